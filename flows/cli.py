"""`rlhf`: the command line of the pipeline.

    rlhf run   [--config params.yaml] [--set KEY=VALUE ...] [--root DIR]   the whole flow, through Prefect
    rlhf stage NAME [--config ...] [--set ...] [--root DIR]              one stage (what dvc.yaml runs)
    rlhf compare [--methods ppo,p3o_v1,...] [--set ...] [--root DIR]     RL methods side by side + frontier plot
    rlhf data ingest SOURCE --out DIR [--format F] [--set data.KEY=VALUE ...]   external preference data
    rlhf data validate DIR [--set data.KEY=VALUE ...]                    the pairs suite on DIR/pairs.jsonl
    rlhf train {sft,reward,dpo} --model M --data FILE --out DIR [--set sft.KEY=VALUE ...]   one trainer alone
    rlhf config [--config ...] [--set ...]                               every key: type, default, description
    rlhf promote VERSION [--force --reason TEXT] | rlhf promote --rollback   the registry's champion alias
    rlhf models                                                          registered versions, aliases, gate
    rlhf serve MODEL [--port N] [--api-key KEY]                          an OpenAI-compatible server (flows/judging.py)
    rlhf judge --outputs A.json --baseline B.json --out DIR [--set judge.KEY=VALUE ...]   LLM-judge win-rate

`rlhf train` fine-tunes the model folder (or hub id) M on a JSONL file: demonstrations with
`prompt` and `response` for sft, preference pairs with `prompt`, `chosen` and `rejected` for reward
and dpo (what `rlhf data ingest` writes). It checkpoints into DIR/checkpoints and, run again after a
crash or kill, resumes from there. DIR may not be the project root, one of the pipeline's own
folders or an existing folder it did not write, unless `--force`. On several GPUs or CPU processes
start it with `accelerate launch --multi_gpu --num_processes N -m flows.cli train ...`.

The configuration is validated before anything runs. `rlhf data` needs no Prefect: `ingest` writes
DIR/pairs.jsonl, DIR/quarantine.jsonl, DIR/report.json and DIR/data_docs/ (see
components/preferences.py), listing what it quarantined on stdout, and fails only when the share of
quarantined rows exceeds data.max_invalid_fraction (then DIR keeps its previous outputs, this
ingest's are in DIR/rejected/), or when the source cannot be read at all.

Exit codes: 0 done; 2 for every error the user can fix, each printed as exactly one line on stderr
(`KIND error: ...`; several problems of one kind joined with "; "): bad arguments, a bad
configuration (every problem listed), bad data (an unreadable source, too many quarantined rows,
rows a trainer refuses, naming file, row and field, a failed validation), a model that cannot be
loaded, an output folder that cannot or must not be written, a busy project folder (`run`,
`compare`, `stage`: one at a time) and a stage that stops on its input or settings. `rlhf promote`
exits 1 when the gate keeps a version from champion. Anything else is a bug: a traceback, exit 1.
(`rlhf run` and `compare` also log the Prefect flow's progress; the error is the last line.)
"""

from __future__ import annotations

import argparse
import atexit
import errno
import gc
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, get_args

# What the command line itself imports is light: a run's Prefect server boots while the stages
# (torch, transformers: ~10 s) are imported and the configuration is checked (`_in_project`).
from components.sections import DataConfig
from components.pipeline.layout import PATHS, STAGE_BY_NAME
from flows import judging

if TYPE_CHECKING:
    from components.config import PipelineConfig

MESSAGES_SHOWN = 20
TRAIN_MARKER = ".rlhf-train"  # in an --out folder that `rlhf train` writes
PROJECT_FOLDERS = ("checkpoints", "mlflow", ".dvc", ".git", ".prefect", "dvc-remote")  # besides layout.PATHS
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM}


