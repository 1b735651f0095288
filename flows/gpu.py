"""The heavy stages (pretrain, sft, reward, rl) on the GPU work pool.

Deployment `rlhf-stage/<orchestration.gpu_pool>` (prefect.yaml: `rlhf-stage/rlhf-gpu` on the
`rlhf-gpu` pool) runs one stage, through the same cached task as in-process; a deployed pipeline
run calls it with `run_deployment`, so each heavy stage shows as a subflow run in the UI, executed
by whichever worker polls that pool (a GPU host's). The project root must be the same path on both
hosts (a shared file system), and so must Prefect's result storage, which carries the stage's
result back (as plain JSON, tasks/results.py).
"""

from __future__ import annotations

from prefect import flow
from prefect.deployments import run_deployment

from components.config import PipelineConfig
from components.pipeline.layout import StageResult
from components.pipeline.stages import StageError
from flows import labeling  # noqa: F401  (online rounds with label.labeler=human ask in the UI)
from tasks import results
from tasks.stages import run

GPU_STAGES = ("pretrain", "sft", "reward", "rl")


@flow(name="rlhf-stage", log_prints=True, persist_result=True, result_serializer=results.PlainJSON())
def rlhf_stage(
    name: str, config: PipelineConfig, root: str, upstream: list[StageResult], parent_run_id: str | None = None
) -> StageResult:
    """One pipeline stage under `root` (its cached task, as the pipeline runs it in-process)."""
    return run(name, config, root, upstream, parent_run_id)


def run_on_pool(name: str, cfg: PipelineConfig, root: str, upstream: list[StageResult], parent_run_id: str | None) -> StageResult:
    """Run stage `name` as a subflow run of deployment rlhf-stage/<gpu_pool> and wait for it."""
    deployment = f"rlhf-stage/{cfg.orchestration.gpu_pool}"
    parameters = {
        "name": name, "config": cfg.model_dump(mode="json"), "root": root,
        "upstream": [result.model_dump(mode="json") for result in upstream], "parent_run_id": parent_run_id,
    }
    flow_run = run_deployment(deployment, parameters=parameters, flow_run_name=name, as_subflow=True, timeout=None)
    if not flow_run.state.is_completed():
        raise StageError(f"stage '{name}' on {deployment}: {flow_run.state.name}: {flow_run.state.message}")
    return StageResult.model_validate(flow_run.state.result())
