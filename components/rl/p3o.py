"""Pairwise Proximal Policy Optimization (P3O; Wu et al. 2023, arXiv 2310.00212).

P3O is a trajectory-wise policy gradient on relative feedback: it samples two responses per prompt
and moves the policy along the difference of their log-probs, weighted by the difference of their
rewards. A per-prompt constant added to the reward cancels in the difference, so P3O needs neither
a value function nor GAE, and is invariant to the reward shifts that Bradley-Terry reward models
leave undetermined (the paper's "reward equivalence"). One iteration of Algorithm 1:

1. rollout (components/rollout.py): two responses per prompt from the current policy, with their
   behaviour log-probs (summed over response tokens), reference log-probs and scores;
2. rewards: r(x, y) = score - kl_coef * KL(x, y), the KL to the reference summed over the response;
3. the pairs join a replay buffer of the newest `buffer_size` prompt pairs;
4. update: `update_epochs` passes of minibatches over the buffer, maximising the clipped
   importance-sampled pairwise objective, V1 (each response's ratio clipped) or V2 (the pair's
   joint ratio clipped).

Section 4 of the paper, in the notation used below. With rho_i = pi(y_i|x) / pi_old(y_i|x) and
A = (r(y_1|x) - r(y_2|x)) / 2:

    pairwise policy gradient (on-policy):  E[ A * grad(log pi(y_1|x) - log pi(y_2|x)) ]
    with importance sampling (replay):     E_old[ rho_1 * rho_2 * A * grad(log pi(y_1|x) - log pi(y_2|x)) ]

and the clipped objectives of `p3o_loss` reproduce the second gradient wherever no clip is active.
"""

from __future__ import annotations

import functools
import random
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from components.progress import Bar
from pydantic import Field

from components.models import checkpoint, lm
from components.rl.base import RLInputs
from components.rl.ppo import entropy, kl_per_token
from components.rl.rollout import Experience, collect, trainable_parameters
from components.sections import Section


class P3OConfig(Section):
    """Pairwise proximal policy optimisation (Wu et al. 2023): two responses per prompt, the
    policy gradient of their reward difference. Clipping V1 or V2 is chosen by rl.algorithm."""

    steps: int = Field(20, ge=1, description="rollout-and-update iterations")
    batch_size: int = Field(32, ge=1, description="prompts per rollout, two responses each")
    minibatch_size: int = Field(16, ge=1, description="prompt pairs per gradient step")
    update_epochs: int = Field(4, ge=1, description="passes over the replay buffer after each rollout")
    buffer_size: int = Field(
        64, ge=1, description="prompt pairs kept for replay, importance-weighted against the policy that sampled them"
    )
    lr: float = Field(5e-5, gt=0)
    kl_coef: float = Field(0.1, ge=0, description="beta of the KL penalty to the SFT reference in each response's reward")
    kl_estimator: Literal["k1", "k3"] = "k1"
    cliprange: float = Field(0.2, gt=0)
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of a response without EOS")
    checkpoint_every: int = Field(5, ge=1, description="iterations between checkpoints a killed run resumes from")

VERSIONS = ("v1", "v2")


def sequence_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r(x, y) = r_phi(x, y) - beta * KL(x, y) (Wu et al. 2023, Algorithm 1): the reward model's score
    minus the KL penalty to the reference, both at the sequence level (`kl` summed over the response)."""
    return scores - kl_coef * kl


def pairwise_advantages(rewards_1: torch.Tensor, rewards_2: torch.Tensor) -> torch.Tensor:
    """A = (r(y_1|x) - r(y_2|x)) / 2, the weight of grad log pi(y_1|x) in the pairwise policy gradient
    (Wu et al. 2023, section 4.1); y_2's weight is -A. A per-prompt constant delta(x) cancels."""
    return (rewards_1 - rewards_2) / 2


