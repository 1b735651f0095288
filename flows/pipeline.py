"""The RLHF pipeline as one Prefect flow (InstructGPT's loop on the configured world).

world -> pretrain -> sft -> collect -> label -> validate -> reward -> rl -> evaluate -> promote

Stages run in the order of `layout.STAGES`, each cached by its inputs; the flow records one
MLflow parent run, publishes the evaluation summary as a Prefect table artifact, and finally has
DVC record every dataset and model in `dvc.lock` and push them to the default remote.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, runtime
from prefect.settings import PREFECT_UI_URL
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from components.pipeline import tracking, versioning
from components.config import PipelineConfig, override, project_config
from components.pipeline.layout import STAGES, StageResult
from components.pipeline.promotion import standing
from flows.gpu import GPU_STAGES, run_on_pool
from flows.judging import export_judge_key
from flows.server import project_run
from tasks.stages import cached_result, promote_task, run

REPO = Path(__file__).resolve().parents[1]


def summary_rows(metrics: dict[str, float], promotion: dict | None) -> list[dict]:
    rows = [{"metric": key, "value": round(value, 4)} for key, value in sorted(metrics.items()) if key.startswith("eval/")]
    if promotion:
        rows.append({"metric": "registered", "value": f"{promotion['model_name']} v{promotion['version']}"})
        rows.append({"metric": "champion", "value": "yes" if promotion["champion"] else "no: " + "; ".join(promotion["reasons"])})
    return rows


def format_table(rows: list[dict]) -> str:
    width = max(len(r["metric"]) for r in rows)
    return "\n".join(f"{r['metric']:<{width}}  {r['value']}" for r in rows)


def where_to_watch(tracking_uri: str, experiment: str, run_id: str) -> str:
    """Log line with the flow run's page in the Prefect UI and the parent run's in MLflow's."""
    ui = PREFECT_UI_URL.value()
    prefect_url = f"{ui}/runs/flow-run/{runtime.flow_run.id}" if ui else "(ephemeral API: no UI; `make up` starts one)"
    mlflow_ui = os.environ.get("RLHF_MLFLOW_URL")
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    mlflow_url = (
        f"{mlflow_ui}/#/experiments/{experiment_id}/runs/{run_id}" if mlflow_ui
        else f"run {run_id} in {tracking_uri} (mlflow ui --backend-store-uri {tracking_uri})"
    )
    return f"Prefect: {prefect_url} | MLflow: {mlflow_url}"


def cached_results(config: PipelineConfig, root: str) -> dict[str, StageResult] | None:
    """Every stage's result when each would reuse its cached one (tasks/stages.py
    `cached_result`), else None."""
    found: dict[str, StageResult] = {}
    for stage in STAGES:
        upstream = [found[s.name] for s in STAGES if set(s.outs + s.metrics) & set(stage.deps)]
        result = cached_result(stage.name, config, root, upstream)
        if result is None:
            return None
        found[stage.name] = result
    return found


def up_to_date(config: PipelineConfig, root: str) -> dict | None:
    """The flow's outcome for a project it would not change, found without running it (no Prefect
    flow run, no MLflow run): every stage cached for `config` and its policy registered under
    `config`. The summary is the cached evaluation's and the policy's standing in the registry now;
    dvc.lock is made to record `config`, as the flow does. None when the flow has work to do."""
    root = str(Path(root).resolve())
    results = cached_results(config, root)
    if results is None:
        return None
    promotion = standing(config, results["rl"].outputs["policy"].md5)
    if promotion is None:  # e.g. only compared so far (promote=False): the flow registers it
        return None
    metrics = results["evaluate"].metrics
    versioning.record(root, config)
    return {"metrics": metrics, "promotion": promotion, "parent_run_id": None, "summary": summary_rows(metrics, promotion)}


class NoParentRun:
    """The parent run of a fully cached re-run: none, so it records nothing."""

    run_id = None

    def set_tags(self, tags: dict) -> None: ...
    def log_metrics(self, metrics: dict) -> None: ...
    def end(self, status: str) -> None: ...
    def parented(self, run_ids: list) -> bool:
        return True


@flow(name="rlhf-pipeline", log_prints=True)
def rlhf_pipeline(
    config: PipelineConfig = project_config(REPO), root: str = ".", promote: bool = True,
    overrides: list[str] | None = None,
) -> dict:
    """Run every stage under `root` (a DVC repository), then register the policy as challenger and
    maybe crown it champion (`promote=False`: evaluation only, as when methods are compared).
    `overrides` take `--set` syntax (e.g. rl.algorithm=dpo) over `config`, whose form defaults are
    the project's params.yaml. A deployed run sends the heavy stages to `orchestration.gpu_pool`."""
    with project_run(root, override(config, overrides or []).experiment):  # one run per project folder
        return _run_pipeline(config, root, promote, overrides)


def _run_pipeline(config: PipelineConfig, root: str, promote: bool, overrides: list[str] | None) -> dict:
    logger = get_run_logger()
    config = override(config, overrides or [])
    export_judge_key(config)  # the judge's key from a Prefect Secret block, for this process's stages
    root = str(Path(root).resolve())
    uri = tracking.configure(root, config.experiment)
    name = f"{config.rl.algorithm}-{datetime.now(timezone.utc):%Y-%m-%d-%H%M%S}"
    if cached_results(config, root) is not None:  # nothing will run: no parent run to add to MLflow
        pipeline = NoParentRun()
        logger.info("every stage is cached for this configuration: no new MLflow run")
    else:
        pipeline = tracking.PipelineRun(config.experiment, config.model_dump(), root, name)
        logger.info(where_to_watch(uri, config.experiment, pipeline.run_id))
    remote = bool(config.orchestration.gpu_pool and runtime.deployment.id)
    progress = create_progress_artifact(0.0, key="rlhf-progress", description="pipeline stages done (%)")
    results: dict[str, StageResult] = {}
    try:
        for done, stage in enumerate(STAGES, start=1):
            upstream = [results[s.name] for s in STAGES if set(s.outs + s.metrics) & set(stage.deps)]
            runner = run_on_pool if remote and stage.name in GPU_STAGES else run
            results[stage.name] = runner(stage.name, config, root, upstream, pipeline.run_id)
            pipeline.set_tags({f"rlhf.stage_run.{stage.name}": results[stage.name].run_id})
            update_progress_artifact(progress, 100.0 * done / len(STAGES))
        metrics = results["evaluate"].metrics
        pipeline.log_metrics(metrics)
        lineage = {f"data.{a.name}.md5": a.md5 for r in results.values() for a in r.outputs.values()}
        pipeline.set_tags(lineage)
        promotion = None
        if promote:
            promotion = promote_task(
                results["rl"].model_uri, results["rl"].outputs["policy"].md5, metrics, config, root, lineage,
                registry_uri=mlflow.get_registry_uri(),
            )
            pipeline.set_tags({"rlhf.registered_version": promotion["version"], "rlhf.champion": promotion["champion"]})
        rows = summary_rows(metrics, promotion)
        create_table_artifact(key="rlhf-summary", table=rows, description=f"Evaluation of the {config.rl.algorithm} policy against SFT")
        logger.info("summary\n%s", format_table(rows))
        versioning.record(root, config)
    except BaseException:
        pipeline.end("FAILED")
        raise
    pipeline.end("FINISHED")
    if not pipeline.parented([result.run_id for result in results.values()]):
        pipeline.discard()  # a fully cached re-run: no empty parent run
    return {"metrics": metrics, "promotion": promotion, "parent_run_id": pipeline.run_id, "summary": rows}
