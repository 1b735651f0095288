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
    "prompts": "data/task/prompts.jsonl",
    "candidates": "data/task/demonstrations.jsonl",
    "corpus": "data/task/corpus.jsonl",
    "base": "models/base",
    "demonstrations": "data/sft/demonstrations.jsonl",
    "sft": "models/sft",
    "samples": "data/samples/samples.jsonl",
    "preferences": "data/preferences/pairs.jsonl",
    "validation": "data/preferences/validation.json",
    "reward": "models/reward",
    "policy": "models/policy",
    "rl_reward": "models/rl-reward",
    "trace": "data/rl/trace.jsonl",
    "completions": "data/eval/completions.jsonl",
    "eval_metrics": "data/eval/metrics.json",
}

# In a stage's params: the section of the RL method `rl.algorithm` names (components/rl/), so a
# stage reads, and is keyed by, only the chosen method's settings.
METHOD_SECTION = "<rl.algorithm>"
# In a stage's params: the `human` section when `label.labeler` is human (the label stage's and
# online rounds' labeler), so a session's size, mode or timeout keys those stages' cache too.
HUMAN_SECTION = "<human labeler>"


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]  # top-level config keys the stage reads
    deps: tuple[str, ...]  # keys of PATHS it reads
    outs: tuple[str, ...]  # keys of PATHS it writes
    metrics: tuple[str, ...] = ()  # outputs that are small metric files, kept in git rather than the DVC cache


STAGES = (
    Stage("task", ("seed", "task", "world", "base"), (), ("prompts", "candidates", "corpus")),
    Stage("pretrain", ("seed", "base"), ("corpus",), ("base",)),
    Stage("sft", ("seed", "sft", "base"), ("candidates", "base"), ("demonstrations", "sft")),
    Stage("collect", ("seed", "collect", "sampling", "label", "data"), ("prompts", "sft"), ("samples",)),
    Stage(
        "label", ("seed", "task", "label", "annotators", "data", "judge", "rlaif", HUMAN_SECTION), ("samples", "sft"),
        ("preferences",),
    ),
    Stage("validate", ("data", "base"), ("preferences", "sft"), (), ("validation",)),
    Stage("reward", ("seed", "reward", "base"), ("prompts", "preferences", "validation", "sft"), ("reward",)),
    Stage(
        "rl",
        ("seed", "task", "rl", METHOD_SECTION, "base", "sampling", "collect", "label", "annotators", "reward", "judge",
         "rlaif", HUMAN_SECTION),
        ("prompts", "sft", "reward", "preferences", "demonstrations"),
        ("policy", "trace", "rl_reward"),
    ),
    Stage(
        "evaluate", ("seed", "task", "eval", "sampling", "judge"), ("prompts", "sft", "reward", "policy", "rl_reward"),
        ("completions",),
        ("eval_metrics",),
    ),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}


def stage_params(cfg, name: str) -> list[str]:
    """The top-level configuration keys stage `name` reads under `cfg` (what dvc.yaml lists)."""
    from components import rl

    section = rl.METHODS[cfg.rl.algorithm].section
    marked = {METHOD_SECTION: section, HUMAN_SECTION: "human" if cfg.label.labeler == "human" else None}
    keys = [marked.get(key, key) for key in STAGE_BY_NAME[name].params]
    return [key for key in keys if key]


DVC_HEADER = """\
# The pipeline's stages for DVC, written from components/pipeline/layout.py (STAGES) for the
# configuration that ran: the rl stage lists only the chosen method's section. Each command is the
# entry point the Prefect flow's tasks call (`rlhf stage NAME` -> run_stage). `rlhf run` executes
# them through Prefect and then records the result with `dvc commit`; `dvc repro` runs them alone.
# A run's params are read from params.run.yaml: the configuration it used, overrides included.
"""
# Written by each `rlhf run` (components/pipeline/versioning.py): the effective configuration,
# params.yaml with `--set` overrides and flow parameters applied, which dvc.yaml then reads.
RUN_PARAMS_FILE = "params.run.yaml"


def dvc_yaml(cfg, params_file: str = "params.yaml") -> str:
    """dvc.yaml for `cfg`: each stage runs `rlhf stage NAME` with its deps, params and outs, its
    params read from `params_file` (the stages read it too, unless it is DVC's default params.yaml)."""
    import yaml

    stages = {}
    for stage in STAGES:
        config = "" if params_file == "params.yaml" else f" --config {params_file}"
        entry: dict = {"cmd": f"rlhf stage {stage.name}{config}"}
        if stage.deps:
            entry["deps"] = [PATHS[key] for key in stage.deps]
        keys = stage_params(cfg, stage.name)
        entry["params"] = keys if params_file == "params.yaml" else [{params_file: keys}]
        if stage.outs:
            entry["outs"] = [PATHS[key] for key in stage.outs]
        if stage.metrics:
            entry["metrics"] = [{PATHS[key]: {"cache": False}} for key in stage.metrics]
        stages[stage.name] = entry
    return DVC_HEADER + yaml.safe_dump({"stages": stages}, sort_keys=False, default_flow_style=None, width=120)


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
