"""The `human` labeler: people rank, rate or compare K completions of a prompt in the Prefect UI.

This is the library half (no Prefect): the items of a labeling session, the check of a submitted
answer, its conversion to preference pairs with the preference layer (a ranking gives all K(K-1)/2
pairs, ratings the pairs of components/data/preferences.py's `rated_pairs`, a pairwise choice one
pair), and the session folder:

    SESSION/items.jsonl    the prompts and their K completions, written once, so a resumed session
                           asks about the same items
    SESSION/labels.jsonl   one line per submitted item (annotator, answer, unsafe/skip flag)
    SESSION/pairs.jsonl    the pairs of every submitted item

Both are appended and fsynced as each answer arrives, so a killed worker loses nothing submitted,
and a session run again skips the items already answered. How a question reaches a person is the
`Asker` that `use` installs: flows/labeling.py pauses the flow run on a form (`pause_flow_run`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from components.data.preferences import ranked_pairs, rated_pairs
from components.data.rows import Ranked, Rated
from components.data.records import PreferencePair, Sample
from components.files import read_jsonl, write_jsonl
from components.labelers import LabelingContext, LabelingError

MODES = ("ranking", "ratings", "pairwise")


@dataclass(frozen=True)
class Item:
    """One question of a session: a prompt and the completions shown (K, or 2 when pairwise)."""

    index: int
    prompt: str
    completions: tuple[str, ...]


# (item, mode, why the previous answer was refused or None, timeout in seconds) -> the answer, or
# None when nobody answered in time
Asker = Callable[[Item, str, str | None, int], dict[str, Any] | None]


def _no_asker(item: Item, mode: str, error: str | None, timeout_s: int) -> dict[str, Any] | None:
    raise LabelingError(
        "the human labeler asks in the Prefect UI: run the pipeline from its deployment, or label a session "
        "with the rlhf-label/human deployment and use its pairs.jsonl as data.source"
    )


_asker: list[Asker] = [_no_asker]


def use(asker: Asker) -> None:
    """Install how questions reach people (flows/labeling.py installs the Prefect UI form)."""
    _asker[0] = asker


def items_of(samples: list[Sample], mode: str, size: int) -> list[Item]:
    """At most `size` items from samples grouped by prompt, in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for sample in samples:
        groups.setdefault(sample.prompt, []).append(sample.completion)
    shown = 2 if mode == "pairwise" else None
    return [
        Item(index, prompt, tuple(completions[:shown]))
        for index, (prompt, completions) in enumerate(list(groups.items())[:size])
    ]


def check(item: Item, mode: str, answer: dict[str, Any]) -> str | None:
    """Why `answer` is not a valid label of `item` (one line), or None when it is.

    ranking: completion numbers 1..K, best first, each once; ratings: one 1-5 integer per
    completion; pairwise: choice 1 or 2. An answer flagged unsafe/skip needs only the name.
    """
    k = len(item.completions)
    if not str(answer.get("annotator") or "").strip():
        return "the annotator's name is empty"
    if answer.get("unsafe_or_skip"):
        return None
    if mode == "ranking":
        ranking = answer.get("ranking") or []
        if sorted(ranking) != list(range(1, k + 1)):
            return f"ranking {ranking} is not an order of the completions 1..{k}, each named once, best first"
    elif mode == "ratings":
        ratings = answer.get("ratings") or []
        if len(ratings) != k or any(not isinstance(r, int) or not 1 <= r <= 5 for r in ratings):
            return f"ratings {ratings} must be {k} whole numbers from 1 to 5, one per completion"
    elif answer.get("choice") not in (1, 2):
        return f"choice {answer.get('choice')} must be 1 or 2"
    return None


