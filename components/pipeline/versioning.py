"""DVC: after a pipeline run, record every stage's deps, params and outs in `dvc.lock`, cache the
datasets and models, and push them to the default remote.

The Prefect flow runs the stages itself (with its own cache); `dvc commit` then tells DVC that
the outputs on disk are what `dvc.yaml`'s commands produce, so `dvc status` is clean and
`dvc repro` / `dvc pull` / `dvc checkout` work on the same versions.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import yaml

from components.files import write_text
from components.pipeline.layout import RUN_PARAMS_FILE, dvc_yaml

log = logging.getLogger(__name__)
RUN_PARAMS_HEADER = "# Written by `rlhf run`: the configuration of the last run (params.yaml with its overrides).\n"


def record(root: str | Path, cfg) -> dict:
    """Write the run's effective configuration `cfg` to RUN_PARAMS_FILE and dvc.yaml with the
    stages as `cfg` declares them, reading their params from that file (so dvc.lock records what
    ran, overrides included), commit all stages and push to the default remote (if one is set)."""
    if not (Path(root) / ".dvc").is_dir():
        log.warning("%s is not a DVC repository: outputs are not versioned", root)
        return {"committed": False, "pushed": 0}
    params = Path(root) / RUN_PARAMS_FILE
    effective = RUN_PARAMS_HEADER + yaml.safe_dump(cfg.model_dump(), sort_keys=False)
    if not params.is_file() or params.read_text() != effective:
        write_text(params, effective)
    stages, declared = Path(root) / "dvc.yaml", dvc_yaml(cfg, RUN_PARAMS_FILE)
    if not stages.is_file() or stages.read_text() != declared:
        write_text(stages, declared)
    from dvc.repo import Repo  # heavy import, only when versioning

    # DVC resolves stage paths against the working directory, so run it from the project root
    with contextlib.chdir(root), Repo(".") as repo:
        repo.commit(None, force=True)
        pushed = repo.push() if repo.config["core"].get("remote") else 0
    return {"committed": True, "pushed": pushed}


def dvc_root(path: str | Path) -> Path | None:
    """The DVC repository holding `path`, if any."""
    for folder in [Path(path).resolve(), *Path(path).resolve().parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def track(files: list[Path]) -> dict | None:
    """`dvc add` dataset files and push them to the default remote; None outside a DVC repo.

    Returns {"md5": {relative path: md5}, "pushed": n}. Only deterministic files belong here
    (not Data Docs, which carry run times): the same content always gets the same md5, so
    ingesting a source twice adds no new version.
    """
    root = dvc_root(files[0])
    if root is None:
        log.warning("%s is not inside a DVC repository: the dataset is not versioned", files[0])
        return None
    from dvc.repo import Repo

    targets = [str(Path(f).resolve().relative_to(root)) for f in files]
    with contextlib.chdir(root), Repo(".") as repo:
        stages = repo.add(targets)
        pushed = repo.push(targets) if repo.config["core"].get("remote") else 0
    return {"md5": {target: stage.outs[0].hash_info.value for target, stage in zip(targets, stages)}, "pushed": pushed}
