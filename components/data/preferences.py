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

Row numbers: the 1-based line number in JSONL and CSV files (the CSV header is line 1; a record
spanning lines has the number of its first line), the 1-based position in a JSON array, a
Parquet file or a Hugging Face split.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import re
import reprlib
import shutil
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from itertools import combinations
from pathlib import Path
from statistics import fmean
from typing import Any, BinaryIO, Iterator, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.sections import DataConfig
from components.data.records import PAIR_FIELDS, PreferencePair
from components.files import read_jsonl, write_json, write_jsonl
from components.data.validation import (
    CONTRADICTIONS,
    DUPLICATES,
    LABEL_COLUMNS,
    ValidationReport,
    build_data_docs,
    validate_labels,
    validate_preferences,
)

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]




@dataclass(frozen=True)
class Ranked:
    prompt: str
    responses: tuple[str, ...]
    ranking: tuple[int, ...]  # ranking[i] is the rank of responses[i]; 0 is the best
    annotator: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Rated:
    prompt: str
    response: str
    rating: float  # 1 (worst) to 5 (best)
    annotator: str | None = None
    source: str | None = None


Message = dict[str, str]  # {"role": one of ROLES, "content": text}


@dataclass(frozen=True)
class Conversation:
    chosen: str | tuple[Message, ...]  # HH text or chat messages, ending with the final assistant turn
    rejected: str | tuple[Message, ...]
    margin: float | None = None
    annotator: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Row:
    """A source record: `data` with fields renamed (and CSV cells typed), `raw` as read."""

    file: str
    row: int
    data: dict[str, Any]
    raw: dict[str, Any]

    def quarantined(self, field: str | None, reason: str) -> Quarantined:
        return Quarantined(self.file, self.row, field, reason, self.raw)


@dataclass(frozen=True)
class Quarantined:
    """A bad row (row None: a bad file) and why; `raw` is the record as read, or the text of a
    line that did not parse."""

    file: str
    row: int | None
    field: str | None
    reason: str
    raw: Any = None

    def message(self) -> str:
        where = self.file if self.row is None else f"{self.file}, row {self.row}"
        return f"{where}{'' if self.field is None else f', field {self.field!r}'}: {self.reason}"


