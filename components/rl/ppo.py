"""PPO for language models with a per-token KL penalty to the reference policy.

The algorithm of Ziegler et al. 2019 and InstructGPT (Ouyang et al. 2022), laid out top to bottom
in the manner of CleanRL's ppo.py. One iteration:

1. rollout (components/rollout.py): sample a response per prompt from the policy; record its
   `logprobs`, the reference's `ref_logprobs`, the reward model's `score` (normalised, minus a
   penalty when the response hit the token limit without EOS) and the critic's `values`;
2. rewards: r_t = -kl_coef * KL_t at every response token, plus the score at the last one;
3. advantages: GAE(gamma, lam) over the response tokens, then whitened;
4. update: `ppo_epochs` passes of minibatches with the clipped surrogate objective and a
   clipped value loss (Schulman et al. 2017).

The critic is a separate network initialised from the reward model, as in InstructGPT, with the
reward normalisation folded into its head so that it starts on the scale of the normalised rewards
it learns to predict (`normalised_head`), or a value head on the policy's own trunk (`ppo.critic`).
A run checkpoints every few iterations and resumes after a crash or kill with the same policy,
critic, optimizer, KL coefficient and RNG.

`train` takes a `PolicyMask`: a restriction of the tokens the policy samples, applied again to the
log-probs of the ratio and refreshed after each iteration. NLPO (components/rl/nlpo.py) is PPO
with the top-p mask of a periodically updated copy of the policy.
"""

from __future__ import annotations

import copy
import random
from typing import Literal, Protocol

import numpy as np
import torch
from components.progress import Bar
from pydantic import Field, model_validator

from components.models import checkpoint, lm
from components.rl.base import RLInputs
from components.rl.rollout import TokenMask, collect, masked_logits, trainable_parameters
from components.sections import Section


class PPOConfig(Section):
    """PPO against the reward model with a per-token KL penalty to the SFT reference."""

    steps: int = Field(
        15, ge=1, description="rollout-and-update iterations; on the review world the gold reward of the policy "
        "levels off after 12-15 (benchmarks/README.md)",
    )
    batch_size: int = Field(64, ge=1, description="prompts per rollout")
    minibatch_size: int = Field(16, ge=1)
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout")
    lr: float = Field(5e-5, gt=0)
    kl_coef: float = Field(0.1, ge=0, description="beta of the per-token KL penalty (its start when adaptive)")
    kl_target: float | None = Field(
        None, gt=0, description="sequence KL the adaptive controller steers beta towards; None keeps beta fixed"
    )
    kl_horizon: int = Field(10000, ge=1, description="adaptive controller horizon in samples (Ziegler et al. 2019)")
    kl_estimator: Literal["k1", "k3"] = "k1"
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, ge=0)
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of a response without EOS")
    whiten_rewards: bool = False
    critic: Literal["separate", "value_head"] = Field(
        "separate",
        description="separate: a critic network initialised from the reward model (InstructGPT); value_head: a "
        "scalar head on the policy's own transformer",
    )
    checkpoint_every: int = Field(5, ge=1, description="iterations between checkpoints a killed run resumes from")

    @model_validator(mode="after")
    def _minibatches(self) -> "PPOConfig":
        if self.batch_size % self.minibatch_size:
            raise ValueError("batch_size must be a multiple of minibatch_size")
        return self


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020, "Approximating KL").

        k1 = log r                  with log r = logprobs - ref_logprobs
        k3 = (exp(-log r) - 1) + log r     (unbiased, never negative)
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2):

        e_t = clip((KL_t - KL_target) / KL_target, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + e_t * n_t / horizon)

    where KL_t is the mean sequence KL of the rollout and n_t its number of samples.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        error = min(max((kl - self.target) / self.target, -0.2), 0.2)
        self.value *= 1 + error * n_samples / self.horizon


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, kl: float, n_samples: int) -> None:
        pass


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """r_t = -kl_coef * KL_t, plus the sequence score on the last response token (Ziegler et al. 2019)."""
    rewards = -kl_coef * kl * response_mask
    last = response_mask.sum(dim=1).long().clamp(min=1) - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}

    V beyond the last response token is 0 (the episode ends there). Returns (advantages, returns)
    with returns = advantages + values.
    """
    values = values * response_mask
    rewards = rewards * response_mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    width = rewards.shape[1]
    for t in reversed(range(width)):
        next_values = values[:, t + 1] if t + 1 < width else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * response_mask
    return advantages, advantages + values


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

        ratio = exp(logprobs - old_logprobs)
        L = mean( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) )

    Also returns clipfrac (share of tokens where clipping was active) and approx_kl
    (mean of 0.5 * (log ratio)^2, as CleanRL logs it).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    stats = {
        "clipfrac": float(masked_mean((clipped > unclipped).float(), mask)),
        "approx_kl": float(masked_mean(0.5 * log_ratio.detach() ** 2, mask)),
    }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 * mean( max((V - R)^2, (V_clipped - R)^2) ),
    V_clipped = old_V + clip(V - old_V, -eps_v, eps_v)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    return loss, {"vf_clipfrac": float(masked_mean((clipped_error > unclipped_error).float(), mask))}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1 - var_residual / var_returns) if var_returns > 0 else float("nan")


class ValueHead(torch.nn.Module):
    """A scalar value head on the policy's last hidden state: the critic shares the policy's
    trunk (one transformer in memory; Stiennon et al. 2020 use a separate one, as `critic` does)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)


