"""Reward sources: what the RL methods optimise and what evaluation calls the proxy reward.

A reward source scores a rollout (components/models/lm.Rollout: prompts, sampled responses and
their tokens) with `scores` (raw r(x, y) per row) and `normalised` (what the policy optimises).
The reward stage writes `models/reward/`, with `reward_source.json` saying which source it is:

- a trained reward model (components/trainers/reward_model.py): on the SFT backbone it scores the
  rollout's own tokens; on another backbone (an encoder such as MiniLM, another tokenizer) it
  scores the decoded text. Trainable: online rounds update it on fresh labels;
- a programmatic reward, `reward.function: module:callable` scoring (prompt, response), e.g. unit
  tests run on generated code (CodeRL) or a length or format rule;
- a reference-based metric of the task's references: rouge_l, bleu or bertscore
  (components/rewards/reference.py), as RL4LMs offers.

A task's gold scorer is not a reward source: it only evaluates (components/tasks/).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable, Protocol

import torch
from safetensors.torch import load_model, save_model

from components.models.lm import Rollout
from components.trainers import reward_model

SPEC_FILE = "reward_source.json"
NORMALISATION = ("reward_mean", "reward_std")  # set by reward_model.train, kept in the model's config


class RewardSource(Protocol):
    trainable: bool

    def scores(self, rollout: Rollout) -> torch.Tensor: ...

    def normalised(self, rollout: Rollout) -> torch.Tensor: ...


class RewardModel:
    """A reward model with a scalar head; `text=True` when it has its own tokenizer and scores
    the decoded text rather than the policy's tokens."""

    trainable = True

    def __init__(self, model, tokenizer, text: bool = False):
        self.model, self.tokenizer, self.text = model, tokenizer, text

    @torch.no_grad()
    def scores(self, rollout: Rollout) -> torch.Tensor:
        if self.text:
            return reward_model.score_texts(self.model, self.tokenizer, rollout.prompts, rollout.completions).cpu()
        return reward_model.scores(self.model, rollout).cpu()

    def normalised(self, rollout: Rollout) -> torch.Tensor:
        config = self.model.config
        return (self.scores(rollout) - config.reward_mean) / config.reward_std

    def update(self, pairs, cfg, seed: int) -> dict:
        """Train further on fresh pairs (an online round)."""
        metrics = reward_model.train(self.model.requires_grad_(True), self.tokenizer, pairs, cfg, seed)
        self.model.requires_grad_(False).eval()  # no dropout when it scores again
        return metrics

    def save_state(self, folder: Path) -> None:
        """The weights and the normalisation statistics an update changed (an online round's state)."""
        save_model(self.model, str(Path(folder) / "reward.safetensors"))
        stats = {key: getattr(self.model.config, key) for key in NORMALISATION}
        (Path(folder) / "reward_normalisation.json").write_text(json.dumps(stats))

    def load_state(self, folder: Path) -> None:
        load_model(self.model, str(Path(folder) / "reward.safetensors"))
        for key, value in json.loads((Path(folder) / "reward_normalisation.json").read_text()).items():
            setattr(self.model.config, key, value)

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(str(folder), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder))
        (Path(folder) / SPEC_FILE).write_text(json.dumps({"kind": "model", "text": self.text}))


class FunctionReward:
    """r(x, y) = fn(prompt, response): a programmatic reward, optimised as it is (not normalised)."""

    trainable = False

    def __init__(self, fn: Callable[[str, str], float], spec: str):
        self.fn, self.spec = fn, spec

    def scores(self, rollout: Rollout) -> torch.Tensor:
        return torch.tensor([float(self.fn(p, c)) for p, c in zip(rollout.prompts, rollout.completions)])

    def normalised(self, rollout: Rollout) -> torch.Tensor:
        return self.scores(rollout)


def save_function_spec(folder: Path, spec: str) -> None:
    """What the reward stage writes for a programmatic reward: its name, loaded again by `load`."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / SPEC_FILE).write_text(json.dumps({"kind": "function", "function": spec}))


def import_callable(spec: str) -> Callable:
    """`package.module:name` -> the object; a clear ValueError when it cannot be found."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"reward.function: expected 'module:callable', got '{spec}'")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward.function: cannot import '{spec}': {error}") from None
    if not callable(target):
        raise ValueError(f"reward.function: '{spec}' is not callable")
    return target


def function_reward(spec: str, references: dict[str, str]) -> FunctionReward:
    """The programmatic reward `spec` names: a reference metric or `module:callable`."""
    from components.rewards import reference

    if spec in reference.METRICS:
        if not references:
            raise ValueError(f"reward.function: {spec} compares responses with references, and the task has none")
        return FunctionReward(reference.against(references, reference.METRICS[spec]), spec)
    return FunctionReward(import_callable(spec), spec)


def load(folder: str | Path, policy_tokenizer, references: dict[str, str] | None = None) -> RewardSource:
    """The reward source the reward stage wrote to `folder`. A reward model on the policy's own
    backbone scores with `policy_tokenizer` (the rollout's tokens); references feed reference metrics."""
    folder = Path(folder)
    spec = json.loads((folder / SPEC_FILE).read_text()) if (folder / SPEC_FILE).is_file() else {"kind": "model"}
    if spec["kind"] == "function":
        return function_reward(spec["function"], references or {})
    if spec.get("text"):
        model, tokenizer = reward_model.load_with_tokenizer(folder)
        return RewardModel(model.eval().requires_grad_(False), tokenizer, text=True)
    return RewardModel(reward_model.load(folder).eval().requires_grad_(False), policy_tokenizer)