def clipped_objective(
    ratio: torch.Tensor, advantages: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) (Schulman et al. 2017,
    eq. 7), elementwise, and where the clipped branch is the active one (its gradient is zero there)."""
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange) * advantages
    return torch.min(unclipped, clipped), clipped < unclipped


def p3o_loss(
    logprobs_1: torch.Tensor,
    logprobs_2: torch.Tensor,
    old_logprobs_1: torch.Tensor,
    old_logprobs_2: torch.Tensor,
    rewards_1: torch.Tensor,
    rewards_2: torch.Tensor,
    cliprange: float,
    version: str,
) -> tuple[torch.Tensor, dict]:
    """The clipped P3O objectives (Wu et al. 2023, section 4.2), as a loss to minimise (mean over pairs).

    Inputs are per prompt pair: sequence log-probs of the two responses under the policy being trained
    and under the behaviour policy that sampled them (sums over response tokens), and their rewards.
    With rho_i = exp(logprobs_i - old_logprobs_i), A = (r_1 - r_2) / 2 and sg the stop-gradient:

    V1, each response clipped separately:
        J = sg(rho_2) * min(rho_1 A, clip(rho_1) A) + sg(rho_1) * min(-rho_2 A, -clip(rho_2) A)
    V2, the joint ratio R = rho_1 / rho_2 = pi(y_1) pi_old(y_2) / (pi_old(y_1) pi(y_2)) clipped:
        J = sg(rho_1 rho_2 / R) * min(R A, clip(R) A)

    where clip(.) = clip(., 1 - eps, 1 + eps). Both gradients equal the importance-sampled pairwise
    policy gradient rho_1 rho_2 A grad(log pi(y_1) - log pi(y_2)) while no clip is active (V1 uses
    rho_1 grad log pi(y_1) = grad rho_1, V2 uses R grad(log pi(y_1) - log pi(y_2)) = grad R). V1 stops
    pushing a response once its own probability has moved by eps; V2 once the probability of y_1
    relative to y_2 has. Stats: clipfrac (share of responses, V1, or pairs, V2, with an active clip)
    and approx_kl (mean over responses of 0.5 * (log rho)^2, as CleanRL logs it).
    """
    advantages = pairwise_advantages(rewards_1, rewards_2)
    log_ratio_1, log_ratio_2 = logprobs_1 - old_logprobs_1, logprobs_2 - old_logprobs_2
    ratio_1, ratio_2 = torch.exp(log_ratio_1), torch.exp(log_ratio_2)
    if version == "v1":
        objective_1, clipped_1 = clipped_objective(ratio_1, advantages, cliprange)
        objective_2, clipped_2 = clipped_objective(ratio_2, -advantages, cliprange)
        objective = ratio_2.detach() * objective_1 + ratio_1.detach() * objective_2
        clipped = torch.cat([clipped_1, clipped_2])
    elif version == "v2":
        joint_ratio = torch.exp(log_ratio_1 - log_ratio_2)
        objective, clipped = clipped_objective(joint_ratio, advantages, cliprange)
        objective = (ratio_1 * ratio_2 / joint_ratio).detach() * objective
    else:
        raise ValueError(f"unknown P3O version {version!r}: one of {VERSIONS}")
    stats = {
        "clipfrac": float(clipped.float().mean()),
        "approx_kl": float(0.5 * torch.cat([log_ratio_1, log_ratio_2]).detach().pow(2).mean()),
    }
    return -objective.mean(), stats


@dataclass
class ResponsePair:
    """Two sampled responses to one prompt, as Algorithm 1's replay buffer keeps them: unpadded token
    ids, the behaviour policy's sequence log-probs and the rewards (score minus KL penalty)."""

    prompt: str
    prompt_ids: list[int]
    response_ids: list[list[int]]
    completions: list[str]
    ended_with_eos: list[bool]
    old_logprobs: list[float]
    rewards: list[float]


