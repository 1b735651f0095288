"""DPO as an RL method: the DPO trainer (components/trainers/dpo.py) on the preference pairs the
stage has (the labelled set, plus each online round's fresh labels); ties are left out. The reward
source is not trained on: the stage only measures the frontier with it."""

from __future__ import annotations

import torch

from components.rl.base import RLInputs
from components.sections import DPOConfig
from components.trainers import dpo


def train(run: RLInputs) -> tuple[torch.nn.Module, dict]:
    cfg: DPOConfig = run.config
    if run.reference is None:
        # the stage gave the policy LoRA adapters already: their base is the reference
        cfg = cfg.model_copy(update={"lora_r": 0, "precompute_ref_logprobs": True})
    pairs = [pair for pair in run.pairs if not pair.tie]
    total = cfg.epochs * max(1, len(pairs) // cfg.batch_size)

    def log(metrics: dict, step: int) -> None:  # the trainer counts optimizer steps from 1
        run.log(metrics, step)
        run.probe(step, total)

    return dpo.train(run.policy, run.tokenizer, pairs, run.max_length, cfg, run.seed, log, run.checkpoint_dir)