def one_line(text: object) -> str:
    """A message on one line: its lines, stripped, joined with "; " (several problems of one kind)."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _fail(kind: str, error: object) -> int:
    """Report a user-facing error as one line on stderr; its exit code, 2."""
    print(f"{kind} error: {one_line(error)}", file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
    """argparse, its errors on one line (not the usage text first) with exit code 2."""

    def error(self, message: str):
        print(f"usage error: {self.prog}: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _common_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", help="YAML configuration (default: ROOT/params.yaml when present)")
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a configuration value, e.g. --set ppo.steps=10 (repeatable)")
    command.add_argument("--root", default=".", help="project root holding data/, models/ and mlflow/")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlhf", description="RLHF pipeline: Prefect flows, MLflow runs, DVC data.")
    commands = parser.add_subparsers(dest="command", required=True)
    _common_options(commands.add_parser("run", help="run the whole pipeline as a Prefect flow"))
    compare = commands.add_parser("compare", help="run the pipeline once per RL method; plot the KL-reward frontier")
    compare.add_argument("--methods", help="comma-separated registered RL methods (default: all; `rlhf config` "
                         "lists rl.algorithm's)")
    compare.add_argument("--seeds", type=int, default=1, help="RL runs per method (rl.seed_offset 0..N-1), summarised "
                         "as mean and 95%% interval")
    _common_options(compare)
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
    train = commands.add_parser("train", help="train one model on a data file (sft, reward model or dpo)")
    train.add_argument("kind", choices=["sft", "reward", "dpo"])
    train.add_argument("--model", required=True, help="model folder or hub id to start from")
    train.add_argument("--data", required=True, help="JSONL: prompt/response (sft) or prompt/chosen/rejected pairs")
    train.add_argument("--out", required=True, metavar="DIR", help="folder for the trained model and its checkpoints")
    train.add_argument("--force", action="store_true",
                       help="write into --out even when it is an existing folder of something else or the pipeline's own")
    _common_options(train)
    _common_options(commands.add_parser("config", help="print every configuration key: type, default, description"))
    promote = commands.add_parser("promote", help="make a registered policy version champion, or roll back")
    promote.add_argument("version", nargs="?", help="registry version of the policy")
    promote.add_argument("--force", action="store_true", help="without the gate (needs --reason)")
    promote.add_argument("--reason", help="why a promotion is forced, recorded as a tag of the version")
    promote.add_argument("--rollback", action="store_true", help="champion back to previous-champion")
    _common_options(promote)
    _common_options(commands.add_parser("models", help="registered policy versions with aliases, gate and metrics"))
    judging.add_commands(commands, _common_options)
    return parser


def _show_config(cfg: PipelineConfig) -> int:
    from functools import reduce

    from components.config import describe

    for key, kind, default, description in describe():
        value = reduce(getattr, key.split("."), cfg)
        current = "" if value == default else f"  (here: {value!r})"
        print(f"{key}  [{kind}]  default {default!r}{current}\n    {description}")
    return 0


def _short(value) -> str:
    """A metric tag to 3 decimals; other values as they are."""
    try:
        return f"{float(value):.3f}" if "." in str(value) else str(value)
    except ValueError:
        return str(value)


def _registry(args, cfg: PipelineConfig) -> int:
    """`rlhf promote` and `rlhf models` on the project's MLflow registry."""
    from components.pipeline import promotion, tracking

    tracking.configure(args.root, cfg.experiment)
    name = cfg.promotion.model_name
    try:
        if args.command == "models":
            rows = [{key: _short(value) for key, value in row.items()} for row in promotion.versions(name)]
            columns = ["version", "aliases", "gate", "gold_win_rate_vs_sft", "proxy_win_rate_vs_sft", "kl_to_sft", "head_to_head"]
            widths = {c: max([len(c), *(len(row[c]) for row in rows)]) for c in columns}
            for row in [dict(zip(columns, columns)), *rows]:
                print("  ".join(f"{row[c]:<{widths[c]}}" for c in columns))
            return 0
        if args.rollback:
            outcome = promotion.rollback(name)
            print(f"{name}: champion is v{outcome['champion']} again (v{outcome['demoted']} demoted)")
            return 0
        if not args.version:
            raise promotion.PromotionError("give a VERSION to promote, or --rollback")
        if cfg.judge.base_url and not args.force:  # the head-to-head asks the judge: its key may be a Secret block
            _prefect_environment(Path(args.root).resolve())
            judging.export_judge_key(cfg)
        outcome = promotion.promote_version(cfg, args.root, args.version, args.force, args.reason)
    except promotion.PromotionError as error:
        return _fail("promotion", error)
    verdict = "champion" if outcome["champion"] else "not promoted: " + "; ".join(outcome["reasons"])
    print(f"{name} v{outcome['version']}: {verdict}")
    return 0 if outcome["champion"] else 1