def _forward(model, batch: lm.Rollout, **kwargs):
    """`model` on [prompt | response], on the model's device, positions counting real tokens."""
    input_ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    attention_mask = torch.cat([batch.prompt_mask, batch.response_mask], dim=1)
    device = next(model.parameters()).device
    return model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
        position_ids=lm.position_ids(attention_mask).to(device), **kwargs,
    )


def _values(critic, hidden: torch.Tensor, batch: lm.Rollout) -> torch.Tensor:
    """V(s_t) for each response token t: the critic's head at the position that predicts token t."""
    width = batch.prompt_ids.shape[1]
    return critic.score(hidden[:, width - 1 : -1]).squeeze(-1).float()


def logits_and_values(policy, critic, batch: lm.Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Response logits of the policy and the values of its response tokens. `critic` is a separate
    network with a scalar head (AutoModelForSequenceClassification) or a `ValueHead` on the
    policy's own hidden states, which then come from the same forward pass."""
    shared = isinstance(critic, ValueHead)
    output = _forward(policy, batch, output_hidden_states=shared)
    logits = output.logits[:, batch.prompt_ids.shape[1] - 1 : -1] / temperature
    hidden = output.hidden_states[-1] if shared else _forward(critic.base_model, batch).last_hidden_state
    return logits, _values(critic, hidden, batch)


def critic_values(policy, critic, batch: lm.Rollout) -> torch.Tensor:
    """The values alone (at rollout time): a separate critic runs without the policy."""
    if isinstance(critic, ValueHead):
        return logits_and_values(policy, critic, batch, 1.0)[1]
    return _values(critic, _forward(critic.base_model, batch).last_hidden_state, batch)


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(masked_mean(-(logp.exp() * logp).sum(-1), mask))


def normalised_head(score: torch.nn.Linear, mean: float, std: float) -> torch.nn.Linear:
    """The reward model's scalar head with the reward normalisation of the reward source
    (components/rewards/: (r - reward_mean) / reward_std) folded into its weight and bias:

        (w . h + b - mean) / std = (w / std) . h + (b - mean) / std

    A critic copied from the reward model then starts on the scale of the normalised rewards it
    learns to predict, its value at the last token the normalised score (Huang et al. 2024, "The N+
    Implementation Details of RLHF with PPO", arXiv 2403.17031: normalise inside the model)."""
    head = torch.nn.Linear(score.in_features, score.out_features, device=score.weight.device, dtype=score.weight.dtype)
    bias = score.bias if score.bias is not None else torch.zeros_like(head.bias)
    with torch.no_grad():
        head.weight.copy_(score.weight / std)
        head.bias.copy_((bias - mean) / std)
    return head


def make_critic(run: RLInputs, cfg: PPOConfig):
    """A value head on the policy's trunk, or a separate network initialised from the reward
    model (InstructGPT), which must then be a reward model on the policy's own tokens; its head
    outputs the normalised reward (`normalised_head`)."""
    if cfg.critic == "value_head":
        return ValueHead(run.policy.config.hidden_size).to(next(run.policy.parameters()).device)
    reward_net = getattr(run.reward, "model", None)
    if reward_net is None or getattr(run.reward, "text", False):
        raise ValueError(
            "ppo.critic=separate starts the critic from a reward model on the policy's tokens; this reward source "
            "has none: set ppo.critic=value_head"
        )
    critic = copy.deepcopy(reward_net).requires_grad_(True)
    critic.score = normalised_head(critic.score, reward_net.config.reward_mean, reward_net.config.reward_std)
    return critic


class PolicyMask(TokenMask, Protocol):
    """A TokenMask (components/rl/rollout.py) that follows the policy through training, as NLPO's
    does: `after_iteration(iterations, policy)` is called once each iteration's update is done,
    and `models`, the networks it keeps, are checkpointed with the policy and critic."""

    models: dict[str, torch.nn.Module]

    def after_iteration(self, iterations: int, policy) -> None: ...


def train(run: RLInputs, token_mask: PolicyMask | None = None) -> tuple[torch.nn.Module, dict]:
    """Run `cfg.steps` PPO iterations in place on the policy and a new critic; returns the policy
    and the last metrics. With a `token_mask` the policy samples from its distribution
    renormalised over the allowed tokens, and the ratio compares those masked distributions.

    The policy, critic, mask, optimizer, KL coefficient and RNG states are checkpointed every
    `cfg.checkpoint_every` steps in `run.checkpoint_dir`, and a killed run resumes from the latest.
    """
    cfg: PPOConfig = run.config
    policy, ref_policy, reward, tokenizer, prompts, sampling = (
        run.policy, run.reference, run.reward, run.tokenizer, run.prompts, run.sampling
    )
    critic = make_critic(run, cfg)
    torch.manual_seed(run.seed)
    rng = random.Random(run.seed)
    for model in (policy, critic, ref_policy):
        if model is not None:
            model.eval()
    if ref_policy is not None:
        ref_policy.requires_grad_(False)
    trainable = trainable_parameters(policy, critic)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, eps=1e-5)
    temperature = sampling.temperature
    kl_controller = (
        AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target else FixedKLController(cfg.kl_coef)
    )
    metrics: dict = {}
    start = 0
    checkpoint_dir = run.checkpoint_dir
    models = {"policy": policy, "critic": critic, **(token_mask.models if token_mask is not None else {})}
    restored = checkpoint.load_latest(checkpoint_dir, models, optimizer)
    if restored is not None:
        state, _ = restored
        start, kl_controller.value, metrics = state["step"], state["kl_coef"], state["metrics"]
        checkpoint.set_random_state(rng, state["rng"])
    for step in Bar(range(start, cfg.steps), desc="ppo", total=cfg.steps, initial=start, unit="iteration"):
        # 1. rollout. Models stay in eval mode throughout: dropout would make the update's
        # log-probs differ from the rollout's at ratio 1 and bias clipping.
        batch_prompts = rng.sample(prompts, k=min(cfg.batch_size, len(prompts)))
        experience = collect(
            policy, ref_policy, reward, tokenizer, batch_prompts, 1, sampling, cfg.missing_eos_penalty, token_mask
        )
        rollout, mask, allowed = experience.rollout, experience.mask, experience.allowed
        old_logprobs, ref_logprobs, scores = experience.behaviour_logprobs, experience.ref_logprobs, experience.scores
        eos = torch.tensor(rollout.ended_with_eos, dtype=torch.float)
        with torch.no_grad():
            old_values = critic_values(policy, critic, rollout).cpu() * mask

            # 2. rewards with the per-token KL penalty: of the policy's own log-probs, unmasked, as
            # RL4LMs penalises NLPO's (kl_div = raw_log_probs - ref_log_probs)
            kl = kl_per_token(experience.logprobs, ref_logprobs, cfg.kl_estimator) * mask
            kl_coef = kl_controller.value
            rewards = per_token_rewards(scores, kl, mask, kl_coef)
            if cfg.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False) * mask

            # 3. advantages
            advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            advantages = masked_whiten(advantages, mask) * mask

        # 4. update
        update_stats: dict[str, list[float]] = {}
        for _ in range(cfg.ppo_epochs):
            for idx in torch.randperm(len(batch_prompts)).split(cfg.minibatch_size):
                mb = rollout.select(idx)
                logits, values = logits_and_values(policy, critic, mb, temperature)
                device = logits.device  # the rollout's tensors join the model's outputs there
                mb_mask = mask[idx].to(device)
                if allowed is not None:
                    logits = masked_logits(logits, allowed[idx])
                logprobs = lm.logprobs_of(logits, mb.response_ids)
                pg_loss, pg_stats = policy_loss(
                    logprobs, old_logprobs[idx].to(device), advantages[idx].to(device), mb_mask, cfg.cliprange
                )
                vf_loss, vf_stats = value_loss(
                    values, old_values[idx].to(device), returns[idx].to(device), mb_mask, cfg.cliprange_value
                )
                loss = pg_loss + cfg.vf_coef * vf_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                stats = {
                    "policy_loss": pg_loss.item(),
                    "value_loss": vf_loss.item(),
                    "entropy": entropy(logits.detach(), mb_mask),
                    **pg_stats,
                    **vf_stats,
                }
                for key, value in stats.items():
                    update_stats.setdefault(key, []).append(value)
        if token_mask is not None:
            token_mask.after_iteration(step + 1, policy)

        lengths = mask.sum(1)
        metrics = {
            "score_mean": float(scores.mean()),
            "kl": float(kl.sum(1).mean()),
            "kl_coef": kl_coef,
            "reward_mean": float(rewards.sum(1).mean()),
            "explained_variance": explained_variance(old_values, returns, mask),
            "response_length": float(lengths.mean()),
            "eos_rate": float(eos.mean()),
            **{key: float(np.mean(values)) for key, values in update_stats.items()},
        }
        if allowed is not None:
            metrics["allowed_tokens"] = float(masked_mean(allowed.sum(-1).float(), mask))
        kl_controller.update(metrics["kl"], len(batch_prompts))
        run.log(metrics, step)
        run.probe(step + 1, cfg.steps)
        if checkpoint_dir is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            state = {"kl_coef": kl_controller.value, "rng": checkpoint.random_state(rng), "metrics": metrics}
            checkpoint.save(checkpoint_dir, step + 1, models, optimizer, state)
    return policy, metrics
