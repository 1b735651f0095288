"""Promotion in a real MLflow registry: challenger, gate, head-to-head, forced promotion, rollback."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from components.files import write_jsonl
from components.pipeline import promotion, tracking
from flows.cli import main

GOOD = {"eval/gold_win_rate_vs_sft": 0.9, "eval/kl_to_sft": 1.0}


@pytest.fixture
def registry(tmp_path, tiny_config, tiny_policy, tiny_tokenizer, single_thread):
    """A project with held-out prompts and two logged copies of the same tiny policy."""
    write_jsonl(tmp_path / "data/task/prompts.jsonl",
                [{"prompt": f"Film {i}: The", "split": "eval"} for i in range(8)])
    tracking.configure(tmp_path, tiny_config.experiment)
    uris = []
    for name in ("first", "second"):
        with mlflow.start_run(run_name=name):
            uris.append(tracking.log_transformers_model(tiny_policy(), tiny_tokenizer, "text-generation", name))
    return tmp_path, uris


def test_challenger_losing_head_to_head_stays_challenger_and_rollback_restores(registry, tiny_config, capsys):
    root, (first, second) = registry
    cfg = tiny_config.model_copy(update={"eval": tiny_config.eval.model_copy(update={"n_prompts": 8})})
    lineage = {"data.policy.md5": "abc"}
    crowned = promotion.promote(first, GOOD, cfg, root, lineage)
    assert crowned["champion"] and crowned["version"] == 1  # no champion yet: the gate against SFT decides

    # the same weights: every held-out prompt a tie, win-rate 0.5, not above the margin
    beaten = promotion.promote(second, GOOD, cfg, root, lineage)
    assert not beaten["champion"] and "head-to-head" in beaten["reasons"][0]
    assert beaten["head_to_head.win_rate"] == 0.5 and beaten["head_to_head.ci_low"] < 0.5 < beaten["head_to_head.ci_high"]
    client = MlflowClient()
    name = cfg.promotion.model_name
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    tags = client.get_model_version_by_alias(name, "challenger").tags
    assert tags["gate"] == "failed" and tags["data.policy.md5"] == "abc" and tags["git_commit"] and "config" in tags

    args = ["--root", str(root), "--set", "eval.n_prompts=8"]
    assert main(["promote", "2", "--force", *args]) == 2  # --force needs a reason
    assert main(["promote", "2", "--force", "--reason", "hotfix", *args]) == 0
    assert str(client.get_model_version_by_alias(name, "previous-champion").version) == "1"
    assert main(["promote", "--rollback", *args]) == 0
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert loaded.metadata.run_id == client.get_model_version(name, "1").run_id
    capsys.readouterr()
    assert main(["models", *args]) == 0
    listing = capsys.readouterr().out
    assert "champion" in listing and "challenger" in listing


def test_head_to_head_asks_the_judge_records_its_win_rate_and_gates_on_it_when_asked(
    registry, tiny_config, tmp_path, monkeypatch, caplog
):
    import json
    import logging
    from pathlib import Path

    from tests.judge_server import TEMPLATE, ScriptedJudge, prefer_longer

    key = "sk-promotion-test-key-that-must-not-be-written"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    caplog.set_level(logging.INFO)
    root, (first, second) = registry
    (tmp_path / "judge.txt").write_text(TEMPLATE)
    client, lineage = MlflowClient(), {"data.policy.md5": "abc"}
    with ScriptedJudge(prefer_longer) as server:
        judge = {"base_url": server.url, "model": "scripted", "template": str(tmp_path / "judge.txt"),
                 "cache_dir": str(tmp_path / "judge-cache"), "bootstrap_resamples": 200}
        cfg = tiny_config.model_copy(update={
            "eval": tiny_config.eval.model_copy(update={"n_prompts": 8}),
            "judge": tiny_config.judge.model_copy(update=judge),
            # the gold head-to-head of two equal policies is 0.5: passes this margin, so the judge decides
            "promotion": tiny_config.promotion.model_copy(update={"head_to_head_margin": 0.4}),
        })
        assert promotion.promote(first, GOOD, cfg, root, lineage)["champion"]  # no champion: no head-to-head
        assert server.requests == []

        # judge_margin None: the judge's verdict is recorded, not gated on
        crowned = promotion.promote(second, GOOD, cfg, root, lineage)
        assert len(server.requests) == 2 * 8 and all(r["authorization"] == f"Bearer {key}" for r in server.requests)
        # equal weights, equal answers: "A" in both orders, a tie on every prompt
        assert crowned["champion"] and crowned["head_to_head.judge_win_rate"] == 0.5
        assert crowned["head_to_head.judge_ci_low"] == crowned["head_to_head.judge_ci_high"] == 0.5
        assert crowned["head_to_head.judge_ties"] == 8 and crowned["head_to_head.judge_position_consistency"] == 0
        version = client.get_model_version(cfg.promotion.model_name, "2")
        assert float(version.tags["head_to_head.judge_win_rate"]) == 0.5
        assert "head_to_head.judge_lc_win_rate" in version.tags
        run = client.get_run(version.run_id)
        assert run.data.metrics["eval/judge_win_rate_vs_champion"] == 0.5
        assert run.data.metrics["judge/calls"] == 16 and "eval/judge_win_rate_vs_champion_ci_low" in run.data.metrics
        assert [a.path for a in client.list_artifacts(version.run_id, "judge")] == ["judge/vs_champion.json"]
        downloaded = client.download_artifacts(version.run_id, "judge/vs_champion.json", str(tmp_path / "download"))
        table = json.loads(Path(downloaded).read_text())
        assert len(table["data"]) == 16

        # judge_margin 0.5: the same tie is not above it; version 1 (registered again) stays challenger
        gated = cfg.model_copy(update={"promotion": cfg.promotion.model_copy(update={"judge_margin": 0.5})})
        refused = promotion.promote(first, GOOD, gated, root, lineage)
        assert len(server.requests) == 16  # the same answers: every judgment from the cache
        # `rlhf promote 3` asks the judge too (the project's default sampling: new answers, new judgments)
        judged_by = ["--set", f"judge.base_url={server.url}", "--set", f"judge.template={tmp_path / 'judge.txt'}",
                     "--set", f"judge.cache_dir={tmp_path / 'judge-cache'}", "--set", "promotion.judge_margin=0.5"]
        assert main(["promote", "3", "--root", str(root), "--set", "eval.n_prompts=8", *judged_by]) == 1
        assert len(server.requests) > 16 and all(r["authorization"] == f"Bearer {key}" for r in server.requests)
        assert "head_to_head.judge_win_rate" in client.get_model_version(cfg.promotion.model_name, "3").tags
    assert not refused["champion"] and refused["reasons"] == [
        "judge win-rate 0.500 (95% CI 0.500-0.500) against champion v2 is not above promotion.judge_margin 0.5"]
    assert str(client.get_model_version_by_alias(cfg.promotion.model_name, "champion").version) == "2"

    # the key: in no tag, param, metric, artifact or log
    assert key not in caplog.text
    for found in client.search_model_versions(f"name='{cfg.promotion.model_name}'"):
        assert key not in json.dumps(found.tags)
        data = client.get_run(found.run_id).data
        assert key not in json.dumps(data.params) + json.dumps(data.tags)
    for path in root.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
