"""`rlhf`: the command line of the pipeline.

    rlhf run   [--config params.yaml] [--set KEY=VALUE ...] [--root DIR]   the whole flow, through Prefect
    rlhf stage NAME [--config ...] [--set ...] [--root DIR]              one stage (what dvc.yaml runs)
    rlhf data ingest SOURCE --out DIR [--format F] [--set data.KEY=VALUE ...]   external preference data
    rlhf data validate DIR [--set data.KEY=VALUE ...]                    the pairs suite on DIR/pairs.jsonl

The configuration is validated before anything runs; a bad key, type or file stops the command
with one message naming it (exit code 2). `rlhf data` needs no Prefect: `ingest` writes
DIR/pairs.jsonl, DIR/quarantine.jsonl, DIR/report.json and DIR/data_docs/ (see
components/preferences.py) and fails (exit code 1) only when the share of quarantined rows exceeds
data.max_invalid_fraction, or when the source cannot be read at all.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import get_args

from components.config import ConfigError, DataConfig, PipelineConfig, load_config
from components.layout import STAGE_BY_NAME

MESSAGES_SHOWN = 20


def _common_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", help="YAML configuration (default: ROOT/params.yaml when present)")
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a configuration value, e.g. --set ppo.steps=10 (repeatable)")
    command.add_argument("--root", default=".", help="project root holding data/, models/ and mlflow/")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF pipeline: Prefect flows, MLflow runs, DVC data.")
    commands = parser.add_subparsers(dest="command", required=True)
    _common_options(commands.add_parser("run", help="run the whole pipeline as a Prefect flow"))
    stage = commands.add_parser("stage", help="run one stage")
    stage.add_argument("name", choices=list(STAGE_BY_NAME))
    _common_options(stage)
    data = commands.add_parser("data", help="ingest and validate external preference data").add_subparsers(
        dest="action", required=True
    )
    ingest = data.add_parser("ingest", help="read, check and convert a preference set into DIR")
    ingest.add_argument("source", help="a .jsonl, .json, .parquet or .csv file (optionally .gz), or a Hugging Face id")
    ingest.add_argument("--out", required=True, metavar="DIR", help="folder for pairs.jsonl, quarantine.jsonl, ...")
    ingest.add_argument("--format", choices=get_args(DataConfig.model_fields["format"].annotation),
                        help="record type of the rows (default: data.format, auto)")
    validate = data.add_parser("validate", help="run the preference suite on DIR/pairs.jsonl")
    validate.add_argument("dir", metavar="DIR")
    for command in (ingest, validate):
        _common_options(command)
    return parser


def _config(args) -> PipelineConfig:
    path = args.config
    if path is None and (Path(args.root) / "params.yaml").is_file():
        path = Path(args.root) / "params.yaml"
    overrides = args.overrides + ([f"data.format={args.format}"] if getattr(args, "format", None) else [])
    return load_config(path, overrides)


def _data(args, cfg: PipelineConfig) -> int:
    from components.preferences import DataError, ingest, validate_output

    try:
        if args.action == "validate":
            report = validate_output(args.dir, cfg.data)
            print(report.summary())
            print(f"Data Docs: {Path(args.dir) / 'data_docs' / 'index.html'}")
            return 0 if report.success else 1
        result = ingest(args.source, args.out, cfg.data)
    except DataError as error:
        print(f"data error: {error}", file=sys.stderr)
        return 1
    for entry in result.quarantine[:MESSAGES_SHOWN]:
        print(f"quarantined: {entry.message()}", file=sys.stderr)
    if len(result.quarantine) > MESSAGES_SHOWN:
        print(f"quarantined: ... and {len(result.quarantine) - MESSAGES_SHOWN} more", file=sys.stderr)
    report = result.report
    print(f"{report['source']} ({report['format']}): {report['rows']} rows, {report['valid_rows']} valid, "
          f"{report['quarantined_rows']} quarantined ({report['invalid_fraction']:.1%}); {report['pairs']} pairs "
          f"-> {Path(args.out) / 'pairs.jsonl'}; quarantine.jsonl, report.json and data_docs/ beside it")
    if not result.ok:
        print(f"data error: {report['invalid_fraction']:.1%} of the rows are invalid, more than "
              f"data.max_invalid_fraction={cfg.data.max_invalid_fraction:g}", file=sys.stderr)
        return 1
    from components.tracking import log_ingest
    from components.versioning import track

    out = Path(args.out)
    version = track([out / name for name in ("pairs.jsonl", "quarantine.jsonl", "report.json")])
    if version:
        for path, md5 in version["md5"].items():
            print(f"DVC: {path} md5 {md5}")
        print(f"DVC: {version['pushed']} files pushed to the default remote")
    print(f"MLflow run: {log_ingest(args.root, cfg.experiment, args.out, report, version)}")
    return 0


def _prefect_environment(root: Path) -> None:
    """Keep Prefect's database and cached results with the project unless the user chose otherwise."""
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = _config(args)
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    if args.command == "data":
        return _data(args, cfg)
    root = Path(args.root).resolve()
    from components.stages import StageError

    try:
        if args.command == "stage":
            from components.stages import run_stage

            result = run_stage(args.name, cfg, root)
            for key, value in result.metrics.items():
                print(f"{key}: {value:.4f}")
            return 0
        _prefect_environment(root)
        from flows.pipeline import format_table, rlhf_pipeline

        outcome = rlhf_pipeline(config=cfg, root=str(root))
        print("\nRLHF pipeline summary (PPO policy vs SFT on held-out prompts)")
        print(format_table(outcome["summary"]))
        return 0
    except StageError as error:
        print(f"stage failed: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
