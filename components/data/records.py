"""The one preference record: every labeler writes it, every trainer reads it, and the pairs file
(`data/preferences/pairs.jsonl`, `rlhf data ingest`'s pairs.jsonl) holds one per line."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any


def pair_id(prompt: str, a: str, b: str) -> str:
    """Stable id of an unordered pair of responses to one prompt: both orientations share it."""
    first, second = sorted((a, b))
    return hashlib.sha256("\x1f".join((prompt, first, second)).encode()).hexdigest()[:16]


def prompt_group(prompt: str) -> str:
    """Digest of a prompt: all pairs of one prompt share it."""
    return hashlib.sha256(json.dumps([prompt]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PreferencePair:
    """`chosen` is the better response to `prompt`; for a tie (`tie=True`) only the order seen.

    `margin` says how much better (a rating difference, or None when unknown); Bradley-Terry uses
    it with `reward.use_margin`. `meta` holds what a labeler records beside its verdict (agreement
    with the gold ordering, a judge's principle and rationale, ...).
    """

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    tie: bool = False
    annotator: str | None = None  # several, comma-separated, once labels are aggregated
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    pair_id: str = field(init=False)
    group: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pair_id", pair_id(self.prompt, self.chosen, self.rejected))
        object.__setattr__(self, "group", prompt_group(self.prompt))

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "PreferencePair":
        """A row of a pairs file (fields missing from older files take their defaults)."""
        given = {name: row[name] for name in INIT_FIELDS if name in row and row[name] is not None}
        return cls(**given)


PAIR_FIELDS = tuple(f.name for f in fields(PreferencePair))
INIT_FIELDS = tuple(f.name for f in fields(PreferencePair) if f.init)


@dataclass(frozen=True)
class Sample:
    """A policy's answer to a prompt, as the collect stage and online rounds hand it to a labeler."""

    prompt: str
    completion: str
    ended_with_eos: bool
