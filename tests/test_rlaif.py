"""RLAIF: the `ai` labeler with a constitution, in the pipeline on the tiny configuration, with a
scripted judge behind a real local HTTP server; and the judge's API key written nowhere."""

from __future__ import annotations

import json
import logging
import os

import pytest
from mlflow.tracking import MlflowClient

from components.files import read_jsonl
from components.labelers import LabelingError
from components.labelers.ai import DEFAULT_CONSTITUTION, load_constitution
from components.pipeline.layout import PATHS
from tests.conftest import REPO, TINY
from tests.judge_server import PRINCIPLED, TEMPLATE, ScriptedJudge, prefer_longer

KEY = "sk-rlaif-test-key-that-must-not-be-written"


def test_constitutions_from_yaml_and_markdown(tmp_path):
    assert len(load_constitution(None)) >= 4 and load_constitution(DEFAULT_CONSTITUTION) == load_constitution(None)
    (tmp_path / "list.yaml").write_text("- Be kind.\n- Be brief.\n")
    (tmp_path / "c.md").write_text("# Principles\n\nSome prose.\n\n- Be kind.\n* Be brief.\n3. Be honest.\n")
    assert load_constitution(tmp_path / "list.yaml") == ["Be kind.", "Be brief."]
    assert load_constitution(tmp_path / "c.md") == ["Be kind.", "Be brief.", "Be honest."]
    (tmp_path / "empty.yaml").write_text("principles: []\n")
    with pytest.raises(LabelingError, match="no principle"):
        load_constitution(tmp_path / "empty.yaml")


def test_the_pipeline_labels_with_ai_feedback_learns_and_is_judged_without_writing_the_key(
    tmp_path, monkeypatch, caplog, capsys, single_thread
):
    import mlflow

    from components.config import load_config
    from components.pipeline import judging, tracking
    from components.pipeline.stages import prompts_of, run_stage

    (tmp_path / "judge.txt").write_text(TEMPLATE)
    (tmp_path / "rlaif.txt").write_text(PRINCIPLED)
    (tmp_path / "constitution.md").write_text("- Which answer is more complete?\n- Which answer says more?\n")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caplog.set_level(logging.INFO)
    root = tmp_path / "project"
    root.mkdir()
    with ScriptedJudge(prefer_longer) as server:
        judge = {"base_url": server.url, "model": "scripted", "template": str(tmp_path / "judge.txt"),
                 "cache_dir": str(root / "judge-cache"), "bootstrap_resamples": 200}
        cfg = load_config(REPO / "params.yaml", {
            **TINY, "label": {"labeler": "ai"}, "judge": judge,
            "rlaif": {"constitution": str(tmp_path / "constitution.md"), "template": str(tmp_path / "rlaif.txt")},
            "rl": {**TINY["rl"], "rounds": 2, "round_prompts": 4},
        })
        results = {stage: run_stage(stage, cfg, root) for stage in
                   ("task", "pretrain", "sft", "collect", "label", "validate", "reward", "rl", "evaluate")}
        # against the registry's champion, here the policy itself: the same answers, so only ties
        assert judging.win_rate_vs_champion(cfg, root / PATHS["completions"], prompts_of(str(root), "eval")) == {}
        tracking.register(results["rl"].model_uri, cfg.promotion.model_name, "champion", {})
        with mlflow.start_run():
            versus = judging.win_rate_vs_champion(cfg, root / PATHS["completions"], prompts_of(str(root), "eval"))
        assert all(request["authorization"] == f"Bearer {KEY}" for request in server.requests)
    assert versus["eval/judge_win_rate_vs_champion"] == 0.5
    assert versus["eval/judge_ties_vs_champion"] == TINY["eval"]["n_prompts"]

    pairs = read_jsonl(root / PATHS["preferences"])
    principles = {"Which answer is more complete?", "Which answer says more?"}
    assert pairs and all(p["source"] == "ai" and p["meta"]["principle"] in principles for p in pairs)
    assert all(set(p["meta"]["rationale"]) == {"12", "21"} and "says more" in p["meta"]["rationale"]["12"] for p in pairs)
    # the judge's rule: the longer answer wins in both orders; equal lengths get "A" twice, a tie
    assert all(p["tie"] == (len(p["chosen"]) == len(p["rejected"])) for p in pairs)
    decided = [p for p in pairs if not p["tie"]]
    assert decided and all(len(p["chosen"]) > len(p["rejected"]) for p in decided)
    label = results["label"].metrics
    assert label["pairs"] == len(pairs) and label["position_consistency"] == len(decided) / len(pairs)
    assert 0 <= label["agreement_with_gold"] <= 1 and label["decided_pairs"] == len(decided)
    assert label["calls"] == 2 * len(pairs)
    assert results["rl"].metrics["round1_pairs"] > 0  # the online round labelled fresh samples with the judge
    evaluation = results["evaluate"].metrics
    assert 0 <= evaluation["eval/judge_win_rate_vs_sft_ci_low"] <= evaluation["eval/judge_win_rate_vs_sft"] <= \
        evaluation["eval/judge_win_rate_vs_sft_ci_high"] <= 1
    assert "eval/judge_lc_win_rate_vs_sft" in evaluation and evaluation["judge/unparsable_share"] == 0
    run = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}").get_run(results["evaluate"].run_id)
    artifacts = [a.path for a in MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}").list_artifacts(run.info.run_id, "judge")]
    assert artifacts == ["judge/vs_sft.json"]

    # the key: in no file under the project root, no MLflow param or tag of any run, no output or log
    printed = capsys.readouterr()
    assert KEY not in printed.out + printed.err + caplog.text
    for path in root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    client = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    for stage in results.values():
        data = client.get_run(stage.run_id).data
        assert KEY not in json.dumps(data.params) + json.dumps(data.tags)


