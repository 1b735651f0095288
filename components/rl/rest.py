"""ReST: Reinforced Self-Training (Gulcehre et al. 2023, arXiv 2308.08998, Algorithm 1).

Growing-batch RL: the policy writes its own training set, the reward model filters it. For each
of `grow_steps` Grow steps:

1. Grow: `n_samples` responses to each of `n_prompts` training prompts from the current policy,
   joined with the original supervised data D (the SFT demonstrations), D_g = samples ∪ D, and
   annotated with the reward: the reward source's normalised score, minus a penalty for a sample
   cut at the token limit without EOS (a demonstration ends with EOS, as SFT trained on it);
2. Improve, `improve_steps` times with rising thresholds tau_1 < tau_2 < ...: keep the members of
   D_g scored above tau_i, F(x, y; tau) = 1[R(x, y) > tau] (`improve_filter`), and fine-tune the
   policy on them, at a learning rate that falls from one Improve step to the next.

Choices, as in the paper unless said otherwise:
- several Improve steps per Grow on the same Grow set, each with a higher threshold and so a
  smaller, better subset: the sampling cost is amortised over the Improve steps;
- each Improve step continues from the policy of the previous one, and each Grow samples from
  the policy of the last Improve step;
- the demonstrations are annotated and filtered like the samples (Algorithm 1 filters D_g, D
  included): they anchor the policy to the supervised data it started from while only the good
  ones are imitated; `with_demonstrations: false` fine-tunes on the Grow samples alone;
- thresholds are fixed reward values (`threshold_kind: absolute`), on the normalised scale of the
  reward (mean 0 and std 1 on the SFT policy's samples), so later Grow sets, from a better policy,
  keep more; the defaults 0, 0.5, 1 start at the SFT samples' mean reward, about the mean reward
  of the first Grow set, which the paper asks tau_1 to exceed (tau_1 > V(pi) = E_{D_g}[R]) so that
  the first Improve step already selects. `threshold_kind: quantile` is our variant: tau is
  the quantile of the Grow set's scores, a known share of the set kept whatever the reward's scale
  (a programmatic reward, `reward.function`, is not normalised);
- Improve step i (from 0) of each Grow fine-tunes at `lr * lr_decay^i`: the paper lowers the
  learning rate for the later Improve steps, which fit ever smaller, better subsets; the
  geometric factor is ours;
- loss: behaviour cloning, the plain NLL of the kept responses (components/trainers/sft.py's
  loss, prompt masked), which the paper found better than the offline-RL losses it tried (GOLD,
  BVMPO, OAC);
- unlike the paper, an Improve step trains a fixed number of `epochs` rather than for as long as
  the reward improves on a held-out set.

The reference policy is not used: ReST has no KL term, and evaluation measures the KL to SFT.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from components.progress import Bar
from pydantic import Field, model_validator

from components.models import lm
from components.rl import rollout
from components.rl.base import RLInputs
from components.rl.best_of_n import Sample, fine_tune, sample_scored, score_mean
from components.sections import SamplingConfig, TrainerConfig
from components.trainers.sft import Demonstration


class RestConfig(TrainerConfig):
    """ReST (Gulcehre et al. 2023): Grow samples from the current policy joined with the SFT
    demonstrations, each Improve step fine-tunes on those above a rising reward threshold."""

    grow_steps: int = Field(2, ge=1, description="Grow phases")
    improve_steps: int = Field(3, ge=1, description="Improve steps per Grow, each with a higher threshold")
    n_prompts: int = Field(256, ge=1, description="training prompts sampled in each Grow")
    n_samples: int = Field(8, ge=1, description="responses per prompt in each Grow")
    threshold_kind: Literal["absolute", "quantile"] = Field(
        "absolute",
        description="absolute: the thresholds are normalised rewards (the paper); quantile: quantiles of each Grow "
        "set's scores",
    )
    thresholds: list[float] = Field(
        [0.0, 0.5, 1.0],
        description="one per Improve step, rising: the Improve steps keep the Grow set's members scored above them",
    )
    with_demonstrations: bool = Field(
        True,
        description="join the SFT demonstrations to each Grow set, filtered alike (the paper); false: the samples only",
    )
    lr_decay: float = Field(
        0.5, gt=0, le=1, description="Improve step i (from 0) of each Grow fine-tunes at lr * lr_decay^i"
    )
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of a response without EOS")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0, description="peak learning rate of the first Improve step of each Grow")

    @model_validator(mode="after")
    def _one_threshold_per_improve_step(self) -> "RestConfig":
        if sorted(self.thresholds) != self.thresholds or len(self.thresholds) != self.improve_steps:
            raise ValueError("thresholds must rise and hold one threshold per Improve step (improve_steps)")
        if self.threshold_kind == "quantile" and not all(0 <= q <= 1 for q in self.thresholds):
            raise ValueError("quantile thresholds must lie in [0, 1]")
        return self


def improve_filter(scores: torch.Tensor, threshold: float, kind: str) -> tuple[float, torch.Tensor]:
    """The threshold tau and the mask of the Grow set's members strictly above it,
    F(x, y; tau) = 1[R(x, y) > tau] (Gulcehre et al. 2023, the Improve step). tau is `threshold` itself
    (`kind` absolute) or the `threshold` quantile of `scores` (`kind` quantile, interpolated
    linearly as torch.quantile does)."""
    tau = float(torch.quantile(scores, threshold)) if kind == "quantile" else float(threshold)
    return tau, scores > tau


def improve_lr(cfg: RestConfig, improve: int) -> float:
    """The peak learning rate of Improve step `improve` (from 0) of a Grow: lr * lr_decay^improve."""
    return cfg.lr * cfg.lr_decay**improve


@torch.no_grad()
def score_demonstrations(
    reward, tokenizer, demonstrations: list[Demonstration], sampling: SamplingConfig, max_length: int
) -> list[Sample]:
    """The original data D annotated as the Grow samples are: each demonstration's normalised
    reward, its response ending with EOS. Scored `sampling.batch_size` at a time; a response is
    cut where prompt and response would overflow `max_length` tokens (SFT cuts it there too)."""
    samples: list[Sample] = []
    for start in range(0, len(demonstrations), sampling.batch_size):
        chunk = demonstrations[start : start + sampling.batch_size]
        batch = lm.make_rollout(tokenizer, [d.prompt for d in chunk], [d.response for d in chunk], [True] * len(chunk))
        room = max(1, max_length - batch.prompt_ids.shape[1])
        batch.response_ids, batch.response_mask = batch.response_ids[:, :room], batch.response_mask[:, :room]
        scores = rollout.score(reward, batch, 0.0).tolist()
        samples.extend(map(Sample, batch.prompts, batch.completions, batch.ended_with_eos, scores))
    return samples


def train(run: RLInputs) -> tuple[torch.nn.Module, dict]:
    """Run `cfg.grow_steps` Grow steps of `cfg.improve_steps` Improve steps each, in place on the
    policy; logs every Improve step's metrics and returns the policy and the last metrics.
    `run.reference` is unused (see the module docstring); `run.demonstrations` is D, needed unless
    `cfg.with_demonstrations` is off."""
    cfg: RestConfig = run.config
    policy, reward, tokenizer, prompts, sampling, seed = (
        run.policy, run.reward, run.tokenizer, run.prompts, run.sampling, run.seed
    )
    if cfg.with_demonstrations and not run.demonstrations:
        raise ValueError("rest.with_demonstrations needs the SFT demonstrations, and none were given")
    total = cfg.grow_steps * cfg.improve_steps
    torch.manual_seed(seed)
    rng = random.Random(seed)
    # the reward source does not change during a call: D is annotated once for every Grow
    demonstrations = (
        score_demonstrations(reward, tokenizer, run.demonstrations, sampling, run.max_length)
        if cfg.with_demonstrations else []
    )
    metrics: dict = {}
    for grow in Bar(range(cfg.grow_steps), desc="rest grow steps", unit="grow"):
        grow_prompts = rng.sample(prompts, k=min(cfg.n_prompts, len(prompts)))
        samples = sample_scored(
            policy, reward, tokenizer, grow_prompts, cfg.n_samples, sampling, cfg.missing_eos_penalty
        )
        grow_set = samples + demonstrations
        scores = torch.tensor([s.score for s in grow_set])
        grow_metrics = {
            "grow": grow,
            "grow_score_mean": score_mean(samples),
            "eos_rate": sum(s.ended_with_eos for s in samples) / len(samples),
        }
        for improve, threshold in enumerate(cfg.thresholds):
            step = grow * cfg.improve_steps + improve
            tau, keep = improve_filter(scores, threshold, cfg.threshold_kind)
            kept = [s for s, k in zip(grow_set, keep.tolist()) if k]
            lr = improve_lr(cfg, improve)
            metrics = {
                **grow_metrics, "threshold": tau, "lr": lr, "kept": len(kept),
                "kept_demonstrations": int(keep[len(samples) :].sum()),
            }
            if kept:  # empty when nothing scores above the threshold
                metrics["score_mean"] = score_mean(kept)
                # a new data order for every Improve step
                improve_cfg = cfg.model_copy(update={"lr": lr})
                metrics["nll"] = fine_tune(policy, tokenizer, kept, improve_cfg, seed + step)["loss"]
            run.log(metrics, step)
            run.probe(step + 1, total)
    return policy, metrics
