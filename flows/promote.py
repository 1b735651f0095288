"""Promotion as a flow (deployment rlhf-promote/manual): what `rlhf promote` does, from the UI."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger

from components.config import PipelineConfig, project_config
from components.pipeline import promotion, tracking
from flows.judging import export_judge_key

REPO = Path(__file__).resolve().parents[1]


@flow(name="rlhf-promote", log_prints=True)
def rlhf_promote(
    action: Literal["promote", "rollback"] = "promote",
    version: int | None = None,
    force: bool = False,
    reason: str = "",
    config: PipelineConfig = project_config(REPO),
    root: str = ".",
) -> dict:
    """promote: crown VERSION past the gate (or with `force` and a `reason`); rollback: the
    champion goes back to previous-champion."""
    tracking.configure(root, config.experiment)
    export_judge_key(config)  # the head-to-head may ask the judge: its key from a Prefect Secret block
    if action == "rollback":
        outcome = promotion.rollback(config.promotion.model_name)
    elif version is None:
        raise promotion.PromotionError("promote needs a version")
    else:
        outcome = promotion.promote_version(config, root, str(version), force, reason or None)
    get_run_logger().info("%s", outcome)
    return outcome
