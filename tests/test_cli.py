"""The `rlhf` command line: configuration errors stop before any work, `rlhf stage` is what
dvc.yaml runs, and a bad preference set stops the pipeline with a report naming rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.layout import PATHS, STAGES, write_jsonl
from flows.cli import main
from tests.conftest import REPO

RLHF = str(Path(sys.executable).parent / "rlhf")


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
    assert err.startswith("configuration error:") and expected in err
    assert not (project / "data" / "world").exists() and not (project / "models").exists()


def test_dvc_yaml_declares_the_same_stages_as_the_flow():
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(declared) == [s.name for s in STAGES]
    for stage in STAGES:
        entry = declared[stage.name]
        assert entry["cmd"] == f"rlhf stage {stage.name}"
        assert entry.get("deps", []) == [PATHS[d] for d in stage.deps]
        assert entry["params"] == list(stage.params)
        assert entry.get("outs", []) == [PATHS[o] for o in stage.outs]
        assert [next(iter(m)) for m in entry.get("metrics", [])] == [PATHS[m] for m in stage.metrics]


def test_params_yaml_is_the_complete_default_configuration():
    from components.config import PipelineConfig, load_config

    assert load_config(REPO / "params.yaml") == PipelineConfig()
    assert set(yaml.safe_load((REPO / "params.yaml").read_text())) == set(PipelineConfig.model_fields)


def test_stage_entry_point_writes_its_outputs(project):
    result = subprocess.run(
        [RLHF, "stage", "world", "--set", "world.n_reviews=200"], cwd=project, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "reviews: 200.0000" in result.stdout
    rows = [json.loads(line) for line in (project / PATHS["prompts"]).read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "eval"}


def test_stage_without_its_inputs_names_the_missing_file(project, capsys):
    assert main(["stage", "pretrain", "--root", str(project)]) == 1
    assert f"needs {PATHS['corpus']}" in capsys.readouterr().err


def test_bad_preference_set_fails_validation_with_rows_named(project, capsys):
    good = {"pair_id": "a", "prompt": "The X: I", "chosen": " liked it.", "rejected": " hated it.",
            "annotator": "simulated-0", "source": "simulated"}
    rows = [good, {**good, "pair_id": "b", "rejected": good["chosen"]}, {**good, "pair_id": "c", "chosen": ""}]
    write_jsonl(project / PATHS["preferences"], rows)
    assert main(["stage", "validate", "--root", str(project)]) == 1
    err = capsys.readouterr().err
    assert "pairs.jsonl: 3 rows" in err
    assert "row 1" in err and "row 2" in err
    report = json.loads((project / PATHS["validation"]).read_text())
    assert report["success"] is False and report["n_rows"] == 3
