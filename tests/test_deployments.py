"""The operated system: a real Prefect server, process workers on rlhf-cpu and rlhf-gpu, the MLflow UI
and prefect.yaml's deployments, brought up once for this module by `flows.stack` (what `make up` runs).

Runs are triggered as the UI does (REST calls on the server), with the tiny configuration. One stack
serves every test of the module (about 5 minutes on 2 cores, on one of `make test`'s two workers)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request

import psutil
import pytest
from mlflow.tracking import MlflowClient

from components.config import load_config
from components.files import read_jsonl
from components.pipeline import tracking
from flows import stack
from tests.conftest import REPO, TINY, make_project

LABELING = {"human": {"session_size": 3, "timeout_s": 300}}
DEPLOYMENTS = ("rlhf-pipeline/scheduled", "rlhf-pipeline/manual", "rlhf-label/human", "rlhf-promote/manual",
               "rlhf-stage/pretrain-sft", "rlhf-stage/reward", "rlhf-stage/rl")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class API:
    def __init__(self, port: int):
        self.port, self.base = port, f"http://127.0.0.1:{port}/api"

    def call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        for attempt in range(5):  # 503: the server asks to retry (SQLite busy), as Prefect's own client does
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    text = response.read()
                return json.loads(text) if text else None
            except urllib.error.HTTPError as error:
                if error.code != 503 or attempt == 4:
                    raise
                time.sleep(1)

    def deployment(self, name: str) -> dict:
        return self.call("GET", f"/deployments/name/{name}")

    def trigger(self, name: str, parameters: dict) -> str:
        """What the UI's "Run" button does."""
        run = self.call("POST", f"/deployments/{self.deployment(name)['id']}/create_flow_run", {"parameters": parameters})
        return run["id"]

    def wait(self, run_id: str, states: set[str], timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.call("GET", f"/flow_runs/{run_id}")
            if run["state_type"] in states:
                return run
            assert run["state_type"] not in {"FAILED", "CRASHED", "CANCELLED"}, run["state"]
            time.sleep(1)
        raise AssertionError(f"flow run {run_id} never reached {states}: {run['state_type']}")

    def question(self, run: dict) -> str:
        """The markdown above the paused run's form (saved just after the run pauses)."""
        key = run["state"]["state_details"]["run_input_keyset"]["description"]
        for _ in range(30):
            try:
                return self.call("GET", f"/flow_runs/{run['id']}/input/{key}")
            except urllib.error.HTTPError as error:
                assert error.code == 404, error
                time.sleep(0.5)
        raise AssertionError(f"flow run {run['id']} paused without its question")


@pytest.fixture(scope="module")
def operated(tmp_path_factory):
    """`make up` on a free port over a fresh project; `make down` afterwards."""
    base = tmp_path_factory.mktemp("operated")
    project, state = make_project(base / "project"), base / "stack"
    ports = (_free_port(), _free_port())
    lines = stack.up(project, REPO, state, *ports, worker_seconds=2)
    assert any("deployed prefect.yaml" in line for line in lines)
    yield API(ports[0]), project, lambda: stack.up(project, REPO, state, *ports, worker_seconds=2), state
    stack.down(state)


@pytest.fixture(scope="module")
def dpo_run(operated):
    """rlhf-pipeline/manual triggered with rl.algorithm=dpo as an override, run to completion."""
    api, project, _, _ = operated
    config = load_config(REPO / "params.yaml", {**TINY, **LABELING}).model_dump(mode="json")
    run_id = api.trigger("rlhf-pipeline/manual", {"config": config, "root": str(project), "overrides": ["rl.algorithm=dpo"]})
    return api.wait(run_id, {"COMPLETED"}, timeout=900)


def test_stack_is_up_once_and_the_schedule_has_upcoming_runs(operated):
    api, _, up_again, state = operated
    again = up_again()
    assert all("started" not in line and "created" not in line for line in again)
    assert "deployments: up to date" in again
    for name in DEPLOYMENTS:
        assert api.deployment(name)["work_pool_name"] == ("rlhf-gpu" if name.startswith("rlhf-stage/") else "rlhf-cpu")
    listed = subprocess.run([str(stack.BIN / "prefect"), "deployment", "ls"], capture_output=True, text=True,
                            env={**stack.environment(state, api.port, 0), "COLUMNS": "250"}, check=True).stdout
    assert all(name in listed for name in DEPLOYMENTS), listed  # both `manual`s, each under its flow
    scheduled = api.deployment("rlhf-pipeline/scheduled")
    assert scheduled["global_concurrency_limit"]["limit"] == 1, scheduled
    deadline, upcoming = time.monotonic() + 60, []
    while not upcoming and time.monotonic() < deadline:
        upcoming = api.call("POST", "/flow_runs/filter", {
            "deployments": {"id": {"any_": [scheduled["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
        })
        time.sleep(2)
    assert upcoming, "no scheduled run within a minute"
    api.call("POST", f"/deployments/{scheduled['id']}/pause_deployment")  # a nightly run must not start mid-test


def test_manual_trigger_runs_training_stages_as_subflows_on_the_gpu_pool(operated, dpo_run):
    api, project, _, _ = operated
    groups = {"pretrain-sft": ["pretrain", "sft"], "reward": ["reward"], "rl": ["rl"]}  # one deployment per group
    subflows = []
    for group, stages in groups.items():
        runs = api.call("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [api.deployment(f"rlhf-stage/{group}")["id"]]}}})
        assert sorted(run["name"] for run in runs) == stages
        subflows += runs
    assert {run["work_pool_name"] for run in subflows} == {"rlhf-gpu"}
    assert all(run["parent_task_run_id"] and run["state_type"] == "COMPLETED" for run in subflows)
    assert dpo_run["work_pool_name"] == "rlhf-cpu"
    tracking.configure(project, "rlhf-pipeline")
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("rlhf-pipeline").experiment_id])
    parents = [run for run in runs if run.data.tags.get("rlhf.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.run_name.startswith("dpo-")
    assert len(runs) == 10  # the parent and one run per stage
    challenger = client.get_model_version_by_alias("rlhf-policy", "challenger")
    assert challenger.tags["gate"] in {"passed", "failed"} and "data.preferences.md5" in challenger.tags


def _kill_worker(state) -> None:
    """The cpu worker and the flow run it spawned, killed as a crash would."""
    worker = psutil.Process(int((state / "worker-cpu.pid").read_text()))
    family = [worker, *worker.children(recursive=True)]
    for process in family:
        process.kill()
    psutil.wait_procs(family, timeout=10)


def test_human_labeling_refuses_invalid_answers_and_survives_a_killed_worker(operated, dpo_run):
    api, project, up_again, state = operated
    config = load_config(REPO / "params.yaml", {**TINY, **LABELING}).model_dump(mode="json")
    parameters = {"config": config, "root": str(project), "session": "s1"}
    run_id = api.trigger("rlhf-label/human", parameters)
    question = api.question(api.wait(run_id, {"PAUSED"}, timeout=300))
    assert "Item 1" in question and "Rank the completions" in question

    def answer(run_id: str, ranking: list[int]) -> dict:
        api.call("POST", f"/flow_runs/{run_id}/resume", {"run_input": {"annotator": "ann", "ranking": ranking}})
        return api.wait(run_id, {"PAUSED", "COMPLETED"}, timeout=120)

    refused = answer(run_id, [1, 1, 2, 3])
    assert "Item 1" in api.question(refused) and "refused" in api.question(refused)
    second = answer(run_id, [4, 3, 2, 1])
    assert "Item 2" in api.question(second)
    answer(run_id, [1, 2, 3, 4])
    session = project / "data/human/s1"
    assert len(read_jsonl(session / "labels.jsonl")) == 2

    _kill_worker(state)
    api.call("POST", f"/flow_runs/{run_id}/set_state", {"state": {"type": "CRASHED"}, "force": True})
    assert any("worker-cpu: started" in line for line in up_again())  # a new worker
    resumed = api.trigger("rlhf-label/human", parameters)  # the same session, continued
    third = api.wait(resumed, {"PAUSED"}, timeout=300)
    assert "Item 3" in api.question(third)
    done = answer(resumed, [2, 1, 3, 4])
    assert done["state_type"] == "COMPLETED"

    labels = read_jsonl(session / "labels.jsonl")
    assert [(row["item"], row["ranking"]) for row in labels] == [(0, [4, 3, 2, 1]), (1, [1, 2, 3, 4]), (2, [2, 1, 3, 4])]
    assert len(read_jsonl(session / "pairs.jsonl")) == 3 * 6  # K(K-1)/2 per ranking
    assert json.loads((session / "validation.json").read_text())["success"]
    assert (session / "pairs.jsonl.dvc").is_file()


def test_an_online_round_takes_its_fresh_labels_from_people_in_the_ui(operated, dpo_run):
    """rl.rounds=2 with label.labeler=human: between the rounds the rl stage (deployment rlhf-stage/rl,
    on the gpu worker) pauses on the labeling form for each prompt; the answers are the round's labels."""
    api, project, _, _ = operated
    overrides = {"rl": {"algorithm": "dpo", "rounds": 2, "round_prompts": 3}, "label": {"labeler": "human"}}
    config = load_config(REPO / "params.yaml", {**TINY, **LABELING, **overrides}).model_dump(mode="json")
    run_id = api.trigger("rlhf-stage/rl", {"name": "rl", "config": config, "root": str(project), "upstream": []})
    asked = 0
    while (run := api.wait(run_id, {"PAUSED", "COMPLETED"}, timeout=600))["state_type"] == "PAUSED":
        assert f"Item {asked + 1}" in api.question(run) and "Rank the completions" in api.question(run)
        api.call("POST", f"/flow_runs/{run_id}/resume", {"run_input": {"annotator": "ann", "ranking": [4, 3, 2, 1]}})
        asked += 1
    assert asked == 3 and run["work_pool_name"] == "rlhf-gpu"
    (labels,) = (project / "data/preferences/human").glob("seed-*/labels.jsonl")
    assert [row["ranking"] for row in read_jsonl(labels)] == [[4, 3, 2, 1]] * 3
    tracking.configure(project, "rlhf-pipeline")
    client = MlflowClient()
    (rl_run,) = client.search_runs([client.get_experiment_by_name("rlhf-pipeline").experiment_id],
                                   "tags.`rlhf.stage` = 'rl'", order_by=["attributes.start_time DESC"], max_results=1)
    assert rl_run.data.metrics["round1_human/answered"] == 3 and rl_run.data.metrics["round1_human/pairs"] == 18
