"""MLflow: where runs go, one run per stage nested under the pipeline run, models logged.

The default tracking and registry store is `sqlite:///<root>/mlflow/mlflow.db` with artifacts
under `<root>/mlflow/artifacts`; `MLFLOW_TRACKING_URI` set in the environment wins.
"""

from __future__ import annotations

import contextlib
import json
import os
from importlib.metadata import version
from pathlib import Path

import mlflow
from huggingface_hub import ModelCard
from mlflow.tracking import MlflowClient

from components.pipeline.layout import Artifact, code_version
from components.data.preferences import report_metrics

STAGE_TAG = "rlhf.stage"
DEVICE_TAG = "rlhf.device"  # training.device_description(): the hardware and threads a run's numbers depend on
METRICS_JOURNAL = "metrics.jsonl"  # beside a run's checkpoints: the steps it logged (metric_logger)
ROOT_TAG = "rlhf.root"  # the project folder of a pipeline, stage or compare run (see fail_stale_runs)
# Read once, before anything here runs: mlflow.set_tracking_uri also writes this variable, so a
# later read could not tell the user's choice from the store of the previous project configured.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def child_environment() -> dict[str, str]:
    """This process's environment for the processes it starts: MLFLOW_TRACKING_URI as the user set
    it (or unset, so each finds its project's store from its root), not the store of the last
    project `configure` pointed this process at."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    if USER_TRACKING_URI:
        env["MLFLOW_TRACKING_URI"] = USER_TRACKING_URI
    return env


def configure(root: str | Path, experiment: str) -> str:
    """Point MLflow at the project's store and experiment; returns the tracking URI."""
    store = Path(root).resolve() / "mlflow"
    uri = USER_TRACKING_URI or f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        artifact_location = None
        if uri.startswith("sqlite:///"):
            store.mkdir(parents=True, exist_ok=True)
            artifact_location = (store / "artifacts").as_uri()
        mlflow.create_experiment(experiment, artifact_location=artifact_location)
    mlflow.set_experiment(experiment)
    return uri


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def fail_stale_runs(root: str | Path, experiment: str) -> int:
    """Mark FAILED the runs of the project at `root` left RUNNING by a killed process. Call it
    holding the project lock (components/pipeline/lock.py): then no run of `root` can be live."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return 0
    client = MlflowClient()
    running = client.search_runs([found.experiment_id], filter_string="attributes.status = 'RUNNING'")
    stale = [run for run in running if run.data.tags.get(ROOT_TAG) == str(Path(root).resolve())]
    for run in stale:
        client.set_tag(run.info.run_id, "rlhf.failure", "its process died (found RUNNING by the next run)")
        client.set_terminated(run.info.run_id, "FAILED")
    return len(stale)


@contextlib.contextmanager
def stage_run(stage: str, params: dict, inputs: list[Artifact], root: str, parent_run_id: str | None = None):
    """An MLflow run for one stage: params, the content hash of every input it consumed."""
    tags = {
        STAGE_TAG: stage, ROOT_TAG: str(Path(root).resolve()), "rlhf.code_version": code_version(),
        **{f"data.{a.name}.md5": a.md5 for a in inputs},
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        mlflow.log_params(flatten(params))
        yield run


def metric_logger(prefix: str, journal: Path | None = None):
    """A `log(metrics, step)` callback for the training loops: curves named `prefix/key`, apart
    from the stage's summary metrics that keep their plain names.

    With `journal` (a file beside the checkpoints a killed run resumes from) every logged step is
    also appended there; a resumed run first logs the journal's steps to its own MLflow run and
    skips them when it computes them again, so its curves equal those of an uninterrupted run."""
    logged: set[tuple] = set()

    def log(metrics: dict, step: int, record: bool = True) -> None:
        entry = (step, *sorted(metrics))
        if entry in logged:
            return
        logged.add(entry)
        mlflow.log_metrics({f"{prefix}/{key}": float(value) for key, value in metrics.items()}, step=step)
        if journal is not None and record:
            journal.parent.mkdir(parents=True, exist_ok=True)
            with open(journal, "a", encoding="utf-8") as handle:
                handle.write(json.dumps([step, metrics]) + "\n")

    for line in journal.read_text().splitlines() if journal is not None and journal.is_file() else []:
        with contextlib.suppress(ValueError):  # the last line may have been cut by the kill
            step, metrics = json.loads(line)
            log(metrics, step, record=False)
    return log


def log_outputs(outputs: list[Artifact]) -> None:
    mlflow.set_tags({f"output.{a.name}.md5": a.md5 for a in outputs})


def log_transformers_model(model, tokenizer, task: str, description: str, name: str = "model") -> str:
    """Log with the transformers flavor; returns the model URI to register.

    The model card is ours: without one MLflow asks the hub for the card of `name_or_path`.
    """
    card = ModelCard(f"---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# {description}\n")
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name=name,
        task=task,
        model_card=card,
        # pinned from this environment: MLflow's own inference imports the model in a subprocess
        pip_requirements=[f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "tokenizers", "safetensors")],
    )
    return info.model_uri


def load_model(model_uri: str):
    """(model, tokenizer) of a logged or registered transformers model, e.g. models:/rlhf-policy@champion."""
    parts = mlflow.transformers.load_model(model_uri, return_type="components")
    return parts["model"].eval(), parts["tokenizer"]


def register(model_uri: str, name: str, alias: str | None, tags: dict) -> int:
    """Register a model version, tag it, and point `alias` at it when given."""
    version = mlflow.register_model(model_uri, name)
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, str(value))
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def log_ingest(root: str | Path, experiment: str, out: str | Path, report: dict, version: dict | None) -> str:
    """One MLflow run for an `rlhf data ingest`: counts, agreement statistics, the dataset's hash
    and the validation's Data Docs."""
    configure(root, experiment)
    tags = {STAGE_TAG: "ingest", "data.source": report["source"]}
    if version:
        tags.update({f"data.{path}.md5": md5 for path, md5 in version["md5"].items()})
    with mlflow.start_run(run_name="ingest", tags=tags) as run:
        mlflow.log_params(flatten({"data": report["config"]}))
        mlflow.log_metrics(report_metrics(report))
        mlflow.log_dict(report, "ingest_report.json")
        mlflow.log_artifacts(str(Path(out) / "data_docs"), "data_docs")
    return run.info.run_id


class PipelineRun:
    """The parent run of one pipeline execution, written through the client so that stage runs
    (started with `mlflow.start_run` in whatever thread runs the task) never collide with it."""

    def __init__(self, experiment: str, params: dict, root: str, name: str = "pipeline"):
        self.client = MlflowClient()
        experiment_id = self.client.get_experiment_by_name(experiment).experiment_id
        tags = {STAGE_TAG: "pipeline", ROOT_TAG: str(Path(root).resolve())}
        self.run_id = self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        for key, value in flatten(params).items():
            self.client.log_param(self.run_id, key, value)

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_metrics(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value))

    def parented(self, run_ids: list[str | None]) -> bool:
        """Whether any of these stage runs ran under this run (not reused from a cached one)."""
        return any(rid and self.client.get_run(rid).data.tags.get("mlflow.parentRunId") == self.run_id for rid in run_ids)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

    def discard(self) -> None:
        """Delete the run: nothing ran under it (a fully cached re-run)."""
        self.client.delete_run(self.run_id)
