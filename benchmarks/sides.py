"""What both sides share, spelled once for our trainers and once for TRL's.

The batches: TRL gets the examples in the order our loop visits them in its one epoch and reads
them sequentially, so step i trains on the same batch on both sides. The optimisation: AdamW
(torch's, not fused, as ours), the same learning rate, weight decay and gradient clipping, linear
warm-up over 5% of the steps then cosine decay to 10% of the peak, one epoch of exactly
`Sizes.steps` batches, fp32, no gradient checkpointing, no checkpoints. TRL logs only at the last
step, shows no progress bar and loads data in the main process. Each trainer keeps its own
defaults otherwise; README.md lists the ones that differ.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback

from benchmarks.measure import StepClock
from benchmarks.workload import SEED, Sizes, ours_options
from components.models.training import step_batches

WARMUP_FRACTION = 0.05
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0


def our_batches(sizes: Sizes) -> list[list[int]]:
    """The example indices of each optimizer step of our loop's first epoch."""
    return step_batches(sizes.n_examples, sizes.batch_size, SEED, 0)


def preference_rows(pairs) -> list[dict]:
    """TRL's explicit-prompt preference format."""
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]


def trl_dataset(rows: list[dict], sizes: Sizes) -> Dataset:
    """The rows in the order our loop visits them (TRL reads them sequentially)."""
    return Dataset.from_list([rows[i] for batch in our_batches(sizes) for i in batch])


def train_trl(trainer, sizes: Sizes) -> None:
    # TRL drops rows it cannot fit in max_length: the batches would no longer be ours
    if len(trainer.train_dataset) != sizes.n_examples:
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {sizes.n_examples} examples")
    trainer.remove_callback(PrinterCallback)  # its log dicts on stdout would break the one-JSON-line output
    trainer.train()


def ours_config(config_class, sizes: Sizes, **fields):
    """Our trainer's config: the shared optimisation, the workload's options (`workload.HH_OPTIONS`), `fields`."""
    fields = {**ours_options(sizes, config_class.__name__), **fields}
    return config_class(
        epochs=1,
        batch_size=sizes.batch_size,
        lr=sizes.lr,
        weight_decay=WEIGHT_DECAY,
        warmup_fraction=WARMUP_FRACTION,
        max_grad_norm=MAX_GRAD_NORM,
        mixed_precision="no",
        checkpoint_every=0,
        log_every=1,
        group_by_length=False,  # the same batches as TRL's: `our_batches`, in order
        **fields,
    )


def ours_clock(clock: StepClock):
    """Our trainers' `log` callback, called after every optimizer step (log_every=1)."""

    def log(metrics: dict, step: int) -> None:
        clock.tick()

    return log


def trl_config(config_class, sizes: Sizes, **fields):
    on_cpu = not torch.cuda.is_available()
    return config_class(
        output_dir=str(Path(tempfile.gettempdir()) / "rlhf-bench-trl"),  # written to only if saving, which is off
        num_train_epochs=1,
        per_device_train_batch_size=sizes.batch_size,
        gradient_accumulation_steps=1,
        train_sampling_strategy="sequential",
        learning_rate=sizes.lr,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch",
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=max(1, int(sizes.steps * WARMUP_FRACTION)),
        bf16=False,
        gradient_checkpointing=False,
        max_length=sizes.max_length,
        use_cpu=on_cpu,
        dataloader_pin_memory=not on_cpu,
        dataloader_num_workers=0,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=sizes.steps,
        disable_tqdm=True,
        seed=SEED,
        **fields,
    )


class TRLClock(TrainerCallback):
    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.tick()
