"""Best-of-n: n samples per prompt, the one the reward model scores highest.

At inference (`best_of_n`) it needs no training: the policy answers each prompt n times and the
reward model picks (Nakano et al. 2021, WebGPT; Stiennon et al. 2020). Its KL to the sampling
policy has the closed form of `best_of_n_kl`, so evaluation reports it without log-probs.

As training (`train`) it is rejection-sampling fine-tuning (Touvron et al. 2023, Llama 2,
section 3.2.3; Dong et al. 2023, RAFT): the policy is fine-tuned with the SFT loss (components/
sft.py: NLL of the response tokens, prompt masked) on its own best-of-n responses, so that one
sample afterwards does part of what n samples did before.

A response is scored as the rollout engine scores it (components/rollout.py): the reward model's
normalised score, minus `missing_eos_penalty` when it hit the token limit without EOS. The
fine-tuning data is rendered as sft renders demonstrations (plain prompt + response + EOS), the
same text the policy was sampled from.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

import torch
from components.progress import Bar
from pydantic import Field

from components.models import lm
from components.rl import rollout
from components.rl.base import RLInputs
from components.sections import SamplingConfig, TrainerConfig
from components.trainers import sft


class BestOfNConfig(TrainerConfig):
    """Best-of-n: the response the reward model scores highest among n samples, at inference and
    as rejection-sampling fine-tuning (the policy is fine-tuned on best-of-n responses)."""

    n: int = Field(16, ge=2, description="samples per prompt")
    n_prompts: int = Field(512, ge=1, description="training prompts whose best-of-n responses are fine-tuned on")
    missing_eos_penalty: float = Field(1.0, ge=0, description="subtracted from the score of a response without EOS")
    epochs: int = Field(4, ge=1, description="passes over the best-of-n responses")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)


class Sample(NamedTuple):
    prompt: str
    completion: str
    ended_with_eos: bool
    score: float  # normalised reward minus the missing-EOS penalty


def best_of_n_kl(n: int) -> float:
    """KL(pi_best-of-n || pi) = log n - (n - 1) / n (Stiennon et al. 2020, appendix G.3).

    Exact when no two samples tie in reward; in general an upper bound (Beirami et al. 2024,
    "Theoretical guarantees on the best-of-n alignment policy").
    """
    return math.log(n) - (n - 1) / n


def sample_scored(
    policy, reward, tokenizer, prompts: list[str], n: int, sampling: SamplingConfig, missing_eos_penalty: float
) -> list[Sample]:
    """n scored samples per prompt, grouped by prompt: sample i answers prompt i // n.

    Generated `sampling.batch_size` rows at a time (whole groups, at least one): the memory of a
    batch does not grow with n.
    """
    # no dropout: the reward model must score as it was evaluated, the policy sample as it will be
    policy.eval()
    per_batch = max(1, sampling.batch_size // n)
    samples: list[Sample] = []
    for start in Bar(range(0, len(prompts), per_batch), desc=f"best-of-{n} sampling", unit="batch"):
        batch = rollout.generate(policy, tokenizer, prompts[start : start + per_batch], n, sampling)
        scores = rollout.score(reward, batch, missing_eos_penalty).tolist()
        samples.extend(map(Sample, batch.prompts, batch.completions, batch.ended_with_eos, scores))
    return samples


def best_of_groups(samples: list[Sample], n: int) -> list[Sample]:
    """The highest-scored sample of each group of n consecutive samples (the first of equal ones)."""
    scores = torch.tensor([s.score for s in samples]).view(-1, n)
    best = torch.arange(len(scores)) * n + scores.argmax(dim=1)
    return [samples[i] for i in best.tolist()]


def best_of_n(
    policy, reward, tokenizer, prompts: list[str], n: int, sampling: SamplingConfig, missing_eos_penalty: float
) -> list[Sample]:
    """For each prompt, the highest-scored of n samples (the first of equal ones)."""
    return best_of_groups(sample_scored(policy, reward, tokenizer, prompts, n, sampling, missing_eos_penalty), n)


def fine_tune(policy, tokenizer, samples: list[Sample], cfg: TrainerConfig, seed: int) -> dict:
    """The SFT loss (sft.train) on the samples' responses; returns sft.train's metrics."""
    demos = [sft.Demonstration(s.prompt, s.completion) for s in samples]
    return sft.train(policy, tokenizer, demos, lm.context_length(policy), cfg, seed)


def score_mean(samples: list[Sample]) -> float:
    return sum(s.score for s in samples) / len(samples)


def train(run: RLInputs) -> tuple[torch.nn.Module, dict]:
    """Rejection-sampling fine-tuning in place on the policy: best-of-`cfg.n` responses to
    `cfg.n_prompts` training prompts, then `cfg.epochs` of the SFT loss on them. `run.reference`
    is unused: the policy samples before it moves, so the KL of its samples to it is 0."""
    cfg: BestOfNConfig = run.config
    policy, reward, tokenizer, prompts, sampling, seed = (
        run.policy, run.reward, run.tokenizer, run.prompts, run.sampling, run.seed
    )
    torch.manual_seed(seed)
    batch_prompts = random.Random(seed).sample(prompts, k=min(cfg.n_prompts, len(prompts)))
    samples = sample_scored(policy, reward, tokenizer, batch_prompts, cfg.n, sampling, cfg.missing_eos_penalty)
    kept = best_of_groups(samples, cfg.n)
    metrics = {
        "sample_score_mean": score_mean(samples),
        "score_mean": score_mean(kept),
        "eos_rate": sum(s.ended_with_eos for s in kept) / len(kept),
        "nll": fine_tune(policy, tokenizer, kept, cfg, seed)["loss"],
    }
    run.log(metrics, 0)
    run.probe(1, 1)
    return policy, metrics