class RowError(ValueError):
    """A bad row: the field at fault (None when the row has none, e.g. unparseable) and why."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class DataError(Exception):
    """A source that cannot be read at all: no such file or dataset, offline, unknown format."""


# ---------------------------------------------------------------------------------- loaders

_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _kind(source: str) -> str:
    path = Path(source)
    stem = source.lower().removesuffix(".gz")
    kind = next((kind for suffix, kind in _SUFFIXES.items() if stem.endswith(suffix)), None)
    if path.is_file():
        if kind is None:
            raise DataError(f"{source}: unknown file type; expected .jsonl, .json, .parquet or .csv, optionally .gz")
        return kind
    if kind is None and not path.exists() and _HUB_ID.fullmatch(source):
        return "hub"
    raise DataError(f"{source}: no such file")


def _object(name: str, number: int, value: Any) -> tuple[int, dict] | Quarantined:
    if isinstance(value, dict):
        return number, value
    return Quarantined(name, number, None, f"not a JSON object but {_type(value)}", value)


def _jsonl(name: str, handle: BinaryIO) -> Iterator[tuple[int, dict] | Quarantined]:
    # Bytes split on b"\n" only: a bad byte or a cut-off line spoils its own line and no other,
    # and a U+2028 inside a JSON string cannot split a record as str.splitlines would.
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        # Invalid bytes survive as lone surrogates, so the text checks can name their field.
        text = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as error:
            yield Quarantined(name, number, None, f"not valid JSON: {error}", text)
            continue
        yield _object(name, number, value)


def _json(name: str, handle: BinaryIO) -> Iterator[tuple[int, dict] | Quarantined]:
    text = handle.read().decode("utf-8", "surrogateescape")
    if not text.strip():
        return
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        yield Quarantined(name, None, None, f"not valid JSON: {error}")
        return
    # An object of equal-length arrays is a table by columns (pandas' orient="list", HF to_dict).
    if isinstance(document, dict) and all(isinstance(v, list) for v in document.values()):
        if len({len(v) for v in document.values()}) > 1:
            yield Quarantined(name, None, None, "an object of arrays whose arrays differ in length")
            return
        document = [dict(zip(document, values)) for values in zip(*document.values())]
    if not isinstance(document, list):
        yield Quarantined(name, None, None, f"expected an array of objects or an object of arrays: {_type(document)}")
        return
    for number, value in enumerate(document, 1):
        yield _object(name, number, value)


def _csv(name: str, handle: BinaryIO) -> Iterator[tuple[int, dict] | Quarantined]:
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    header = next(reader, None)
    if header is None:
        return
    line = reader.line_num
    while True:
        start = line + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:  # e.g. a cell over the csv module's 131,072-character limit
            line = reader.line_num
            yield Quarantined(name, start, None, f"not a valid CSV record: {error}")
            continue
        line = reader.line_num
        if not cells:
            continue
        if len(cells) != len(header):
            reason = f"{len(cells)} cells for the {len(header)} columns of the header"
            yield Quarantined(name, start, None, reason, cells)
            continue
        yield start, dict(zip(header, cells))


def _parquet(name: str, handle: BinaryIO) -> Iterator[tuple[int, dict] | Quarantined]:
    number = 0
    for batch in pq.ParquetFile(pa.BufferReader(handle.read())).iter_batches():
        for record in batch.to_pylist():
            number += 1
            yield number, record


_LOADERS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet}


def _hub(dataset_id: str, cfg: DataConfig) -> Iterator[tuple[int, dict] | Quarantined]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{dataset_id}: reading a Hugging Face dataset needs the `datasets` package") from None
    try:
        dataset = datasets.load_dataset(dataset_id, name=cfg.hf_subset, data_dir=cfg.hf_data_dir, split=cfg.hf_split)
    except Exception as error:  # the library raises many types: connection, not found, bad config
        offline = (
            " We are offline (HF_DATASETS_OFFLINE=1, set by `import components`) and it is not in the local "
            "cache; set HF_DATASETS_OFFLINE=0 and HF_HUB_OFFLINE=0 to download it."
            if datasets.config.HF_HUB_OFFLINE
            else ""
        )
        raise DataError(f"cannot load the Hugging Face dataset '{dataset_id}': {error}.{offline}") from None
    return enumerate(dataset, 1)


# CSV cells are text: these fields hold JSON values (numbers, arrays), and an empty optional
# cell means the field is absent.
_JSON_CELLS = ("responses", "ranking", "rating", "margin")
_OPTIONAL = ("margin", "annotator", "source")


def _typed_cells(data: dict[str, Any]) -> dict[str, Any]:
    data = {key: value for key, value in data.items() if not (key in _OPTIONAL and value == "")}
    for key in _JSON_CELLS:
        if isinstance(data.get(key), str):
            try:
                data[key] = json.loads(data[key])
            except ValueError:
                pass  # stays text and is reported as the wrong type
    return data


def _records(name: str, kind: str, cfg: DataConfig) -> Iterator[tuple[int, dict] | Quarantined]:
    if kind == "hub":
        yield from _hub(name, cfg)
        return
    with gzip.open(name, "rb") if name.lower().endswith(".gz") else open(name, "rb") as handle:
        yield from _LOADERS[kind](name, handle)


def read_rows(source: str | Path, cfg: DataConfig = DataConfig()) -> list[Row | Quarantined]:
    """Every record of a local file or Hugging Face dataset id, or why it could not be read.

    Raises DataError when the source cannot be opened at all. A file that breaks off midway keeps
    the rows before the break and adds one entry for the rest.
    """
    name = str(source)
    kind = _kind(name)
    items: list[Row | Quarantined] = []
    try:
        for record in _records(name, kind, cfg):
            if isinstance(record, Quarantined):
                items.append(record)
                continue
            number, raw = record
            data = {cfg.fields.get(key, key): value for key, value in raw.items()}
            items.append(Row(name, number, _typed_cells(data) if kind == "csv" else data, raw))
    except (OSError, EOFError, ValueError, zlib.error, csv.Error) as error:
        items.append(Quarantined(name, None, None, f"reading stopped after {len(items)} records: {error}"))
    return items or [Quarantined(name, None, None, "the file is empty: no rows")]


def detect_format(data: dict[str, Any]) -> str | None:
    """The record type a row's fields (after renaming) fit, as `format: auto` decides it."""
    if {"responses", "ranking"} <= data.keys():
        return "ranked"
    if {"response", "rating"} <= data.keys():
        return "ratings"
    if {"chosen", "rejected"} <= data.keys():
        texts = [data.get("prompt"), data["chosen"], data["rejected"]]
        if "messages" in data or any(isinstance(text, list) for text in texts):
            return "hh"
        if "prompt" in data:
            return "pairs"
        if all(isinstance(text, str) and ASSISTANT in text for text in texts[1:]):
            return "hh"
    return None


# ------------------------------------------------------------------------------ row checks


