"""Simulated annotators: Bradley-Terry noise on the gold score.

An annotator shown completions a and b prefers a with probability

    P(a > b) = sigmoid((gold(a) - gold(b)) / tau)

The temperature tau is calibrated on the pairs at hand so that the expected agreement with the
gold ordering equals `target_agreement`: InstructGPT reports 72.6% inter-annotator agreement among
its labellers and AlpacaFarm tunes its simulated annotators to the same human-like level.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import combinations
from typing import Callable

from components.data.records import PreferencePair, Sample


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def expected_agreement(gold_diffs: list[float], tau: float) -> float:
    """Mean probability that a label agrees with the gold ordering (ties count one half)."""
    return sum(_sigmoid(abs(d) / tau) for d in gold_diffs) / len(gold_diffs)


def calibrate_tau(gold_diffs: list[float], target: float, iterations: int = 60) -> float:
    """The tau at which expected_agreement equals `target`, by bisection in log space.

    Agreement falls monotonically from its noiseless value at tau -> 0 to 0.5 at tau -> inf.
    """
    low, high = 1e-4, 1e4
    for _ in range(iterations):
        mid = math.sqrt(low * high)
        if expected_agreement(gold_diffs, mid) > target:
            low = mid
        else:
            high = mid
    return math.sqrt(low * high)


@dataclass(frozen=True)
class GoldScored:
    prompt: str
    completion: str
    gold: float


def label(samples_by_prompt: dict[str, list[GoldScored]], n_annotators: int, target_agreement: float, seed: int):
    """Label every pair of distinct completions of each prompt (K(K-1)/2 pairs, as InstructGPT).

    Returns (labels, stats) with stats holding tau, the expected and the realised agreement.
    """
    rng = random.Random(seed)
    # identical completions are one item: pairing each copy would label the same pair twice
    distinct = {prompt: list({s.completion: s for s in samples}.values()) for prompt, samples in samples_by_prompt.items()}
    pairs = [(prompt, a, b) for prompt, samples in distinct.items() for a, b in combinations(samples, 2)]
    if not pairs:
        raise ValueError("no pair of distinct completions to label")
    diffs = [a.gold - b.gold for _, a, b in pairs]
    tau = calibrate_tau(diffs, target_agreement)
    labels = []
    for prompt, a, b in pairs:
        a_wins = rng.random() < _sigmoid((a.gold - b.gold) / tau)
        chosen, rejected = (a, b) if a_wins else (b, a)
        agrees = 0.5 if a.gold == b.gold else float(chosen.gold > rejected.gold)
        annotator = f"simulated-{rng.randrange(n_annotators)}"
        labels.append(
            PreferencePair(
                prompt, chosen.completion, rejected.completion, annotator=annotator, source="simulated",
                meta={"agrees_with_gold": agrees},
            )
        )
    stats = {
        "tau": tau,
        "expected_agreement": expected_agreement(diffs, tau),
        "agreement_with_gold": sum(l.meta["agrees_with_gold"] for l in labels) / len(labels),
        "pairs": len(labels),
    }
    return labels, stats


class SimulatedAnnotators:
    """The `simulated` labeler: every pair of distinct answers to a prompt, labelled by `label`
    with the task's gold scorer."""

    needs_samples = True

    def __init__(self, gold_reward: Callable[[str, str, bool], float], n_annotators: int, target_agreement: float):
        self.gold_reward, self.n_annotators, self.target_agreement = gold_reward, n_annotators, target_agreement

    @classmethod
    def from_context(cls, context) -> "SimulatedAnnotators":
        if context.gold is None:
            from components.labelers import LabelingError

            raise LabelingError("the simulated annotators need a task with a gold scorer (task.name=world)")
        settings = context.cfg.annotators
        return cls(context.gold, settings.n_annotators, settings.target_agreement)

    def label(self, samples: list[Sample], seed: int) -> tuple[list[PreferencePair], dict]:
        by_prompt: dict[str, list[GoldScored]] = {}
        for s in samples:
            score = self.gold_reward(s.prompt, s.completion, s.ended_with_eos)
            by_prompt.setdefault(s.prompt, []).append(GoldScored(s.prompt, s.completion, score))
        return label(by_prompt, self.n_annotators, self.target_agreement, seed)
