"""The one training loop: pretraining, SFT, reward models and DPO all run through `train_loop`.

It runs unchanged on a CPU, one GPU or several processes (`accelerate launch`: DDP, FSDP,
DeepSpeed), in bf16 on GPUs that support it. A trainer supplies an `Objective`: how many loss
terms a set of examples holds (tokens for SFT, pairs for reward models and DPO) and their summed
loss. The loop divides by the number of terms in the whole optimizer step, across processes and
accumulation steps, so the gradient is the same however the batch is split: 2 processes give the
loss curve of 1 with the same global batch.

Checkpoints hold the model, optimizer, scheduler, every RNG state and the data position (the
optimizer step: each epoch's batches are a function of the seed and the epoch) and the epoch's
running metric sums, so a run killed at any point and started again continues as if it had never
stopped: same weights, same returned metrics (the logged curves: components/pipeline/tracking.py).

A non-finite loss, gradient norm or weight stops training with `NonFiniteError`; nothing is saved.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from components.progress import Bar

from components.sections import TrainerConfig

MetricsLogger = Callable[[dict, int], None]
STATE_FILE = "trainer_state.json"
# accelerate warns at every save that it dropped the tied lm_head copy; loading re-ties it
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


def no_logging(metrics: dict, step: int) -> None:
    pass


class NonFiniteError(ArithmeticError):
    """Training produced a non-finite loss, gradient or weight: the model must not be saved."""


def check_finite(model: torch.nn.Module, what: str) -> None:
    """Raise NonFiniteError naming the first parameter of `model` holding a NaN or infinity."""
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter.detach()).all():
            raise NonFiniteError(f"{what}: weight {name} is not finite; no model saved")


class Objective(Protocol):
    """A training objective over `n_examples` examples, addressed by index."""

    n_examples: int
    lengths: Sequence[int]  # each example's tokens, what `group_by_length` sorts on (pairs: prompt + both responses)

    def n_terms(self, indices: list[int]) -> int:
        """Loss terms in these examples: the denominator of the mean loss (tokens, pairs)."""

    def loss(self, model: torch.nn.Module, indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed loss over the examples' terms, and metrics summed the same way (a metric
        reported as its mean over the step's terms, e.g. the number of correctly ordered pairs)."""


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# False within the RL stage (`cpu_float32`): there `auto` keeps a CPU in float32
_CPU_BF16 = contextvars.ContextVar("cpu_bf16", default=True)


def resolve_precision(mixed_precision: str) -> str:
    """`no` or `bf16`: `auto` means bf16 where the device has bf16 matrix units: a CUDA GPU that
    supports bf16, or, without CUDA and outside the RL stage, a CPU with Intel AMX. There bf16
    autocast took the demo's training steps 1.5-1.9x faster (benchmarks/README.md); a CPU without
    AMX emulates bf16 matmuls, slower than float32."""
    if mixed_precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        return "bf16" if _CPU_BF16.get() and torch.cpu._is_amx_tile_supported() else "no"
    return mixed_precision


def device_description() -> str:
    """The hardware a run's numbers depend on, for its record. `auto` precision is bf16 on a CPU
    with AMX or a bf16 GPU and float32 elsewhere; and in float32 a CPU's sums are split by the
    kernels torch dispatches to (its CPU capability: AVX512, AVX2) and by the thread count: ten
    training steps of the demo's model end on another loss in the 7th digit with AVX2 than with
    AVX512, or on 1 thread than on 2, and a whole run turns that into another model."""
    if torch.cuda.is_available():
        return f"cuda {torch.cuda.get_device_name()}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
    amx = "yes" if torch.cpu._is_amx_tile_supported() else "no"
    return (f"cpu {torch.backends.cpu.get_cpu_capability()}, cores {os.cpu_count()}, "
            f"threads {torch.get_num_threads()}, AMX bf16 {amx}")


@contextlib.contextmanager
def cpu_float32():
    """`auto` as float32 on a CPU for the block: the RL stage's. Under bf16 autocast on this CPU the
    demo's methods drifted from the SFT policy (PPO: KL 40.6 and a gold win rate of 0.594, against
    2.78 and 0.856 in float32 on the same upstream; ReST 22.3 and 0.578, best-of-n 10.4 and 0.676)
    and PPO was no faster."""
    token = _CPU_BF16.set(False)
    try:
        yield
    finally:
        _CPU_BF16.reset(token)


