"""Compare RL methods on one world: the pipeline once per method, then the KL-reward frontier.

Upstream stages (world ... reward) are shared through the task cache; each method's RL and
evaluation stages run once. The plot (components/evaluation.plot_frontier), the traces and a
table of every method's eval/* metrics are logged to one MLflow run tagged `rlhf.stage=compare`
and written under data/compare/. No policy is registered: promotion stays with `rlhf run`.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from components import evaluation
from components.pipeline import tracking
from components.config import PipelineConfig
from components.files import read_jsonl, write_json
from components.pipeline.layout import PATHS
from flows.pipeline import rlhf_pipeline


@flow(name="rlhf-compare", log_prints=True)
def compare_methods(methods: list[str], config: PipelineConfig = PipelineConfig(), root: str = ".") -> dict:
    root = str(Path(root).resolve())
    traces, finals = {}, {}
    for method in methods:
        variant = config.model_copy(update={"rl": config.rl.model_copy(update={"algorithm": method})})
        outcome = rlhf_pipeline.with_options(flow_run_name=f"compare-{method}")(config=variant, root=root, promote=False)
        traces[method] = read_jsonl(Path(root) / PATHS["trace"])
        finals[method] = outcome["metrics"]
    out = Path(root) / "data" / "compare"
    out.mkdir(parents=True, exist_ok=True)
    figure = evaluation.plot_frontier(traces, finals)
    figure.savefig(out / "frontier.png", dpi=120)
    write_json(out / "results.json", {"final": finals, "traces": traces})
    rows = [{"method": m, **{k.removeprefix("eval/"): round(v, 4) for k, v in finals[m].items()}} for m in methods]
    tracking.configure(root, config.experiment)
    with mlflow.start_run(run_name="compare", tags={tracking.STAGE_TAG: "compare"}):
        mlflow.log_param("methods", ",".join(methods))
        mlflow.log_figure(figure, "frontier.png")
        mlflow.log_dict({"final": finals, "traces": traces}, "frontier.json")
        for method in methods:
            mlflow.log_metrics({f"{method}/{k.removeprefix('eval/')}": v for k, v in finals[method].items()})
    create_table_artifact(key="rlhf-compare", table=rows, description="RL methods against SFT on held-out prompts")
    get_run_logger().info("frontier plot: %s", out / "frontier.png")
    return {"final": finals, "traces": traces, "plot": str(out / "frontier.png")}
