"""The RLHF pipeline as one Prefect flow (InstructGPT's loop on the configured world).

world -> pretrain -> sft -> collect -> label -> validate -> reward -> rl -> evaluate -> promote

Stages run in the order of `layout.STAGES`, each cached by its inputs; the flow records one
MLflow parent run, publishes the evaluation summary as a Prefect table artifact, and finally has
DVC record every dataset and model in `dvc.lock` and push them to the default remote.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from components.pipeline import tracking, versioning
from components.config import PipelineConfig
from components.pipeline.layout import STAGES, StageResult, dvc_yaml
from tasks.stages import promote_task, run


def summary_rows(metrics: dict[str, float], promotion: dict | None) -> list[dict]:
    rows = [{"metric": key, "value": round(value, 4)} for key, value in sorted(metrics.items()) if key.startswith("eval/")]
    if promotion:
        rows.append({"metric": "registered", "value": f"{promotion['model_name']} v{promotion['version']}"})
        rows.append({"metric": "champion", "value": "yes" if promotion["champion"] else "no: " + "; ".join(promotion["reasons"])})
    return rows


def format_table(rows: list[dict]) -> str:
    width = max(len(r["metric"]) for r in rows)
    return "\n".join(f"{r['metric']:<{width}}  {r['value']}" for r in rows)


@flow(name="rlhf-pipeline", log_prints=True)
def rlhf_pipeline(config: PipelineConfig = PipelineConfig(), root: str = ".", promote: bool = True) -> dict:
    """Run every stage under `root` (a DVC repository), then register and maybe promote the policy
    (`promote=False`: evaluation only, as when methods are compared)."""
    logger = get_run_logger()
    root = str(Path(root).resolve())
    tracking.configure(root, config.experiment)
    pipeline = tracking.PipelineRun(config.experiment, config.model_dump())
    results: dict[str, StageResult] = {}
    try:
        for stage in STAGES:
            upstream = [results[s.name] for s in STAGES if set(s.outs + s.metrics) & set(stage.deps)]
            results[stage.name] = run(stage.name, config, root, upstream, pipeline.run_id)
            pipeline.set_tags({f"rlhf.stage_run.{stage.name}": results[stage.name].run_id})
        metrics = results["evaluate"].metrics
        pipeline.log_metrics(metrics)
        pipeline.set_tags({f"data.{a.name}.md5": a.md5 for r in results.values() for a in r.outputs.values()})
        promotion = None
        if promote:
            promotion = promote_task(
                results["rl"].model_uri, results["rl"].outputs["policy"].md5, metrics, config.promotion,
                registry_uri=mlflow.get_registry_uri(),
            )
            pipeline.set_tags({"rlhf.registered_version": promotion["version"], "rlhf.champion": promotion["champion"]})
        rows = summary_rows(metrics, promotion)
        create_table_artifact(key="rlhf-summary", table=rows, description=f"Evaluation of the {config.rl.algorithm} policy against SFT")
        logger.info("summary\n%s", format_table(rows))
        versioning.record(root, dvc_yaml(config))
    except BaseException:
        pipeline.end("FAILED")
        raise
    pipeline.end("FINISHED")
    return {"metrics": metrics, "promotion": promotion, "parent_run_id": pipeline.run_id, "summary": rows}
