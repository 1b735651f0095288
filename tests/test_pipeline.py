"""The whole pipeline on a tiny configuration, through a real Prefect API, a real MLflow SQLite
store and registry, and a real DVC repository in a temp dir."""

from __future__ import annotations

import hashlib
import json
import math

import mlflow
import pytest
import yaml
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from components.models.training import resolve_precision
from components.pipeline.layout import PATHS, STAGES
from components.pipeline.tracking import DEVICE_TAG

EVAL_METRICS = {
    "eval/gold_win_rate_vs_sft", "eval/proxy_win_rate_vs_sft", "eval/kl_to_sft", "eval/gold_reward_mean",
    "eval/sft_gold_reward_mean", "eval/proxy_reward_mean", "eval/sft_proxy_reward_mean", "eval/response_length_mean",
    "eval/eos_rate",
}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, prefect_api):
    from components.config import load_config
    from flows.pipeline import rlhf_pipeline
    from tests.conftest import REPO, TINY, make_project

    root = make_project(tmp_path_factory.mktemp("pipeline") / "project")
    cfg = load_config(REPO / "params.yaml", TINY)
    outcome = rlhf_pipeline(config=cfg, root=str(root))
    return root, cfg, outcome


def lock_hashes(root) -> dict[str, str]:
    """path -> md5 of every stage output recorded in dvc.lock."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def _runs(root, view=ViewType.ACTIVE_ONLY, **filters) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf-pipeline")
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in filters.items())
    return client.search_runs([experiment.experiment_id], filter_string=query, run_view_type=view, max_results=500)


def test_flow_reports_every_evaluation_metric(pipeline_run):
    root, _, outcome = pipeline_run
    assert set(outcome["metrics"]) == EVAL_METRICS
    assert all(math.isfinite(v) for v in outcome["metrics"].values())
    assert 0.0 <= outcome["metrics"]["eval/gold_win_rate_vs_sft"] <= 1.0
    on_disk = json.loads((root / PATHS["eval_metrics"]).read_text())
    assert on_disk == pytest.approx(outcome["metrics"])


def test_the_ui_shows_the_progress_of_each_trainer_and_rl_loop_while_it_runs(pipeline_run):
    """Each stage's bars (components/progress.py) are Prefect progress artifacts, updated to 100%."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))
    final = {a.key: a for a in sorted(artifacts, key=lambda a: a.updated)}  # the last update of each key
    for key in ("pretrain-sft-progress", "sft-sft-progress", "reward-reward-progress", "rl-ppo-progress"):
        assert key in final, sorted(final)
        assert final[key].data == 100.0 and " of " in final[key].description


def test_mlflow_has_parent_run_with_one_nested_run_per_stage(pipeline_run):
    root, _, outcome = pipeline_run
    parent = _runs(root, **{"rlhf.stage": "pipeline"})
    assert [r.info.run_id for r in parent] == [outcome["parent_run_id"]]
    assert parent[0].data.metrics.keys() >= EVAL_METRICS
    for stage in STAGES:
        (run,) = _runs(root, **{"rlhf.stage": stage.name})
        assert run.data.tags["mlflow.parentRunId"] == outcome["parent_run_id"]
        assert run.info.status == "FINISHED"
        # the fact that decides `mixed_precision: auto` on a CPU: bf16 with AMX, float32 without
        assert run.data.tags[DEVICE_TAG].endswith("AMX bf16 yes" if resolve_precision("auto") == "bf16" else "AMX bf16 no")
    ppo_run = _runs(root, **{"rlhf.stage": "rl"})[0]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    history = client.get_metric_history(ppo_run.info.run_id, "train/kl")
    assert [m.step for m in history] == [0, 1]
    assert history[-1].value == pytest.approx(ppo_run.data.metrics["kl"])


def test_dataset_hashes_on_runs_equal_dvc_lock_and_dvc_is_clean(pipeline_run):
    from dvc.repo import Repo

    root, _, _ = pipeline_run
    locked = lock_hashes(root)
    (label_run,) = _runs(root, **{"rlhf.stage": "label"})
    (reward_run,) = _runs(root, **{"rlhf.stage": "reward"})
    assert label_run.data.tags["data.samples.md5"] == locked[PATHS["samples"]]
    assert reward_run.data.tags["data.preferences.md5"] == locked[PATHS["preferences"]]
    # folders too: MLflow records DVC's own .dir md5, so a model is traced to its DVC version
    assert reward_run.data.tags["data.sft.md5"] == locked[PATHS["sft"]] and locked[PATHS["sft"]].endswith(".dir")
    assert reward_run.data.tags["output.reward.md5"] == locked[PATHS["reward"]]
    for key in ("corpus", "prompts", "demonstrations", "samples", "preferences", "completions"):
        assert PATHS[key] in locked
    with Repo(str(root)) as repo:
        assert repo.status() == {}
    assert (root.parent / "dvc-remote").is_dir()  # pushed to the default local remote


