"""The rlhf-label flow on a real Prefect API (the test harness): a session answered through the API
as the UI's form does, then a pause nobody answers. On that timeout the run ends Completed and keeps
what was labelled."""

from __future__ import annotations

import threading
import time

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run

from components.config import load_config
from components.files import read_jsonl, write_jsonl
from components.pipeline.layout import stage_params
from components.pipeline.stages import params_of
from tests.conftest import REPO, TINY

COMPLETIONS = ["a warm and funny film", "dull", "a slow, muddled story", "fine acting"]


def _paused_run(timeout: float = 60):
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            paused = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            if paused:
                return paused[0]
            time.sleep(0.5)
    raise AssertionError("the labeling run never paused")


def test_a_timed_out_session_completes_and_keeps_its_labels(prefect_api, tmp_path):
    from flows.labeling import rlhf_label

    cfg = load_config(REPO / "params.yaml", {**TINY, "human": {"timeout_s": 4}})
    session = tmp_path / cfg.human.folder / "s"
    session.mkdir(parents=True)
    write_jsonl(session / "items.jsonl", [  # the session's items, as sampled when it started
        {"index": i, "prompt": prompt, "completions": COMPLETIONS} for i, prompt in enumerate(["The film was", "I found it"])
    ])
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(
        state=rlhf_label(config=cfg, root=str(tmp_path), session="s", return_state=True)))
    thread.start()
    run = _paused_run()
    resume_flow_run(run.id, run_input={"annotator": "ann", "ranking": [1, 4, 3, 2]})  # what the form's Submit does
    thread.join(timeout=120)  # item 2 is never answered: its pause times out after 4 s

    state = outcome["state"]
    assert state.type == StateType.COMPLETED, state
    stats = state.result()
    assert stats["human/answered"] == 1 and stats["human/timed_out"] == 1.0
    assert [(row["item"], row["ranking"]) for row in read_jsonl(session / "labels.jsonl")] == [(0, [1, 4, 3, 2])]
    assert len(read_jsonl(session / "pairs.jsonl")) == 6


def test_the_human_section_keys_the_label_and_rl_stages_when_people_label():
    simulated = load_config(REPO / "params.yaml", TINY)
    assert "human" not in stage_params(simulated, "label") + stage_params(simulated, "rl")
    by_hand = load_config(REPO / "params.yaml", {**TINY, "label": {"labeler": "human"}})
    longer = load_config(REPO / "params.yaml", {**TINY, "label": {"labeler": "human"}, "human": {"timeout_s": 60}})
    for stage in ("label", "rl"):
        assert "human" in stage_params(by_hand, stage)
        assert params_of(by_hand, stage) != params_of(longer, stage)  # a different session: not the cached labels
