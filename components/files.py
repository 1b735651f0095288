"""Files the library reads and writes: JSONL rows, JSON documents, and content hashes (md5, as DVC
computes them) of files and folders. Writes go to a temporary name renamed once complete: a
crash, a kill or a full disk leaves the previous file, never half of a new one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path


def cache_root() -> Path:
    """The user's cache of what is derived once and reused by every project: `$RLHF_CACHE_DIR`,
    default ~/.cache/rlhf-pipeline."""
    return Path(os.environ.get("RLHF_CACHE_DIR") or "~/.cache/rlhf-pipeline").expanduser()


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(path: str | Path) -> str:
    """The md5 DVC records for a file or a folder (for a folder, its `.dir` hash: the md5 of the
    JSON listing of each file's md5 and relative path, sorted by path), so a hash in MLflow finds
    the same version in dvc.lock and the DVC cache."""
    path = Path(path)
    if path.is_file():
        return md5_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no file or folder at {path}")
    listing = sorted(
        ({"md5": md5_file(p), "relpath": p.relative_to(path).as_posix()} for p in path.rglob("*") if p.is_file()),
        key=lambda entry: entry["relpath"],
    )
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """A temporary path beside `path` to write to; renamed to `path` only when the block ends
    without an error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_jsonl(path: str | Path, rows) -> None:
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
