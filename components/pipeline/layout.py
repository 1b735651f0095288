"""Where every stage reads and writes, and the stage graph that both Prefect and DVC follow.

`dvc.yaml` declares the same stages with the same deps, params and outs (a test keeps the two
equal), each calling `rlhf stage NAME`, the entry point the Prefect tasks call too.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from components.files import content_hash

PATHS = {
    "corpus": "data/world/corpus.jsonl",
    "prompts": "data/world/prompts.jsonl",
    "base": "models/base",
    "demonstrations": "data/sft/demonstrations.jsonl",
    "sft": "models/sft",
    "samples": "data/samples/samples.jsonl",
    "preferences": "data/preferences/pairs.jsonl",
    "validation": "data/preferences/validation.json",
    "reward": "models/reward",
    "policy": "models/policy",
    "trace": "data/rl/trace.jsonl",
    "completions": "data/eval/completions.jsonl",
    "eval_metrics": "data/eval/metrics.json",
}


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]  # top-level config keys the stage reads
    deps: tuple[str, ...]  # keys of PATHS it reads
    outs: tuple[str, ...]  # keys of PATHS it writes
    metrics: tuple[str, ...] = ()  # outputs that are small metric files, kept in git rather than the DVC cache


STAGES = (
    Stage("world", ("seed", "world"), (), ("corpus", "prompts")),
    Stage("pretrain", ("seed", "base"), ("corpus",), ("base",)),
    Stage("sft", ("seed", "sft", "base"), ("corpus", "base"), ("demonstrations", "sft")),
    Stage("collect", ("seed", "collect", "sampling"), ("prompts", "sft"), ("samples",)),
    Stage("label", ("seed", "annotators", "data"), ("samples",), ("preferences",)),
    Stage("validate", ("data", "base"), ("preferences", "sft"), (), ("validation",)),
    Stage("reward", ("seed", "reward", "base"), ("preferences", "validation", "sft"), ("reward",)),
    Stage(
        "rl",
        ("seed", "rl", "ppo", "p3o", "rest", "best_of_n", "dpo", "sampling", "collect", "annotators", "reward"),
        ("prompts", "sft", "reward", "preferences"),
        ("policy", "trace"),
    ),
    Stage("evaluate", ("seed", "eval", "sampling"), ("prompts", "sft", "reward", "policy"), ("completions",), ("eval_metrics",)),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}


class Artifact(BaseModel):
    """A dataset or model a stage produced: where it is and what it contained."""

    name: str
    path: str
    md5: str

    @classmethod
    def of(cls, root: str | Path, name: str) -> "Artifact":
        path = Path(root) / PATHS[name]
        return cls(name=name, path=str(path), md5=content_hash(path))

    def intact(self) -> bool:
        try:
            return content_hash(self.path) == self.md5
        except FileNotFoundError:
            return False


class StageResult(BaseModel):
    stage: str
    outputs: dict[str, Artifact]
    metrics: dict[str, float] = {}
    run_id: str | None = None
    model_uri: str | None = None
    report: str | None = None  # markdown published as a Prefect artifact

    def intact(self) -> bool:
        return all(artifact.intact() for artifact in self.outputs.values())


# Modules that record or publish results but never change what a stage computes.
BOOKKEEPING_MODULES = {"pipeline/tracking.py", "pipeline/versioning.py", "pipeline/promotion.py"}
LIBRARY = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the library's source as loaded by this process: a change to any module that
    computes results invalidates every cached stage (coarse, but never stale)."""
    digest = hashlib.md5()
    for source in sorted(LIBRARY.rglob("*.py")):
        name = source.relative_to(LIBRARY).as_posix()
        if name in BOOKKEEPING_MODULES:
            continue
        digest.update(name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()