def test_dvc_lock_records_the_configuration_that_ran_not_params_yaml(pipeline_run):
    """The flow ran with the tiny configuration as its parameter; params.yaml on disk holds the defaults."""
    root, cfg, _ = pipeline_run
    assert yaml.safe_load((root / "params.yaml").read_text())["world"]["n_reviews"] == 6000
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    recorded = lock["task"]["params"]["params.run.yaml"]
    assert recorded["world"]["n_reviews"] == cfg.world.n_reviews == 400
    assert recorded["base"] == cfg.base.model_dump()
    assert lock["rl"]["params"]["params.run.yaml"]["ppo"]["steps"] == cfg.ppo.steps
    assert yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["rl"]["cmd"] == "rlhf stage rl --config params.run.yaml"


def test_policy_is_registered_and_champion_loads_and_generates(pipeline_run):
    root, _, outcome = pipeline_run
    assert outcome["promotion"]["champion"] is True
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    version = MlflowClient().get_model_version_by_alias("rlhf-policy", "champion")
    assert int(version.version) == outcome["promotion"]["version"]
    model = mlflow.pyfunc.load_model("models:/rlhf-policy@champion")
    generated = model.predict(["The Silent Harbor: I watched"])
    assert isinstance(generated[0], str) and len(generated[0]) > 0


def test_rlhf_run_on_an_up_to_date_project_reports_without_a_flow_run(pipeline_run, tmp_path, capsys):
    """`rlhf run` where every stage is cached for the configuration and its policy is registered:
    the same summary, read from the stage cache and the registry; no Prefect flow run, no MLflow
    run, no new version. After a rollback it says the policy is no longer champion."""
    from prefect import get_client

    from components.pipeline import promotion
    from flows.cli import main
    from flows.pipeline import format_table, up_to_date

    root, cfg, first = pipeline_run
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with get_client(sync_client=True) as client:
        flow_runs = len(client.read_flow_runs())
    mlflow_runs = len(_runs(root, ViewType.ALL))
    capsys.readouterr()
    assert main(["run", "--root", str(root), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "nothing ran" in out and format_table(first["summary"]) in out
    with get_client(sync_client=True) as client:
        assert len(client.read_flow_runs()) == flow_runs
    assert len(_runs(root, ViewType.ALL)) == mlflow_runs

    client = MlflowClient(registry_uri=f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    name = cfg.promotion.model_name
    client.delete_registered_model_alias(name, promotion.CHAMPION)  # as if another version took over
    try:
        outcome = up_to_date(cfg, str(root))
        assert outcome["promotion"]["version"] == first["promotion"]["version"]
        assert outcome["promotion"]["champion"] is False and "the champion is now none" in outcome["promotion"]["reasons"][0]
    finally:
        client.set_registered_model_alias(name, promotion.CHAMPION, str(first["promotion"]["version"]))
    changed = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"n_prompts": 10})})
    assert up_to_date(changed, str(root)) is None  # the evaluation would run again


def test_rerun_skips_every_unchanged_stage(pipeline_run):
    from flows.pipeline import rlhf_pipeline

    root, cfg, first = pipeline_run
    stage_runs_before = len(_runs(root)) - len(_runs(root, **{"rlhf.stage": "pipeline"}))
    parents_before = len(_runs(root, ViewType.ALL, **{"rlhf.stage": "pipeline"}))
    second = rlhf_pipeline(config=cfg, root=str(root))
    stage_runs_after = len(_runs(root)) - len(_runs(root, **{"rlhf.stage": "pipeline"}))
    assert stage_runs_after == stage_runs_before  # no stage ran again
    # and no empty parent run: none was created (not even one deleted afterwards)
    assert len(_runs(root, ViewType.ALL, **{"rlhf.stage": "pipeline"})) == parents_before
    assert second["parent_run_id"] is None
    assert second["metrics"] == first["metrics"]
    assert second["promotion"]["version"] == first["promotion"]["version"]  # not registered twice

    changed = cfg.model_copy(update={"ppo": cfg.ppo.model_copy(update={"steps": 3})})
    rlhf_pipeline(config=changed, root=str(root))
    rerun = {r.data.tags["rlhf.stage"] for r in _runs(root)} - {"pipeline"}
    counts = {name: len(_runs(root, **{"rlhf.stage": name})) for name in rerun}
    assert counts == {s.name: (2 if s.name in ("rl", "evaluate") else 1) for s in STAGES}


