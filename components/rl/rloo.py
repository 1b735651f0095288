"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics", arXiv 2402.14740; Kool et al. 2019).

The whole response is one action: REINFORCE on the sequence reward, with each response's baseline
the mean reward of the other k - 1 responses to its prompt, so no critic is needed and the
baseline does not depend on the response it scores. One iteration:

1. rollout (components/rl/rollout.py): k = `k` responses to each of `batch_size` prompts from
   the current policy, with their behaviour `logprobs`, the reference's `ref_logprobs` and the
   reward source's `score` (normalised, minus the missing-EOS penalty);
2. rewards, with the KL in the reward at the sequence level (`sequence_rewards`):
   R_i = score_i - kl_coef * sum_t (logprobs_t - ref_logprobs_t);
3. advantages (`leave_one_out_advantages`): A_i = R_i - (sum_j R_j - R_i) / (k - 1);
4. update: minimise `rloo_loss`. With `update_epochs: 1` and `minibatch_size` equal to
   batch_size * k (the defaults) there is one gradient step per rollout, at ratio 1, and its
   gradient is exactly the paper's REINFORCE gradient of -A_i * sum_t log pi(y_i,t)
   (`reinforce_loss`). More epochs or smaller minibatches reuse the rollout, and the loss is then
   the PPO-clipped surrogate on the sequence-level ratio, as TRL's RLOOTrainer computes it.

