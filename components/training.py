"""The supervised training loop shared by pretraining, SFT and reward modelling.

Each trainer supplies `batch_loss(indices) -> (loss, metrics)`; this loop owns shuffling,
AdamW with linear warm-up and cosine decay, gradient clipping and metric logging.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

MetricsLogger = Callable[[dict, int], None]
WARMUP_FRACTION = 0.05
MAX_GRAD_NORM = 1.0


def no_logging(metrics: dict, step: int) -> None:
    pass


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, int(total_steps * WARMUP_FRACTION))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=generator).split(batch_size))


def train_loop(
    model: torch.nn.Module,
    n_examples: int,
    batch_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict]],
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: MetricsLogger = no_logging,
    log_every: int = 10,
) -> dict:
    """Train `model` for `epochs` passes; returns the mean metrics of the last epoch."""
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n_examples / batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    scheduler = warmup_cosine(optimizer, epochs * steps_per_epoch)
    model.train()
    step = 0
    for epoch in range(epochs):
        totals: dict[str, float] = {}
        for indices in minibatches(n_examples, batch_size, generator):
            loss, metrics = batch_loss(indices)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            metrics = {"loss": loss.item(), **metrics}
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value
            if step % log_every == 0:
                log({**metrics, "lr": scheduler.get_last_lr()[0], "epoch": epoch}, step)
            step += 1
    model.eval()
    return {key: value / steps_per_epoch for key, value in totals.items()}
