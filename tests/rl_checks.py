"""Checks that every RL method's tests share: the policy's samples score higher after training, and
a crashed run resumes to the weights and metrics of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from components.rl.rollout import generate, score
from components.sections import SamplingConfig

SAMPLING = SamplingConfig(max_new_tokens=8, batch_size=64)


def calibrate(reward, policy, tokenizer, prompts) -> None:
    """Normalise the tiny reward model to mean 0 and std 1 on the initial policy's samples, as
    stage 'reward' normalises a reward model on its data: its raw scores barely vary."""
    torch.manual_seed(7)
    with torch.no_grad():
        raw = reward.scores(generate(policy, tokenizer, prompts, 4, SAMPLING)).float()
    reward.model.config.reward_mean, reward.model.config.reward_std = float(raw.mean()), float(raw.std())


def mean_score(policy, reward, tokenizer, prompts, seed: int) -> float:
    """The mean normalised score of 8 samples of the policy for each prompt (a fixed sampling seed)."""
    torch.manual_seed(seed)
    return float(score(reward, generate(policy, tokenizer, prompts, 8, SAMPLING), 0.0).mean())


def crash_and_resume(run: Callable, folder: Path, crash_step: int):
    """`run(checkpoint_dir, log)` once uninterrupted, once crashed (KeyboardInterrupt) as iteration
    `crash_step` logs, then again in the crashed run's folder, as a fresh process would (the caller's
    `run` starts from the initial weights each time). Checks that only the checkpoint of the crashed
    iteration is left and that the rerun starts there; returns the uninterrupted and the resumed
    `(policy, metrics)`."""
    whole = run(folder / "whole", lambda metrics, step: None)

    def crash(metrics, step):
        if step == crash_step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(folder / "crashed", crash)
    assert [p.name for p in (folder / "crashed").glob("step-*")] == [f"step-{crash_step:08d}"]
    steps: list[int] = []
    resumed = run(folder / "crashed", lambda metrics, step: steps.append(step))
    assert steps[0] == crash_step  # resumed at the checkpoint, not from the start
    return whole, resumed


def assert_same_weights(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    for (name, weight), (_, value) in zip(model.named_parameters(), expected.named_parameters()):
        torch.testing.assert_close(weight, value, rtol=0, atol=1e-6, msg=name)


def assert_same_checkpointed(folder: Path, step: int, models: tuple[str, ...]) -> None:
    """The models (critic, mask policy, ...) the crashed and the whole run checkpointed at `step` are equal."""
    for model in models:
        saved = load_file(folder / "crashed" / f"step-{step:08d}" / f"{model}.safetensors")
        expected = load_file(folder / "whole" / f"step-{step:08d}" / f"{model}.safetensors")
        for name, weight in saved.items():
            torch.testing.assert_close(weight, expected[name], rtol=0, atol=1e-6, msg=f"{model}.{name}")
