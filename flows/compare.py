"""Compare RL methods on one world: the pipeline once per method and seed, then the frontier.

Upstream stages (world ... reward) are shared through the task cache: the seeds vary the RL stage
(`rl.seed_offset` 0..N-1: its sampling, minibatches and fresh labels) on the same SFT policy,
reward model and preference data, and evaluation scores every run on the same held-out prompts.
The summary (mean and 95% interval over seeds of the gold and proxy win-rates and the KL to SFT,
the frontier area of components/evaluation/frontier.py), every run's metrics and trace and the
plot are logged to one MLflow run tagged `rlhf.stage=compare` and written under data/compare/.
No policy is registered: promotion stays with `rlhf run`.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from components.config import PipelineConfig
from components.evaluation import frontier
from components.files import read_jsonl, write_json
from components.pipeline import tracking
from components.pipeline.layout import PATHS
from flows.pipeline import rlhf_pipeline


def _interval(stat: dict) -> str:
    if stat["ci_low"] is None:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} [{stat['ci_low']:.3f}, {stat['ci_high']:.3f}]"


def table(summary: dict) -> list[dict]:
    """One row per method: each metric as 'mean [ci_low, ci_high]', and the frontier area."""
    return [
        {"method": method, **{name: _interval(stat) for name, stat in stats.items() if name != "frontier_area"},
         **({"frontier_area": round(stats["frontier_area"], 4)} if "frontier_area" in stats else {})}
        for method, stats in summary.items() if not method.startswith("_")
    ]


@flow(name="rlhf-compare", log_prints=True)
def compare_methods(
    methods: list[str], config: PipelineConfig = PipelineConfig(), root: str = ".", seeds: int = 1
) -> dict:
    root = str(Path(root).resolve())
    runs: dict[str, list[frontier.Run]] = {method: [] for method in methods}
    for offset in range(seeds):  # every method at a seed before the next seed: early rows are comparable
        for method in methods:
            rl = config.rl.model_copy(update={"algorithm": method, "seed_offset": config.rl.seed_offset + offset})
            outcome = rlhf_pipeline.with_options(flow_run_name=f"compare-{method}-seed{offset}")(
                config=config.model_copy(update={"rl": rl}), root=root, promote=False
            )
            runs[method].append({"final": outcome["metrics"], "trace": read_jsonl(Path(root) / PATHS["trace"])})
    summary = frontier.summarise(runs)
    out = Path(root) / "data" / "compare"
    out.mkdir(parents=True, exist_ok=True)
    figure = frontier.plot(runs)
    figure.savefig(out / "frontier.png", dpi=120)
    write_json(out / "summary.json", summary)
    write_json(out / "results.json", runs)
    tracking.configure(root, config.experiment)
    with mlflow.start_run(run_name="compare", tags={tracking.STAGE_TAG: "compare"}):
        mlflow.log_params({"methods": ",".join(methods), "seeds": seeds})
        mlflow.log_figure(figure, "frontier.png")
        mlflow.log_dict(summary, "summary.json")
        mlflow.log_dict(runs, "results.json")
        for method in methods:
            stats = dict(summary[method])
            area = {f"{method}/frontier_area": stats.pop("frontier_area")} if "frontier_area" in stats else {}
            mlflow.log_metrics({**area, **{f"{method}/{name}/mean": stat["mean"] for name, stat in stats.items()}})
    create_table_artifact(key="rlhf-compare", table=table(summary),
                          description=f"RL methods against SFT on held-out prompts: mean [95% CI] over {seeds} seeds")
    get_run_logger().info("frontier plot: %s", out / "frontier.png")
    return {"summary": summary, "runs": runs, "plot": str(out / "frontier.png")}
