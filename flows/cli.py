"""`rlhf`: the command line of the pipeline.

    rlhf run   [--config params.yaml] [--set KEY=VALUE ...] [--root DIR]   the whole flow, through Prefect
    rlhf stage NAME [--config ...] [--set ...] [--root DIR]              one stage (what dvc.yaml runs)

The configuration is validated before anything runs; a bad key, type or file stops the command
with one message naming it (exit code 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from components.config import ConfigError, PipelineConfig, load_config
from components.layout import STAGE_BY_NAME


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF pipeline: Prefect flows, MLflow runs, DVC data.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run the whole pipeline as a Prefect flow"), ("stage", "run one stage")):
        command = commands.add_parser(name, help=help_text)
        if name == "stage":
            command.add_argument("name", choices=list(STAGE_BY_NAME))
        command.add_argument("--config", help="YAML configuration (default: ROOT/params.yaml when present)")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a configuration value, e.g. --set ppo.steps=10 (repeatable)")
        command.add_argument("--root", default=".", help="project root holding data/, models/ and mlflow/")
    return parser


def _config(args) -> PipelineConfig:
    path = args.config
    if path is None and (Path(args.root) / "params.yaml").is_file():
        path = Path(args.root) / "params.yaml"
    return load_config(path, args.overrides)


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
