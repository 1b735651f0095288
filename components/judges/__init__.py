"""LLM judges over any OpenAI-compatible endpoint: pairwise comparisons in both orders, or
pointwise grades (templates.py), asked robustly and cached (client.py).

A pair (instruction, output_1, output_2) is judged twice, output_1 shown first ("12") and second
("21"), because LLM judges favour a position (Zheng et al. 2023). The two verdicts give the
preference for output_1: 1 when both prefer it, 0 when both prefer output_2, 0.5 when both say
tie or when they disagree (an inconsistent pair counts as a tie, as in MT-Bench), and None when
either is unparsable (kept and counted, never dropped). A pointwise judge grades each output
alone; the higher grade wins.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from components.judges.client import Answer, BudgetExceeded, JudgeClient  # noqa: F401  (the package's API)
from components.judges.templates import UNPARSABLE

PREFERENCE = {"1": 1.0, "2": 0.0, "tie": 0.5}


@dataclass(frozen=True)
class Comparison:
    instruction: str
    output_1: str
    output_2: str
    principle: str | None = None  # a constitution's principle, for templates with {principle}


@dataclass
class PairResult:
    comparison: Comparison
    answers: dict[str, Answer]  # by order: "12" and "21" (pairwise), "1" and "2" (pointwise)
    preferred: str  # "1", "2", "tie" or "unparsable"
    consistent: bool | None  # pairwise, both parsed: did both orders agree

    @property
    def preference(self) -> float | None:
        """Share of a win for output_1: 1, 0.5 or 0; None when unparsable."""
        return PREFERENCE.get(self.preferred)


def _preferred_in(order: str, verdict) -> str:
    """Which output a pairwise verdict prefers, given the order the outputs were shown in."""
    if verdict in ("A", "B"):
        return order[0] if verdict == "A" else order[1]
    return verdict  # tie or unparsable


def _fields(comparison: Comparison, order: str, pointwise: bool) -> dict[str, str]:
    outputs = {"1": comparison.output_1, "2": comparison.output_2}
    fields = {"instruction": comparison.instruction}
    if comparison.principle is not None:
        fields["principle"] = comparison.principle
    if pointwise:
        return {**fields, "output": outputs[order]}
    return {**fields, "output_a": outputs[order[0]], "output_b": outputs[order[1]]}


def judge(client: JudgeClient, comparisons: list[Comparison]) -> list[PairResult]:
    """Every comparison judged in both orders (or both outputs graded), `judge.concurrency`
    requests at a time; results in the order of `comparisons`. Raises BudgetExceeded."""
    pointwise = client.template.kind == "pointwise"
    orders = ("1", "2") if pointwise else ("12", "21")
    jobs = [(i, order) for i in range(len(comparisons)) for order in orders]
    with ThreadPoolExecutor(client.cfg.concurrency) as pool:
        answers = list(pool.map(lambda job: client.ask(_fields(comparisons[job[0]], job[1], pointwise), job[1]), jobs))
    results = []
    for i, comparison in enumerate(comparisons):
        by_order = dict(zip(orders, answers[i * 2 : i * 2 + 2]))
        if pointwise:
            first, second = by_order["1"].verdict, by_order["2"].verdict
            preferred = UNPARSABLE if first is None or second is None else (
                "1" if first > second else "2" if first < second else "tie"
            )
            results.append(PairResult(comparison, by_order, preferred, None))
            continue
        views = [_preferred_in(order, answer.verdict) for order, answer in by_order.items()]
        parsed = UNPARSABLE not in views
        preferred = (views[0] if views[0] == views[1] else "tie") if parsed else UNPARSABLE
        results.append(PairResult(comparison, by_order, preferred, views[0] == views[1] if parsed else None))
    return results


def summary_stats(client: JudgeClient, results: list[PairResult]) -> dict[str, float]:
    """What the judge did: requests, retries, cache hits, tokens, and the shares of unparsable
    pairs and of position-consistent ones (among pairs parsed in both orders)."""
    consistent = [r.consistent for r in results if r.consistent is not None]
    stats = {key: float(value) for key, value in client.stats.as_dict().items()}
    stats["pairs"] = float(len(results))
    stats["unparsable_share"] = sum(r.preferred == UNPARSABLE for r in results) / max(1, len(results))
    if consistent:
        stats["position_consistency"] = sum(consistent) / len(consistent)
    return stats


def table(results: list[PairResult]) -> list[dict]:
    """One row per pair and order: the texts shown, the verdict, the raw answer and its tokens."""
    rows = []
    for index, result in enumerate(results):
        for order, answer in result.answers.items():
            rows.append({
                "pair": index, "order": order, "instruction": result.comparison.instruction,
                "output_1": result.comparison.output_1, "output_2": result.comparison.output_2,
                "principle": result.comparison.principle, "verdict": answer.verdict, "p_a": answer.p_a,
                "raw": answer.raw, "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                "cached": answer.cached, "error": answer.error, "preferred": result.preferred,
            })
    return rows
