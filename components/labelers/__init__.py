"""Labelers: samples in, preference records out, with statistics.

A labeler takes the K answers a policy gave to each prompt (`Sample`s, grouped by prompt) and
returns `(pairs, stats)`: `PreferencePair`s (components/data/records.py) and float statistics for
MLflow. The label stage and the online rounds (components/rl/online.py) both use the configured
one (`label.labeler`). Registered here:

- `simulated`: simulated annotators, Bradley-Terry noise on the task's gold scorer
  (components/labelers/annotators.py);
- `file`: an existing preference set (`data.source`, a file or a Hugging Face id), ingested and
  checked row by row (components/data/preferences.py); it cannot label fresh samples;
- `ai`: RLAIF, an LLM judge comparing samples under a constitution's principles
  (components/labelers/ai.py);
- `human`: people ranking, rating or comparing the samples in the Prefect UI, one prompt at a
  time (components/labelers/human.py; the form is flows/labeling.py's).

A new labeler is a module with a factory taking a
`LabelingContext`, and one `register` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from components.data.records import PreferencePair, Sample


class LabelingError(ValueError):
    """Labels could not be produced; the message says why and where."""


class Labeler(Protocol):
    needs_samples: bool  # False: the labels come from elsewhere and the collect stage samples nothing

    def label(self, samples: list[Sample], seed: int) -> tuple[list[PreferencePair], dict[str, float]]: ...


@dataclass(frozen=True)
class LabelingContext:
    """What a labeler may need: the configuration, the task's gold scorer (None when the task has
    none), the folder of the preference set being written (for reports and quarantine), and the
    judge's API key that the pipeline layer read (components/pipeline/judging.py)."""

    cfg: Any
    gold: Callable[[str, str, bool], float] | None
    out: Path
    judge_api_key: str | None = field(default=None, repr=False)  # for the `ai` labeler; never shown


LABELERS: dict[str, Callable[[LabelingContext], Labeler]] = {}


def register(name: str, factory: Callable[[LabelingContext], Labeler]) -> None:
    if name in LABELERS:
        raise ValueError(f"labeler '{name}' is registered already")
    LABELERS[name] = factory


def make(name: str, context: LabelingContext) -> Labeler:
    if name not in LABELERS:
        raise LabelingError(f"unknown labeler '{name}': one of {', '.join(LABELERS)}")
    return LABELERS[name](context)


from components.labelers import ai, annotators, file, human  # noqa: E402  (they import the interface above)

register("simulated", annotators.SimulatedAnnotators.from_context)
register("file", file.FileLabeler.from_context)
register("human", human.HumanLabeler.from_context)
register("ai", ai.AIFeedback.from_context)
