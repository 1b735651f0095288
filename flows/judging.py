"""`rlhf serve` and `rlhf judge`, and the judge's API key from a Prefect Secret block.

    rlhf serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--served-model-name NAME]
    rlhf judge --outputs A.json --baseline B.json --out DIR [--set judge.base_url=...] [--set judge.model=...]

`rlhf serve` puts a model folder, `gguf:` name, hub id (online) or MLflow model URI
(`models:/rlhf-policy@champion`) behind an OpenAI-compatible API (components/serving/).
`rlhf judge` compares two output files in AlpacaEval's format (a JSON list, or JSONL, of
`instruction`, `input`, `output`), pairing rows by instruction and input, with the configured judge:
DIR/judgments.jsonl (one line per pair and order), DIR/summary.json (win_rate, ci_low, ci_high,
lc_win_rate, ties, unparsable, calls, cache_hits, ...), a printed table, and an MLflow run with the
metrics and the judgments as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SUMMARY_KEYS = ("win_rate", "ci_low", "ci_high", "lc_win_rate", "ties", "unparsable", "calls", "cache_hits")
FRACTIONS = ("win_rate", "ci_low", "ci_high", "lc_win_rate", "position_consistency")


def add_commands(commands, common_options) -> None:
    serve = commands.add_parser("serve", help="serve a model behind an OpenAI-compatible HTTP API")
    serve.add_argument("model", help="model folder, gguf: name, hub id (online) or models:/NAME@ALIAS")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="bearer key clients must send (default: RLHF_SERVE_API_KEY, else none)")
    serve.add_argument("--served-model-name", help="the model name clients ask for (default: MODEL)")
    serve.add_argument("--max-batch", type=int, default=16, help="rows (requests x n) decoded together")
    common_options(serve)
    judge = commands.add_parser("judge", help="judge win-rate of one output file against another (AlpacaEval format)")
    judge.add_argument("--outputs", required=True, help="the outputs judged (JSON list or JSONL)")
    judge.add_argument("--baseline", required=True, help="the outputs they are compared with")
    judge.add_argument("--out", required=True, metavar="DIR", help="folder for judgments.jsonl and summary.json")
    common_options(judge)


def export_judge_key(cfg) -> None:
    """With `judge.api_key_secret` set and `judge.api_key_env` unset, the Prefect Secret block's value goes
    into that variable, for this process only, where components/pipeline/judging.py reads it."""
    judge = cfg.judge
    if judge.api_key_secret and not os.environ.get(judge.api_key_env):
        from prefect.blocks.system import Secret

        os.environ[judge.api_key_env] = Secret.load(judge.api_key_secret).get()


def serve(args) -> int:
    from components import serving

    if args.host != "127.0.0.1":
        print(f"warning: listening on {args.host}, reachable from other machines", file=sys.stderr)
    print(f"serving {args.model} as '{args.served_model_name or args.model}' at http://{args.host}:{args.port}/v1",
          flush=True)
    try:
        serving.serve(args.model, args.host, args.port, args.api_key or os.environ.get("RLHF_SERVE_API_KEY"),
                      args.served_model_name, args.max_batch)
    except (OSError, ValueError) as error:
        print(f"model error: {error}", file=sys.stderr)
        return 2
    return 0


def read_outputs(path: str) -> dict[tuple[str, str], str]:
    """(instruction, input) -> output of an AlpacaEval output file."""
    text = Path(path).read_text()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    try:
        return {(row["instruction"], row.get("input") or ""): row["output"] for row in rows}
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: every row needs instruction and output ({error!r} missing)") from None


def judge(args, cfg) -> int:
    import mlflow

    from components.evaluation.judge import as_metrics, judge_win_rate
    from components.judges import BudgetExceeded, table
    from components.pipeline import judging, tracking

    export_judge_key(cfg)
    if not cfg.judge.base_url:
        print("configuration error: judge.base_url is not set (e.g. --set judge.base_url=http://127.0.0.1:8000/v1)",
              file=sys.stderr)
        return 2
    try:
        client = judging.client(cfg.judge)
    except ValueError as error:  # a template that is neither built in nor a readable template file
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    try:
        ours, theirs = read_outputs(args.outputs), read_outputs(args.baseline)
    except (OSError, ValueError) as error:
        print(f"data error: {error}", file=sys.stderr)
        return 2
    keys = [key for key in ours if key in theirs]
    if not keys:
        print(f"data error: no instruction of {args.outputs} is in {args.baseline}", file=sys.stderr)
        return 2
    instructions = [f"{instruction}\n\n{extra}" if extra else instruction for instruction, extra in keys]
    start = time.monotonic()
    tracking.configure(args.root, cfg.experiment)
    with mlflow.start_run(run_name="judge", tags={tracking.STAGE_TAG: "judge"}):
        mlflow.log_params(tracking.flatten({"judge": cfg.judge.model_dump(), "outputs": args.outputs,
                                            "baseline": args.baseline}))
        try:
            summary, results = judge_win_rate(client, instructions, [ours[k] for k in keys], [theirs[k] for k in keys],
                                              cfg.seed)
        except BudgetExceeded as error:
            print(f"judge error: {error}", file=sys.stderr)
            return 2
        mlflow.log_metrics(as_metrics(summary, "baseline"))
        judging.log_table(results, "vs_baseline")
    summary = {key: int(value) if key not in FRACTIONS and float(value).is_integer() else value for key, value in summary.items()}
    summary.update(judge_model=cfg.judge.model, template=cfg.judge.template, seconds=round(time.monotonic() - start, 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "judgments.jsonl", "w") as handle:
        for row in table(results):
            handle.write(json.dumps(row) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{Path(args.outputs).name} vs {Path(args.baseline).name}: {len(keys)} pairs, judge {cfg.judge.model} "
          f"({cfg.judge.template}), each pair in both orders")
    for key in (*SUMMARY_KEYS, "retries", "position_consistency", "seconds"):
        if key in summary:
            print(f"{key:<22}{summary[key]:.4f}" if key in FRACTIONS else f"{key:<22}{summary[key]:g}")
    print(f"95% interval: percentile bootstrap over prompts; judgments in {out / 'judgments.jsonl'}")
    return 0


def run(args: argparse.Namespace, cfg) -> int:
    return serve(args) if args.command == "serve" else judge(args, cfg)
