"""Shared fixtures: a real Prefect API (test harness on SQLite), a fresh DVC + git project in a
temp dir, and a tiny configuration so a whole pipeline runs in seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Before Prefect or MLflow are imported anywhere: keep their state out of the user's home.
_STATE = tempfile.mkdtemp(prefix="rlhf-tests-")
os.environ["PREFECT_HOME"] = str(Path(_STATE) / "prefect")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)

import components  # noqa: E402,F401  (offline switches)

TINY = {
    "world": {"n_reviews": 400},
    "base": {"epochs": 1, "n_layer": 1, "n_head": 2, "n_embd": 32, "max_length": 96, "vocab_size": 400},
    "sft": {"n_demonstrations": 60, "epochs": 1},
    "sampling": {"max_new_tokens": 12, "batch_size": 32},
    "collect": {"n_prompts": 12, "k": 4},
    "reward": {"epochs": 1},
    "ppo": {"steps": 2, "batch_size": 8, "minibatch_size": 4, "ppo_epochs": 1},
    "rl": {"probe_points": 2, "probe_prompts": 8},
    "eval": {"n_prompts": 12},
    "promotion": {"min_gold_win_rate": 0.0, "max_kl": 1000.0},
}


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models: thread start-up and contention on a shared machine cost more than they save."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _git_identity_env() -> dict:
    return {**os.environ, "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.invalid",
            "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.invalid"}


def make_project(path: Path) -> Path:
    """A fresh git + DVC repository holding the project's dvc.yaml and params.yaml."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, path / name)
    dvc = str(Path(os.sys.executable).parent / "dvc")
    env = _git_identity_env()
    subprocess.run(["git", "init", "-q"], cwd=path, check=True, env=env)
    subprocess.run([dvc, "init", "-q"], cwd=path, check=True, env=env)
    subprocess.run([dvc, "remote", "add", "-q", "-d", "local", "../dvc-remote"], cwd=path, check=True, env=env)
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture
def tiny_config():
    from components.config import load_config

    return load_config(REPO / "params.yaml", TINY)