def _out_refusal(out: Path, root: Path) -> str | None:
    """Why `rlhf train` must not write into `out`, if it must not: the project root (or above it),
    the pipeline's own folders, or an existing folder that no `rlhf train` wrote."""
    out, root = out.resolve(), root.resolve()
    if out == root or out in root.parents:
        return f"is the project root {root} or a folder above it"
    own = [root / folder for folder in PROJECT_FOLDERS]
    own += [(root / output).parent if Path(output).suffix else root / output for output in PATHS.values()]
    for folder in own:
        if out == folder or folder in out.parents or out in folder.parents:
            return f"is, holds or is inside the pipeline's own folder {folder.relative_to(root)}"
    if out.is_dir() and any(out.iterdir()) and not (out / TRAIN_MARKER).is_file():
        return "an existing folder that `rlhf train` did not write"
    return None


def _train(args, cfg: PipelineConfig) -> int:
    """One trainer on one file, logged to MLflow by the main process; resumes from DIR/checkpoints."""
    import importlib

    import mlflow
    from accelerate import PartialState

    from components.data.sources import DataError
    from components.pipeline import tracking
    from components.models.training import NonFiniteError, device_description, no_logging

    import torch

    if not Path(args.data).is_file():
        return _fail("data", f"--data {args.data}: no such file")
    refusal = None if args.force else _out_refusal(Path(args.out), Path(args.root))
    if refusal:
        return _fail("output", f"--out {args.out}: {refusal} (--force to write there anyway)")
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / TRAIN_MARKER).touch()
    except OSError as error:
        return _fail("output", f"--out {args.out}: {error.strerror}")
    torch.manual_seed(cfg.seed)
    trainer = importlib.import_module({"sft": "components.trainers.sft", "reward": "components.trainers.reward_model",
                                       "dpo": "components.trainers.dpo"}[args.kind])
    section = {"sft": cfg.sft, "reward": cfg.reward, "dpo": cfg.dpo}[args.kind]
    try:
        if not PartialState().is_main_process:
            trainer.run(cfg, args.model, args.data, Path(args.out), no_logging)
            return 0
        tracking.configure(args.root, cfg.experiment)
        tags = {tracking.STAGE_TAG: f"train-{args.kind}", tracking.DEVICE_TAG: device_description()}
        with mlflow.start_run(run_name=f"train-{args.kind}", tags=tags):
            mlflow.log_params(tracking.flatten({args.kind: section.model_dump(), "model": args.model, "data": args.data}))
            log = tracking.metric_logger("train", Path(args.out) / "checkpoints" / tracking.METRICS_JOURNAL)
            metrics = trainer.run(cfg, args.model, args.data, Path(args.out), log)
            mlflow.log_metrics({key: float(value) for key, value in metrics.items()})
    except NonFiniteError as error:  # the data or the settings drove the loss or weights to NaN/inf
        return _fail("training", error)
    except (ValueError, DataError) as error:
        return _fail("data", error)
    except OSError as error:
        if error.errno in OUTPUT_ERRNOS:  # a full disk or a folder we may not write
            return _fail("output", error)
        return _fail("model", error)  # the data was read: the model (--model) failed to load
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}")
    print(f"model saved to {args.out}")
    return 0


