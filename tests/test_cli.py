"""The `rlhf` command line: configuration errors stop before any work, `rlhf stage` is what
dvc.yaml runs, and a bad preference set stops the pipeline with a report naming rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.models import lm
from components.files import write_jsonl
from components.pipeline.layout import PATHS, STAGES, dvc_yaml, stage_params
from flows.cli import main
from tests.conftest import REPO

RLHF = str(Path(sys.executable).parent / "rlhf")


def rlhf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The console script in a child process, with MLflow's default store: this process's
    mlflow.set_tracking_uri calls leave MLFLOW_TRACKING_URI in the environment a child inherits."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return subprocess.run([RLHF, *args], cwd=cwd, capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "ppo.stepz=3"], "ppo.stepz: unknown key"),
        (["--set", "ppo.steps=abc"], "ppo.steps: Input should be a valid integer"),
        (["--set", "base.pretrained=./no/such/model"], "base.pretrained: no model folder at ./no/such/model"),
        (["--config", "missing.yaml"], "configuration file not found: missing.yaml"),
        (["--set", "ppo.steps"], "--set expects KEY=VALUE, got 'ppo.steps'"),
    ],
)
def test_bad_configuration_stops_before_any_stage(project, capsys, args, expected):
    code = main(["run", "--root", str(project), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("configuration error:") and expected in err and len(err.splitlines()) == 1
    assert not (project / "data" / "task").exists() and not (project / "models").exists()


def test_dvc_yaml_declares_the_same_stages_as_the_flow():
    from components.config import load_config

    cfg = load_config(REPO / "params.yaml")
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml(cfg)  # the file the flow writes for params.yaml
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(declared) == [s.name for s in STAGES]
    for stage in STAGES:
        entry = declared[stage.name]
        assert entry["cmd"] == f"rlhf stage {stage.name}"
        assert entry.get("deps", []) == [PATHS[d] for d in stage.deps]
        assert entry["params"] == stage_params(cfg, stage.name)
        assert entry.get("outs", []) == [PATHS[o] for o in stage.outs]
        assert [next(iter(m)) for m in entry.get("metrics", [])] == [PATHS[m] for m in stage.metrics]
    assert declared["rl"]["params"].count("ppo") == 1 and "p3o" not in declared["rl"]["params"]


def test_params_yaml_is_the_complete_default_configuration():
    from components.config import PipelineConfig, load_config

    assert load_config(REPO / "params.yaml") == PipelineConfig()
    assert set(yaml.safe_load((REPO / "params.yaml").read_text())) == set(PipelineConfig.model_fields)


def test_stage_entry_point_writes_its_outputs(project):
    result = rlhf("stage", "task", "--set", "world.n_reviews=200", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "reviews: 200.0000" in result.stdout
    rows = [json.loads(line) for line in (project / PATHS["prompts"]).read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "eval"}


def test_a_configuration_with_several_problems_is_one_line_listing_them_all(project, capsys):
    (project / "bad.yaml").write_text("ppo:\n  steps: abc\n  stepz: 3\nbase:\n  lr: .inf\n")
    assert main(["stage", "task", "--root", str(project), "--config", str(project / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("configuration error:")
    assert err.count("; ") == 2 and all(f"{key}: " in err for key in ("ppo.steps", "ppo.stepz", "base.lr"))


def test_bad_arguments_are_one_line_with_exit_2(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["stage", "no-such-stage"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("usage error: rlhf stage: argument name: invalid choice: 'no-such-stage'")


def test_stage_without_its_inputs_names_the_missing_file(project, capsys):
    assert main(["stage", "pretrain", "--root", str(project)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stage failed:") and f"needs {PATHS['corpus']}" in err and len(err.splitlines()) == 1


def test_rlhf_run_stopped_by_its_input_is_one_line_on_stderr_with_exit_2(project):
    """Through Prefect too: the flow's log (the failed task's traceback with it) goes to stdout and
    reaches the server before it stops; stderr holds the one line."""
    (project / "prompts.jsonl").write_text('{"prompt": "Fine."}\n{"text": "x"}\n')
    result = rlhf("run", "--set", "task.name=dataset", "--set", "task.prompts=prompts.jsonl", cwd=project)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr[-3000:]
    assert result.stderr.startswith("stage failed: task (dataset): task.prompts: 1 of 2 rows of prompts.jsonl are bad")
    assert "row 2, field 'prompt': missing field" in result.stderr and "Traceback" in result.stdout


def test_bad_preference_set_fails_validation_with_rows_named(project, capsys):
    # the validate stage counts tokens with the SFT policy's tokenizer: a tiny one stands in
    texts = ["The X: I liked it.", "The X: I hated it.", "a b c d e f g h"]
    tokenizer = lm.train_tokenizer(texts, 300)
    lm.save_policy(lm.build_model(tokenizer, 1, 1, 8, 32), tokenizer, project / PATHS["sft"])
    good = {"pair_id": "a", "prompt": "The X: I", "chosen": " liked it.", "rejected": " hated it.",
            "annotator": "simulated-0", "source": "simulated"}
    rows = [good, {**good, "pair_id": "b", "rejected": good["chosen"]}, {**good, "pair_id": "c", "chosen": ""},
            {**good, "pair_id": "d", "chosen": " liked it" + " a lot" * 40 + "."}]
    write_jsonl(project / PATHS["preferences"], rows)
    assert main(["stage", "validate", "--root", str(project), "--set", "base.max_length=32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stage failed:") and len(err.splitlines()) == 1  # each failure, joined with "; "
    assert "pairs.jsonl: 4 rows, 3 expectations failed" in err
    assert "'chosen' and 'rejected' are identical in row 1." in err
    assert "column 'chosen' is empty or longer than 20000 characters in row 2." in err
    assert "more tokens than the model's context in row 3." in err
    report = json.loads((project / PATHS["validation"]).read_text())
    assert report["success"] is False and report["n_rows"] == 4
    assert (project / "data" / "preferences" / "data_docs" / "index.html").is_file()


def test_ingested_dataset_is_dvc_tracked_pushed_and_recorded_in_mlflow(project):
    import mlflow

    source = project.parent / "pairs.jsonl"
    rows = [{"prompt": f"The X{i}: I", "chosen": " liked it.", "rejected": " hated it.", "annotator": "a"} for i in range(5)]
    write_jsonl(source, rows)
    out = project / "data" / "external"
    command = ["data", "ingest", str(source), "--out", str(out), "--format", "pairs"]
    first = rlhf(*command, cwd=project)
    assert first.returncode == 0, first.stderr
    tracked = yaml.safe_load((out / "pairs.jsonl.dvc").read_text())["outs"][0]
    assert f"DVC: data/external/pairs.jsonl md5 {tracked['md5']}" in first.stdout
    second = rlhf(*command, cwd=project)
    assert second.returncode == 0 and f"pairs.jsonl md5 {tracked['md5']}" in second.stdout  # same source, same version
    assert len((out / "pairs.jsonl").read_text().splitlines()) == 5
    remote_files = [p for p in (project.parent / "dvc-remote").rglob("*") if p.is_file()]
    assert len(remote_files) == 3  # pairs, quarantine (empty) and report, pushed once
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf-pipeline")
    runs = client.search_runs([experiment.experiment_id], "tags.`rlhf.stage` = 'ingest'")
    assert len(runs) == 2
    assert {r.data.tags["data.data/external/pairs.jsonl.md5"] for r in runs} == {tracked["md5"]}
    assert runs[0].data.metrics["pairs"] == 5
