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
