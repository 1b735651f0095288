"""Evaluation of a policy against the SFT policy on held-out prompts.

Both policies answer every held-out prompt once with the same sampling settings. A win is a
higher score than SFT's answer to the same prompt; ties count one half.

- eval/gold_win_rate_vs_sft: wins under the task's gold scorer (the world's stand-in for
  humans), when the task has one;
- eval/proxy_win_rate_vs_sft: wins under the reward source the policy optimised;
- eval/kl_to_sft: mean over prompts of sum_t log pi(y_t|...) - log pi_sft(y_t|...) on the
  policy's own samples, the Monte-Carlo estimate of the sequence-level KL(pi || pi_sft);
- eval/gold_reward_mean, eval/sft_gold_reward_mean (with a gold scorer), eval/proxy_reward_mean,
  eval/sft_proxy_reward_mean, eval/response_length_mean (tokens), eval/eos_rate.
"""

from __future__ import annotations

from typing import Callable

import torch

from components.models import lm
from components.sections import SamplingConfig

GoldScorer = Callable[[str, str, bool], float]


def win_rate(ours: list[float], theirs: list[float]) -> float:
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs)) / len(ours)


def sequence_kl(policy, ref_policy, rollout: lm.Rollout, temperature: float) -> torch.Tensor:
    """sum_t log pi(y_t) - log pi_ref(y_t) per row, on the CPU: the RL stage's frontier probe has
    the policy on the accelerator and, beside a LoRA policy, the SFT policy on the CPU."""
    with torch.no_grad():
        logprobs, ref_logprobs = (lm.response_logprobs(m, rollout, temperature).cpu() for m in (policy, ref_policy))
    return ((logprobs - ref_logprobs) * rollout.response_mask).sum(1)


def evaluate(
    policy, sft_policy, reward, tokenizer, prompts: list[str], sampling: SamplingConfig, seed: int,
    gold: GoldScorer | None = None,
):
    """Returns (metrics, rows): the eval/* metrics and one row per prompt with both answers."""
    rows, kls, lengths = [], [], []
    for name, model in (("policy", policy), ("sft", sft_policy)):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), sampling.batch_size):
            chunk = prompts[start : start + sampling.batch_size]
            rollout = lm.sample(
                model, tokenizer, chunk, sampling.max_new_tokens, sampling.temperature, sampling.top_p,
                engine=sampling.engine,
            )
            proxy = reward.scores(rollout).tolist()
            if name == "policy":
                kls.extend(sequence_kl(policy, sft_policy, rollout, sampling.temperature).tolist())
                lengths.extend(rollout.response_mask.sum(1).tolist())
            for i, prompt in enumerate(chunk):
                completion, eos = rollout.completions[i], rollout.ended_with_eos[i]
                row = {"model": name, "prompt": prompt, "completion": completion, "ended_with_eos": eos, "proxy": proxy[i]}
                if gold is not None:
                    row["gold"] = gold(prompt, completion, eos)
                rows.append(row)
    ours = [r for r in rows if r["model"] == "policy"]
    sft = [r for r in rows if r["model"] == "sft"]
    metrics = {"eval/kl_to_sft": sum(kls) / len(kls)}
    for scorer in ("gold", "proxy") if gold is not None else ("proxy",):
        metrics.update({
            f"eval/{scorer}_win_rate_vs_sft": win_rate([r[scorer] for r in ours], [r[scorer] for r in sft]),
            f"eval/{scorer}_reward_mean": sum(r[scorer] for r in ours) / len(ours),
            f"eval/sft_{scorer}_reward_mean": sum(r[scorer] for r in sft) / len(sft),
        })
    metrics["eval/response_length_mean"] = sum(lengths) / len(lengths)
    metrics["eval/eos_rate"] = sum(r["ended_with_eos"] for r in ours) / len(ours)
    return metrics, rows


def frontier_point(
    policy, sft_policy, reward, tokenizer, prompts: list[str], sampling: SamplingConfig, seed: int,
    gold: GoldScorer | None = None,
) -> dict:
    """One point of the KL-reward frontier: KL to SFT and the mean proxy (and gold) rewards of the
    policy's samples on `prompts`. The RNG is forked so a measurement never changes training."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rollout = lm.sample(
            policy, tokenizer, prompts, sampling.max_new_tokens, sampling.temperature, sampling.top_p,
            engine=sampling.engine,
        )
        proxy = reward.scores(rollout)
    point = {
        "kl_to_sft": float(sequence_kl(policy, sft_policy, rollout, sampling.temperature).mean()),
        "proxy_reward": float(proxy.mean()),
    }
    if gold is not None:
        rows = zip(prompts, rollout.completions, rollout.ended_with_eos)
        point["gold_reward"] = sum(gold(p, c, e) for p, c, e in rows) / len(prompts)
    return point
