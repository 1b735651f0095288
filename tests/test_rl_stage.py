"""The RL stage: online rounds, the frontier trace, and a kill -9 in the middle of PPO.

The upstream stages run once on the tiny configuration; `rlhf stage rl` then runs in a
subprocess, as `dvc repro` or a Prefect worker would run it.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from components.files import read_jsonl
from components.pipeline.layout import PATHS
from tests.conftest import REPO, TINY

RLHF = str(Path(sys.executable).parent / "rlhf")
ROUNDS = ["--set", "rl.rounds=2", "--set", "ppo.steps=4", "--set", "ppo.checkpoint_every=1"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """A project with every stage before rl done, configured by its own params.yaml."""
    from components.config import load_config
    from components.pipeline.stages import run_stage

    root = tmp_path_factory.mktemp("rl") / "project"
    root.mkdir()
    cfg = load_config(REPO / "params.yaml", {**TINY, "rl": {"probe_points": 2, "probe_prompts": 8, "round_prompts": 8}})
    (root / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    for stage in ("world", "pretrain", "sft", "collect", "label", "validate", "reward"):
        run_stage(stage, cfg, root)
    return root


def rl_command(root: Path, *options: str) -> list[str]:
    return [RLHF, "stage", "rl", "--root", str(root), *options]


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "OMP_NUM_THREADS": "1"}


def policy_weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / PATHS["policy"] / "model.safetensors")


def test_killed_ppo_resumes_mid_round_without_redoing_the_finished_round(upstream, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    shutil.copytree(upstream, reference)
    shutil.copytree(upstream, killed)
    done = subprocess.run(rl_command(reference, *ROUNDS), capture_output=True, text=True, env=environment())
    assert done.returncode == 0, done.stderr[-3000:]

    # kill -9 once round 1 (the second) has checkpointed its second PPO iteration
    process = subprocess.Popen(rl_command(killed, *ROUNDS), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=environment())
    marker = killed / "checkpoints" / "rl" / "round-1" / "step-00000002"
    deadline = time.monotonic() + 600
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / PATHS["policy"]).exists()

    resumed = subprocess.run(rl_command(killed, *ROUNDS), capture_output=True, text=True, env=environment())
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    final, uninterrupted = policy_weights(killed), policy_weights(reference)
    assert final.keys() == uninterrupted.keys()
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(final[name], weight, rtol=0, atol=1e-6)
    assert not (killed / "checkpoints" / "rl").exists()  # removed once the stage finished

    # the resumed run trained only what was left: round 1 from its third iteration
    client = MlflowClient(tracking_uri=f"sqlite:///{killed / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf-pipeline")
    runs = client.search_runs([experiment.experiment_id], "tags.`rlhf.stage` = 'rl'", order_by=["attributes.start_time"])
    last = runs[-1]
    assert [m.step for m in client.get_metric_history(last.info.run_id, "train/kl")] == [10_002, 10_003]
    assert last.data.metrics["round1_pairs"] > 0  # fresh labels between the rounds

    trace = read_jsonl(killed / PATHS["trace"])
    assert [row["step"] for row in trace] == [0, 2, 4, 10_002, 10_004]
    assert trace == read_jsonl(reference / PATHS["trace"])
    assert {"kl_to_sft", "gold_reward", "proxy_reward", "algorithm"} <= trace[0].keys() and trace[0]["kl_to_sft"] == 0


TINY_METHODS = {
    "p3o_v1": {"p3o": {"steps": 2, "batch_size": 4, "minibatch_size": 2, "update_epochs": 1}},
    "p3o_v2": {"p3o": {"steps": 2, "batch_size": 4, "minibatch_size": 2, "update_epochs": 1}},
    "rest": {"rest": {"grow_steps": 1, "improve_steps": 2, "thresholds": [0.3, 0.6], "n_prompts": 4, "n_samples": 4,
                      "batch_size": 4}},
    "best_of_n": {"best_of_n": {"n": 4, "n_prompts": 8, "batch_size": 4, "epochs": 1}},
    "dpo": {"dpo": {"batch_size": 8, "lr": 1e-4}},
}


@pytest.mark.parametrize("algorithm", sorted(TINY_METHODS))
def test_every_method_trains_the_policy_and_traces_the_frontier(upstream, tmp_path, algorithm):
    from components.config import load_config
    from components.pipeline.stages import run_stage

    root = tmp_path / "project"
    shutil.copytree(upstream, root)
    cfg = load_config(root / "params.yaml", {"rl": {"algorithm": algorithm}, **TINY_METHODS[algorithm]})
    result = run_stage("rl", cfg, root)

    assert result.metrics and all(math.isfinite(v) for v in result.metrics.values())
    trained, sft = policy_weights(root), load_file(root / PATHS["sft"] / "model.safetensors")
    assert any(not torch.equal(trained[name], sft[name]) for name in sft)
    trace = read_jsonl(root / PATHS["trace"])
    assert trace[0]["step"] == 0 and len(trace) >= 2 and {row["algorithm"] for row in trace} == {algorithm}