def to_pairs(item: Item, mode: str, answer: dict[str, Any], source: str) -> list[PreferencePair]:
    """The preference pairs of a checked answer (none when flagged unsafe/skip)."""
    if answer.get("unsafe_or_skip"):
        return []
    annotator = answer["annotator"].strip()
    if mode == "ranking":
        rank = {number - 1: position for position, number in enumerate(answer["ranking"])}
        record = Ranked(item.prompt, item.completions, tuple(rank[i] for i in range(len(item.completions))), annotator, source)
        return ranked_pairs(record)
    if mode == "ratings":
        return rated_pairs([
            Rated(item.prompt, completion, rating, annotator, source)
            for completion, rating in zip(item.completions, answer["ratings"])
        ])
    better, worse = (0, 1) if answer["choice"] == 1 else (1, 0)
    return [PreferencePair(item.prompt, item.completions[better], item.completions[worse], annotator=annotator, source=source)]


def _append(path: Path, rows: list[dict]) -> None:
    """Append rows and fsync before returning: what a person submitted survives a kill."""
    with open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


class Session:
    """A labeling session in `folder`: its items, and the answers and pairs written so far."""

    def __init__(self, folder: str | Path, mode: str, timeout_s: int):
        self.folder, self.mode, self.timeout_s = Path(folder), mode, timeout_s
        self.items_file, self.labels_file, self.pairs_file = (
            self.folder / name for name in ("items.jsonl", "labels.jsonl", "pairs.jsonl")
        )

    def items(self, fresh: Callable[[], list[Item]]) -> list[Item]:
        """The session's items: those written when it started, else `fresh()` (then written)."""
        if not self.items_file.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            write_jsonl(self.items_file, [{"index": i.index, "prompt": i.prompt, "completions": list(i.completions)}
                                          for i in fresh()])
        return [Item(row["index"], row["prompt"], tuple(row["completions"])) for row in read_jsonl(self.items_file)]

    def labels(self) -> list[dict]:
        return read_jsonl(self.labels_file) if self.labels_file.is_file() else []

    def pairs(self) -> list[PreferencePair]:
        return [PreferencePair.from_row(row) for row in read_jsonl(self.pairs_file)] if self.pairs_file.is_file() else []

    def run(self, items: list[Item], ask: Asker | None = None) -> dict[str, float]:
        """Ask about every item not answered yet, until all are or a question times out; each valid
        answer is written at once, a refused one is asked again with the reason. Returns counts."""
        ask = ask or _asker[0]
        self.folder.mkdir(parents=True, exist_ok=True)
        answered = {row["item"] for row in self.labels()}
        timed_out = False
        for item in (item for item in items if item.index not in answered):
            error = None
            while True:
                answer = ask(item, self.mode, error, self.timeout_s)
                if answer is None:
                    timed_out = True
                    break
                error = check(item, self.mode, answer)
                if error is None:
                    break
            if timed_out:
                break
            pairs = to_pairs(item, self.mode, answer, f"human:{self.folder.name}")
            _append(self.labels_file, [{"item": item.index, "mode": self.mode, "prompt": item.prompt, **answer}])
            _append(self.pairs_file, [pair.to_row() for pair in pairs])
        labels = self.labels()
        return {
            "human/items": len(items),
            "human/answered": len(labels),
            "human/skipped": sum(bool(row.get("unsafe_or_skip")) for row in labels),
            "human/pairs": len(self.pairs()),
            "human/timed_out": float(timed_out),
        }


class HumanLabeler:
    """Labels fresh samples (the label stage's or an online round's) through a session under the
    preference folder, one item per prompt, at most `human.session_size` of them."""

    needs_samples = True

    def __init__(self, cfg, out: Path):
        self.cfg, self.out = cfg, Path(out)

    @classmethod
    def from_context(cls, context: LabelingContext) -> "HumanLabeler":
        return cls(context.cfg, context.out)

    def label(self, samples: list[Sample], seed: int) -> tuple[list[PreferencePair], dict[str, float]]:
        session = Session(self.out / "human" / f"seed-{seed}", self.cfg.human.mode, self.cfg.human.timeout_s)
        items = session.items(lambda: items_of(samples, self.cfg.human.mode, self.cfg.human.session_size))
        stats = session.run(items)
        return session.pairs(), stats