def test_a_stage_on_the_gpu_pool_gets_the_judge_key_from_its_secret_block_and_writes_it_nowhere(
    prefect_api, tmp_path, monkeypatch, caplog, capsys
):
    """The rlhf-stage flow (what a GPU-pool worker runs, in its own process) loads the Secret block
    named by judge.api_key_secret into judge.api_key_env at its start; the key is no parameter."""
    from prefect import get_client
    from prefect.blocks.system import Secret

    from components.config import load_config
    from flows.gpu import rlhf_stage

    variable, secret_key = "RLHF_TEST_GPU_JUDGE_KEY", "sk-secret-block-key-for-the-gpu-pool"
    monkeypatch.delenv(variable, raising=False)
    Secret(value=secret_key).save("rlhf-test-judge-key", overwrite=True)
    judge = {"api_key_env": variable, "api_key_secret": "rlhf-test-judge-key"}
    cfg = load_config(REPO / "params.yaml", {**TINY, "judge": judge})
    caplog.set_level(logging.INFO)
    root = tmp_path / "project"
    root.mkdir()
    state = rlhf_stage(name="task", config=cfg, root=str(root), upstream=[], return_state=True)
    assert state.is_completed(), state
    assert os.environ[variable] == secret_key  # in this process, as in the worker's
    with get_client(sync_client=True) as client:  # the run's parameters, its Prefect artifacts and logs
        parameters = client.read_flow_run(state.state_details.flow_run_id).parameters
        artifacts = [artifact.model_dump_json() for artifact in client.read_artifacts()]
        logs = [log.message for log in client.read_logs()]
    assert "rlhf-test-judge-key" in json.dumps(parameters) and secret_key not in json.dumps(parameters, default=str)
    assert logs and not any(secret_key in text for text in artifacts + logs)
    printed = capsys.readouterr()
    assert secret_key not in printed.out + printed.err + caplog.text
    for path in root.rglob("*"):
        if path.is_file():
            assert secret_key.encode() not in path.read_bytes(), path