class ReplayBuffer:
    """The newest `capacity` prompt pairs; pushing more drops the oldest. `state_dict` is plain Python
    (lists, floats, strings), so it checkpoints with torch.save or JSON."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.pairs: list[ResponsePair] = []

    def __len__(self) -> int:
        return len(self.pairs)

    def push(self, experience: Experience, rewards: torch.Tensor) -> None:
        """Add an experience of two responses per prompt (rows 2i and 2i + 1 answer prompt i)."""
        rollout, mask = experience.rollout, experience.mask
        old_logprobs = (experience.logprobs * mask).sum(1).tolist()
        prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(rollout.prompt_ids, rollout.prompt_mask)]
        response_ids = [ids[m.bool()].tolist() for ids, m in zip(rollout.response_ids, rollout.response_mask)]
        for i in range(0, len(rollout.prompts), 2):
            pair = slice(i, i + 2)
            self.pairs.append(ResponsePair(
                rollout.prompts[i], prompt_ids[i], response_ids[pair], rollout.completions[pair],
                rollout.ended_with_eos[pair], old_logprobs[pair], rewards[pair].tolist(),
            ))
        self.pairs = self.pairs[-self.capacity :]

    def batch(self, indices: list[int], pad_id: int) -> tuple[lm.Rollout, torch.Tensor, torch.Tensor]:
        """Pairs `indices` as a rollout of 2m rows (pair j in rows 2j, 2j + 1), padded afresh as lm's
        layout wants, with their behaviour log-probs and rewards, each of shape (m, 2)."""
        pairs = [self.pairs[i] for i in indices]
        prompt_width = max(len(p.prompt_ids) for p in pairs)
        response_width = max(len(r) for p in pairs for r in p.response_ids)
        rows = 2 * len(pairs)
        prompt_ids = torch.full((rows, prompt_width), pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((rows, prompt_width), dtype=torch.long)
        response_ids = torch.full((rows, response_width), pad_id, dtype=torch.long)
        response_mask = torch.zeros((rows, response_width), dtype=torch.long)
        for j, pair in enumerate(pairs):
            for k, response in enumerate(pair.response_ids):
                row = 2 * j + k
                prompt_ids[row, prompt_width - len(pair.prompt_ids) :] = torch.tensor(pair.prompt_ids)
                prompt_mask[row, prompt_width - len(pair.prompt_ids) :] = 1
                response_ids[row, : len(response)] = torch.tensor(response)
                response_mask[row, : len(response)] = 1
        rollout = lm.Rollout(
            [p.prompt for p in pairs for _ in range(2)], prompt_ids, prompt_mask, response_ids, response_mask,
            [c for p in pairs for c in p.completions], [e for p in pairs for e in p.ended_with_eos],
        )
        old_logprobs = torch.tensor([p.old_logprobs for p in pairs])
        rewards = torch.tensor([p.rewards for p in pairs])
        return rollout, old_logprobs, rewards

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "pairs": [asdict(p) for p in self.pairs]}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = state["capacity"]
        self.pairs = [ResponsePair(**p) for p in state["pairs"]]


def train(run: RLInputs, version: str) -> tuple[torch.nn.Module, dict]:
    """Run `cfg.steps` P3O iterations (Algorithm 1) in place on the policy; returns the policy
    and the last metrics.

    `version` is "v1" or "v2" (see `p3o_loss`). The policy, optimizer, replay buffer and RNG
    states are checkpointed every `cfg.checkpoint_every` iterations in `run.checkpoint_dir`, and
    a killed run resumes from the latest.
    """
    cfg: P3OConfig = run.config
    policy, ref_policy, reward, tokenizer, prompts, sampling = (
        run.policy, run.reference, run.reward, run.tokenizer, run.prompts, run.sampling
    )
    seed, checkpoint_dir = run.seed, run.checkpoint_dir
    if version not in VERSIONS:
        raise ValueError(f"unknown P3O version {version!r}: one of {VERSIONS}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    # eval mode throughout: dropout would make the update's log-probs differ from the behaviour
    # log-probs at ratio 1 and bias the clipping
    for model in (policy, ref_policy):
        if model is not None:
            model.eval()
    if ref_policy is not None:
        ref_policy.requires_grad_(False)
    parameters = trainable_parameters(policy)
    optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, eps=1e-5)
    buffer = ReplayBuffer(cfg.buffer_size)
    metrics: dict = {}
    start = 0
    restored = checkpoint.load_latest(checkpoint_dir, {"policy": policy}, optimizer)
    if restored is not None:
        state, _ = restored
        start, metrics = state["step"], state["metrics"]
        buffer.load_state_dict(state["buffer"])
        checkpoint.set_random_state(rng, state["rng"])
    for step in Bar(range(start, cfg.steps), desc="p3o", total=cfg.steps, initial=start, unit="iteration"):
        # 1. rollout: two responses per prompt
        batch_prompts = rng.sample(prompts, k=min(cfg.batch_size, len(prompts)))
        experience = collect(policy, ref_policy, reward, tokenizer, batch_prompts, 2, sampling, cfg.missing_eos_penalty)
        mask = experience.mask

        # 2. sequence-level rewards with the KL penalty, fixed at sampling time
        kl = (kl_per_token(experience.logprobs, experience.ref_logprobs, cfg.kl_estimator) * mask).sum(1)
        rewards = sequence_rewards(experience.scores, kl, cfg.kl_coef)

        # 3. replay buffer
        buffer.push(experience, rewards)

        # 4. update on the whole buffer, importance-weighted against the policies that sampled it
        update_stats: dict[str, list[float]] = {}
        for _ in range(cfg.update_epochs):
            order = torch.randperm(len(buffer)).tolist()
            for start in range(0, len(order), cfg.minibatch_size):
                indices = order[start : start + cfg.minibatch_size]
                mb, old_logprobs, mb_rewards = buffer.batch(indices, tokenizer.pad_token_id)
                logits = lm.response_logits(policy, mb, sampling.temperature)
                device = logits.device
                mb_mask = mb.response_mask.to(device).float()
                logprobs = (lm.logprobs_of(logits, mb.response_ids.to(device)) * mb_mask).sum(1).view(-1, 2)
                old_logprobs, mb_rewards = old_logprobs.to(device), mb_rewards.to(device)
                loss, stats = p3o_loss(
                    logprobs[:, 0], logprobs[:, 1], old_logprobs[:, 0], old_logprobs[:, 1],
                    mb_rewards[:, 0], mb_rewards[:, 1], cfg.cliprange, version,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                stats = {"policy_loss": loss.item(), "entropy": entropy(logits.detach(), mb_mask), **stats}
                for key, value in stats.items():
                    update_stats.setdefault(key, []).append(value)

        rollout = experience.rollout
        metrics = {
            "score_mean": float(experience.scores.mean()),
            "kl": float(kl.mean()),
            "reward_mean": float(rewards.mean()),
            "reward_gap": float((rewards[0::2] - rewards[1::2]).abs().mean()),
            "response_length": float(mask.sum(1).mean()),
            "eos_rate": float(np.mean(rollout.ended_with_eos)),
            "buffer_pairs": len(buffer),
            **{key: float(np.mean(values)) for key, values in update_stats.items()},
        }
        run.log(metrics, step)
        run.probe(step + 1, cfg.steps)
        if checkpoint_dir is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            state = {"rng": checkpoint.random_state(rng), "metrics": metrics, "buffer": buffer.state_dict()}
            checkpoint.save(checkpoint_dir, step + 1, {"policy": policy}, optimizer, state)
    return policy, metrics


train_v1 = functools.partial(train, version="v1")
train_v2 = functools.partial(train, version="v2")
