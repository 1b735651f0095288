"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, section 4).

PPO without a critic: the baseline of a response is the mean reward of the other responses to the
same prompt. One iteration (Algorithm 1 with outcome supervision):

1. rollout (components/rl/rollout.py): G = `group_size` responses to each of `batch_size` prompts
   from the current policy, with their behaviour `logprobs`, the reference's `ref_logprobs` and the
   reward source's `score` (normalised, minus the missing-EOS penalty);
2. advantages: the group-relative A_i = (r_i - mean(r)) / (std(r) + eps) over the G responses to a
   prompt, the same for every token of response i; `scale_rewards: false` drops the division by
   the std (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783, which shows it biases towards easy and
   hard prompts);
3. update: `update_epochs` passes (the paper's mu) of minibatches over the rollout, minimising
   `grpo_loss`: the clipped surrogate with the ratio to the sampling policy, minus kl_coef times
   the k3 estimate of KL(pi || pi_ref) per token, aggregated as the paper does (token mean per
   response, then mean over responses; `loss_agg_mode` offers DAPO's and Dr. GRPO's).

`kl_in_reward: true` instead subtracts kl_coef * sum_t (logprobs - ref_logprobs) (k1, at sampling
time) from each response's reward before the group normalisation, as PPO-style RLHF does, and the
loss then has no KL term. A run checkpoints every `checkpoint_every` iterations (policy, optimizer,
RNG) and a killed run resumes from the latest, as PPO's does.
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

LossAggregation = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]


class GRPOConfig(Section):
    """GRPO (Shao et al. 2024): G responses per prompt, group-relative advantages, the clipped
    surrogate and a k3 KL penalty to the SFT reference in the loss; no critic."""

    steps: int = Field(20, ge=1, description="rollout-and-update iterations")
    batch_size: int = Field(16, ge=1, description="prompts per rollout, group_size responses each")
    group_size: int = Field(8, ge=2, description="G: responses sampled per prompt, the group of the baseline")
    minibatch_size: int = Field(32, ge=1, description="responses per gradient step")
    update_epochs: int = Field(
        1, ge=1, description="mu: passes over each rollout (1: on-policy, ratio 1 at the first step)"
    )
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate of the policy (or its LoRA adapters)")
    kl_coef: float = Field(0.04, ge=0, description="beta of the KL penalty to the SFT reference (the paper's 0.04)")
    kl_in_reward: bool = Field(
        False,
        description="false: k3 KL per token in the loss (the paper); true: kl_coef * the k1 sequence KL subtracted "
        "from each response's reward before the group normalisation",
    )
    scale_rewards: bool = Field(
        True,
        description="divide the advantages by the group's reward std (the paper); false: Dr. GRPO (Liu et al. 2025)",
    )
    loss_agg_mode: LossAggregation = Field(
        "seq-mean-token-mean",
        description="seq-mean-token-mean: token mean per response, then mean (the paper); token-mean: mean over all "
        "tokens of the minibatch (DAPO); seq-mean-token-sum-norm: token sum per response over sampling.max_new_tokens, "
        "then mean (Dr. GRPO)",
    )
    cliprange: float = Field(0.2, gt=0, description="epsilon of the clipped ratio to the sampling policy")
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of a response without EOS")
    checkpoint_every: int = Field(5, ge=1, description="iterations between checkpoints a killed run resumes from")

    @model_validator(mode="after")
    def _minibatches(self) -> "GRPOConfig":
        if (self.batch_size * self.group_size) % self.minibatch_size:
            raise ValueError("batch_size * group_size must be a multiple of minibatch_size")
        return self


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, section 4.1.2, outcome supervision).

        A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)     scale_rewards (GRPO)
        A_i =  r_i - mean(r_1..r_G)                              not scale_rewards (Dr. GRPO)

    `rewards` holds G consecutive responses per prompt (row i answers prompt i // G); std is the
    sample std (Bessel-corrected, as TRL and verl compute it). A group whose rewards all tie gets
    advantage 0. Returns one advantage per response, shape (B,).
    """
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The per-token KL(pi || pi_ref) estimate in GRPO's loss (Shao et al. 2024, eq. 4; Schulman 2020's k3):

        D_KL = exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1

    never negative, unbiased for tokens sampled from pi."""
    return kl_per_token(logprobs, ref_logprobs, "k3")


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str = "seq-mean-token-mean", max_tokens: int | None = None
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar over the response tokens (`mask`):

        seq-mean-token-mean      (1/B) sum_i (1/|o_i|) sum_t l_it     GRPO (Shao et al. 2024, eq. 3)
        token-mean               sum_i sum_t l_it / sum_i |o_i|       DAPO (Yu et al. 2025)
        seq-mean-token-sum-norm  (1/B) sum_i sum_t l_it / max_tokens  Dr. GRPO (Liu et al. 2025)
    """
    per_token = per_token * mask
    if mode == "seq-mean-token-mean":
        return (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()
    if mode == "token-mean":
        return per_token.sum() / mask.sum().clamp(min=1)
    if mode == "seq-mean-token-sum-norm":
        if not max_tokens:
            raise ValueError("seq-mean-token-sum-norm needs max_tokens, the generation budget")
        return (per_token.sum(1) / max_tokens).mean()
    raise ValueError(f"unknown loss aggregation {mode!r}")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    kl_coef: float,
    loss_agg_mode: str = "seq-mean-token-mean",
    max_tokens: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """The GRPO objective (Shao et al. 2024, eq. 3) as a loss to minimise. Per response token t of
    response i, with ratio = exp(logprobs - old_logprobs) against the policy that sampled it:

        l_it = -[ min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i) - kl_coef * D_KL_it ]

    D_KL the k3 estimate of `k3_kl` on the current log-probs (so it has a gradient), A_i the
    response's advantage (`advantages`, shape (B,), applied to every token), then `aggregate`d.
    Inputs are (B, T) log-probs of the response tokens, `mask` marks them. kl_coef 0 leaves the
    clipped surrogate alone (the KL is then in the reward). Stats: clipfrac (share of tokens where
    the clip is active), approx_kl (mean of 0.5 * (log ratio)^2) and kl_loss (mean D_KL per token).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    a = advantages.unsqueeze(1)
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * a
    surrogate = torch.min(unclipped, clipped)
    kl = k3_kl(logprobs, ref_logprobs)
    per_token = -(surrogate - kl_coef * kl)
    loss = aggregate(per_token, mask, loss_agg_mode, max_tokens)
    tokens = mask.sum().clamp(min=1)
    stats = {
        "clipfrac": float(((clipped < unclipped).float() * mask).sum() / tokens),
        "approx_kl": float((0.5 * log_ratio.detach() ** 2 * mask).sum() / tokens),
        "kl_loss": float((kl.detach() * mask).sum() / tokens),
    }
    return loss, stats


