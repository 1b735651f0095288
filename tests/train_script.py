"""A small SFT run through `training.train_loop`, for the tests in test_training.py.

    python tests/train_script.py OUT [--accumulation N] [--checkpoint-every N] [--kill-at STEP]
    accelerate launch --multi_gpu --num_processes 2 tests/train_script.py OUT

Demonstrations of different lengths, so that the loss is a mean over tokens that the processes
and micro-batches split unevenly. Writes OUT/curve.json (loss per step), OUT/metrics.json (what
train_loop returns: the last epoch's means) and OUT/model.safetensors.
`--kill-at` sends SIGKILL to the process itself at that step, before its checkpoint is written.
"""

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import GPT2LMHeadModel

from components.models import lm
from components.trainers import sft
from components.sections import TrainerConfig
from components.models.training import train_loop

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--accumulation", type=int, default=1)
parser.add_argument("--checkpoint-every", type=int, default=0)
parser.add_argument("--kill-at", type=int, default=0)
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

words = "the film was a quiet wonder and the cast gave it a warm and honest heart".split()
texts = [" ".join(words[i % 7 : i % 7 + 3 + i % 9]) for i in range(48)]
tokenizer = lm.train_tokenizer(texts, 300)
config = lm.build_model(tokenizer, n_layer=1, n_head=2, n_embd=32, max_length=64).config
config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # dropout would differ per process
torch.manual_seed(0)
model = GPT2LMHeadModel(config)
demos = [sft.Demonstration(t.split()[0], " " + " ".join(t.split()[1:])) for t in texts]
objective = sft.lm_objective(tokenizer, demos, 64)
cfg = TrainerConfig(
    epochs=2, batch_size=8, gradient_accumulation_steps=args.accumulation, lr=3e-3,
    checkpoint_every=args.checkpoint_every, log_every=1, mixed_precision="no",  # the curve of every step
)
curve = {}


def log(metrics: dict, step: int) -> None:
    if step == args.kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    curve[step] = metrics["loss"]


metrics = train_loop(model, objective, cfg, seed=0, log=log, checkpoint_dir=out / "checkpoints")
if int(os.environ.get("RANK", "0")) == 0:
    (out / "curve.json").write_text(json.dumps(curve))
    (out / "metrics.json").write_text(json.dumps(metrics))
    save_model(model, str(out / "model.safetensors"))
