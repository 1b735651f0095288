"""Pairwise Proximal Policy Optimization (P3O; Wu et al. 2023, arXiv 2310.00212), as its first author
implements it: thwu1/trlx, trlx/trainer/accelerate_p3o_trainer.py (`AccelerateP3OTrainer.p3o_loss`).

P3O is a trajectory-wise policy gradient on relative feedback: it samples two responses per prompt
and moves the policy along the difference of their log-probs, weighted by the difference of their
rewards. A per-prompt constant added to the reward cancels in the difference, so P3O needs neither
a value function nor GAE, and is invariant to the reward shifts that Bradley-Terry reward models
leave undetermined (the paper's "reward equivalence"). With rho_i = pi(y_i|x) / pi_old(y_i|x) and
A = (r(y_1|x) - r(y_2|x)) / 2, section 4 of the paper:

    pairwise policy gradient (on-policy):  E[ A * grad(log pi(y_1|x) - log pi(y_2|x)) ]
    with importance sampling:              E_old[ rho_1 * rho_2 * A * grad(log pi(y_1|x) - log pi(y_2|x)) ]

One iteration (Algorithm 1; the author's `make_experience` and `post_epoch_callback`):

1. rollout (components/rl/rollout.py): two responses to each of `batch_size` prompts from the
   current policy, with their behaviour `logprobs`, the reference's `ref_logprobs` and the reward
   source's `score` (normalised, minus the missing-EOS penalty);
2. update: `update_epochs` passes of minibatches over this rollout alone, minimising `p3o_loss`,
   which recomputes each response's reward r = score - kl_coef * KL(pi || pi_ref) with the policy
   being trained. The rollout is then dropped: the store is emptied every iteration.

The loss is linear in the log-probs with a fixed (detached) weight: the importance weight
rho_1 rho_2, clamped to [1/c, c], times the reward difference. The clip stops the gradient once a
log-ratio has moved `cliprange` from its sampling-time value: for V2 the pair's log-ratio
log pi(y_1)/pi(y_2) (the paper's joint ratio, clipped in log space), for V1 each token's log-prob of
each response (the author's per-response variant, `clip_tokenwise`). A run checkpoints every
`checkpoint_every` iterations (policy, optimizer, RNG) and a killed run resumes from the latest.

Left out of the author's trainer: its reward scaling and clipping (`scale_reward`, `cliprange_reward`;
our reward sources are normalised already) and `scale_q` (off in all his configurations). His loss
recomputes the reference log-probs each minibatch; ours keeps the rollout's, the same numbers for a
frozen reference.
"""

from __future__ import annotations

import functools
import random
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from components.models import checkpoint, lm
from components.progress import Bar
from components.rl.base import RLInputs
from components.rl.ppo import entropy, kl_per_token
from components.rl.rloo import sequence_rewards
from components.rl.rollout import collect, trainable_parameters
from components.sections import Section


class P3OConfig(Section):
    """Pairwise proximal policy optimisation (Wu et al. 2023; the first author's trlx): two responses
    per prompt, the policy gradient of their reward difference. Clipping V1 or V2 is chosen by
    rl.algorithm."""

    steps: int = Field(20, ge=1, description="rollout-and-update iterations")
    batch_size: int = Field(
        64, ge=1, description="prompts per rollout, two responses each (the author's num_rollouts, in pairs)"
    )
    minibatch_size: int = Field(16, ge=1, description="prompt pairs per gradient step")
    update_epochs: int = Field(
        4, ge=1, description="passes over each rollout before it is dropped (the author's p3o_epochs)"
    )
    lr: float = Field(5e-5, gt=0)
    kl_coef: float = Field(
        0.1, ge=0, description="beta of the KL penalty to the SFT reference in each response's reward, recomputed "
        "with the policy being trained"
    )
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="the summed per-token KL estimate (k1: the author's)")
    cliprange: float = Field(
        0.2, gt=0, description="epsilon: how far a log-ratio (V2: log pi(y_1)/pi(y_2); V1: each token's log-prob) "
        "may move from its sampling-time value before its gradient stops"
    )
    weight_clip: float = Field(
        10.0, gt=1, description="c: the importance weight rho_1 rho_2 is clamped to [1/c, c] (the author's "
        "cliprange_ratio)"
    )
    avg_tokenwise: bool = Field(
        True, description="V2: the summed pair losses over the minibatch's response tokens (the author's default); "
        "false: their mean over pairs / 2, the paper's A = (r_1 - r_2) / 2. V1 always divides by the tokens"
    )
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of a response without EOS")
    checkpoint_every: int = Field(5, ge=1, description="iterations between checkpoints a killed run resumes from")