def test_compare_runs_each_method_over_seeds_on_the_same_upstream_stages(pipeline_run):
    """`rlhf compare --seeds 2`: each method's RL stage twice (rl.seed_offset 0 and 1) on the cached
    upstream stages; summary.json holds each metric's mean and Student-t interval and the frontier area."""
    from flows.compare import compare_methods

    root, cfg, _ = pipeline_run
    upstream = {name: len(_runs(root, **{"rlhf.stage": name})) for name in ("task", "sft", "reward")}
    cfg = cfg.model_copy(update={"best_of_n": cfg.best_of_n.model_copy(update={"n": 2, "n_prompts": 8})})
    outcome = compare_methods(methods=["ppo", "best_of_n"], config=cfg, root=str(root), seeds=2)

    summary = json.loads((root / "data" / "compare" / "summary.json").read_text())
    assert set(summary) == {"ppo", "best_of_n", "_frontier_kl"} and summary["_frontier_kl"] >= 0
    for method in ("ppo", "best_of_n"):
        runs = outcome["runs"][method]
        for metric in ("gold_win_rate_vs_sft", "proxy_win_rate_vs_sft", "kl_to_sft"):
            values = [run["final"][f"eval/{metric}"] for run in runs]
            stat = summary[method][metric]
            half = 12.706204736174698 * abs(values[0] - values[1]) / math.sqrt(2) / math.sqrt(2)  # t_{0.975,1} s/sqrt(2)
            assert stat["mean"] == pytest.approx(sum(values) / 2)
            assert (stat["ci_low"], stat["ci_high"]) == pytest.approx((stat["mean"] - half, stat["mean"] + half))
        assert isinstance(summary[method]["frontier_area"], float)
    assert outcome["runs"]["ppo"][0]["trace"] != outcome["runs"]["ppo"][1]["trace"]  # two different RL runs
    assert {name: len(_runs(root, **{"rlhf.stage": name})) for name in upstream} == upstream  # from the cache
    assert (root / "data" / "compare" / "frontier.png").stat().st_size > 0


def test_pipeline_starts_from_an_ingested_external_set(pipeline_run, tmp_path):
    """`data.source` replaces the simulated labels; the set is checked row by row and by GX."""
    from flows.pipeline import rlhf_pipeline

    root, cfg, _ = pipeline_run
    prompts = [json.loads(line)["prompt"] for line in (root / PATHS["prompts"]).read_text().splitlines()][:10]
    responses = (" I loved this film.", " The plot is dull.", " It is wonderful to watch.")
    rows = ["prompt,response,rating,annotator"]
    for prompt in prompts:
        for response, rating in zip(responses, (5, 1, 4)):
            for annotator, noise in (("ann-a", 0), ("ann-b", -1 if response == responses[2] else 0)):
                rows.append(f'"{prompt}","{response}",{rating + noise},{annotator}')
    rows.append(f'"{prompts[0]}"," A bad row.",7,ann-a')  # out of range: quarantined, below the threshold
    source = tmp_path / "ratings.csv"
    source.write_text("\n".join(rows) + "\n")

    external = cfg.model_copy(update={"data": cfg.data.model_copy(update={"source": str(source), "format": "ratings"})})
    outcome = rlhf_pipeline(config=external, root=str(root))

    (label_run,) = [r for r in _runs(root, **{"rlhf.stage": "label"}) if r.data.params.get("data.source") == str(source)]
    metrics = label_run.data.metrics
    assert (metrics["rows"], metrics["quarantined_rows"], metrics["pairs"]) == (61, 1, 30)
    assert metrics["agreement/multi_annotator_items"] == 30
    assert metrics["agreement/mean_pairwise_agreement"] == pytest.approx(1.0)  # the two annotators agree on order
    pairs = [json.loads(line) for line in (root / PATHS["preferences"]).read_text().splitlines()]
    assert len(pairs) == 30 and all(p["chosen"] != p["rejected"] for p in pairs)
    quarantine = [json.loads(line) for line in (root / "data/preferences/quarantine.jsonl").read_text().splitlines()]
    assert [(q["row"], q["field"]) for q in quarantine] == [(62, "rating")]
    (reward_run,) = [r for r in _runs(root, **{"rlhf.stage": "reward"}) if r.data.tags["mlflow.parentRunId"] == outcome["parent_run_id"]]
    assert reward_run.data.tags["data.preferences.md5"] == lock_hashes(root)[PATHS["preferences"]]
    assert label_run.data.tags["data.data.source.md5"] == hashlib.md5(source.read_bytes()).hexdigest()

    # the source's content keys the cache: an edited file is ingested again under the same name
    source.write_text("\n".join(rows[:-1]) + "\n")  # the bad row fixed by removing it
    rlhf_pipeline(config=external, root=str(root))
    labels = [r for r in _runs(root, **{"rlhf.stage": "label"}) if r.data.params.get("data.source") == str(source)]
    assert sorted(r.data.metrics["quarantined_rows"] for r in labels) == [0, 1]