def train(run: RLInputs) -> tuple[torch.nn.Module, dict]:
    """Run `cfg.steps` GRPO iterations in place on the policy; returns the policy and the last
    metrics. The policy, optimizer and RNG states are checkpointed every `cfg.checkpoint_every`
    iterations (and after the last) in `run.checkpoint_dir`; a killed run resumes from the latest.
    """
    cfg: GRPOConfig = run.config
    policy, ref_policy, reward, tokenizer, prompts, sampling = (
        run.policy, run.reference, run.reward, run.tokenizer, run.prompts, run.sampling
    )
    torch.manual_seed(run.seed)
    rng = random.Random(run.seed)
    eval_mode(policy, ref_policy)
    parameters = trainable_parameters(policy)
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, eps=1e-5)
    loss_kl_coef = 0.0 if cfg.kl_in_reward else cfg.kl_coef
    checkpoints = LoopCheckpoints(run.checkpoint_dir, {"policy": policy}, optimizer, rng, cfg.checkpoint_every, cfg.steps)
    start, metrics = checkpoints.resume()
    for step in Bar(range(start, cfg.steps), desc="grpo", total=cfg.steps, initial=start, unit="iteration"):
        # 1. rollout: a group of G responses per prompt
        batch_prompts = rng.sample(prompts, k=min(cfg.batch_size, len(prompts)))
        experience = collect(
            policy, ref_policy, reward, tokenizer, batch_prompts, cfg.group_size, sampling, cfg.missing_eos_penalty
        )
        rollout, mask = experience.rollout, experience.mask
        old_logprobs, ref_logprobs, scores = experience.logprobs, experience.ref_logprobs, experience.scores

        # 2. rewards (with the KL penalty when it is in the reward) and group-relative advantages
        kl = (kl_per_token(old_logprobs, ref_logprobs, "k1") * mask).sum(1)
        rewards = scores - cfg.kl_coef * kl if cfg.kl_in_reward else scores
        advantages = group_advantages(rewards, cfg.group_size, cfg.scale_rewards)

        # 3. update
        update_stats: dict[str, list[float]] = {}
        for _ in range(cfg.update_epochs):
            for idx in torch.randperm(len(rewards)).split(cfg.minibatch_size):
                mb = rollout.select(idx)
                logits = lm.response_logits(policy, mb, sampling.temperature)
                device = logits.device
                mb_mask = mask[idx].to(device)
                logprobs = lm.logprobs_of(logits, mb.response_ids.to(device))
                loss, stats = grpo_loss(
                    logprobs, old_logprobs[idx].to(device), ref_logprobs[idx].to(device), advantages[idx].to(device),
                    mb_mask, cfg.cliprange, loss_kl_coef, cfg.loss_agg_mode, sampling.max_new_tokens,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                stats = {"policy_loss": loss.item(), "entropy": entropy(logits.detach(), mb_mask), **stats}
                for key, value in stats.items():
                    update_stats.setdefault(key, []).append(value)

        grouped = rewards.view(-1, cfg.group_size)
        metrics = {
            "score_mean": float(scores.mean()),
            "kl": float(kl.mean()),
            "reward_mean": float(rewards.mean()),
            "reward_std_in_group": float(grouped.std(dim=1).mean()),
            "tied_groups": float((grouped.std(dim=1) == 0).float().mean()),
            "response_length": float(mask.sum(1).mean()),
            "eos_rate": float(np.mean(rollout.ended_with_eos)),
            **{key: float(np.mean(values)) for key, values in update_stats.items()},
        }
        run.log(metrics, step)
        run.probe(step + 1, cfg.steps)
        checkpoints.done(step + 1, metrics)
    return policy, metrics
