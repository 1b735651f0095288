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
from typing import Callable, NamedTuple

import torch

from components.models import lm
from components.rl import rollout
from components.trainers import reward_model, sft
from components.world import gold
from components.config import BestOfNConfig, SamplingConfig, TrainerConfig
from components.evaluation import win_rate
from components.models.training import MetricsLogger, no_logging


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
    reward.eval()
    per_batch = max(1, sampling.batch_size // n)
    samples: list[Sample] = []
    for start in range(0, len(prompts), per_batch):
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


def gold_reward_mean(samples: list[Sample], gold_reward: Callable[[str, str, bool], float]) -> float:
    return sum(gold_reward(s.prompt, s.completion, s.ended_with_eos) for s in samples) / len(samples)


def train(
    policy,
    ref_policy,
    reward,
    tokenizer,
    prompts: list[str],
    cfg: BestOfNConfig,
    sampling: SamplingConfig,
    seed: int,
    log: MetricsLogger = no_logging,
    gold_reward: Callable[[str, str, bool], float] | None = None,
) -> dict:
    """Rejection-sampling fine-tuning in place on `policy`: best-of-`cfg.n` responses to
    `cfg.n_prompts` training prompts, then `cfg.epochs` of the SFT loss on them.

    `ref_policy` is unused (the policy samples before it moves, so the KL of its samples to the
    reference is 0); it keeps the signature of the other RL methods. `gold_reward`, when given,
    is only logged, never optimised.
    """
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
    if gold_reward is not None:
        metrics["sample_gold_reward_mean"] = gold_reward_mean(samples, gold_reward)
        metrics["gold_reward_mean"] = gold_reward_mean(kept, gold_reward)
    log(metrics, 0)
    return metrics


def _proxy_and_lengths(reward, tokenizer, rows: list[tuple[str, str, bool]], batch_size: int):
    """Raw reward-model scores and response lengths (tokens, EOS included), as evaluation reports them."""
    proxy, lengths = [], []
    for start in range(0, len(rows), batch_size):
        batch = lm.make_rollout(tokenizer, *map(list, zip(*rows[start : start + batch_size])))
        with torch.no_grad():
            proxy.extend(reward_model.scores(reward, batch).tolist())
        lengths.extend(batch.response_mask.sum(1).tolist())
    return proxy, lengths


def evaluate(
    sft_policy, reward, tokenizer, prompts: list[str], n: int, sampling: SamplingConfig, seed: int,
    missing_eos_penalty: float = 1.0,
):
    """The eval/* metrics of components/evaluation.py for inference-time best-of-n of the SFT
    policy against one SFT sample per prompt; returns (metrics, rows) as evaluation.evaluate does.

    The SFT answers are those evaluation.evaluate draws with the same seed, so the numbers compare
    with any policy's evaluation. eval/kl_to_sft is `best_of_n_kl(n)`.
    """
    sft_rows = lm.sample_many(sft_policy, tokenizer, prompts, sampling, seed)
    torch.manual_seed(seed)
    best_rows = [s[:3] for s in best_of_n(sft_policy, reward, tokenizer, prompts, n, sampling, missing_eos_penalty)]
    rows, lengths = [], {}
    for name, answers in (("best_of_n", best_rows), ("sft", sft_rows)):
        proxy, lengths[name] = _proxy_and_lengths(reward, tokenizer, answers, sampling.batch_size)
        rows.extend(
            {
                "model": name, "prompt": p, "completion": c, "ended_with_eos": e,
                "gold": gold.gold_reward(p, c, e), "proxy": r,
            }
            for (p, c, e), r in zip(answers, proxy)
        )
    ours = [r for r in rows if r["model"] == "best_of_n"]
    base = [r for r in rows if r["model"] == "sft"]
    metrics = {
        "eval/gold_win_rate_vs_sft": win_rate([r["gold"] for r in ours], [r["gold"] for r in base]),
        "eval/proxy_win_rate_vs_sft": win_rate([r["proxy"] for r in ours], [r["proxy"] for r in base]),
        "eval/kl_to_sft": best_of_n_kl(n),
        "eval/gold_reward_mean": sum(r["gold"] for r in ours) / len(ours),
        "eval/sft_gold_reward_mean": sum(r["gold"] for r in base) / len(base),
        "eval/response_length_mean": sum(lengths["best_of_n"]) / len(ours),
        "eval/eos_rate": sum(r["ended_with_eos"] for r in ours) / len(ours),
    }
    return metrics, rows
