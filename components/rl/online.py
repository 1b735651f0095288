"""Online rounds (Christiano et al. 2017): RL in rounds, with fresh feedback between them.

Round r trains the policy with the configured method; after every round but the last, the current
policy answers sampled training prompts K times, the configured labeler labels the answers, the
new pairs join the preference set (offline methods such as DPO train on them) and a trainable
reward source (a reward model) is trained further on them. Nothing here knows a method or a
labeler by name. The method runs on the accelerator (components/rl/rollout.py, `on_accelerator`).

Each finished round is saved whole (written to a temporary folder, then renamed), so a killed run
resumes in the round it was in; a method that checkpoints (PPO, P3O) also resumes inside it, from
`checkpoint_dir/round-R`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_model, save_model

from components.data.records import PreferencePair
from components.files import read_jsonl, write_jsonl
from components.models import lm
from components.rl.base import RLInputs, RLMethod
from components.rl.rollout import on_accelerator
from components.sections import RewardConfig, SamplingConfig

ROUND_STEPS = 10_000  # MLflow and frontier steps of round r start at r * ROUND_STEPS, so they keep increasing


@dataclass
class Feedback:
    """Where a round's fresh labels come from: `labeler` labels `k` answers to each of
    `n_prompts` training prompts; `reward_cfg` trains a trainable reward source on them."""

    labeler: object
    n_prompts: int
    k: int
    sampling: SamplingConfig
    reward_cfg: RewardConfig


def fresh_pairs(policy, tokenizer, prompts: list[str], feedback: Feedback, seed: int):
    """The current policy's answers, labelled: (pairs, labeler stats)."""
    chosen = random.Random(seed).sample(prompts, k=min(feedback.n_prompts, len(prompts)))
    repeated = [prompt for prompt in chosen for _ in range(feedback.k)]
    return feedback.labeler.label(lm.samples_to_label(policy, tokenizer, repeated, feedback.sampling, seed), seed)


def _save_round(folder: Path, round_: int, run: RLInputs, policy, pairs: list[PreferencePair], stats: dict) -> None:
    partial = folder / "partial-round"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_model(policy, str(partial / "policy.safetensors"))
    if run.reward.trainable:
        run.reward.save_state(partial)
    write_jsonl(partial / "pairs.jsonl", [pair.to_row() for pair in pairs])
    (partial / "round.json").write_text(json.dumps({"done": round_ + 1, "stats": stats}))
    os.replace(partial, folder / f"after-round-{round_:03d}")


def _restore(folder: Path, run: RLInputs):
    """(rounds done, stats, policy, pairs) of the last finished round, or of none."""
    finished = sorted(folder.glob("after-round-*"))  # written whole, then renamed: complete or absent
    if not finished:
        return 0, {}, run.policy, run.pairs
    state = finished[-1]
    progress = json.loads((state / "round.json").read_text())
    load_model(run.policy, str(state / "policy.safetensors"))
    if run.reward.trainable:
        run.reward.load_state(state)
    pairs = [PreferencePair.from_row(row) for row in read_jsonl(state / "pairs.jsonl")]
    return progress["done"], progress["stats"], run.policy, pairs


def train_rounds(
    method: RLMethod, run: RLInputs, rounds: int, feedback: Feedback | None, folder: Path,
    probe_for: Callable[[int, torch.nn.Module], Callable[[int, int], None]],
) -> tuple[torch.nn.Module, dict]:
    """`rounds` rounds of `method` starting from `run` (its policy, reward source and pairs);
    returns the final policy and the last round's metrics with every round's labeling stats.

    `probe_for(round, policy)` gives the frontier probe of a round that trains `policy` (steps
    counted within the round);
    `feedback` may be None only for a single round.
    """
    if rounds > 1 and feedback is None:
        raise ValueError("online rounds need a labeler that can label fresh samples")
    done, round_stats, policy, pairs = _restore(folder, run)
    metrics: dict = {}
    for round_ in range(done, rounds):
        offset = round_ * ROUND_STEPS
        probe = probe_for(round_, policy)
        round_run = replace(
            run, policy=policy, pairs=pairs, seed=run.seed + round_, probe=probe,
            log=lambda values, step, offset=offset: run.log(values, offset + step),
            checkpoint_dir=folder / f"round-{round_}",
        )
        # the method alone: the reward model's update below trains in the reward section's precision
        with on_accelerator(round_run):
            if round_ == 0:
                probe(0, 1)
            policy, metrics = method.train(round_run)
        if round_ + 1 < rounds:
            fresh, stats = fresh_pairs(policy, run.tokenizer, run.prompts, feedback, run.seed + round_ + 1)
            pairs = pairs + fresh
            if run.reward.trainable:
                run.reward.update(fresh, feedback.reward_cfg, run.seed + round_ + 1)
            round_stats.update({f"round{round_ + 1}_{key}": value for key, value in stats.items()})
            _save_round(folder, round_, run, policy, pairs, round_stats)
    return policy, {**metrics, **round_stats}
