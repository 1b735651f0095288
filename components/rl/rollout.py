"""The rollout engine every RL method shares: sample, score, and record log-probs.

`collect` samples K responses per prompt from the policy (KV-cached `generate`, temperature and
top-p, at most `max_new_tokens`, stopping at EOS), then records for every response token the
policy's `logprobs` and the reference's `ref_logprobs`, and for every response the reward model's
normalised `score` (a reward source, components/rewards/) minus a penalty when it hit the token limit without EOS. The score belongs to
the last response token; methods that need per-token rewards put it there (PPO).

With a LoRA policy (peft) and no separate reference, the reference is the base model with the
adapter disabled: one copy of the weights in memory.

`on_accelerator` runs a method on the accelerator the trainers use, in bf16 where they would.

A `TokenMask` restricts the tokens the policy may sample at each step (NLPO's top-p mask,
components/rl/nlpo.py): the policy then samples from its distribution renormalised over the
allowed tokens, and the experience records the masks and that distribution's log-probs, which the
update computes again on the same masks (`masked_logits`) for its ratio.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from transformers import LogitsProcessor

from components.models import checkpoint, lm, training
from components.rl.base import RLInputs
from components.sections import SamplingConfig


@dataclass
class Experience:
    """K responses per prompt, rows grouped by prompt: row i answers prompt i // k."""

    rollout: lm.Rollout
    logprobs: torch.Tensor  # (B, R) the policy's, at sampling temperature (unmasked: see behaviour_logprobs)
    ref_logprobs: torch.Tensor  # (B, R)
    scores: torch.Tensor  # (B,) normalised reward minus the missing-EOS penalty
    k: int
    allowed: torch.Tensor | None = None  # (B, R, V) bool: the tokens a TokenMask let the policy sample
    masked_logprobs: torch.Tensor | None = None  # (B, R) of the policy renormalised over `allowed`

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask.float()

    @property
    def behaviour_logprobs(self) -> torch.Tensor:
        """Log-probs of the distribution that sampled: the masked one when a TokenMask restricted it."""
        return self.logprobs if self.masked_logprobs is None else self.masked_logprobs

    def select(self, index: torch.Tensor) -> "Experience":
        """Rows `index` (the grouping by prompt holds only when whole groups are selected)."""
        masked = [None if x is None else x[index] for x in (self.allowed, self.masked_logprobs)]
        return Experience(
            self.rollout.select(index), self.logprobs[index], self.ref_logprobs[index], self.scores[index], self.k,
            *masked,
        )


class TokenMask(Protocol):
    """Which tokens the policy may sample at each step. `processor(prompt_mask)` is the
    LogitsProcessor that `generate` applies (the other tokens' logits set to -inf), given the
    prompts' attention mask; after the generation, `applied()` is the (B, R, V) boolean mask it
    applied at the R response positions."""

    def processor(self, prompt_mask: torch.Tensor) -> LogitsProcessor: ...

    def applied(self) -> torch.Tensor: ...


def masked_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`logits` with the tokens outside `allowed` at the dtype's lowest value: their softmax is the
    policy renormalised over the allowed tokens, pi(a) 1[a allowed] / sum_{a' allowed} pi(a').
    Finite rather than -inf, so that an entropy's p log p over them is 0 rather than NaN."""
    return logits.masked_fill(~allowed.to(logits.device), torch.finfo(logits.dtype).min)


@contextlib.contextmanager
def reference(policy, ref_policy):
    """The reference model: `ref_policy`, or the policy's base model with its LoRA adapter off."""
    if ref_policy is not None:
        yield ref_policy
    else:
        with policy.disable_adapter():
            yield policy


@contextlib.contextmanager
def on_accelerator(run: RLInputs, mixed_precision: str | None = None):
    """Run an RL method where the supervised trainers train (components/models/training.py,
    `placement`): policy, reference and reward model move to this process's device, where they
    stay, and every forward pass inside autocasts to bf16 where mixed precision is on (`auto`: a
    CUDA GPU with bf16; on a CPU `auto` stays float32 here, `training.cpu_float32`, for the
    trainers a method runs too). Weights, gradients and optimizer state stay float32, as under the
    trainers' autocast: bf16 weights would round away small updates.

    `mixed_precision`: auto, no or bf16; None takes the method section's own where it is a
    trainer's section (ReST's, best-of-n's, DPO's: their fine-tuning computes alike), else auto."""
    with training.cpu_float32():
        if mixed_precision is None:
            mixed_precision = getattr(run.config, "mixed_precision", "auto")
        device, dtype = training.placement(mixed_precision)
        for model in (run.policy, run.reference, getattr(run.reward, "model", None)):
            if model is not None:
                model.to(device)
        # around the whole method, so that every forward is covered (sampling, the reward model, a new
        # method's own); backward reuses the dtypes of the forward, and the optimizer's ops do not autocast
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            yield


