"""Faults: kill -9 during the stages of `rlhf run`, a second run in the same folder, and a pickle
planted in Prefect's result store.

`rlhf run` runs in a subprocess, as a user starts it, and is killed in turn during each stage
that resumes from checkpoints (pretrain, sft, reward, rl) and during label, which stands for the
stages that simply run again; the last run finishes. Its models and logged metrics must equal
those of an uninterrupted run, no process of ours may survive a kill, no finished stage may run
again, and no MLflow or Prefect run may stay RUNNING. (Every kill costs a process start and a
Prefect server: killing in the other four stages too would double the test's minutes.)
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from components.pipeline.layout import PATHS, STAGES
from tests.conftest import REPO, TINY, make_project

RLHF = str(Path(sys.executable).parent / "rlhf")
# every trainer checkpoints each step, so a kill lands between checkpoints
SETTINGS = {**TINY, **{section: {**TINY.get(section, {}), "checkpoint_every": 1} for section in ("base", "sft", "reward", "ppo")}}
MODELS = ("base", "sft", "reward", "policy")
KILLED_IN = ("pretrain", "sft", "label", "reward", "rl")


def overrides() -> list[str]:
    return [f"--set={section}.{key}={value}" for section, values in SETTINGS.items() for key, value in values.items()]


def environment(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    return {**env, "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(root / ".prefect")}


def rlhf_run(root: Path) -> None:
    done = subprocess.run([RLHF, "run", "--root", str(root), *overrides()], env=environment(root), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The pipeline run once, uninterrupted, on the same configuration."""
    root = make_project(tmp_path_factory.mktemp("reference") / "project")
    rlhf_run(root)
    return root


def started(root: Path, stage: str, since: float) -> bool:
    """The stage began after `since` (it stamps its checkpoint folder) and, for a trainer, logged a step."""
    folder = root / "checkpoints" / stage
    marks = [folder / "run.json"] + ([folder / "metrics.jsonl"] if stage in ("pretrain", "sft", "reward", "rl") else [])
    return all(mark.is_file() and mark.stat().st_mtime >= since for mark in marks)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_during(root: Path, stage: str) -> None:
    since, log = time.time(), root.parent / f"killed-in-{stage}.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen([RLHF, "run", "--root", str(root), *overrides()], env=environment(root),
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 300
    while not started(root, stage, since) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    ours = children(process.pid)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, f"the run ended before {stage}: {log.read_text()[-3000:]}"
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in ours) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ours and not [pid for pid in ours if alive(pid)], "a process of the killed run survived it"


def stage_runs(root: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf-pipeline")
    return client.search_runs([experiment.experiment_id], max_results=1000)


def histories(root: Path, run) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics}


@pytest.mark.slow  # about 10 minutes on 2 cores: `make test-slow`
def test_kill_9_during_the_stages_then_a_rerun_gives_the_models_and_metrics_of_an_uninterrupted_run(reference, tmp_path):
    root = make_project(tmp_path / "project")
    for stage in KILLED_IN:
        kill_during(root, stage)
    rlhf_run(root)

    for model in MODELS:
        final, uninterrupted = load_file(root / PATHS[model] / "model.safetensors"), load_file(
            reference / PATHS[model] / "model.safetensors")
        assert final.keys() == uninterrupted.keys()
        assert all((final[name] == weight).all() for name, weight in uninterrupted.items()), model
    runs, expected = stage_runs(root), {r.data.tags["rlhf.stage"]: r for r in stage_runs(reference)}
    assert not [r for r in runs if r.info.status == "RUNNING"]
    finished = {r.data.tags["rlhf.stage"]: r for r in runs if r.info.status == "FINISHED"}
    assert {stage.name: [r.data.tags["rlhf.stage"] for r in runs if r.info.status == "FINISHED"].count(stage.name)
            for stage in STAGES} == {stage.name: 1 for stage in STAGES}  # no finished stage ran twice
    for stage in STAGES:
        assert histories(root, finished[stage.name]) == histories(reference, expected[stage.name]), stage.name
    assert sum(r.info.status == "FAILED" for r in runs if r.data.tags["rlhf.stage"] == "pipeline") == len(KILLED_IN)
    failed = {r.data.tags["rlhf.stage"] for r in runs if r.info.status == "FAILED"}  # label may die before its run
    assert {"pipeline", "pretrain", "sft", "reward", "rl"} <= failed <= {"pipeline", *KILLED_IN}

    with sqlite3.connect(root / ".prefect" / "prefect.db") as db:
        states = [state for (state,) in db.execute("select state_type from flow_run")]
    assert sorted(states) == ["COMPLETED"] + ["CRASHED"] * len(KILLED_IN)
    assert not (root / "checkpoints").exists() or not any((root / "checkpoints").iterdir())
    # dvc.lock records the --set values the runs used; params.yaml on disk was never edited
    assert (root / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    recorded = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["task"]["params"]["params.run.yaml"]
    assert recorded["world"]["n_reviews"] == SETTINGS["world"]["n_reviews"] != 6000


def test_a_second_run_in_the_same_folder_exits_2_naming_the_holder(tmp_path, capsys):
    from components.pipeline import lock
    from flows.cli import main

    held = lock.acquire(tmp_path, "rlhf run")
    try:
        assert main(["stage", "task", "--root", str(tmp_path)]) == 2
    finally:
        held.release()
    err = capsys.readouterr().err
    assert err.startswith("project busy:") and f"rlhf run (pid {os.getpid()}, since" in err and len(err.splitlines()) == 1

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from components.pipeline import lock; "
                               "held = lock.acquire(sys.argv[1], 'rlhf run'); print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(lock.ProjectBusy, match=f"pid {holder.pid}"):
        lock.acquire(tmp_path, "rlhf run")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    lock.acquire(tmp_path, "rlhf run").release()  # the kernel released the lock of the killed holder


class Planted:
    """A pickle that, when loaded, leaves a file behind."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_planted_where_a_cached_result_is_looked_up_is_never_loaded(prefect_api, tmp_path):
    from prefect import flow, task
    from prefect.cache_policies import INPUTS
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    from tasks import results
    from tasks.stages import promote_task, stage_task

    assert isinstance(stage_task.cache_policy, results.Verified) and isinstance(promote_task.cache_policy, results.Verified)
    assert isinstance(stage_task.result_serializer, results.PlainJSON)
    calls = []

    @task(cache_policy=results.Verified(policy=INPUTS), persist_result=True, result_serializer=results.PlainJSON())
    def double(x: int) -> dict:
        calls.append(x)
        return {"double": 2 * x}

    @flow
    def twice(x: int) -> tuple:
        return double(x, return_state=True), double(x)

    state, value = twice(21)
    assert value == {"double": 42} and calls == [21]  # the second call was a cache hit
    record = Path(state.data.metadata.storage_key)
    marker = tmp_path / "executed"
    metadata = ResultRecordMetadata(serializer=PickleSerializer(), storage_key=str(record), expiration=None)
    record.write_bytes(ResultRecord(metadata=metadata, result=Planted(marker)).serialize())
    assert twice(21)[1] == {"double": 42}
    assert not marker.exists() and calls == [21, 21]  # the planted record was dropped and the task ran again
    assert results.written_by_us(record.read_bytes())
