"""RLAIF agreement: how often the `ai` labeler (an LLM judge under a constitution, both orders)
agrees with human labels, or with the review world's gold scorer.

    python -m benchmarks.rlaif_agreement --base-url http://127.0.0.1:8000/v1 --model M --data hh [--pairs N] [--minutes T]

- `hh`: the HH-RLHF harmless pairs of ../shared/data/hh-rlhf/ (Bai et al. 2022): the transcript
  up to the last assistant turn, the human-chosen and the rejected reply; the default constitution;
- `world`: two reviews of the same film from the embedded review world, the continuation of one
  review's first words and the continuation of another's; recipes/constitution-reviews.yaml; the
  gold scorer's ordering stands for the human label.

Pairs are judged in chunks of 10, in a seeded order, until `--pairs` or `--minutes` is reached (the
judge's cache makes a rerun free). One JSON line: pairs judged, the share the judge decided (both
orders agreeing), agreement with the reference among decided pairs and over all pairs (ties and
unparsable pairs counting one half), position consistency, the judge's calls and tokens, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from benchmarks.hh_reward import DATA, hh_pairs
from components.config import load_config
from components.data.records import Sample
from components.labelers import LabelingContext
from components.labelers.ai import AIFeedback
from components.world import generate_reviews, gold

REPO = Path(__file__).resolve().parents[1]
CHUNK = 10


def hh_references() -> tuple[list[tuple[str, str, str]], None]:
    return [(p.prompt, p.chosen, p.rejected) for p in hh_pairs(DATA)], None


def world_references() -> tuple[list[tuple[str, str, str]], str]:
    """(prompt, better, worse) by the gold scorer, from two reviews of one film."""
    by_title: dict[str, list] = {}
    for review in generate_reviews(6000, 0.1, 0.3, seed=0):
        by_title.setdefault(review.title, []).append(review)
    triples = []
    for reviews in by_title.values():
        for a, b in zip(reviews[::2], reviews[1::2]):
            prompt, first, second = a.prompt(3), a.completion(3), b.completion(3)
            if gold.gold_reward(prompt, first) != gold.gold_reward(prompt, second):
                better, worse = sorted((first, second), key=lambda c: -gold.gold_reward(prompt, c))
                triples.append((prompt, better, worse))
    return triples, str(REPO / "recipes" / "constitution-reviews.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", choices=["hh", "world"], default="hh")
    parser.add_argument("--pairs", type=int, default=None, help="at most this many pairs (default: all)")
    parser.add_argument("--minutes", type=float, default=14.0, help="stop starting chunks after this long")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    triples, constitution = hh_references() if args.data == "hh" else world_references()
    available = len(triples)
    random.Random(0).shuffle(triples)
    triples = triples[: args.pairs]
    cfg = load_config(REPO / "params.yaml", [f"judge.base_url={args.base_url}", f"judge.model={args.model}",
                                             *([f"rlaif.constitution={constitution}"] if constitution else []),
                                             *args.overrides])
    better = {(prompt, chosen) for prompt, chosen, _ in triples}
    reference = lambda prompt, completion, eos: float((prompt, completion) in better)  # noqa: E731
    labeler = AIFeedback.from_context(LabelingContext(cfg, reference, Path(tempfile.mkdtemp()),
                                                      os.environ.get(cfg.judge.api_key_env)))
    start, pairs = time.monotonic(), []
    for index in range(0, len(triples), CHUNK):
        if time.monotonic() - start > args.minutes * 60:
            break
        chunk = triples[index: index + CHUNK]
        samples = [Sample(p, c, True) for prompt, chosen, rejected in chunk for p, c in ((prompt, chosen), (prompt, rejected))]
        labelled, _ = labeler.label(samples, seed=index)
        pairs += labelled
    decided = [p.meta["agrees_with_gold"] for p in pairs if "agrees_with_gold" in p.meta]
    consistent = [p.meta["consistent"] for p in pairs if p.meta["consistent"] is not None]
    stats = labeler.client.stats.as_dict()
    print(json.dumps({
        "data": args.data, "judge": args.model, "pairs": len(pairs), "available": available,
        "decided_share": len(decided) / max(1, len(pairs)),
        "agreement_decided": sum(decided) / len(decided) if decided else None,
        "agreement_all_ties_half": (sum(decided) + 0.5 * (len(pairs) - len(decided))) / max(1, len(pairs)),
        "position_consistency": sum(consistent) / len(consistent) if consistent else None,
        "unparsable": sum(p.meta["preferred"] == "unparsable" for p in pairs),
        **{key: stats[key] for key in ("calls", "cache_hits", "prompt_tokens", "completion_tokens")},
        "seconds": round(time.monotonic() - start, 1),
    }))


if __name__ == "__main__":
    main()
