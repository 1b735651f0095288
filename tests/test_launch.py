"""`orchestration.gpu_processes` > 1: a trainer stage under `accelerate launch` (components/pipeline/launch.py),
here 2 CPU processes joined over gloo, through the Prefect task as the GPU deployment runs it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components.config import load_config
from components.pipeline import launch
from components.pipeline.stages import run_stage
from tests.conftest import REPO, TINY


def test_the_launch_command_names_the_processes_and_the_stage(tmp_path):
    cfg = load_config(REPO / "params.yaml", {**TINY, "orchestration": {"gpu_processes": 4}})
    assert launch.launched("sft", cfg) and launch.launched("reward", cfg) and not launch.launched("rl", cfg)
    assert not launch.launched("sft", load_config(REPO / "params.yaml", TINY))  # 1 process: in this one
    programmatic = load_config(REPO / "params.yaml", {**TINY, "orchestration": {"gpu_processes": 4},
                                                      "reward": {"function": "rouge_l"}})
    assert not launch.launched("reward", programmatic)  # nothing to train
    command = launch.command("sft", 4, tmp_path / "c.json", "/p", tmp_path / "r.json", "abc")
    assert command[1:5] == ["launch", "--multi_gpu", "--num_processes", "4"]
    assert command[-6:] == ["components.pipeline.launch", "sft", str(tmp_path / "c.json"), "/p", str(tmp_path / "r.json"), "abc"]


def test_two_processes_train_pretrain_as_one_and_record_it_once(prefect_api, tmp_path, monkeypatch):
    from prefect import flow

    from tasks.stages import run

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one, two = tmp_path / "one", tmp_path / "two"
    cfg = load_config(REPO / "params.yaml", TINY)
    task = run_stage("task", cfg, one)
    shutil.copytree(one, two)
    alone = run_stage("pretrain", cfg, one)

    launched_cfg = cfg.model_copy(update={"orchestration": cfg.orchestration.model_copy(update={"gpu_processes": 2})})

    @flow
    def gpu_stage():
        return run("pretrain", launched_cfg, str(two), [task.model_copy(update={"outputs": {
            k: a.model_copy(update={"path": str(two / Path(a.path).relative_to(one))}) for k, a in task.outputs.items()
        }})], None)

    result = gpu_stage()
    assert result.intact() and (two / "models/base/model.safetensors").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{two / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.`rlhf.stage` = 'pretrain'")
    assert [r.info.run_id for r in runs] == [result.run_id]  # recorded once, by the main process
    assert runs[0].data.tags["rlhf.processes"] == "2"
    # the same training: a step's gradients from two halves agree with one batch's within 3e-7
    # (float summation order), which an epoch of Adam steps amplifies (3.7e-4 with length-grouped batches)
    assert result.model_uri and result.metrics["loss"] == pytest.approx(alone.metrics["loss"], rel=1e-3)
