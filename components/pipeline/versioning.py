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

log = logging.getLogger(__name__)


def record(root: str | Path, dvc_yaml: str) -> dict:
    """Write `dvc_yaml` (the stages as the run's configuration declares them) to `root`, commit
    all its stages and push to the default remote (if one is set)."""
    if not (Path(root) / ".dvc").is_dir():
        log.warning("%s is not a DVC repository: outputs are not versioned", root)
        return {"committed": False, "pushed": 0}
    stages = Path(root) / "dvc.yaml"
    if not stages.is_file() or stages.read_text() != dvc_yaml:
        stages.write_text(dvc_yaml)
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