VERSIONS = ("v1", "v2")


def p3o_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    version: str,
    kl_coef: float,
    cliprange: float,
    weight_clip: float,
    kl_estimator: str = "k1",
    avg_tokenwise: bool = True,
) -> tuple[torch.Tensor, dict]:
    """The clipped P3O loss as its first author computes it (thwu1/trlx, accelerate_p3o_trainer.py,
    `p3o_loss`), to minimise. Inputs are (2m, T) log-probs of the response tokens (`mask` marks
    them) of m prompt pairs, pair j in rows 2j and 2j + 1: under the policy being trained, the
    behaviour policy that sampled them and the reference; `scores` (2m,) the reward source's.

    Per response i of a pair, l_i = sum_t (logprobs - ref_logprobs) (current policy), l_i^old the same
    at sampling time, rho_i = exp(l_i - l_i^old) = pi(y_i) / pi_old(y_i) and sg the stop-gradient:

        q = sg(r_1 - r_2),  r_i = score_i - kl_coef * KL_i, KL_i summed over y_i with the current policy
        w = sg(clip(rho_1 rho_2, 1/c, c))                        c = weight_clip
        V2: L_pair = max(-q w d, -q w clip(d, d_old - eps, d_old + eps)),  d = l_1 - l_2, d_old = l_1^old - l_2^old
        V1: L_pair = sum_t max(-q w lp_1t, -q w clip(lp_1t, old_1t - eps, old_1t + eps))
                   + sum_t max( q w lp_2t,  q w clip(lp_2t, old_2t - eps, old_2t + eps))

    summed over pairs and divided by N, the number of response tokens in the minibatch (V2 with
    avg_tokenwise false: the mean over pairs, halved). Unclipped, the gradient is
    w q grad(log pi(y_1) - log pi(y_2)) / N: the paper's importance-sampled pairwise gradient with
    rho_1 rho_2 clamped (exactly it, A = q / 2, for the pair mean). d - d_old = log rho_1 - log rho_2
    is the log of the paper's joint ratio, so V2 stops pushing once pi(y_1)/pi(y_2) has moved by a
    factor e^eps; V1 stops pushing each token once its own probability has.

    Stats: clipfrac (share of pairs, V2, or tokens, V1, whose clip is active), weight_clipfrac
    (share of pairs whose weight is clamped) and approx_kl (mean over responses of
    0.5 * (log rho)^2, as CleanRL logs it).
    """
    logratios = ((logprobs - ref_logprobs) * mask).sum(1).view(-1, 2)
    old_logratios = ((old_logprobs - ref_logprobs) * mask).sum(1).view(-1, 2)
    # the KL penalty of the policy being trained, not the sampler's; detached, like the score, it
    # weighs the step and does not steer it
    rewards = sequence_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, kl_estimator).view(-1, 2)
    reward_diff = (rewards[:, 0] - rewards[:, 1]).detach()
    log_rho = (logratios - old_logratios).detach()
    joint_ratio = torch.exp(log_rho.sum(1))
    # a fixed weight: large rho_1 rho_2 of stale pairs cannot blow the step up, nor small ones stall it
    weight = torch.clamp(joint_ratio, 1 / weight_clip, weight_clip)
    tokens = mask.sum()
    if version == "v2":
        diff, old_diff = logratios[:, 0] - logratios[:, 1], old_logratios[:, 0] - old_logratios[:, 1]
        unclipped = -reward_diff * weight * diff
        clipped = -reward_diff * weight * torch.clamp(diff, old_diff - cliprange, old_diff + cliprange)
        per_pair = torch.max(unclipped, clipped)
        loss = per_pair.sum() / tokens if avg_tokenwise else per_pair.mean() / 2
        clipfrac = (clipped > unclipped).float().mean()
    elif version == "v1":
        # y_1 is pushed up by q w, y_2 down by it: one signed weight per row
        row_weight = torch.stack([-reward_diff * weight, reward_diff * weight], dim=1).reshape(-1, 1)
        logprobs, old_logprobs = logprobs * mask, old_logprobs * mask
        unclipped = row_weight * logprobs
        clipped = row_weight * torch.clamp(logprobs, old_logprobs - cliprange, old_logprobs + cliprange)
        loss = torch.max(unclipped, clipped).sum() / tokens
        clipfrac = ((clipped > unclipped).float() * mask).sum() / tokens
    else:
        raise ValueError(f"unknown P3O version {version!r}: one of {VERSIONS}")
    stats = {
        "clipfrac": float(clipfrac),
        "weight_clipfrac": float((weight != joint_ratio).float().mean()),
        "approx_kl": float(0.5 * log_rho.pow(2).mean()),
    }
    return loss, stats


