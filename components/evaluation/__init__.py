"""Evaluation of a policy against the SFT policy on held-out prompts.

Both policies answer every held-out prompt once with the same sampling settings. A win is a
higher score than SFT's answer to the same prompt; ties count one half.

- eval/gold_win_rate_vs_sft: wins under the gold scorer (the world's stand-in for humans);
- eval/proxy_win_rate_vs_sft: wins under the learned reward model;
- eval/kl_to_sft: mean over prompts of sum_t log pi(y_t|...) - log pi_sft(y_t|...) on the
  policy's own samples, the Monte-Carlo estimate of the sequence-level KL(pi || pi_sft);
- eval/gold_reward_mean, eval/sft_gold_reward_mean, eval/response_length_mean (tokens),
  eval/eos_rate.
"""

from __future__ import annotations

import torch

from components.models import lm
from components.trainers import reward_model
from components.world import gold
from components.config import SamplingConfig


def win_rate(ours: list[float], theirs: list[float]) -> float:
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs)) / len(ours)


def sequence_kl(policy, ref_policy, rollout: lm.Rollout, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        log_ratio = lm.response_logprobs(policy, rollout, temperature) - lm.response_logprobs(
            ref_policy, rollout, temperature
        )
    return (log_ratio * rollout.response_mask).sum(1)


def evaluate(policy, sft_policy, reward, tokenizer, prompts: list[str], sampling: SamplingConfig, seed: int):
    """Returns (metrics, rows): the eval/* metrics and one row per prompt with both answers."""
    rows, kls, lengths = [], [], []
    for name, model in (("policy", policy), ("sft", sft_policy)):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), sampling.batch_size):
            chunk = prompts[start : start + sampling.batch_size]
            rollout = lm.sample(model, tokenizer, chunk, sampling.max_new_tokens, sampling.temperature, sampling.top_p)
            with torch.no_grad():
                proxy = reward_model.scores(reward, rollout).tolist()
            if name == "policy":
                kls.extend(sequence_kl(policy, sft_policy, rollout, sampling.temperature).tolist())
                lengths.extend(rollout.response_mask.sum(1).tolist())
            for i, prompt in enumerate(chunk):
                completion, eos = rollout.completions[i], rollout.ended_with_eos[i]
                rows.append({
                    "model": name, "prompt": prompt, "completion": completion, "ended_with_eos": eos,
                    "gold": gold.gold_reward(prompt, completion, eos), "proxy": proxy[i],
                })
    ours = [r for r in rows if r["model"] == "policy"]
    sft = [r for r in rows if r["model"] == "sft"]
    metrics = {
        "eval/gold_win_rate_vs_sft": win_rate([r["gold"] for r in ours], [r["gold"] for r in sft]),
        "eval/proxy_win_rate_vs_sft": win_rate([r["proxy"] for r in ours], [r["proxy"] for r in sft]),
        "eval/kl_to_sft": sum(kls) / len(kls),
        "eval/gold_reward_mean": sum(r["gold"] for r in ours) / len(ours),
        "eval/sft_gold_reward_mean": sum(r["gold"] for r in sft) / len(sft),
        "eval/response_length_mean": sum(lengths) / len(lengths),
        "eval/eos_rate": sum(r["ended_with_eos"] for r in ours) / len(ours),
    }
    return metrics, rows


def frontier_point(policy, sft_policy, reward, tokenizer, prompts: list[str], sampling: SamplingConfig, seed: int) -> dict:
    """One point of the KL-reward frontier: KL to SFT and the mean gold and proxy rewards of the
    policy's samples on `prompts`. The RNG is forked so a measurement never changes training."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        rollout = lm.sample(policy, tokenizer, prompts, sampling.max_new_tokens, sampling.temperature, sampling.top_p)
        with torch.no_grad():
            proxy = reward_model.scores(reward, rollout)
    gold_rewards = [gold.gold_reward(p, c, e) for p, c, e in zip(prompts, rollout.completions, rollout.ended_with_eos)]
    return {
        "kl_to_sft": float(sequence_kl(policy, sft_policy, rollout, sampling.temperature).mean()),
        "gold_reward": sum(gold_rewards) / len(gold_rewards),
        "proxy_reward": float(proxy.mean()),
    }


def plot_frontier(traces: dict[str, list[dict]], finals: dict[str, dict]):
    """The KL-reward frontier: gold and proxy reward against KL to SFT, one curve per method over
    its training checkpoints (the trace of the RL stage), its final evaluation marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for (method, trace), colour in zip(sorted(traces.items()), plt.cm.tab10.colors):
        kl = [point["kl_to_sft"] for point in trace]
        for axis, key in zip(axes, ("gold_reward", "proxy_reward")):
            axis.plot(kl, [point[key] for point in trace], "o-", color=colour, label=method, markersize=3)
        final = finals.get(method)
        if final:
            axes[0].plot(final["eval/kl_to_sft"], final["eval/gold_reward_mean"], "*", color=colour, markersize=12)
    for axis, title in zip(axes, ("gold reward (the world's oracle)", "proxy reward (the learned reward model)")):
        axis.set_xlabel("KL(policy || SFT), nats per response")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(title="method (star: final evaluation)")
    return figure
