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

import torch
from components.progress import Bar
from pydantic import Field, model_validator

from components.rl.base import RLInputs
from components.rl.best_of_n import fine_tune, sample_scored, score_mean
from components.sections import TrainerConfig


class RestConfig(TrainerConfig):
    """ReST (Gulcehre et al. 2023): Grow samples from the current policy, each Improve step
    fine-tunes on the samples above a rising reward threshold."""

    grow_steps: int = Field(2, ge=1, description="Grow phases")
    improve_steps: int = Field(3, ge=1, description="Improve steps per Grow, each with a higher threshold")
    n_prompts: int = Field(256, ge=1, description="training prompts sampled in each Grow")
    n_samples: int = Field(8, ge=1, description="responses per prompt in each Grow")
    thresholds: list[float] = Field(
        [0.5, 0.7, 0.9], description="reward quantiles of the Grow set that the Improve steps keep samples above"
    )
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of a response without EOS")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)

    @model_validator(mode="after")
    def _one_threshold_per_improve_step(self) -> "RestConfig":
        if sorted(self.thresholds) != self.thresholds or len(self.thresholds) != self.improve_steps:
            raise ValueError("thresholds must rise and hold one quantile per Improve step (improve_steps)")
        return self


def improve_filter(scores: torch.Tensor, quantile: float) -> tuple[float, torch.Tensor]:
    """The threshold tau = the `quantile` of the Grow set's scores (linear interpolation, as
    torch.quantile) and the mask of the samples strictly above it: F(x, y; tau) = 1[R(x, y) > tau]."""
    threshold = float(torch.quantile(scores, quantile))
    return threshold, scores > threshold


def train(run: RLInputs) -> tuple[torch.nn.Module, dict]:
    """Run `cfg.grow_steps` Grow steps of `cfg.improve_steps` Improve steps each, in place on the
    policy; logs every Improve step's metrics and returns the policy and the last metrics.
    `run.reference` is unused (see the module docstring)."""
    cfg: RestConfig = run.config
    policy, reward, tokenizer, prompts, sampling, seed = (
        run.policy, run.reward, run.tokenizer, run.prompts, run.sampling, run.seed
    )
    total = cfg.grow_steps * cfg.improve_steps
    torch.manual_seed(seed)
    rng = random.Random(seed)
    metrics: dict = {}
    for grow in Bar(range(cfg.grow_steps), desc="rest grow steps", unit="grow"):
        grow_prompts = rng.sample(prompts, k=min(cfg.n_prompts, len(prompts)))
        samples = sample_scored(policy, reward, tokenizer, grow_prompts, cfg.n_samples, sampling, cfg.missing_eos_penalty)
        scores = torch.tensor([s.score for s in samples])
        grow_metrics = {
            "grow": grow,
            "grow_score_mean": score_mean(samples),
            "eos_rate": sum(s.ended_with_eos for s in samples) / len(samples),
        }
        for improve, quantile in enumerate(cfg.thresholds):
            step = grow * cfg.improve_steps + improve
            threshold, keep = improve_filter(scores, quantile)
            kept = [s for s, k in zip(samples, keep.tolist()) if k]
            metrics = {**grow_metrics, "threshold": threshold, "quantile": quantile, "kept": len(kept)}
            if kept:  # empty when no score lies above the threshold (all tie, or the quantile is 1)
                metrics["score_mean"] = score_mean(kept)
                # a new data order for every Improve step
                metrics["nll"] = fine_tune(policy, tokenizer, kept, cfg, seed + step)["loss"]
            run.log(metrics, step)
            run.probe(step + 1, total)
    return policy, metrics