def pair_rows(pairs: torch.Tensor) -> torch.Tensor:
    """The rows of prompt pairs `pairs` in a rollout of two responses per prompt: 2j, 2j + 1 for pair j."""
    return torch.stack([2 * pairs, 2 * pairs + 1], dim=1).flatten()


def train(run: RLInputs, version: str) -> tuple[torch.nn.Module, dict]:
    """Run `cfg.steps` P3O iterations in place on the policy; returns the policy and the last metrics.

    `version` is "v1" or "v2" (see `p3o_loss`). The policy, optimizer and RNG states are
    checkpointed every `cfg.checkpoint_every` iterations (and after the last) in
    `run.checkpoint_dir`; a killed run resumes from the latest.
    """
    cfg: P3OConfig = run.config
    policy, ref_policy, reward, tokenizer, prompts, sampling = (
        run.policy, run.reference, run.reward, run.tokenizer, run.prompts, run.sampling
    )
    checkpoint_dir = run.checkpoint_dir
    if version not in VERSIONS:
        raise ValueError(f"unknown P3O version {version!r}: one of {VERSIONS}")
    torch.manual_seed(run.seed)
    rng = random.Random(run.seed)
    # eval mode throughout: dropout would make the update's log-probs differ from the behaviour
    # log-probs at ratio 1 and bias the clipping
    for model in (policy, ref_policy):
        if model is not None:
            model.eval()
    if ref_policy is not None:
        ref_policy.requires_grad_(False)
    parameters = trainable_parameters(policy)
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, eps=1e-5)
    metrics: dict = {}
    start = 0
    restored = checkpoint.load_latest(checkpoint_dir, {"policy": policy}, optimizer)
    if restored is not None:
        state, _ = restored
        start, metrics = state["step"], state["metrics"]
        checkpoint.set_random_state(rng, state["rng"])
    for step in Bar(range(start, cfg.steps), desc="p3o", total=cfg.steps, initial=start, unit="iteration"):
        # 1. rollout: two responses per prompt, rows 2j and 2j + 1 answering prompt j
        batch_prompts = rng.sample(prompts, k=min(cfg.batch_size, len(prompts)))
        experience = collect(policy, ref_policy, reward, tokenizer, batch_prompts, 2, sampling, cfg.missing_eos_penalty)
        rollout, mask = experience.rollout, experience.mask
        old_logprobs, ref_logprobs, scores = experience.logprobs, experience.ref_logprobs, experience.scores
        # the rewards of the samples, for the metrics: the loss recomputes the KL with the updated policy
        kl = (kl_per_token(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask).sum(1)
        rewards = scores - cfg.kl_coef * kl

        # 2. update on this rollout alone; it is dropped afterwards (the store is emptied every iteration)
        update_stats: dict[str, list[float]] = {}
        for _ in range(cfg.update_epochs):
            for pairs in torch.randperm(len(batch_prompts)).split(cfg.minibatch_size):
                idx = pair_rows(pairs)
                mb = rollout.select(idx)
                logits = lm.response_logits(policy, mb, sampling.temperature)
                device = logits.device
                mb_mask = mask[idx].to(device)
                logprobs = lm.logprobs_of(logits, mb.response_ids.to(device))
                loss, stats = p3o_loss(
                    logprobs, old_logprobs[idx].to(device), ref_logprobs[idx].to(device), scores[idx].to(device),
                    mb_mask, version, cfg.kl_coef, cfg.cliprange, cfg.weight_clip, cfg.kl_estimator, cfg.avg_tokenwise,
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
            "reward_gap": float((rewards[0::2] - rewards[1::2]).abs().mean()),
            "response_length": float(mask.sum(1).mean()),
            "eos_rate": float(np.mean(rollout.ended_with_eos)),
            **{key: float(np.mean(values)) for key, values in update_stats.items()},
        }
        run.log(metrics, step)
        run.probe(step + 1, cfg.steps)
        if checkpoint_dir is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            state = {"rng": checkpoint.random_state(rng), "metrics": metrics}
            checkpoint.save(checkpoint_dir, step + 1, {"policy": policy}, optimizer, state)
    return policy, metrics


train_v1 = functools.partial(train, version="v1")
train_v2 = functools.partial(train, version="v2")
