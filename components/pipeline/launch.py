"""A heavy stage's trainer on several processes: `accelerate launch --multi_gpu --num_processes N`.

With `orchestration.gpu_processes` > 1, the stages whose trainers run under accelerate (pretrain,
sft, reward: components/models/training.py) are run by `run_launched` as

    accelerate launch --multi_gpu --num_processes N -m components.pipeline.launch NAME CONFIG ROOT OUT [PARENT]

one process per GPU (on a host without CUDA, N CPU processes joined over gloo). Every process
trains; the main one also records the stage (its MLflow run, the model, the outputs) and writes the
StageResult to OUT, which the caller (the Prefect task, tasks/stages.py) returns as if the stage
had run in its own process. The RL stage runs in one process: its loops generate, score and train
in turn on one policy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

LAUNCHED = ("pretrain", "sft", "reward")
STAGE_ERROR_EXIT = 3  # the stage failed its own checks (StageError): not worth a retry


class LaunchError(RuntimeError):
    """The launched processes failed for another reason than the stage's checks (retried)."""


def launched(name: str, cfg) -> bool:
    """Whether stage `name` runs under `accelerate launch` with this configuration (not when it
    trains nothing: a pretrained base model, a programmatic reward)."""
    trains = not (name == "pretrain" and cfg.base.pretrained) and not (name == "reward" and cfg.reward.function)
    return cfg.orchestration.gpu_processes > 1 and name in LAUNCHED and trains


def command(name: str, processes: int, config_file: Path, root: str, out: Path, parent_run_id: str | None) -> list[str]:
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [
        accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",  # precision: the trainer's own choice (bf16 on GPUs)
        "-m", "components.pipeline.launch", name, str(config_file), str(root), str(out), *([parent_run_id] if parent_run_id else []),
    ]


def run_launched(name: str, cfg, root: str, parent_run_id: str | None):
    """Run stage `name` under `accelerate launch` with `orchestration.gpu_processes` processes;
    its StageResult. Output streams through (the main process's progress bar and logs)."""
    from components.pipeline import tracking
    from components.pipeline.layout import StageResult
    from components.pipeline.stages import StageError

    env = tracking.child_environment()  # the processes find the store from `root`, as the stage does here

    with tempfile.TemporaryDirectory(prefix=f"rlhf-{name}-") as folder:
        config_file, out = Path(folder) / "config.json", Path(folder) / "result.json"
        config_file.write_text(cfg.model_dump_json())
        done = subprocess.run(
            command(name, cfg.orchestration.gpu_processes, config_file, root, out, parent_run_id),
            stderr=subprocess.PIPE, text=True, env={**env, "PYTHONUNBUFFERED": "1"},
        )
        sys.stderr.write(done.stderr[-20_000:])
        if done.returncode == STAGE_ERROR_EXIT and out.with_suffix(".error").is_file():
            raise StageError(out.with_suffix(".error").read_text())
        if done.returncode or not out.is_file():
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise LaunchError(f"stage '{name}' under accelerate launch exited with {done.returncode}:\n{tail}")
        return StageResult.model_validate_json(out.read_text())


def main(argv: list[str]) -> int:
    """One of the launched processes (what `command` starts)."""
    import mlflow

    from components.config import PipelineConfig
    from components.pipeline.stages import StageError, run_stage

    name, config_file, root, out, *parent = argv
    cfg = PipelineConfig.model_validate_json(Path(config_file).read_text())
    main_process = int(os.environ.get("RANK", "0")) == 0  # torchrun's; the trainers set up the process group
    try:
        result = run_stage(name, cfg, root, parent[0] if parent else None)
    except StageError as error:
        if main_process:
            Path(out).with_suffix(".error").write_text(str(error))
        return STAGE_ERROR_EXIT
    if main_process:
        mlflow.MlflowClient().set_tag(result.run_id, "rlhf.processes", os.environ.get("WORLD_SIZE", "1"))
        Path(out).write_text(result.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
