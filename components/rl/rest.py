"""ReST: Reinforced Self-Training (Gulcehre et al. 2023, arXiv 2308.08998, Algorithm 1).

Growing-batch RL: the policy writes its own training set, the reward model filters it. For each
of `grow_steps` Grow steps:

1. Grow: `n_samples` responses to each of `n_prompts` training prompts from the current policy,
   scored as the rollout engine scores them (the reward model's normalised score, minus a
   penalty for a response cut at the token limit without EOS);
2. Improve, `improve_steps` times with rising thresholds tau_1 < tau_2 < ...: keep the Grow
   samples scored above tau_i (`improve_filter`) and fine-tune the policy on them.

Choices, as in the paper unless said otherwise:
- several Improve steps per Grow on the same Grow set, each with a higher threshold and so a
  smaller, better subset: the sampling cost is amortised over the Improve steps;
- each Improve step continues from the policy of the previous one, and each Grow samples from
  the policy of the last Improve step;
- loss: behaviour cloning, the plain NLL of the kept responses (components/sft.py's loss, prompt
  masked), which the paper found better than the offline-RL losses it tried (GOLD, BVMPO, OAC);
- unlike the paper, a threshold is a quantile of the Grow set's scores rather than a fixed reward
  value: a Bradley-Terry reward has no fixed scale, and a quantile keeps a known share of the set;
- the Grow set is not mixed with the original supervised data.

The reference policy is not used: ReST has no KL term, and evaluation measures the KL to SFT.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from components.rl.best_of_n import fine_tune, gold_reward_mean, sample_scored, score_mean
from components.config import RestConfig, SamplingConfig
from components.models.training import MetricsLogger, no_logging


def improve_filter(scores: torch.Tensor, quantile: float) -> tuple[float, torch.Tensor]:
    """The threshold tau = the `quantile` of the Grow set's scores (linear interpolation, as
    torch.quantile) and the mask of the samples strictly above it: F(x, y; tau) = 1[R(x, y) > tau]."""
    threshold = float(torch.quantile(scores, quantile))
    return threshold, scores > threshold


def train(
    policy,
    ref_policy,
    reward,
    tokenizer,
    prompts: list[str],
    cfg: RestConfig,
    sampling: SamplingConfig,
    seed: int,
    log: MetricsLogger = no_logging,
    gold_reward: Callable[[str, str, bool], float] | None = None,
) -> dict:
    """Run `cfg.grow_steps` Grow steps of `cfg.improve_steps` Improve steps each, in place on
    `policy`; logs every Improve step's metrics and returns the last.

    `ref_policy` is unused (see the module docstring); it keeps the signature of the other RL
    methods. `gold_reward`, when given, is only logged (the world's oracle), never optimised.
    """
    if len(cfg.thresholds) != cfg.improve_steps:
        raise ValueError("cfg.thresholds must hold one quantile per Improve step")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    metrics: dict = {}
    for grow in range(cfg.grow_steps):
        grow_prompts = rng.sample(prompts, k=min(cfg.n_prompts, len(prompts)))
        samples = sample_scored(policy, reward, tokenizer, grow_prompts, cfg.n_samples, sampling, cfg.missing_eos_penalty)
        scores = torch.tensor([s.score for s in samples])
        grow_metrics = {
            "grow": grow,
            "grow_score_mean": score_mean(samples),
            "eos_rate": sum(s.ended_with_eos for s in samples) / len(samples),
        }
        if gold_reward is not None:
            grow_metrics["grow_gold_reward_mean"] = gold_reward_mean(samples, gold_reward)
        for improve, quantile in enumerate(cfg.thresholds):
            step = grow * cfg.improve_steps + improve
            threshold, keep = improve_filter(scores, quantile)
            kept = [s for s, k in zip(samples, keep.tolist()) if k]
            metrics = {**grow_metrics, "threshold": threshold, "quantile": quantile, "kept": len(kept)}
            if kept:  # empty when no score lies above the threshold (all tie, or the quantile is 1)
                metrics["score_mean"] = score_mean(kept)
                if gold_reward is not None:
                    metrics["gold_reward_mean"] = gold_reward_mean(kept, gold_reward)
                # a new data order for every Improve step
                metrics["nll"] = fine_tune(policy, tokenizer, kept, cfg, seed + step)["loss"]
            log(metrics, step)
    return metrics
