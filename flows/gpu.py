"""The heavy stages (pretrain, sft, reward, rl) on the GPU work pool.

One deployment per group of heavy stages, all on the `orchestration.gpu_pool` work pool
(prefect.yaml: `rlhf-stage/pretrain-sft`, `rlhf-stage/reward`, `rlhf-stage/rl` on `rlhf-gpu`),
runs one stage of its group through the same cached task as in-process; a deployed pipeline run
calls it with `run_deployment`, so each heavy stage shows as a subflow run in the UI, executed by
whichever worker polls that pool (a GPU host's). With `orchestration.gpu_processes` > 1 the
pretrain, sft and reward trainers run under `accelerate launch` on that many processes
(components/pipeline/launch.py). The project root must be the same path on both hosts (a shared
file system), and so must Prefect's result storage, which carries the stage's result back (as
plain JSON, tasks/results.py).
"""

from __future__ import annotations

from prefect import flow
from prefect.deployments import run_deployment

from components.config import PipelineConfig
from components.pipeline.layout import StageResult
from components.pipeline.stages import StageError
from flows import labeling  # noqa: F401  (online rounds with label.labeler=human ask in the UI)
from flows.judging import export_judge_key
from tasks import results
from tasks.stages import run

GPU_GROUPS = {"pretrain-sft": ("pretrain", "sft"), "reward": ("reward",), "rl": ("rl",)}  # deployment name: stages
GPU_STAGES = tuple(stage for stages in GPU_GROUPS.values() for stage in stages)
GROUP_OF = {stage: group for group, stages in GPU_GROUPS.items() for stage in stages}


@flow(name="rlhf-stage", log_prints=True, persist_result=True, result_serializer=results.PlainJSON())
def rlhf_stage(
    name: str, config: PipelineConfig, root: str, upstream: list[StageResult], parent_run_id: str | None = None,
    group: str | None = None,
) -> StageResult:
    """One pipeline stage under `root` (its cached task, as the pipeline runs it in-process); a
    deployment of group `group` (prefect.yaml sets it) runs only that group's stages."""
    if group is not None and name not in GPU_GROUPS.get(group, ()):
        raise StageError(f"deployment rlhf-stage/{group} runs {', '.join(GPU_GROUPS.get(group, ())) or 'no stage'}, not '{name}'")
    export_judge_key(config)  # the judge's key from its Secret block, in this worker's process only
    return run(name, config, root, upstream, parent_run_id)


def run_on_pool(name: str, cfg: PipelineConfig, root: str, upstream: list[StageResult], parent_run_id: str | None) -> StageResult:
    """Run stage `name` as a subflow run of its group's deployment (rlhf-stage/GROUP) and wait for it."""
    deployment = f"rlhf-stage/{GROUP_OF[name]}"
    parameters = {
        "name": name, "config": cfg.model_dump(mode="json"), "root": root,
        "upstream": [result.model_dump(mode="json") for result in upstream], "parent_run_id": parent_run_id,
        "group": GROUP_OF[name],
    }
    flow_run = run_deployment(deployment, parameters=parameters, flow_run_name=name, as_subflow=True, timeout=None)
    if not flow_run.state.is_completed():
        raise StageError(f"stage '{name}' on {deployment}: {flow_run.state.name}: {flow_run.state.message}")
    return StageResult.model_validate(flow_run.state.result())