def _config(args) -> PipelineConfig:
    from components.config import load_config

    path = args.config
    if path is None and (Path(args.root) / "params.yaml").is_file():
        path = Path(args.root) / "params.yaml"
    overrides = args.overrides + ([f"data.format={args.format}"] if getattr(args, "format", None) else [])
    return load_config(path, overrides)


def _data(args, cfg: PipelineConfig) -> int:
    from components.data.preferences import REJECTED, DataError, ingest, validate_output

    try:
        if args.action == "validate":
            report = validate_output(args.dir, cfg.data)
            print(report.summary())
            print(f"Data Docs: {Path(args.dir) / 'data_docs' / 'index.html'}")
            if report.success:
                return 0
            return _fail("data", f"{report.source}: {len(report.failures)} of the suite's expectations failed "
                                 f"(listed above; Data Docs in {Path(args.dir) / 'data_docs'})")
        result = ingest(args.source, args.out, cfg.data)
    except DataError as error:
        return _fail("data", error)
    except OSError as error:
        return _fail("output", error)
    for entry in result.quarantine[:MESSAGES_SHOWN]:  # the report of what was set aside, not an error
        print(f"quarantined: {one_line(entry.message())}")
    if len(result.quarantine) > MESSAGES_SHOWN:
        print(f"quarantined: ... and {len(result.quarantine) - MESSAGES_SHOWN} more")
    report = result.report
    counts = (f"{report['source']} ({report['format']}): {report['rows']} rows, {report['valid_rows']} valid, "
              f"{report['quarantined_rows']} quarantined ({report['invalid_fraction']:.1%}); {report['pairs']} pairs")
    if not result.ok:
        print(f"{counts}; nothing in {args.out} replaced: quarantine.jsonl, report.json and data_docs/ are in "
              f"{Path(args.out) / REJECTED}")
        return _fail("data", f"{report['invalid_fraction']:.1%} of the rows of {report['source']} are invalid, more than "
                             f"data.max_invalid_fraction={cfg.data.max_invalid_fraction:g} (nothing in {args.out} replaced)")
    print(f"{counts} -> {Path(args.out) / 'pairs.jsonl'}; quarantine.jsonl, report.json and data_docs/ beside it")
    from components.pipeline.tracking import log_ingest
    from components.pipeline.versioning import track

    out = Path(args.out)
    version = track([out / name for name in ("pairs.jsonl", "quarantine.jsonl", "report.json")])
    if version:
        for path, md5 in version["md5"].items():
            print(f"DVC: {path} md5 {md5}")
        print(f"DVC: {version['pushed']} files pushed to the default remote")
    print(f"MLflow run: {log_ingest(args.root, cfg.experiment, args.out, report, version)}")
    return 0


def _methods(args) -> list[str]:
    """`--methods` as a list (every registered method by default); ConfigError naming what is not one."""
    from components import rl
    from components.config import ConfigError

    methods = [m.strip() for m in (args.methods or ",".join(rl.METHODS)).split(",") if m.strip()]
    unknown = sorted(set(methods) - set(rl.METHODS))
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(rl.METHODS)}")
    return methods


def _compare(args, cfg: PipelineConfig, root: Path) -> int:
    methods = _methods(args)
    from flows.compare import compare_methods, table

    if args.seeds < 1:
        from components.config import ConfigError

        raise ConfigError(f"--seeds: expected at least 1, got {args.seeds}")
    outcome = compare_methods(methods=methods, config=cfg, root=str(root), seeds=args.seeds)
    rows = table(outcome["summary"])
    columns = list(dict.fromkeys(key for row in rows for key in row))
    widths = {key: max(len(key), *(len(str(row.get(key, ""))) for row in rows)) + 2 for key in columns}
    print("\n" + "".join(f"{key:<{widths[key]}}" for key in columns))
    for row in rows:
        print("".join(f"{str(row.get(key, '')):<{widths[key]}}" for key in columns))
    print(f"frontier areas: mean gold reward gained over KL budgets 0..{outcome['summary']['_frontier_kl']:.3f}")
    print(f"KL-reward frontier: {outcome['plot']}")
    return 0


