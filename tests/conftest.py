"""Shared fixtures: a real Prefect API (test harness on SQLite), a fresh DVC + git project in a
temp dir, and a tiny configuration so a whole pipeline runs in seconds."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Before Prefect or MLflow are imported anywhere: keep their state out of the user's home.
# pytest-xdist's workers (`make test` runs two) inherit the environment of the controlling pytest
# process, which imports this file first.
_STATE = tempfile.mkdtemp(prefix="rlhf-tests-")
atexit.register(shutil.rmtree, _STATE, ignore_errors=True)
os.environ["PREFECT_HOME"] = str(Path(_STATE) / "prefect")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
if "PYTEST_XDIST_WORKER" not in os.environ:  # converted GGUF models (517 MB): once per test run, in the controller's folder
    os.environ["RLHF_CACHE_DIR"] = str(Path(_STATE) / "cache")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)

import components  # noqa: E402,F401  (offline switches)

TINY = {
    "world": {"n_reviews": 400},
    "base": {"epochs": 1, "n_layer": 1, "n_head": 2, "n_embd": 32, "max_length": 96, "vocab_size": 400},
    "sft": {"n_demonstrations": 60, "epochs": 1},
    "sampling": {"max_new_tokens": 12, "batch_size": 32},
    "collect": {"n_prompts": 12, "k": 4},
    # the 72 pairs of a 1-layer model's samples: their gold gaps may not allow InstructGPT's 0.726
    "annotators": {"target_agreement": 0.65},
    "reward": {"epochs": 1},
    "ppo": {"steps": 2, "batch_size": 8, "minibatch_size": 4, "ppo_epochs": 1},
    "rl": {"probe_points": 2, "probe_prompts": 8},
    "eval": {"n_prompts": 12},
    "promotion": {"min_gold_win_rate": 0.0, "max_kl": 1000.0},
}


def pytest_configure(config):
    """Stages pick torch's thread count from the cores other processes leave free (components/threads.py),
    which varies with the load; tests fix it instead, in every process of the run, so that the runs a
    test compares compute alike: the cores shared out among pytest-xdist's workers (one thread each
    on 2 cores: two workers of two threads would wait on each other's barriers). The controller sets
    it before it starts the workers, which inherit it. tests/test_threads.py tests the policy itself."""
    workers = getattr(config.option, "numprocesses", None)
    workers = workers if isinstance(workers, int) and workers > 0 else 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))


def pytest_collection_modifyitems(items):
    """The Prefect stack's module first: it is a third of the run and one worker's, so pytest-xdist's
    other worker runs the rest beside it instead of waiting for it at the end."""
    items.sort(key=lambda item: item.module.__name__ != "tests.test_deployments")


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


# ------------------------------------------------------------------------------ tiny models
# The RL, rollout and LM tests share one tiny world: 200 reviews, a BPE tokenizer of 400 tokens,
# a 1-layer GPT-2 policy and a reward model on its backbone. Data and tokenizer are built once a
# session; models come as fresh copies, because the tests train them in place.

TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "max_length": 64}


@pytest.fixture(scope="session")
def tiny_world():
    """200 reviews of the synthetic world (seed 0)."""
    from components.world import generate_reviews

    return generate_reviews(200, 0.1, 0.3, seed=0)


@pytest.fixture(scope="session")
def tiny_prompts(tiny_world) -> list[str]:
    """40 training prompts (the first three words of a review)."""
    return [r.prompt(3) for r in tiny_world[:40]]


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_world):
    from components.models import lm

    return lm.train_tokenizer([r.document for r in tiny_world], 400)


@pytest.fixture(scope="session")
def tiny_sft_folder(tiny_tokenizer, tmp_path_factory) -> Path:
    """An untrained tiny GPT-2 policy (seed 0) saved as stage sft leaves its policy."""
    import torch

    from components.models import lm

    torch.manual_seed(0)
    model = lm.build_model(tiny_tokenizer, **TINY_MODEL)
    folder = tmp_path_factory.mktemp("tiny-sft")
    lm.save_policy(model, tiny_tokenizer, folder)
    return folder


@pytest.fixture(scope="session")
def _tiny_models(tiny_sft_folder):
    """The prototypes that `tiny_policy` and `tiny_reward` copy: never hand them out."""
    import torch
    from transformers import GPT2LMHeadModel

    from components.trainers import reward_model

    policy = GPT2LMHeadModel.from_pretrained(str(tiny_sft_folder), use_safetensors=True).eval()
    torch.manual_seed(1)  # the reward model's new scalar head
    reward = reward_model.load(tiny_sft_folder).eval().requires_grad_(False)
    reward.config.reward_mean, reward.config.reward_std = 0.0, 1.0  # as stage 'reward' leaves them
    return policy, reward


@pytest.fixture
def tiny_policy(_tiny_models):
    """Factory: `tiny_policy()` is a fresh copy of the tiny SFT policy (eval mode), equal every call."""
    import copy

    return lambda: copy.deepcopy(_tiny_models[0])


@pytest.fixture
def tiny_reward(_tiny_models, tiny_tokenizer):
    """A fresh reward source: the tiny reward model (the SFT backbone with a scalar head,
    reward_mean 0 and reward_std 1 in its config) wrapped in `components.rewards.RewardModel`."""
    import copy

    from components.rewards import RewardModel

    return RewardModel(copy.deepcopy(_tiny_models[1]), tiny_tokenizer)
