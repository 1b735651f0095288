"""Simulated annotators: Bradley-Terry noise on the gold score.

An annotator shown completions a and b prefers a with probability

    P(a > b) = sigmoid((gold(a) - gold(b)) / tau)

The temperature tau is calibrated on the pairs at hand so that the expected agreement with the
gold ordering equals `target_agreement`: InstructGPT reports 72.6% inter-annotator agreement among
its labellers and AlpacaFarm tunes its simulated annotators to the same human-like level.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass
from itertools import combinations

from components.world import gold


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
class Sample:
    prompt: str
    completion: str
    gold: float


@dataclass(frozen=True)
class Label:
    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    annotator: str
    source: str
    agrees_with_gold: float  # 1, 0, or 0.5 for a gold tie


def pair_id(prompt: str, a: str, b: str) -> str:
    """Stable id of an unordered pair of completions to one prompt."""
    first, second = sorted((a, b))
    return hashlib.sha256("\x1f".join((prompt, first, second)).encode()).hexdigest()[:16]


def label(samples_by_prompt: dict[str, list[Sample]], n_annotators: int, target_agreement: float, seed: int):
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
        labels.append(
            Label(
                pair_id=pair_id(prompt, a.completion, b.completion),
                prompt=prompt,
                chosen=chosen.completion,
                rejected=rejected.completion,
                annotator=f"simulated-{rng.randrange(n_annotators)}",
                source="simulated",
                agrees_with_gold=agrees,
            )
        )
    stats = {
        "tau": tau,
        "expected_agreement": expected_agreement(diffs, tau),
        "agreement_with_gold": sum(l.agrees_with_gold for l in labels) / len(labels),
        "pairs": len(labels),
    }
    return labels, stats


def as_rows(labels: list[Label]) -> list[dict]:
    return [asdict(l) for l in labels]


def label_samples(rows: list[dict], n_annotators: int, target_agreement: float, seed: int) -> tuple[list[dict], dict]:
    """Pair rows and stats for sampled completions (rows with prompt, completion, ended_with_eos)."""
    by_prompt: dict[str, list[Sample]] = {}
    for row in rows:
        score = gold.gold_reward(row["prompt"], row["completion"], row["ended_with_eos"])
        by_prompt.setdefault(row["prompt"], []).append(Sample(row["prompt"], row["completion"], score))
    labels, stats = label(by_prompt, n_annotators, target_agreement, seed)
    return as_rows(labels), stats
