"""The `ai` labeler: RL from AI feedback (Bai et al. 2022; Lee et al. 2023).

Every pair of distinct answers to a prompt (at most `rlaif.max_pairs_per_prompt` of them) goes to
the LLM judge (`judge` section, components/judges/) with one principle of the constitution drawn
at random for it, in both orders. Both orders agreeing give chosen and rejected; disagreeing
orders or a tie give a tie pair; an unparsable verdict gives a tie pair too, marked as such
(trainers skip ties, and the judgment stays on record). Each pair's `meta` holds the principle, the
judge's answers in both orders (its rationale) and the verdicts; with a gold scorer the stats
include the agreement of the decided pairs with the gold ordering.
"""

from __future__ import annotations

import random
import re
from itertools import combinations
from pathlib import Path

import yaml

from components.data.records import PreferencePair, Sample
from components.judges import BudgetExceeded, Comparison, JudgeClient, judge, summary_stats, templates
from components.labelers import LabelingContext, LabelingError

DEFAULT_CONSTITUTION = Path(__file__).with_name("constitution.yaml")
MARKDOWN_ITEM = re.compile(r"^\s*(?:[-*]|\d+[.)])\s+(.+)$", re.MULTILINE)


def load_constitution(path: str | Path | None) -> list[str]:
    """Principles from a YAML list (or a mapping with `principles:`) or a Markdown list (- * or 1.)."""
    path = Path(path or DEFAULT_CONSTITUTION).expanduser()
    if not path.is_file():
        raise LabelingError(f"rlaif.constitution: no such file {path}")
    text = path.read_text()
    if path.suffix in (".md", ".markdown"):
        items = MARKDOWN_ITEM.findall(text)
    else:
        loaded = yaml.safe_load(text)
        items = loaded.get("principles") if isinstance(loaded, dict) else loaded
    principles = [str(item).strip() for item in items or [] if str(item).strip()]
    if not principles:
        raise LabelingError(f"rlaif.constitution: {path} lists no principle")
    return principles


class AIFeedback:
    needs_samples = True

    def __init__(self, client: JudgeClient, principles: list[str], max_pairs_per_prompt: int | None, gold=None):
        self.client, self.principles, self.max_pairs, self.gold = client, principles, max_pairs_per_prompt, gold

    @classmethod
    def from_context(cls, context: LabelingContext) -> "AIFeedback":
        cfg = context.cfg
        try:
            client = JudgeClient(cfg.judge, context.judge_api_key, templates.load(cfg.rlaif.template))
        except ValueError as error:
            raise LabelingError(f"the ai labeler: {error}") from error
        if client.template.kind != "pairwise":
            raise LabelingError(f"the ai labeler compares two answers: rlaif.template {cfg.rlaif.template!r} is pointwise")
        return cls(client, load_constitution(cfg.rlaif.constitution), cfg.rlaif.max_pairs_per_prompt, context.gold)

    def label(self, samples: list[Sample], seed: int) -> tuple[list[PreferencePair], dict[str, float]]:
        rng = random.Random(seed)
        by_prompt: dict[str, dict[str, Sample]] = {}
        for sample in samples:  # identical answers are one item, as for the simulated annotators
            by_prompt.setdefault(sample.prompt, {}).setdefault(sample.completion, sample)
        candidates = []
        for prompt, distinct in by_prompt.items():
            pairs = list(combinations(distinct.values(), 2))
            if self.max_pairs and len(pairs) > self.max_pairs:
                pairs = rng.sample(pairs, self.max_pairs)
            candidates.extend(pairs)
        if not candidates:
            raise LabelingError("no pair of distinct completions to label")
        comparisons = [Comparison(a.prompt, a.completion, b.completion, rng.choice(self.principles)) for a, b in candidates]
        try:
            results = judge(self.client, comparisons)
        except BudgetExceeded as error:
            raise LabelingError(str(error)) from error
        labels, agreements = [], []
        for (a, b), result in zip(candidates, results):
            chosen, rejected = (b, a) if result.preferred == "2" else (a, b)
            meta = {
                "principle": result.comparison.principle,
                "rationale": {order: answer.raw for order, answer in result.answers.items()},
                "verdicts": {order: answer.verdict for order, answer in result.answers.items()},
                "preferred": result.preferred,
                "consistent": result.consistent,
            }
            decided = result.preferred in ("1", "2")
            if decided and self.gold is not None:
                scores = [self.gold(s.prompt, s.completion, s.ended_with_eos) for s in (chosen, rejected)]
                meta["agrees_with_gold"] = 0.5 if scores[0] == scores[1] else float(scores[0] > scores[1])
                agreements.append(meta["agrees_with_gold"])
            labels.append(PreferencePair(
                a.prompt, chosen.completion, rejected.completion, tie=not decided,
                annotator=f"judge:{self.client.cfg.model}", source="ai", meta=meta,
            ))
        stats = summary_stats(self.client, results)
        stats["decided_pairs"] = float(sum(not pair.tie for pair in labels))
        if agreements:
            stats["agreement_with_gold"] = sum(agreements) / len(agreements)
        return labels, stats
