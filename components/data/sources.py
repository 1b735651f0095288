"""Reading preference sources row by row: JSONL, JSON, Parquet and CSV files (gzip too) and
Hugging Face dataset ids, each row kept with its file and row number, every unreadable row or file
a `Quarantined` entry with the reason (see components/data/preferences.py for the row numbering)."""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from components.sections import DataConfig


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
    return Quarantined(name, number, None, f"not a JSON object but {type_name(value)}", value)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads keeps the last of two equal keys silently: an ambiguous row is an error instead."""
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise ValueError(f"the key {key!r} appears {keys.count(key)} times in one object")
    return dict(pairs)


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_unique_keys)


def _text_start(name: str, head: bytes) -> None:
    """A UTF-8 byte-order mark is skipped by the readers; UTF-16 or UTF-32 text is refused at once."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{name}: the file is UTF-16 or UTF-32 text (byte-order mark); save it as UTF-8")


def _jsonl(name: str, handle: BinaryIO) -> Iterator[tuple[int, dict] | Quarantined]:
    # Bytes split on b"\n" only: a bad byte or a cut-off line spoils its own line and no other,
    # and a U+2028 inside a JSON string cannot split a record as str.splitlines would.
    for number, line in enumerate(handle, 1):
        if number == 1:
            _text_start(name, line)
            line = line.removeprefix(codecs.BOM_UTF8)
        if not line.strip():
            continue
        # Invalid bytes survive as lone surrogates, so the text checks can name their field.
        text = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
        try:
            value = _loads(text)
        except (ValueError, RecursionError) as error:
            yield Quarantined(name, number, None, f"not valid JSON: {error}", text)
            continue
        yield _object(name, number, value)


def _json(name: str, handle: BinaryIO) -> Iterator[tuple[int, dict] | Quarantined]:
    data = handle.read()
    _text_start(name, data)
    text = data.decode("utf-8-sig", "surrogateescape")
    if not text.strip():
        return
    try:
        document = _loads(text)
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
        yield Quarantined(name, None, None, f"expected an array of objects or an object of arrays: {type_name(document)}")
        return
    for number, value in enumerate(document, 1):
        yield _object(name, number, value)


def _csv(name: str, handle: BinaryIO) -> Iterator[tuple[int, dict] | Quarantined]:
    _text_start(name, handle.peek(4)[:4] if hasattr(handle, "peek") else b"")
    text = io.TextIOWrapper(handle, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    header = next(reader, None)
    if header is None:
        return
    _distinct_columns(name, header)
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


def _distinct_columns(name: str, columns: list[str]) -> None:
    """Two columns of one name would make one of them vanish (a dict keeps the last): refused."""
    repeated = sorted({column for column in columns if columns.count(column) > 1})
    if repeated:
        raise DataError(f"{name}: the column(s) {', '.join(map(repr, repeated))} appear more than once in the header")


def _parquet(name: str, handle: BinaryIO) -> Iterator[tuple[int, dict] | Quarantined]:
    number = 0
    table = pq.ParquetFile(pa.BufferReader(handle.read()))
    _distinct_columns(name, table.schema_arrow.names)
    for batch in table.iter_batches():
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


def _renamed(raw: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    """`raw` with its fields renamed by `fields` (a byte-order mark dropped from the names); two
    names that become one make the row ambiguous (RowError)."""
    names = {key: fields.get(key.removeprefix("\ufeff"), key.removeprefix("\ufeff")) for key in raw}
    data: dict[str, Any] = {}
    for key, value in raw.items():
        if names[key] in data:
            sources = ", ".join(repr(other) for other in raw if names[other] == names[key])
            raise RowError(names[key], f"ambiguous columns: {sources} all become {names[key]!r}")
        data[names[key]] = value
    return data


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
            try:
                data = _renamed(raw, cfg.fields)
            except RowError as error:
                if kind in ("csv", "parquet"):  # one header for every row: the whole file is ambiguous
                    raise DataError(f"{name}: {error.reason}") from None
                items.append(Quarantined(name, number, error.field, error.reason, raw))
                continue
            items.append(Row(name, number, _typed_cells(data) if kind == "csv" else data, raw))
    except (OSError, EOFError, ValueError, zlib.error, csv.Error) as error:
        items.append(Quarantined(name, None, None, f"reading stopped after {len(items)} records: {error}"))
    return items or [Quarantined(name, None, None, "the file is empty: no rows")]


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)
