"""Files the library reads and writes: JSONL rows, JSON documents, and content hashes (md5, as DVC
computes them) of files and folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(path: str | Path) -> str:
    """md5 of a file (the same value DVC records for it) or of a folder's sorted listing of md5s."""
    path = Path(path)
    if path.is_file():
        return md5_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no file or folder at {path}")
    listing = [(str(p.relative_to(path)), md5_file(p)) for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.md5(json.dumps(listing).encode()).hexdigest() + ".dir"


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_records(path: str | Path, fields: tuple[str, ...]) -> list[dict]:
    """JSONL rows that must each hold `fields` as strings; the first bad row stops the read with
    an error naming the file, the row (1-based) and the field."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: row {number}: not valid JSON ({error.msg})") from None
            for field in fields:
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise ValueError(f"{path}: row {number}: field '{field}' missing or not a string")
            rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
