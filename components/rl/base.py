"""What every RL method receives and returns (components/rl/__init__.py registers them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from components.data.records import PreferencePair
from components.models.training import MetricsLogger, no_logging
from components.sections import SamplingConfig

if TYPE_CHECKING:
    from components.trainers.sft import Demonstration


def no_probe(step: int, total: int) -> None:
    pass


@dataclass
class RLInputs:
    """One round of an RL method: it trains `policy` (in place where it can) and returns
    `(policy, metrics)`, the policy being the same object unless the method had to replace it.

    - `reference`: the frozen reference policy; None when `policy` carries LoRA adapters, whose
      base model with the adapters off is the reference (components/rl/rollout.reference);
    - `reward`: a reward source (components/rewards/): `scores` and `normalised` of a rollout;
    - `prompts`: training prompts; `pairs`: the preference set so far (offline methods train on it);
    - `config`: the method's own section (None for a method registered without one);
    - `log(metrics, step)` records per-step metrics; `probe(step, total)` is called after each
      step so the stage can measure the KL-reward frontier;
    - `checkpoint_dir`: where a method that checkpoints keeps the state a killed run resumes from;
    - `max_length`: the context offline pair losses truncate to;
    - `demonstrations`: the SFT stage's demonstrations, the original supervised data (ReST joins
      them to each Grow set);
    - `labeler`: the pipeline's labeler (`label.labeler`, components/labelers/) for a method that
      labels its own samples (online DPO with `labeler: label`); None when no method asked for it.
    """

    policy: Any
    reference: Any
    reward: Any
    tokenizer: Any
    prompts: list[str]
    pairs: list[PreferencePair]
    config: Any
    sampling: SamplingConfig
    seed: int
    log: MetricsLogger = no_logging
    checkpoint_dir: Path | None = None
    probe: Callable[[int, int], None] = field(default=no_probe)
    max_length: int = 1024
    demonstrations: list[Demonstration] = field(default_factory=list)
    labeler: Any = None


TrainFn = Callable[[RLInputs], tuple[Any, dict]]


@dataclass(frozen=True)
class RLMethod:
    """A registered method: its `train`, and the configuration section it reads (a field of
    PipelineConfig named `section`, of type `config`), if any."""

    name: str
    train: TrainFn
    section: str | None = None
    config: type | None = None