def _prefect_environment(root: Path) -> None:
    """Keep Prefect's database and cached results with the project unless the user chose otherwise."""
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # the flow's logs (a failed task's traceback too) on stdout: stderr holds the one-line error alone
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_STREAM", "ext://sys.stdout")


def main(argv: list[str] | None = None) -> int:
    # MLflow announces on stderr that it creates a project's database: not an error
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # the interpreter's last garbage collections at exit would walk every object that torch,
    # transformers, Prefect and MLflow made (2-4 s); the process ends, its memory goes anyway
    atexit.register(gc.freeze)
    args = _parser().parse_args(argv)
    if args.command in ("run", "compare", "stage"):
        return _in_project(args)
    from components.config import ConfigError

    try:
        cfg = _config(args)
    except ConfigError as error:
        return _fail("configuration", error)
    if args.command == "data":
        return _data(args, cfg)
    if args.command == "train":
        return _train(args, cfg)
    if args.command == "config":
        return _show_config(cfg)
    if args.command in ("promote", "models"):
        return _registry(args, cfg)
    _prefect_environment(Path(args.root).resolve())  # a Prefect Secret block may hold the judge's key
    return judging.run(args, cfg)


def _in_project(args) -> int:
    """`run`, `compare` and `stage`, one at a time per project folder. The Prefect server of `run`
    starts first: it boots (10-15 s) while the stages are imported and the configuration is checked."""
    from components.pipeline import lock

    root = Path(args.root).resolve()
    _prefect_environment(root)
    try:  # one run per project folder; what a killed one left RUNNING is marked failed
        held = lock.acquire(root, f"rlhf {args.command}")
    except lock.ProjectBusy as error:
        print(f"project busy: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        return _fail("output", error)
    started = []

    def server():
        """The command's LocalServer (None where a Prefect API is configured), started on the first call."""
        if not started:
            from flows.server import start_server

            started.append(start_server())
        return started[0]

    try:
        # a project with a policy may be up to date: then `run` needs no server
        if args.command == "run" and not (root / PATHS["policy"]).exists():
            server()
        return _run_in_project(args, root, server)
    finally:
        if started and started[0] is not None:
            started[0].stop()
        held.release()


def _run_in_project(args, root: Path, server: Callable) -> int:
    from components.config import ConfigError
    from components.pipeline import tracking
    from components.pipeline.stages import StageError

    try:
        cfg = _config(args)
        if args.command == "compare":
            _methods(args)
            server()  # it boots while the project's stale runs are marked
        judging.export_judge_key(cfg)
        tracking.configure(root, cfg.experiment)
        tracking.fail_stale_runs(root, cfg.experiment)
        if args.command == "stage":
            from components.pipeline.stages import run_stage

            result = run_stage(args.name, cfg, root)
            for key, value in result.metrics.items():
                print(f"{key}: {value:.4f}")
            return 0
        from flows.pipeline import format_table, rlhf_pipeline, up_to_date
        from flows.server import crash_stale_runs, local_api

        outcome = up_to_date(cfg, root) if args.command == "run" else None
        if outcome:  # like `dvc repro` on an unchanged pipeline: no flow run
            print("Every stage is up to date for this configuration and its policy is registered: nothing ran.")
        else:
            with local_api(server()):
                crash_stale_runs(root)
                if args.command == "compare":
                    return _compare(args, cfg, root)
                outcome = rlhf_pipeline(config=cfg, root=str(root))
        print(f"\nRLHF pipeline summary ({cfg.rl.algorithm} policy vs SFT on held-out prompts)")
        print(format_table(outcome["summary"]))
        return 0
    except ConfigError as error:  # the configuration, --methods, or a deployment's overrides checked in the flow
        return _fail("configuration", error)
    except StageError as error:  # its input or settings: the message says what to fix
        print(f"stage failed: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # an unwritable or full project folder
        return _fail("output", error)


if __name__ == "__main__":
    sys.exit(main())