def _type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _check_text(field: str, value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise RowError(field, f"wrong type: expected a string, got {_type(value)}")
    if not value:
        raise RowError(field, "empty string")
    if len(value) > max_chars:
        raise RowError(field, f"text of {len(value):,} characters is longer than max_chars={max_chars:,}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            code = ord(value[error.start])
            what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
            raise RowError(field, f"invalid UTF-8: {what} at character {error.start}") from None
    return value


def _required(data: dict[str, Any], field: str) -> Any:
    if field not in data:
        present = ", ".join(repr(key) for key in data) or "none"
        raise RowError(field, f"missing field (fields present: {present})")
    return data[field]


def _text(data: dict[str, Any], field: str, max_chars: int) -> str:
    return _check_text(field, _required(data, field), max_chars)


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(field, f"wrong type: expected a number, got {_type(value)}")
    if not math.isfinite(value):
        raise RowError(field, f"{value} is not a finite number")
    return value


def _margin(data: dict[str, Any]) -> float | None:
    if data.get("margin") is None:
        return None
    margin = _number("margin", data["margin"])
    if margin < 0:
        raise RowError("margin", f"{margin} is negative; the margin says how much better chosen is")
    return margin


def _messages(field: str, value: list, max_chars: int) -> tuple[Message, ...]:
    if not value:
        raise RowError(field, "empty message list")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(f"{field}[{i}]", f"wrong type: expected a message object, got {_type(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise RowError(f"{field}[{i}].role", f"expected one of {', '.join(ROLES)}, got {reprlib.repr(role)}")
        content = _check_text(f"{field}[{i}].content", message.get("content"), max_chars)
        messages.append({"role": role, "content": content})
    return tuple(messages)


def _conversation(data: dict[str, Any], field: str, max_chars: int) -> str | tuple[Message, ...]:
    value = _required(data, field)
    if isinstance(value, list):
        return _messages(field, value, max_chars)
    if not isinstance(value, str):
        raise RowError(field, f"wrong type: expected HH text or a message list, got {_type(value)}")
    return _check_text(field, value, max_chars)


def _common_prefix_length(a: str, b: str) -> int:
    # Bisection on slice comparisons, which run in C: a character loop over 4,000-character
    # transcripts would dominate the ingest of HH-RLHF.
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two HH transcripts.

    The prompt runs up to and including the last "\\n\\nAssistant:" marker that both transcripts
    share, so prompt + reply gives back each transcript; a reply may itself contain that marker
    (HH-RLHF has replies that run on), but not a new human turn. Raises RowError otherwise.
    """
    end = chosen.rfind(ASSISTANT, 0, _common_prefix_length(chosen, rejected))
    if end < 0:
        raise RowError("rejected", "shares no conversation with chosen up to an '\\n\\nAssistant:' turn")
    end += len(ASSISTANT)
    for name, reply in (("chosen", chosen[end:]), ("rejected", rejected[end:])):
        if not reply:
            raise RowError(name, "empty final assistant turn")
        if HUMAN in reply:
            raise RowError(name, "differs from the other transcript before the final assistant turn")
    return chosen[:end], chosen[end:], rejected[end:]


def split_messages(chosen: tuple[Message, ...], rejected: tuple[Message, ...]) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two chat conversations, rendered as HH text:
    the prompt is the messages before the final assistant message, then "\\n\\nAssistant:"."""
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise RowError(f"{name}[{len(messages) - 1}].role", "the final message is not the assistant's")
        if len(messages) < 2:
            raise RowError(name, "no conversation before the final assistant message")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("rejected", "differs from chosen before the final assistant message")
    prompt = "".join(f"\n\n{ROLES[m['role']]}: {m['content']}" for m in chosen[:-1]) + ASSISTANT
    return prompt, " " + chosen[-1]["content"], " " + rejected[-1]["content"]


def conversation_pair(conversation: Conversation) -> PreferencePair:
    split = split_hh if isinstance(conversation.chosen, str) else split_messages
    prompt, chosen, rejected = split(conversation.chosen, conversation.rejected)
    return PreferencePair(prompt, chosen, rejected, conversation.margin, False, conversation.annotator, conversation.source)


def _conversations(data: dict[str, Any], max_chars: int) -> tuple[Any, Any]:
    chosen, rejected = _conversation(data, "chosen", max_chars), _conversation(data, "rejected", max_chars)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RowError("rejected", "wrong type: chosen and rejected must both be HH text or both message lists")
    if chosen == rejected:
        raise RowError("rejected", "identical to chosen")
    if isinstance(chosen, tuple) and isinstance(data.get("prompt"), list):
        context = _messages("prompt", data["prompt"], max_chars)
        chosen, rejected = context + chosen, context + rejected
    return chosen, rejected


def _ranked(data: dict[str, Any], max_chars: int, meta: dict[str, Any]) -> Ranked:
    prompt = _text(data, "prompt", max_chars)
    responses = _required(data, "responses")
    if not isinstance(responses, list):
        raise RowError("responses", f"wrong type: expected an array, got {_type(responses)}")
    responses = tuple(_check_text(f"responses[{i}]", text, max_chars) for i, text in enumerate(responses))
    if len(responses) < 2:
        raise RowError("responses", f"{len(responses)} response(s); a ranking needs at least 2")
    if len(set(responses)) < len(responses):
        raise RowError("responses", "two responses are identical")
    ranking = _required(data, "ranking")
    if not isinstance(ranking, list) or any(isinstance(r, bool) or not isinstance(r, int) for r in ranking):
        raise RowError("ranking", f"wrong type: expected an array of integers, got {reprlib.repr(ranking)}")
    if sorted(ranking) != list(range(len(responses))):
        raise RowError(
            "ranking", f"{reprlib.repr(ranking)} is not a permutation of range({len(responses)}), one rank per response"
        )
    return Ranked(prompt, responses, tuple(ranking), **meta)


def parse_row(fmt: str, data: dict[str, Any], max_chars: int, source: str | None = None) -> PreferencePair | Ranked | Rated:
    """The record a row holds; a conversation becomes its PreferencePair at once, since splitting it is
    part of checking it. `source` fills a missing source field. Raises RowError on the first
    bad field."""
    meta = {
        "annotator": None if data.get("annotator") is None else _check_text("annotator", data["annotator"], max_chars),
        "source": source if data.get("source") is None else _check_text("source", data["source"], max_chars),
    }
    if fmt == "pairs":
        prompt, chosen, rejected = (_text(data, name, max_chars) for name in ("prompt", "chosen", "rejected"))
        if chosen == rejected:
            raise RowError("rejected", "identical to chosen")
        return PreferencePair(prompt, chosen, rejected, _margin(data), **meta)
    if fmt == "hh":
        pair = conversation_pair(Conversation(*_conversations(data, max_chars), _margin(data), **meta))
        if len(pair.prompt) > max_chars:  # rendered message lists are checked message by message only
            raise RowError("prompt", f"the shared conversation's {len(pair.prompt):,} characters exceed max_chars")
        return pair
    if fmt == "ranked":
        return _ranked(data, max_chars, meta)
    if fmt == "ratings":
        prompt, response = _text(data, "prompt", max_chars), _text(data, "response", max_chars)
        rating = _number("rating", _required(data, "rating"))
        if not 1 <= rating <= 5:
            raise RowError("rating", f"{rating} is outside 1-5")
        return Rated(prompt, response, rating, **meta)
    raise ValueError(f"unknown format {fmt!r}")


# ------------------------------------------------------------------------------ conversions


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
    (every bad row once), OUT/report.json and Data Docs under OUT/data_docs/. Raises DataError
    when the source cannot be read at all or `format: auto` fits none of its rows' fields.
    """
    name, out = str(source), Path(out)
    items = read_rows(name, cfg)
    rows = [item for item in items if isinstance(item, Row)]
    quarantine = [item for item in items if isinstance(item, Quarantined)]
    fmt = cfg.format
    if fmt == "auto" and rows:
        fmt = detect_format(rows[0].data) or ""
        if not fmt:
            raise DataError(
                f"{name}: cannot detect the format from the fields {', '.join(map(repr, rows[0].data))}; "
                f"pass --format or rename fields with --set data.fields=..."
            )
    default_source = Path(name).name if Path(name).is_file() else name
    parsed: list[Row] = []
    records: list[PreferencePair | Ranked | Rated] = []
    for row in rows:
        try:
            records.append(parse_row(fmt, row.data, cfg.max_chars, default_source))
            parsed.append(row)
        except RowError as error:
            quarantine.append(row.quarantined(error.field, error.reason))

    docs = out / "data_docs"
    shutil.rmtree(docs, ignore_errors=True)  # the Data Docs of this ingest only
    judgements = [_judgement(record) for record in records]
    labels_report = validate_labels(
        pd.DataFrame([j[:2] for j in judgements], columns=list(LABEL_COLUMNS)), cfg.mostly, f"{name} (labels)", docs
    )
    problems = _dataset_problems(parsed, judgements, labels_report)
    quarantine += problems.values()
    labels = to_labels([record for i, record in enumerate(records) if i not in problems])
    pairs, agreement = aggregate(labels, cfg.ties)
    pairs_path = out / "pairs.jsonl"
    pairs_frame = pd.DataFrame([asdict(p) for p in pairs], columns=list(PAIR_FIELDS))
    pairs_report = validate_preferences(pairs_frame, cfg.mostly, cfg.max_chars, str(pairs_path), docs)
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
    write_jsonl(pairs_path, [asdict(p) for p in pairs])
    _write_quarantine(out / "quarantine.jsonl", quarantine)
    write_json(out / "report.json", report)
    return IngestResult(pairs, quarantine, report)


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
