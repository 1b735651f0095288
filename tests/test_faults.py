"""Faults: kill -9 during each stage of `rlhf run`, a second run in the same folder (from the CLI
or a flow run a worker started), and a pickle planted in Prefect's result store.

`rlhf run` runs in a subprocess, as a user starts it, and is killed in turn during every stage;
the last run finishes. Its models, data and logged metrics must equal those of an uninterrupted
run, no process of ours may survive a kill, no finished stage may run again, and no MLflow or
Prefect run may stay RUNNING.

Where a kill lands: the trainers (pretrain, sft, reward, rl) run long enough to be killed for
real mid-training, once their checkpoint folder is stamped and a step is logged. The other stages
(task, collect, label, validate, evaluate) take a fraction of a second on the tiny configuration,
too short to hit by polling; the killed run gets RLHF_TEST_HOLD_STAGE=NAME, and stage NAME waits,
once it has written its outputs and before it records them or ends its MLflow run, to be killed
there (components/pipeline/stages.py). Only that run's environment has it: the rerun resumes
with nothing set, as a user's would.
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

from components.files import content_hash
from components.pipeline.layout import PATHS, STAGES
from components.pipeline.stages import HOLD_VARIABLE
from tests.conftest import REPO, TINY, make_project

RLHF = str(Path(sys.executable).parent / "rlhf")
# every trainer checkpoints each step, so a kill lands between checkpoints
SETTINGS = {**TINY, **{section: {**TINY.get(section, {}), "checkpoint_every": 1} for section in ("base", "sft", "reward", "ppo")}}
MODELS = ("base", "sft", "reward", "policy")
KILLED_IN = tuple(stage.name for stage in STAGES)  # every stage, in the order they run
TRAINERS = ("pretrain", "sft", "reward", "rl")  # killed mid-training; the others where they hold (see above)


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
    """The stage began after `since` (it stamps its checkpoint folder) and, for a trainer, logged a
    step; any other stage holds (it touched `held`)."""
    folder = root / "checkpoints" / stage
    marks = [folder / "run.json"] + ([folder / "metrics.jsonl"] if stage in TRAINERS else [folder / "held"])
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
        hold = {} if stage in TRAINERS else {HOLD_VARIABLE: stage}
        process = subprocess.Popen([RLHF, "run", "--root", str(root), *overrides()], env={**environment(root), **hold},
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


@pytest.mark.slow  # about 15 minutes on 2 cores: `make test-slow`
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
    failed = [r.data.tags["rlhf.stage"] for r in runs if r.info.status == "FAILED"]  # each killed one, once
    assert sorted(failed) == sorted(["pipeline"] * len(KILLED_IN) + list(KILLED_IN))
    # every dataset a stage wrote is the uninterrupted run's (validation.json names its own project's path)
    for name in set(PATHS) - set(MODELS) - {"validation"}:
        assert content_hash(root / PATHS[name]) == content_hash(reference / PATHS[name]), name

    with sqlite3.connect(root / ".prefect" / "prefect.db") as db:
        states = [state for (state,) in db.execute("select state_type from flow_run")]
    assert sorted(states) == ["COMPLETED"] + ["CRASHED"] * len(KILLED_IN)
    assert not (root / "checkpoints").exists() or not any((root / "checkpoints").iterdir())
    # dvc.lock records the --set values the runs used; params.yaml on disk was never edited
    assert (root / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    recorded = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["task"]["params"]["params.run.yaml"]
    assert recorded["world"]["n_reviews"] == SETTINGS["world"]["n_reviews"] != 6000


def hold_the_lock(root: Path, command: str = "rlhf run") -> subprocess.Popen:
    """Another process holding ROOT's lock, as a run in progress does."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from components.pipeline import lock; "
                               "held = lock.acquire(sys.argv[1], sys.argv[2]); print('held', flush=True); time.sleep(60)",
                               str(root), command], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline() == "held\n"
    return holder


