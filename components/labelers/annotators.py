"""Simulated annotators: Bradley-Terry noise on the gold score.

An annotator shown completions a and b prefers a with probability

    P(a > b) = sigmoid((gold(a) - gold(b)) / tau)

The temperature tau is calibrated on the pairs at hand so that two annotators, labelling the same
pair independently, agree with each other with probability `target_agreement`:

    agreement(pair) = p^2 + (1 - p)^2,   p = sigmoid(|gold(a) - gold(b)| / tau)

InstructGPT's 72.6% (Ouyang et al. 2022, section 5.1) and AlpacaFarm's ~65% (Dubois et al. 2023)
are agreements between two labellers, not with a gold ordering: calibrating p itself to 72.6%
would make two of our annotators agree only ~60% of the time. `calibrate_to="gold"` keeps that
variant (the agreement of one label with the gold ordering, p).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Literal

from components.data.records import PreferencePair, Sample


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


Agreement = Literal["inter_annotator", "gold"]


def _agreement(p: float, between: Agreement) -> float:
    """Probability that two independent labels agree (inter_annotator) or that one label agrees
    with the gold ordering (gold), when each prefers the gold-better completion with probability p."""
    return p * p + (1 - p) * (1 - p) if between == "inter_annotator" else p


def expected_agreement(gold_diffs: list[float], tau: float, between: Agreement = "inter_annotator") -> float:
    """Mean agreement over the pairs (a tie has p = 1/2)."""
    return sum(_agreement(_sigmoid(abs(d) / tau), between) for d in gold_diffs) / len(gold_diffs)


def calibrate_tau(
    gold_diffs: list[float], target: float, between: Agreement = "inter_annotator", iterations: int = 60
) -> float:
    """The tau at which expected_agreement equals `target`, by bisection in log space.

    Agreement falls monotonically from its noiseless value at tau -> 0 (1 for every untied pair,
    1/2 for a tie) to 1/2 at tau -> inf; a target outside that range is an error.
    """
    noiseless = sum(0.5 if d == 0 else 1.0 for d in gold_diffs) / len(gold_diffs)
    if not 0.5 < target < noiseless:
        raise ValueError(
            f"annotators.target_agreement={target} is unreachable: {between} agreement on these "
            f"{len(gold_diffs)} pairs lies strictly between 0.5 and {noiseless:.4f}"
        )
    low, high = 1e-4, 1e4
    for _ in range(iterations):
        mid = math.sqrt(low * high)
        if expected_agreement(gold_diffs, mid, between) > target:
            low = mid
        else:
            high = mid
    return math.sqrt(low * high)


@dataclass(frozen=True)
class GoldScored:
    prompt: str
    completion: str
    gold: float


def label(
    samples_by_prompt: dict[str, list[GoldScored]], n_annotators: int, target_agreement: float, seed: int,
    calibrate_to: Agreement = "inter_annotator",
):
    """Label every pair of distinct completions of each prompt (K(K-1)/2 pairs, as InstructGPT).

    Returns (labels, stats) with stats holding tau, the expected agreement between two annotators
    and with gold, and the realised agreement with gold.
    """
    rng = random.Random(seed)
    # identical completions are one item: pairing each copy would label the same pair twice
    distinct = {prompt: list({s.completion: s for s in samples}.values()) for prompt, samples in samples_by_prompt.items()}
    pairs = [(prompt, a, b) for prompt, samples in distinct.items() for a, b in combinations(samples, 2)]
    if not pairs:
        raise ValueError("no pair of distinct completions to label")
    diffs = [a.gold - b.gold for _, a, b in pairs]
    tau = calibrate_tau(diffs, target_agreement, calibrate_to)
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
        "expected_inter_annotator_agreement": expected_agreement(diffs, tau, "inter_annotator"),
        "expected_agreement_with_gold": expected_agreement(diffs, tau, "gold"),
        "agreement_with_gold": sum(l.meta["agrees_with_gold"] for l in labels) / len(labels),
        "pairs": len(labels),
    }
    return labels, stats


class SimulatedAnnotators:
    """The `simulated` labeler: every pair of distinct answers to a prompt, labelled by `label`
    with the task's gold scorer."""

    needs_samples = True

    def __init__(
        self, gold_reward: Callable[[str, str, bool], float], n_annotators: int, target_agreement: float,
        calibrate_to: Agreement = "inter_annotator",
    ):
        self.gold_reward, self.n_annotators = gold_reward, n_annotators
        self.target_agreement, self.calibrate_to = target_agreement, calibrate_to

    @classmethod
    def from_context(cls, context) -> "SimulatedAnnotators":
        if context.gold is None:
            from components.labelers import LabelingError

            raise LabelingError("the simulated annotators need a task with a gold scorer (task.name=world)")
        settings = context.cfg.annotators
        return cls(context.gold, settings.n_annotators, settings.target_agreement, settings.calibrate_to)

    def label(self, samples: list[Sample], seed: int) -> tuple[list[PreferencePair], dict]:
        by_prompt: dict[str, list[GoldScored]] = {}
        for s in samples:
            score = self.gold_reward(s.prompt, s.completion, s.ended_with_eos)
            by_prompt.setdefault(s.prompt, []).append(GoldScored(s.prompt, s.completion, score))
        return label(by_prompt, self.n_annotators, self.target_agreement, seed, self.calibrate_to)