def generate(
    policy, tokenizer, prompts: list[str], k: int, sampling: SamplingConfig, token_mask: TokenMask | None = None
) -> lm.Rollout:
    """K samples for each prompt in one batch, grouped by prompt (restricted by `token_mask`, if any)."""
    repeated = [prompt for prompt in prompts for _ in range(k)]
    processor = token_mask.processor if token_mask is not None else None
    return lm.sample(
        policy, tokenizer, repeated, sampling.max_new_tokens, sampling.temperature, sampling.top_p, processor,
        engine=sampling.engine,
    )


@torch.no_grad()
def score(reward, rollout: lm.Rollout, missing_eos_penalty: float) -> torch.Tensor:
    """The reward source's normalised score, minus the penalty for a response cut without EOS."""
    eos = torch.tensor(rollout.ended_with_eos, dtype=torch.float)
    return reward.normalised(rollout).float().cpu() - missing_eos_penalty * (1 - eos)


def trainable_parameters(*models) -> list[torch.nn.Parameter]:
    """What an RL optimizer updates: every parameter that requires grad (only the adapters of a
    LoRA policy)."""
    return [p for model in models for p in model.parameters() if p.requires_grad]


def collect(
    policy, ref_policy, reward, tokenizer, prompts: list[str], k: int, sampling: SamplingConfig,
    missing_eos_penalty: float, token_mask: TokenMask | None = None,
) -> Experience:
    """Sample K responses per prompt and record log-probs, reference log-probs and scores; with a
    `token_mask`, also the masks it applied and the log-probs of the masked distribution."""
    rollout = generate(policy, tokenizer, prompts, k, sampling, token_mask)
    mask = rollout.response_mask.float()
    # the padding after a response allows every token, so that its log-probs stay finite
    allowed = None if token_mask is None else token_mask.applied() | ~rollout.response_mask.bool().unsqueeze(-1)
    logprobs, masked = policy_logprobs(policy, rollout, sampling.temperature, allowed)
    with torch.no_grad(), reference(policy, ref_policy) as ref:
        ref_logprobs = lm.response_logprobs(ref, rollout, sampling.temperature).cpu()
    scores = score(reward, rollout, missing_eos_penalty)
    return Experience(
        rollout, logprobs * mask, ref_logprobs * mask, scores, k, allowed, None if masked is None else masked * mask
    )


@torch.no_grad()
def policy_logprobs(
    policy, rollout: lm.Rollout, temperature: float, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The policy's log-probs of the response tokens and, given the `allowed` tokens, those of its
    distribution renormalised over them (None without), from one forward pass; on the CPU."""
    logits = lm.response_logits(policy, rollout, temperature)
    tokens = rollout.response_ids.to(logits.device)
    masked = None if allowed is None else lm.logprobs_of(masked_logits(logits, allowed), tokens).cpu()
    return lm.logprobs_of(logits, tokens).cpu(), masked


def eval_mode(policy, ref_policy) -> None:
    """Both models in eval mode for the whole run, the reference frozen: dropout would make the
    log-probs of an update differ from those of the sampler (and, at the first step, the policy's
    from the reference's, which it equals)."""
    for model in (policy, ref_policy):
        if model is not None:
            model.eval()
    if ref_policy is not None:
        ref_policy.requires_grad_(False)


class LoopCheckpoints:
    """The checkpoints of an iterative RL loop (components/models/checkpoint.py): `models`, the
    optimizer, the torch RNG and the prompt sampler `rng`, after every `every`-th iteration and
    after the last of `total`, in `folder` (None: no checkpoints). A killed run that calls
    `resume` first continues from the newest one with the same weights and random streams."""

    def __init__(
        self, folder: Path | None, models: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
        rng: random.Random, every: int, total: int,
    ):
        self.folder, self.models, self.optimizer, self.rng = folder, models, optimizer, rng
        self.every, self.total = every, total

    def resume(self) -> tuple[int, dict]:
        """Restore the newest checkpoint; returns (iterations done, the metrics of the last one),
        (0, {}) when there is none."""
        restored = checkpoint.load_latest(self.folder, self.models, self.optimizer)
        if restored is None:
            return 0, {}
        state, _ = restored
        checkpoint.set_random_state(self.rng, state["rng"])
        return state["step"], state["metrics"]

    def done(self, iterations: int, metrics: dict) -> None:
        """Called after each iteration (`iterations` done so far): checkpoints when one is due."""
        if self.folder is not None and (iterations % self.every == 0 or iterations == self.total):
            state = {"rng": checkpoint.random_state(self.rng), "metrics": metrics}
            checkpoint.save(self.folder, iterations, self.models, self.optimizer, state)
