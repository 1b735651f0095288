"""One Prefect task per pipeline stage, cached by what the stage depends on.

A stage's cache key hashes its name, the configuration slice it reads, the content hashes of
the datasets and models it consumes (files named in the configuration too), and the library's code version: a re-run skips a stage
exactly when none of these changed. A cached result whose outputs were deleted or modified on
disk is recomputed (`run`). Results are stored as plain JSON and never unpickled (tasks/results.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, CachePolicy
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore, get_default_result_storage
from prefect.settings import get_current_settings
from prefect.utilities.hashing import hash_objects

from components import progress
from components.pipeline import launch, promotion
from components.config import PipelineConfig
from components.pipeline.layout import STAGE_BY_NAME, StageResult, code_version
from components.pipeline.stages import StageError, config_inputs, params_of, run_stage
from tasks import results


@dataclass
class StageInputs(CachePolicy):
    """Cache key: stage name, config slice, input content hashes, code version, project root."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> Optional[str]:
        name, cfg = inputs["name"], inputs["cfg"]
        consumed = {
            artifact.name: artifact.md5
            for result in inputs["upstream"]
            for artifact in result.outputs.values()
            if artifact.name in STAGE_BY_NAME[name].deps
        }
        consumed.update({artifact.name: artifact.md5 for artifact in config_inputs(name, cfg)})
        return hash_objects(
            {
                "stage": name,
                "params": params_of(cfg, name),
                "inputs": consumed,
                "code": code_version(),
                "root": inputs["root"],
            }
        )


@task(cache_policy=results.Verified(policy=StageInputs()), persist_result=True, result_serializer=results.PlainJSON())
def stage_task(
    name: str, cfg: PipelineConfig, root: str, upstream: list[StageResult], parent_run_id: str | None = None
) -> StageResult:
    try:
        if launch.launched(name, cfg):  # on several processes: the trainer under `accelerate launch`
            result = launch.run_launched(name, cfg, root, parent_run_id)
        else:
            with progress.reporting(ui_progress(name)):
                result = run_stage(name, cfg, root, parent_run_id)
    except StageError as error:
        create_markdown_artifact(
            key=f"{name}-failure", markdown=f"## Stage `{name}` failed\n\n```\n{error}\n```", description=str(error)[:200]
        )
        raise
    if result.report:
        create_markdown_artifact(key=f"{name}-report", markdown=result.report, description=f"stage {name}")
    return result


def ui_progress(stage: str) -> progress.Listener:
    """Each progress bar of the stage (a trainer's steps, the RL iterations of a round, sampling)
    as a Prefect progress artifact of the task run, updated while it runs (components/progress.py)."""

    def started(description: str, total: float | None):
        if not total:
            return None
        key = re.sub(r"[^a-z0-9]+", "-", f"{stage}-{description}-progress".lower()).strip("-")
        artifact = create_progress_artifact(0.0, key=key, description=f"{stage}: {description}")

        def done(count: float) -> None:
            update_progress_artifact(artifact, 100.0 * min(count, total) / total,
                                     description=f"{stage}: {description}, {count:.0f} of {total:.0f}")

        return done

    return started


def transient(task, task_run, state) -> bool:
    """Retry a failed stage unless it failed its own checks (StageError: the data or settings are
    wrong, and would be again); a lost worker, a full disk or a flaky file system are retried."""
    try:
        state.result()
    except StageError:
        return False
    except BaseException:
        return True
    return True


def _result_storage():
    """Where Prefect keeps the stage results. Without a configured API, Prefect would start the
    project's temporary server only to hear that it sets no default storage (none is set there),
    so this takes Prefect's fallback, the local storage path, at once. A result missed by asking
    the wrong place only means that the flow runs and finds it."""
    settings = get_current_settings()
    if not settings.api.url and settings.results.default_storage_block is None:
        return LocalFileSystem(basepath=str(settings.results.local_storage_path))
    return get_default_result_storage(_sync=True)


def cached_result(name: str, cfg: PipelineConfig, root: str, upstream: list[StageResult]) -> StageResult | None:
    """The result that `run` would reuse for stage `name` (cached under the same key, written by
    us, its outputs intact), or None when the stage would run. Looked up without running anything."""
    key = StageInputs().compute_key(None, {"name": name, "cfg": cfg, "root": root, "upstream": upstream}, {})
    storage = _result_storage()
    if not isinstance(storage, LocalFileSystem):
        return None
    record = Path(storage.basepath).expanduser() / key
    if not record.is_file() or not results.written_by_us(record.read_bytes()):
        return None
    found = ResultStore(result_storage=storage, serializer=results.PlainJSON()).read(key).result
    return found if isinstance(found, StageResult) and found.intact() else None


def run(name: str, cfg: PipelineConfig, root: str, upstream: list[StageResult], parent_run_id: str | None) -> StageResult:
    """Run a stage through Prefect, reusing a cached result only while its outputs are intact."""
    staged = stage_task.with_options(
        name=name, task_run_name=name, retries=cfg.orchestration.retries, retry_delay_seconds=5,
        retry_condition_fn=transient,
    )
    result = staged(name, cfg, root, upstream, parent_run_id)
    if not result.intact():
        result = staged.with_options(refresh_cache=True)(name, cfg, root, upstream, parent_run_id)
    return result


@task(cache_policy=results.Verified(policy=INPUTS - "model_uri"), persist_result=True, result_serializer=results.PlainJSON())
def promote_task(
    model_uri: str, policy_md5: str, metrics: dict[str, float], cfg: PipelineConfig, root: str, lineage: dict[str, str],
    registry_uri: str,
) -> dict:
    """Register the policy once per policy version and registry as `challenger`; crown it past the
    gate (components/pipeline/promotion.py)."""
    return promotion.promote(model_uri, metrics, cfg, root, lineage)