def kill(holder: subprocess.Popen) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()


def test_a_second_run_in_the_same_folder_exits_2_naming_the_holder(tmp_path, capsys):
    from components.pipeline import lock
    from flows.cli import main

    holder = hold_the_lock(tmp_path)
    try:
        assert main(["stage", "task", "--root", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("project busy:") and f"rlhf run (pid {holder.pid}, since" in err
        assert len(err.splitlines()) == 1
        with pytest.raises(lock.ProjectBusy, match=f"pid {holder.pid}"):
            lock.acquire(tmp_path, "rlhf run")
    finally:
        kill(holder)
    lock.acquire(tmp_path, "rlhf run").release()  # the kernel released the lock of the killed holder


def test_the_lock_is_reentrant_within_a_process_and_held_until_the_outer_release(tmp_path):
    from components.pipeline import lock

    outer = lock.acquire(tmp_path, "rlhf run")
    inner = lock.acquire(tmp_path / ".." / tmp_path.name, "rlhf-pipeline flow")  # the same folder, spelt otherwise
    assert not outer.reentered and inner.reentered
    inner.release()
    probe = [sys.executable, "-c", "import sys; from components.pipeline import lock; lock.acquire(sys.argv[1], 'x')",
             str(tmp_path)]
    busy = subprocess.run(probe, cwd=REPO, capture_output=True, text=True)
    assert busy.returncode == 1 and "ProjectBusy" in busy.stderr and "rlhf run (pid" in busy.stderr
    outer.release()
    assert subprocess.run(probe, cwd=REPO).returncode == 0


def test_a_flow_run_started_by_a_worker_takes_the_lock_and_cleans_up_after_a_killed_run(prefect_api, project, tiny_config):
    """What a worker runs is the flow itself, with no CLI around it: the flow takes the project's
    lock (a second run, here from another process, stops it before any stage, naming the holder)
    and, holding it, marks failed or crashed what a killed run left RUNNING."""
    import mlflow
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from components.pipeline import lock, tracking
    from flows.pipeline import rlhf_pipeline
    from flows.server import project_run

    holder = hold_the_lock(project, "rlhf-pipeline flow")
    try:
        with pytest.raises(lock.ProjectBusy, match=f"rlhf-pipeline flow \\(pid {holder.pid}, since"):
            rlhf_pipeline(config=tiny_config, root=str(project))
    finally:
        kill(holder)
    assert not (project / "data").exists() and not (project / "models").exists()  # no stage ran

    # what a killed run left: a stage's MLflow run and a flow run, both RUNNING
    tracking.configure(project, tiny_config.experiment)
    stale = mlflow.MlflowClient().create_run(
        mlflow.get_experiment_by_name(tiny_config.experiment).experiment_id,
        tags={tracking.ROOT_TAG: str(project.resolve()), tracking.STAGE_TAG: "sft"}).info.run_id

    @flow
    def killed(root: str) -> None:
        pass

    @flow
    def worker_run(root: str) -> str:
        with project_run(root, tiny_config.experiment):
            return (Path(root) / lock.LOCK_FILE).read_text()

    @flow
    def parent(root: str) -> str:  # as `compare` runs the pipeline: its own run stays alive
        return worker_run(root)

    with get_client(sync_client=True) as client:
        left = client.create_flow_run(killed, parameters={"root": str(project)}, state=Running())
        parent_state = parent(str(project), return_state=True)
        assert client.read_flow_run(left.id).state.type.value == "CRASHED"
        history = [state.type.value for state in client.read_flow_run_states(parent_state.state_details.flow_run_id)]
    assert "CRASHED" not in history and parent_state.type.value == "COMPLETED"
    assert parent_state.result().startswith(f"rlhf-pipeline flow (pid {os.getpid()}, since")
    assert mlflow.MlflowClient().get_run(stale).info.status == "FAILED"
    lock.acquire(project, "rlhf run").release()  # released when the flow ended


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
