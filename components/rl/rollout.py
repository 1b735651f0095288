"""The rollout engine every RL method shares: sample, score, and record log-probs.

`collect` samples K responses per prompt from the policy (KV-cached `generate`, temperature and
top-p, at most `max_new_tokens`, stopping at EOS), then records for every response token the
policy's `logprobs` and the reference's `ref_logprobs`, and for every response the reward model's
normalised `score` (a reward source, components/rewards/) minus a penalty when it hit the token limit without EOS. The score belongs to
the last response token; methods that need per-token rewards put it there (PPO).

With a LoRA policy (peft) and no separate reference, the reference is the base model with the
adapter disabled: one copy of the weights in memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from components.models import lm
from components.sections import SamplingConfig


@dataclass
class Experience:
    """K responses per prompt, rows grouped by prompt: row i answers prompt i // k."""

    rollout: lm.Rollout
    logprobs: torch.Tensor  # (B, R) behaviour policy, at sampling temperature
    ref_logprobs: torch.Tensor  # (B, R)
    scores: torch.Tensor  # (B,) normalised reward minus the missing-EOS penalty
    k: int

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask.float()

    def select(self, index: torch.Tensor) -> "Experience":
        """Rows `index` (the grouping by prompt holds only when whole groups are selected)."""
        return Experience(
            self.rollout.select(index), self.logprobs[index], self.ref_logprobs[index], self.scores[index], self.k
        )


@contextlib.contextmanager
def reference(policy, ref_policy):
    """The reference model: `ref_policy`, or the policy's base model with its LoRA adapter off."""
    if ref_policy is not None:
        yield ref_policy
    else:
        with policy.disable_adapter():
            yield policy


def generate(policy, tokenizer, prompts: list[str], k: int, sampling: SamplingConfig) -> lm.Rollout:
    """K samples for each prompt in one batch, grouped by prompt."""
    repeated = [prompt for prompt in prompts for _ in range(k)]
    return lm.sample(policy, tokenizer, repeated, sampling.max_new_tokens, sampling.temperature, sampling.top_p)


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
    missing_eos_penalty: float,
) -> Experience:
    """Sample K responses per prompt and record log-probs, reference log-probs and scores."""
    rollout = generate(policy, tokenizer, prompts, k, sampling)
    with torch.no_grad():
        logprobs = lm.response_logprobs(policy, rollout, sampling.temperature).cpu()
        with reference(policy, ref_policy) as ref:
            ref_logprobs = lm.response_logprobs(ref, rollout, sampling.temperature).cpu()
    mask = rollout.response_mask.float()
    return Experience(rollout, logprobs * mask, ref_logprobs * mask, score(reward, rollout, missing_eos_penalty), k)
