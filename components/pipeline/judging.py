"""The judge in the pipeline: its API key, its win-rates in the evaluate stage and against the
champion, and its records in MLflow.

The key is read here, from the environment variable `judge.api_key_env` (the flows put a Prefect
Secret block's value there when `judge.api_key_secret` names one, flows/judging.py), and handed to
the judge client; it never reaches a param, tag, artifact, metric or log line. What MLflow gets:
the judge's statistics as metrics (judge/calls, judge/retries, judge/cache_hits, tokens,
judge/unparsable_share, judge/position_consistency) and every judgment as a table
(`mlflow.log_table`), which the run's page in the MLflow UI shows as an evaluation table.
"""

from __future__ import annotations

import os
import time

import mlflow
import pandas as pd

from components.evaluation.judge import as_metrics, judge_win_rate
from components.files import read_jsonl
from components.judges import JudgeClient, PairResult, table
from components.sections import JudgeConfig

CHAMPION = "champion"


def api_key(cfg: JudgeConfig) -> str | None:
    return os.environ.get(cfg.api_key_env) or None


def client(cfg: JudgeConfig) -> JudgeClient:
    return JudgeClient(cfg, api_key(cfg))


def log_table(results: list[PairResult], name: str) -> None:
    """The judgments of one comparison as an MLflow table artifact, judge/NAME.json."""
    mlflow.log_table(pd.DataFrame(table(results)).astype({"verdict": str}), artifact_file=f"judge/{name}.json")


def judge_rows(cfg, rows: list[dict], other: str = "sft") -> dict[str, float]:
    """Judge win-rate metrics of the evaluate stage's rows (model policy against model `other`,
    prompt by prompt), with the judgments logged to the active MLflow run."""
    ours = {row["prompt"]: row["completion"] for row in rows if row["model"] == "policy"}
    theirs = {row["prompt"]: row["completion"] for row in rows if row["model"] == other}
    prompts = [prompt for prompt in ours if prompt in theirs]
    summary, results = judge_win_rate(
        client(cfg.judge), prompts, [ours[p] for p in prompts], [theirs[p] for p in prompts], cfg.seed
    )
    log_table(results, f"vs_{other}")
    return as_metrics(summary, other)


def head_to_head(
    cfg, prompts: list[str], challenger: list[str], champion: list[str], run_id: str | None
) -> dict[str, float]:
    """The judge's part of promotion's head-to-head (components/pipeline/promotion.py): the
    challenger's answers against the champion's to the same prompts, both orders; judge_win_rate
    with its 95% interval (judge_ci_low, judge_ci_high), judge_lc_win_rate, judge_ties,
    judge_unparsable_share and judge_position_consistency. The judgments (table
    judge/vs_champion.json) and the eval/judge_*_vs_champion and judge/* metrics go to the
    challenger's MLflow run `run_id`. Empty when no judge is configured."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    if not cfg.judge.base_url:
        return {}
    summary, results = judge_win_rate(client(cfg.judge), prompts, challenger, champion, cfg.seed)
    if run_id:
        mlflow_client = MlflowClient()
        mlflow_client.log_table(run_id, pd.DataFrame(table(results)).astype({"verdict": str}), "judge/vs_champion.json")
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, 0) for key, value in as_metrics(summary, CHAMPION).items()]
        mlflow_client.log_batch(run_id, metrics=metrics)
    kept = ("win_rate", "ci_low", "ci_high", "lc_win_rate", "ties", "unparsable_share", "position_consistency")
    return {f"judge_{key}": float(summary[key]) for key in kept if key in summary}


def win_rate_vs_champion(cfg, completions_file, prompts: list[str]) -> dict[str, float]:
    """eval/judge_win_rate_vs_champion (with its interval and the length-controlled rate): the
    policy's evaluation answers (the evaluate stage's completions file) against the answers of the
    registry's current champion to the same prompts, sampled with the evaluate stage's settings.
    Empty when no judge is configured or there is no champion yet. (Promotion's own head-to-head asks
    the judge through `head_to_head` above, on the answers it samples from both registered versions.)"""
    from mlflow.exceptions import MlflowException

    from components import serving
    from components.models import lm

    if not cfg.judge.base_url:
        return {}
    try:
        champion, tokenizer = serving.load(f"models:/{cfg.promotion.model_name}@{CHAMPION}")
    except MlflowException:
        return {}
    rows = [row for row in read_jsonl(completions_file) if row["model"] == "policy" and row["prompt"] in set(prompts)]
    answers = lm.sample_many(champion, tokenizer, [row["prompt"] for row in rows], cfg.sampling, cfg.seed + 1)
    rows += [{"model": CHAMPION, "prompt": prompt, "completion": completion} for prompt, completion, _ in answers]
    return judge_rows(cfg, rows, CHAMPION)