def make_accelerator(mixed_precision: str = "auto") -> Accelerator:
    """An Accelerator for this process, in `resolve_precision(mixed_precision)`. accelerate keeps
    one precision per process and refuses another; stages run one after another in a process (the
    pipeline flow, the RL stage's reward update) with their sections' precisions, so a different
    one resets accelerate's precision state, leaving its distributed set-up (PartialState) as is."""
    precision = resolve_precision(mixed_precision)
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        AcceleratorState._reset_state()
    # cpu=True without CUDA: under `accelerate launch --multi_gpu` the processes then join over gloo.
    # The scheduler counts optimizer steps, not per-process batches.
    return Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=precision, step_scheduler_with_optimizer=False,
    )


def placement(mixed_precision: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The device and the autocast dtype that `make_accelerator(mixed_precision)` computes in: this
    process's accelerate device, and bf16 under mixed precision, else float32 (no autocast).
    Without building an Accelerator: accelerate fixes its precision once per process, and the RL
    stage also runs the reward trainer, in the reward section's precision."""
    device = PartialState(cpu=not torch.cuda.is_available()).device
    return device, torch.bfloat16 if resolve_precision(mixed_precision) == "bf16" else torch.float32


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (for adapter switches and attributes)."""
    return getattr(model, "module", model)


def step_batches(
    n_examples: int, batch_size: int, seed: int, epoch: int, lengths: Sequence[int] | None = None
) -> list[list[int]]:
    """The optimizer steps of one epoch: a seeded permutation cut into global batches; the last
    partial batch is dropped (unless it is the only one) so that every step has the same size.
    With the examples' `lengths`, the same examples in batches of similar lengths (`length_grouped`)."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n_examples, generator=generator).tolist()
    steps = max(1, n_examples // batch_size)
    batches = [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]
    if lengths is None:
        return batches
    return length_grouped([i for batch in batches for i in batch], lengths, len(batches[0]), generator)


def length_grouped(
    order: list[int], lengths: Sequence[int], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """`order` (a whole number of batches) in batches of similar lengths, as transformers'
    group_by_length (LengthGroupedSampler) forms them: megabatches of up to 50 batches in `order`,
    each sorted longest first and cut into batches. A batch is then padded to little more than its
    own longest example. The batches come in a shuffled order, the one holding the longest example
    first, so that a run that does not fit in memory fails at its first step."""
    # at least 4 megabatches where there are enough examples: otherwise one megabatch would sort
    # the whole epoch and every epoch would have the same batches
    megabatch = batch_size * max(1, min(len(order) // (4 * batch_size), 50))
    batches = []
    for start in range(0, len(order), megabatch):
        group = sorted(order[start : start + megabatch], key=lambda i: -lengths[i])
        batches += [group[s : s + batch_size] for s in range(0, len(group), batch_size)]
    batches = [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]
    longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def micro_batches(batch: list[int], process: int, n_processes: int, accumulation: int) -> list[list[int]]:
    """This process's share of a global batch, cut into `accumulation` micro-batches."""
    share = batch[process::n_processes]
    if len(share) < accumulation:
        raise ValueError(
            f"a batch of {len(batch)} examples cannot feed {n_processes} processes x {accumulation} accumulation steps"
        )
    size = math.ceil(len(share) / accumulation)
    return [share[i : i + size] for i in range(0, len(share), size)]


def save_on_main(out: Path, save: Callable[[Path], None]) -> None:
    """Write the trained model from one process (under `accelerate launch` all of them finish the
    loop) and drop the checkpoints: the run is complete, a rerun starts afresh."""
    if PartialState().is_main_process:
        save(out)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)


def latest_checkpoint(checkpoint_dir: Path | None) -> Path | None:
    if checkpoint_dir is None or not checkpoint_dir.is_dir():
        return None
    done = sorted(p for p in checkpoint_dir.glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: Path, step: int, epoch_totals: dict) -> None:
    """Write the state and the epoch's running metric sums to a temporary folder and rename it,
    so a kill mid-save leaves the previous checkpoint as the latest; older checkpoints are removed."""
    final, partial = checkpoint_dir / f"step-{step:08d}", checkpoint_dir / f"partial-{step:08d}"
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps({"step": step, "epoch_totals": epoch_totals}))
        os.replace(partial, final)
        for old in checkpoint_dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def train_loop(
    model: torch.nn.Module,
    objective: Objective,
    cfg: TrainerConfig,
    seed: int,
    log: MetricsLogger = no_logging,
    checkpoint_dir: str | Path | None = None,
    description: str = "train",
) -> dict:
    """Train `model` on `objective` with AdamW; returns the mean metrics of the last epoch.

    With `checkpoint_dir`, the state is saved every `cfg.checkpoint_every` optimizer steps and the
    loop starts from the latest checkpoint found there. The model is left unwrapped, in eval mode.
    """
    accelerator = make_accelerator(cfg.mixed_precision)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
    batches_per_epoch = len(step_batches(objective.n_examples, cfg.batch_size, seed, 0))
    lengths = objective.lengths if cfg.group_by_length else None
    total_steps = cfg.epochs * batches_per_epoch
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    scheduler = warmup_cosine(optimizer, total_steps, cfg.warmup_fraction)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start, epoch_totals = 0, {}
    resume_from = latest_checkpoint(checkpoint_dir)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = json.loads((resume_from / STATE_FILE).read_text())
        start, epoch_totals = state["step"], state["epoch_totals"]

    model.train()
    progress = Bar(
        total=total_steps, initial=start, desc=description, disable=not accelerator.is_local_main_process or None
    )
    step = 0
    for epoch in range(cfg.epochs):
        for batch in step_batches(objective.n_examples, cfg.batch_size, seed, epoch, lengths):
            step += 1
            if step <= start:
                continue
            if (step - 1) % batches_per_epoch == 0:  # an epoch's first step
                epoch_totals = {}
            metrics = _optimizer_step(accelerator, model, optimizer, scheduler, objective, batch, cfg)
            if not all(math.isfinite(value) for value in metrics.values()):
                raise NonFiniteError(f"{description}: step {step}: {metrics}; stopped, no model saved (lower the lr?)")
            for key, value in metrics.items():
                epoch_totals[key] = epoch_totals.get(key, 0.0) + value
            if accelerator.is_main_process and (step % cfg.log_every == 0 or step == total_steps):
                log({**metrics, "lr": scheduler.get_last_lr()[0], "epoch": epoch}, step)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            if checkpoint_dir and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == total_steps):
                save_checkpoint(accelerator, checkpoint_dir, step, epoch_totals)
    progress.close()
    accelerator.wait_for_everyone()
    # without accelerate's autocast wrapper on its forward: later passes in this process (the RL
    # stage's reward model after an online round's update) compute as a process that loads it does
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    model.eval()
    check_finite(model, description)
    return {key: value / batches_per_epoch for key, value in epoch_totals.items()}


def _optimizer_step(accelerator, model, optimizer, scheduler, objective: Objective, batch: list[int], cfg) -> dict:
    """One optimizer step over a global batch; returns its metrics, averaged over all its terms."""
    micro = micro_batches(batch, accelerator.process_index, accelerator.num_processes, cfg.gradient_accumulation_steps)
    local_terms = torch.tensor(float(sum(objective.n_terms(m) for m in micro)), device=accelerator.device)
    total_terms = accelerator.reduce(local_terms, reduction="sum").clamp(min=1)
    # DDP averages gradients over processes; scaling by their number makes the result a sum
    scale = accelerator.num_processes / total_terms
    sums: dict[str, float] = {"loss": 0.0}
    for i, indices in enumerate(micro):
        last = i == len(micro) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                loss_sum, metric_sums = objective.loss(model, indices)
            accelerator.backward(loss_sum * scale)
        sums["loss"] += float(loss_sum.detach())
        for key, value in metric_sums.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    keys = sorted(sums)
    totals = accelerator.reduce(torch.tensor([sums[k] for k in keys], device=accelerator.device), reduction="sum")
    metrics = {key: float(value) / float(total_terms) for key, value in zip(keys, totals)}
    metrics["grad_norm"] = float(grad_norm)
    return metrics

