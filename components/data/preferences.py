"""Preference data from outside the pipeline: read it, check every row, turn it into pairs.

Human preference sets come as pairs, rankings, ratings or whole conversations; the reward model
wants one shape, a PreferencePair (prompt, chosen, rejected). `ingest` reads a source, quarantines every bad
row with the reason, converts the rest, merges several annotators' labels of one pair into one,
and writes the pairs, the quarantine, a report and Great Expectations Data Docs.

Record types, by the field names a row has after `DataConfig.fields` renamed them:

- pairs: prompt, chosen, rejected; optional margin (a number >= 0), annotator, source.
- ranked: prompt, responses (K >= 2 distinct texts), ranking, where ranking[i] is the rank of
  responses[i], 0 the best: a permutation of range(K). Optional annotator, source.
- ratings: prompt, response, rating (a number from 1 to 5); optional annotator, source.
- hh (conversations): chosen and rejected are whole conversations, either HH text
  ("\\n\\nHuman: ... \\n\\nAssistant: ...") or chat message lists ([{"role", "content"}], roles user,
  assistant, system), equal up to the final assistant turn; with message lists an optional
  `prompt` message list is their shared beginning (TRL's explicit-prompt layout). Optional
  margin, annotator, source.

Conversions:

- conversation -> prompt = the shared conversation up to and including its final
  "\\n\\nAssistant:" marker, chosen and rejected = the two final assistant turns, so that prompt +
  chosen gives back the chosen transcript. Message lists are rendered as HH text first.
- ranking -> all K(K-1)/2 pairs, the better-ranked response chosen (InstructGPT).
- ratings -> every two responses that one annotator rated for one prompt (different people's
  scales are not compared), the higher rating chosen, margin = the difference; equal ratings
  are tie labels.
- labels of the same pair (same prompt, same two responses) from several annotators -> one pair
  by plurality vote; an exact split, or a winning tie label, is a tie. `ties: keep` writes a
  tie as a pair with tie=true and margin 0, `ties: drop` leaves it out.

Checks. A row is quarantined, with the first reason found, for: a missing field, a wrong type, an
empty string (zero characters: a reply of one space is a reply, the chosen one in four rows of
HH-RLHF's harmless-base test set), chosen identical to rejected, a text longer than `max_chars`,
invalid UTF-8 (or a lone surrogate), a rating outside 1-5, a ranking that is not a permutation,
conversations that differ before their final assistant turn, a line that is not a JSON object. A
CSV whose header lacks a field gets each of its rows quarantined for that missing field, the
reason listing the header's columns (no separate file-level entry). Then the GX suite of
`validation.validate_labels` flags duplicates (a later copy of the same annotator's identical
label) and contradictions (one annotator, or none named, labelling the same item both ways: all
those rows), which are quarantined too. An empty or unreadable file is one entry with row null.
With `format: auto` each row's fields decide its record type; a row that fits none is quarantined.
A file is refused whole (DataError) when it is UTF-16/32 text, or its header (CSV, Parquet) repeats
a column or has two columns that `fields` maps to one name; a JSON object repeating a key, or
renamed onto a key it already has, is a bad row. A UTF-8 byte-order mark is skipped.

Row numbers: the 1-based line number in JSONL and CSV files (the CSV header is line 1; a record
spanning lines has the number of its first line), the 1-based position in a JSON array, a
Parquet file or a Hugging Face split.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, replace
from itertools import combinations
from pathlib import Path
from statistics import fmean
from typing import Any, Literal

import pandas as pd

from components.data.records import PAIR_FIELDS, PreferencePair
from components.data.rows import Ranked, Rated, detect_format, parse_row
from components.data.sources import DataError, Quarantined, Row, RowError, read_rows
from components.data.validation import (
    CONTRADICTIONS,
    DUPLICATES,
    LABEL_COLUMNS,
    ValidationReport,
    build_data_docs,
    validate_labels,
    validate_preferences,
)
from components.files import read_jsonl, write_json, write_jsonl
from components.sections import DataConfig


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def ranked_pairs(record: Ranked) -> list[PreferencePair]:
    """All K(K-1)/2 pairs of a ranking, the better-ranked response chosen."""
    pairs = []
    for i, j in combinations(range(len(record.responses)), 2):
        better, worse = (i, j) if record.ranking[i] < record.ranking[j] else (j, i)
        pairs.append(
            PreferencePair(record.prompt, record.responses[better], record.responses[worse],
                 annotator=record.annotator, source=record.source)
        )
    return pairs


def rated_pairs(records: list[Rated]) -> list[PreferencePair]:
    """Every two responses one annotator rated for one prompt: the higher rating chosen, margin
    the difference; equal ratings give a tie label (tie=True, margin 0)."""
    groups: dict[tuple[str, str | None], list[Rated]] = {}
    for record in records:
        groups.setdefault((record.prompt, record.annotator), []).append(record)
    pairs = []
    for group in groups.values():
        for a, b in combinations(group, 2):
            if a.response == b.response:
                continue
            high, low = (b, a) if b.rating > a.rating else (a, b)
            pairs.append(
                PreferencePair(a.prompt, high.response, low.response, high.rating - low.rating, a.rating == b.rating,
                     a.annotator, a.source)
            )
    return pairs


def to_labels(records: list[PreferencePair | Ranked | Rated]) -> list[PreferencePair]:
    """The pair labels of checked records, in record order (ratings after grouping)."""
    labels: list[PreferencePair] = []
    for record in records:
        if isinstance(record, PreferencePair):
            labels.append(record)
        elif isinstance(record, Ranked):
            labels += ranked_pairs(record)
    return labels + rated_pairs([record for record in records if isinstance(record, Rated)])


def _joined(values: list[str | None]) -> str | None:
    return ",".join(sorted({v for v in values if v})) or None


def aggregate(labels: list[PreferencePair], ties: Literal["drop", "keep"] = "drop") -> tuple[list[PreferencePair], dict[str, float]]:
    """One pair per pair_id from all its labels, and agreement statistics for MLflow.

    The plurality label wins; an exact split between the top labels, or a winning tie label, is
    a tie: dropped or kept per `ties`. The winner's margin is the mean margin of the labels that
    voted for it. Pairs of one prompt come out consecutive, prompts in order of first appearance.
    Statistics over items with more than one label: `mean_pairwise_agreement` (per item, the
    share of pairs of labels that agree, averaged over items) and `unanimous_share` (absent when
    there is no such item).
    """
    votes: dict[str, list[PreferencePair]] = {}
    for label in labels:
        votes.setdefault(label.pair_id, []).append(label)
    pairs: list[PreferencePair] = []
    agreements: list[float] = []
    dropped = 0
    for item in votes.values():
        outcomes = Counter(None if label.tie else label.chosen for label in item)
        if len(item) > 1:
            n = len(item)
            agreements.append(sum(c * (c - 1) for c in outcomes.values()) / (n * (n - 1)))
        (winner, top), *others = outcomes.most_common()
        if winner is None or (others and others[0][1] == top):
            if ties == "drop":
                dropped += 1
                continue
            pair = replace(item[0], tie=True, margin=0)
        else:
            winning = [label for label in item if not label.tie and label.chosen == winner]
            margins = [label.margin for label in winning if label.margin is not None]
            pair = winning[0] if len(item) == 1 else replace(winning[0], margin=fmean(margins) if margins else None)
        annotator, source = _joined([vote.annotator for vote in item]), _joined([vote.source for vote in item])
        pairs.append(replace(pair, annotator=annotator, source=source))
    order: dict[str, int] = {}
    for pair in pairs:
        order.setdefault(pair.group, len(order))
    pairs.sort(key=lambda pair: order[pair.group])
    stats = {
        "items": float(len(votes)),
        "multi_annotator_items": float(len(agreements)),
        "ties_kept": float(sum(p.tie for p in pairs)),
        "ties_dropped": float(dropped),
    }
    if agreements:
        stats["mean_pairwise_agreement"] = fmean(agreements)
        stats["unanimous_share"] = sum(a == 1 for a in agreements) / len(agreements)
    return pairs, stats


# ----------------------------------------------------------------------------------- ingest


def _judgement(record: PreferencePair | Ranked | Rated) -> tuple[str, str, str]:
    """(item, label, field of the label): what was judged and by whom, and the judgement."""
    if isinstance(record, PreferencePair):
        return _digest(record.pair_id, record.annotator), _digest(record.chosen), "chosen"
    if isinstance(record, Ranked):
        best_first = [text for _, text in sorted(zip(record.ranking, record.responses))]
        return _digest(record.prompt, sorted(record.responses), record.annotator), _digest(best_first), "ranking"
    return _digest(record.prompt, record.response, record.annotator), _digest(float(record.rating)), "rating"


def _dataset_problems(
    rows: list[Row], judgements: list[tuple[str, str, str]], report: ValidationReport
) -> dict[int, Quarantined]:
    """The records GX flagged as duplicates or contradictions, naming the rows they clash with."""
    first: dict[tuple[str, str], int] = {}
    by_item: dict[str, list[int]] = {}
    for i, (item, label, _) in enumerate(judgements):
        first.setdefault((item, label), i)
        by_item.setdefault(item, []).append(i)
    problems = {}
    for i in report.flagged.get(CONTRADICTIONS, []):
        item, label, name = judgements[i]
        others = ", ".join(str(rows[k].row) for k in by_item[item] if judgements[k][1] != label)
        problems[i] = rows[i].quarantined(name, f"contradicts row(s) {others}: same item, same annotator, other label")
    for i in report.flagged.get(DUPLICATES, []):
        item, label, name = judgements[i]
        problems.setdefault(i, rows[i].quarantined(name, f"duplicate of row {rows[first[item, label]].row}"))
    return problems


REJECTED = "rejected"  # OUT/rejected/: the quarantine, report and Data Docs of a failed ingest


@dataclass(frozen=True)
class IngestResult:
    pairs: list[PreferencePair]
    quarantine: list[Quarantined]
    report: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.report["ok"]


def _write_quarantine(path: Path, entries: list[Quarantined]) -> None:
    # Raw rows may hold invalid bytes, kept as lone surrogates: written as \udcXX JSON escapes,
    # the file stays valid UTF-8 and reads back as the same strings. default=str covers Parquet
    # and HF values such as dates.
    with open(path, "w", encoding="utf-8", errors="backslashreplace") as handle:
        for entry in entries:
            handle.write(json.dumps(asdict(entry), ensure_ascii=False, sort_keys=True, default=str) + "\n")


def ingest(source: str | Path, out: str | Path, cfg: DataConfig = DataConfig()) -> IngestResult:
    """Read `source` (a local file or a Hugging Face dataset id), check, convert and aggregate it.

    Writes OUT/pairs.jsonl (valid pairs, sorted keys, deterministic order), OUT/quarantine.jsonl
    (every bad row once), OUT/report.json and Data Docs under OUT/data_docs/, all at once when
    complete: an ingest that fails (more invalid rows than `max_invalid_fraction`) or is
    interrupted leaves the previous outputs intact, a failed one its own in OUT/rejected/. Raises
    DataError when the source cannot be read at all or `format: auto` fits none of its rows.
    """
    name, out = str(source), Path(out)
    items = read_rows(name, cfg)
    rows = [item for item in items if isinstance(item, Row)]
    quarantine = [item for item in items if isinstance(item, Quarantined)]
    # `auto` decides row by row: a file mixing pairs and ratings keeps both
    formats = [cfg.format if cfg.format != "auto" else detect_format(row.data) for row in rows]
    if rows and not any(formats):
        raise DataError(
            f"{name}: cannot detect the format from the fields {', '.join(map(repr, rows[0].data))}; "
            f"pass --format or rename fields with --set data.fields=..."
        )
    default_source = Path(name).name if Path(name).is_file() else name
    parsed: list[Row] = []
    records: list[PreferencePair | Ranked | Rated] = []
    found: set[str] = set()
    for row, row_format in zip(rows, formats):
        try:
            if row_format is None:
                raise RowError(None, f"its fields ({', '.join(map(repr, row.data))}) fit no record type: pairs, "
                                     "ranked, ratings or hh (pass --format, or rename fields with data.fields)")
            records.append(parse_row(row_format, row.data, cfg.max_chars, default_source))
            parsed.append(row)
            found.add(row_format)
        except RowError as error:
            quarantine.append(row.quarantined(error.field, error.reason))
    fmt = ",".join(sorted(found)) or cfg.format

    staging = out / f".ingest-{os.getpid()}"  # every output is written here, then moved into place
    for stale in out.glob(".ingest-*"):
        shutil.rmtree(stale)
    docs = staging / "data_docs"
    judgements = [_judgement(record) for record in records]
    labels_report = validate_labels(
        pd.DataFrame([j[:2] for j in judgements], columns=list(LABEL_COLUMNS)), cfg.mostly, f"{name} (labels)", docs
    )
    problems = _dataset_problems(parsed, judgements, labels_report)
    quarantine += problems.values()
    labels = to_labels([record for i, record in enumerate(records) if i not in problems])
    pairs, agreement = aggregate(labels, cfg.ties)
    pairs_frame = pd.DataFrame([asdict(p) for p in pairs], columns=list(PAIR_FIELDS))
    pairs_report = validate_preferences(pairs_frame, cfg.mostly, cfg.max_chars, str(out / "pairs.jsonl"), docs)
    build_data_docs(docs)

    quarantine.sort(key=lambda entry: entry.row or 0)
    invalid_fraction = len(quarantine) / len(items)
    report = {
        "source": name,
        "format": fmt,
        "rows": len(items),
        "valid_rows": len(items) - len(quarantine),
        "quarantined_rows": len(quarantine),
        "invalid_fraction": invalid_fraction,
        "ok": invalid_fraction <= cfg.max_invalid_fraction,
        "labels": len(labels),
        "pairs": len(pairs),
        "agreement": agreement,
        "validation": {"labels": labels_report.to_dict(), "pairs": pairs_report.to_dict()},
        "data_docs": "data_docs/index.html",
        "config": cfg.model_dump(),
    }
    write_jsonl(staging / "pairs.jsonl", [asdict(p) for p in pairs])
    _write_quarantine(staging / "quarantine.jsonl", quarantine)
    write_json(staging / "report.json", report)
    _publish(staging, out, report["ok"])
    return IngestResult(pairs, quarantine, report)


def _publish(staging: Path, out: Path, ok: bool) -> None:
    """A complete ingest replaces OUT's outputs; a failed one leaves them as they were and keeps
    its quarantine, report and Data Docs in OUT/rejected/ instead."""
    rejected = out / REJECTED
    shutil.rmtree(rejected, ignore_errors=True)
    if not ok:
        os.replace(staging, rejected)
        return
    old_docs = staging / "previous_data_docs"
    if (out / "data_docs").is_dir():
        os.replace(out / "data_docs", old_docs)
    for item in ("data_docs", "pairs.jsonl", "quarantine.jsonl", "report.json"):
        os.replace(staging / item, out / item)
    shutil.rmtree(staging)


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """An ingest report's counts and agreement statistics, as flat metrics for MLflow."""
    counts = {key: report[key] for key in ("rows", "valid_rows", "quarantined_rows", "labels", "pairs")}
    return {**counts, **{f"agreement/{key}": value for key, value in report["agreement"].items()}}


def validate_output(out: str | Path, cfg: DataConfig = DataConfig()) -> ValidationReport:
    """The pairs suite on OUT/pairs.jsonl written by `ingest`, added to OUT/data_docs/."""
    path = Path(out) / "pairs.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: not found; `rlhf data ingest SOURCE --out {out}` writes it")
    try:
        rows = read_jsonl(path)
    except ValueError as error:
        raise DataError(f"{path}: not a JSONL file: {error}") from None
    docs = Path(out) / "data_docs"
    report = validate_preferences(rows, cfg.mostly, cfg.max_chars, str(path), docs)
    build_data_docs(docs)
    return report
