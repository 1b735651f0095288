"""Checkpoints of the RL loops (PPO, P3O): a run killed at any point resumes where it stopped.

A checkpoint is a folder `step-NNNNNNNN` holding each model's weights (safetensors), the
optimizer's state (loaded with `weights_only=True`), the torch RNG states (the GPU's too), replay
data as tensors (safetensors) and the loop's own state as JSON (step, KL coefficient, the prompt
sampler's RNG). It loads on any device, whichever wrote it.
It is written to a temporary folder and renamed, so a kill mid-save leaves the previous one
intact; older checkpoints are then removed. The supervised trainers checkpoint through
`accelerate` instead (components/training.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

STATE = "state.json"


def save(
    folder: Path, step: int, models: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, state: dict,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    final, partial = folder / f"step-{step:08d}", folder / f"partial-{step:08d}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, model in models.items():
        save_model(model, str(partial / f"{name}.safetensors"))
    torch.save(optimizer.state_dict(), partial / "optimizer.pt")
    rng = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():  # a GPU samples from its own generator
        rng["cuda_rng"] = torch.cuda.get_rng_state()
    save_file({**rng, **(tensors or {})}, str(partial / "tensors.safetensors"))
    (partial / STATE).write_text(json.dumps({"step": step, **state}))
    os.replace(partial, final)
    for old in folder.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def load_latest(
    folder: Path | None, models: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer
) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """Restore the newest checkpoint in `folder` into `models` and `optimizer` and the torch RNG;
    returns (state, tensors), or None when there is none."""
    done = sorted(p for p in folder.glob("step-*") if (p / STATE).is_file()) if folder and folder.is_dir() else []
    if not done:
        return None
    latest = done[-1]
    for name, model in models.items():
        load_model(model, str(latest / f"{name}.safetensors"))  # read to the CPU, copied to the model's device
    # on the CPU, whatever device wrote it; the optimizer moves its state to its parameters' device
    optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True, map_location="cpu"))
    tensors = load_file(str(latest / "tensors.safetensors"))
    torch.set_rng_state(tensors.pop("torch_rng"))
    cuda_rng = tensors.pop("cuda_rng", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    return json.loads((latest / STATE).read_text()), tensors


def random_state(rng: random.Random) -> list:
    """A `random.Random` state as JSON-friendly lists (restore with `set_random_state`)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_random_state(rng: random.Random, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))