A run checkpoints every `checkpoint_every` iterations (policy, optimizer, RNG) and a killed run
resumes from the latest, as PPO's does.
"""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from components.models import lm
from components.progress import Bar
from components.rl.base import RLInputs
from components.rl.ppo import entropy, kl_per_token
from components.rl.rollout import LoopCheckpoints, collect, eval_mode, trainable_parameters
from components.sections import Section


class RLOOConfig(Section):
    """RLOO (Ahmadian et al. 2024): k responses per prompt, REINFORCE on the sequence reward (KL to
    the SFT reference included) with the mean reward of the other k - 1 responses as baseline."""

    steps: int = Field(20, ge=1, description="rollout-and-update iterations")
    batch_size: int = Field(32, ge=1, description="prompts per rollout, k responses each")
    k: int = Field(
        4, ge=2, description="responses sampled per prompt (the paper's k; the baseline of one is the other k - 1)"
    )
    minibatch_size: int | None = Field(
        32, ge=1, description="responses per gradient step; None: the whole rollout (batch_size * k), one step"
    )
    update_epochs: int = Field(
        1, ge=1, description="passes over each rollout; more than 1 reuses it with the PPO-clipped ratio (TRL)"
    )
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the policy (or its LoRA adapters)")
    kl_coef: float = Field(
        0.05, ge=0, description="beta of the sequence-level KL penalty to the SFT reference in the reward"
    )
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="per-token KL estimate summed into the penalty")
    cliprange: float = Field(0.2, gt=0, description="epsilon of the clipped sequence ratio when a rollout is reused")
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of a response without EOS")
    checkpoint_every: int = Field(5, ge=1, description="iterations between checkpoints a killed run resumes from")

    @model_validator(mode="after")
    def _minibatches(self) -> "RLOOConfig":
        if self.minibatch_size is not None and (self.batch_size * self.k) % self.minibatch_size:
            raise ValueError("batch_size * k must be a multiple of minibatch_size")
        return self


def sequence_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """R_i = r(x, y_i) - kl_coef * sum_t KL_t (Ahmadian et al. 2024, eq. 1 with the KL in the reward),
    KL_t = logprobs_t - ref_logprobs_t (k1; or k3) summed over the response tokens (`mask`)."""
    return scores - kl_coef * (kl_per_token(logprobs, ref_logprobs, estimator) * mask).sum(1)


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = R_i - b_i with the leave-one-out baseline b_i = (sum_j R_j - R_i) / (k - 1) over the k
    responses to the same prompt (Ahmadian et al. 2024, eq. 6; Kool et al. 2019). `rewards` holds k
    consecutive responses per prompt; equivalently A_i = k / (k - 1) * (R_i - mean(R))."""
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The RLOO REINFORCE loss (Ahmadian et al. 2024, eq. 6), the whole response one action:

        L = -(1/B) sum_i A_i * sum_t log pi(y_i,t | x, y_i,<t)

    `logprobs` (B, T) of the response tokens (`mask`), `advantages` (B,) taken as constants."""
    return -(advantages * (logprobs * mask).sum(1)).mean()


def rloo_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, dict]:
    """The loss RLOO minimises here: PPO's clipped surrogate on the sequence-level ratio, as TRL's
    RLOOTrainer computes it,

        ratio_i = exp( sum_t (logprobs_it - old_logprobs_it) )
        L = (1/B) sum_i max( -A_i * ratio_i, -A_i * clip(ratio_i, 1 - eps, 1 + eps) )

    At ratio 1 (the first step on a fresh rollout) its gradient is exactly `reinforce_loss`'s,
    since grad ratio_i = ratio_i * grad sum_t logprobs_it; on a reused rollout the clip stops a
    response from moving further than eps. Stats: clipfrac (share of responses with an active
    clip) and approx_kl (mean of 0.5 * (sequence log ratio)^2).
    """
    log_ratio = ((logprobs - old_logprobs) * mask).sum(1)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = torch.max(unclipped, clipped).mean()
    stats = {
        "clipfrac": float((clipped > unclipped).float().mean()),
        "approx_kl": float((0.5 * log_ratio.detach() ** 2).mean()),
    }
    return loss, stats


def train(run: RLInputs) -> tuple[torch.nn.Module, dict]:
    """Run `cfg.steps` RLOO iterations in place on the policy; returns the policy and the last
    metrics. The policy, optimizer and RNG states are checkpointed every `cfg.checkpoint_every`
    iterations (and after the last) in `run.checkpoint_dir`; a killed run resumes from the latest.
    """
    cfg: RLOOConfig = run.config
    policy, ref_policy, reward, tokenizer, prompts, sampling = (
        run.policy, run.reference, run.reward, run.tokenizer, run.prompts, run.sampling
    )
    torch.manual_seed(run.seed)
    rng = random.Random(run.seed)
    eval_mode(policy, ref_policy)
    parameters = trainable_parameters(policy)
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, eps=1e-5)
    checkpoints = LoopCheckpoints(run.checkpoint_dir, {"policy": policy}, optimizer, rng, cfg.checkpoint_every, cfg.steps)
    start, metrics = checkpoints.resume()
    for step in Bar(range(start, cfg.steps), desc="rloo", total=cfg.steps, initial=start, unit="iteration"):
        # 1. rollout: k responses per prompt
        batch_prompts = rng.sample(prompts, k=min(cfg.batch_size, len(prompts)))
        experience = collect(
            policy, ref_policy, reward, tokenizer, batch_prompts, cfg.k, sampling, cfg.missing_eos_penalty
        )
        rollout, mask = experience.rollout, experience.mask
        old_logprobs, scores = experience.logprobs, experience.scores

        # 2. sequence rewards with the KL penalty; 3. leave-one-out advantages
        kl = (kl_per_token(old_logprobs, experience.ref_logprobs, cfg.kl_estimator) * mask).sum(1)
        rewards = sequence_rewards(scores, old_logprobs, experience.ref_logprobs, mask, cfg.kl_coef, cfg.kl_estimator)
        advantages = leave_one_out_advantages(rewards, cfg.k)

        # 4. update
        update_stats: dict[str, list[float]] = {}
        minibatch_size = cfg.minibatch_size or len(rewards)
        for _ in range(cfg.update_epochs):
            for idx in torch.randperm(len(rewards)).split(minibatch_size):
                mb = rollout.select(idx)
                logits = lm.response_logits(policy, mb, sampling.temperature)
                device = logits.device
                mb_mask = mask[idx].to(device)
                logprobs = lm.logprobs_of(logits, mb.response_ids.to(device))
                loss, stats = rloo_loss(
                    logprobs, old_logprobs[idx].to(device), advantages[idx].to(device), mb_mask, cfg.cliprange
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                stats = {"policy_loss": loss.item(), "entropy": entropy(logits.detach(), mb_mask), **stats}
                for key, value in stats.items():
                    update_stats.setdefault(key, []).append(value)

        metrics = {
            "score_mean": float(scores.mean()),
            "kl": float(kl.mean()),
            "reward_mean": float(rewards.mean()),
            "advantage_abs_mean": float(advantages.abs().mean()),
            "response_length": float(mask.sum(1).mean()),
            "eos_rate": float(np.mean(rollout.ended_with_eos)),
            **{key: float(np.mean(values)) for key, values in update_stats.items()},
        }
        run.log(metrics, step)
        run.probe(step + 1, cfg.steps)
        checkpoints.done(step + 1, metrics)
    return policy, metrics
