"""Methods compared over seeds: intervals, the KL-reward frontier as a number, and its plot.

A run's trace (the RL stage's `data/rl/trace.jsonl`) holds frontier points measured during
training: KL to SFT and the mean gold (and proxy) reward of the policy's samples on held-out
prompts, the first one at the SFT policy itself (KL 0). From a trace:

    gain(k) = max { reward(p) - reward(p_0) : points p with KL(p) <= k }

is the most reward the run gained over SFT within a KL budget k (a step function that never
falls: a point past the budget does not count, a worse later point does not undo a better earlier
one), and the frontier area up to a common KL K,

    area = (1 / K) * integral_0^K gain(k) dk,

is the mean gain over budgets in [0, K]: reward gained per unit of KL spent. K is the largest KL
any compared run measured, the same for every method: gain(k) is defined at every budget (past a
run's last point it keeps its best, which that run's policy delivers within any larger budget), so
a method that gains early and one that gains late are both counted, the first over more budgets.
One method's frontier dominates another's when its gain is at least as high at every budget; the
areas rank them when neither does.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

Run = dict  # {"final": eval/* metrics of the run, "trace": its frontier points}


def mean_ci(values: list[float], confidence: float = 0.95) -> dict:
    """Mean and Student-t interval over seeds: mean +- t_{(1+c)/2, n-1} * s / sqrt(n), with s the
    sample standard deviation. One seed has no interval (None)."""
    n, mean = len(values), float(np.mean(values))
    if n < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": n}
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def gain_steps(trace: list[dict], key: str = "gold_reward") -> tuple[np.ndarray, np.ndarray]:
    """The steps of gain(k): KL values (sorted, from 0) and the gain from each on. Points whose
    Monte-Carlo KL estimate came out negative count at KL 0."""
    base = trace[0][key]
    points = sorted((max(point["kl_to_sft"], 0.0), point[key] - base) for point in trace)
    kl = np.array([0.0] + [k for k, _ in points])
    gain = np.maximum.accumulate(np.array([0.0] + [g for _, g in points]))
    return kl, gain


def gain_at(trace: list[dict], budgets: np.ndarray, key: str = "gold_reward") -> np.ndarray:
    """gain(k) at each KL budget in `budgets`."""
    kl, gain = gain_steps(trace, key)
    return gain[np.searchsorted(kl, budgets, side="right") - 1]


def frontier_area(trace: list[dict], kl_max: float, key: str = "gold_reward") -> float:
    """(1 / kl_max) * integral_0^kl_max gain(k) dk, exact for the step function."""
    if kl_max <= 0:
        return 0.0
    kl, gain = gain_steps(trace, key)
    edges = np.clip(np.append(kl, kl_max), 0.0, kl_max)
    return float(np.sum(gain * np.diff(edges)) / kl_max)


def common_kl(runs: dict[str, list[Run]]) -> float:
    """The largest KL any run of any method measured: the budgets the frontier areas average over."""
    return max(max(point["kl_to_sft"], 0.0) for seeds in runs.values() for run in seeds for point in run["trace"])


METRICS = ("gold_win_rate_vs_sft", "proxy_win_rate_vs_sft", "kl_to_sft")


def summarise(runs: dict[str, list[Run]]) -> dict:
    """{method: {metric: mean_ci over seeds, ..., "frontier_area": mean over seeds}} and, under
    "_frontier_kl", the common KL the areas integrate to."""
    kl_max = common_kl(runs)
    summary: dict = {}
    for method, seeds in runs.items():
        summary[method] = {
            name: mean_ci([run["final"][f"eval/{name}"] for run in seeds])
            for name in METRICS if all(f"eval/{name}" in run["final"] for run in seeds)
        }
        if all("gold_reward" in point for run in seeds for point in run["trace"]):
            summary[method]["frontier_area"] = float(np.mean([frontier_area(run["trace"], kl_max) for run in seeds]))
    summary["_frontier_kl"] = kl_max
    return summary


def dominates(first: list[Run], second: list[Run], budgets: int = 50) -> bool:
    """Whether the mean (over seeds) gain of `first` is at least that of `second` at every KL budget
    up to the largest either measured."""
    kl_max = common_kl({"first": first, "second": second})
    grid = np.linspace(0.0, kl_max, budgets)
    mean_gain = [np.mean([gain_at(run["trace"], grid) for run in seeds], axis=0) for seeds in (first, second)]
    return bool(np.all(mean_gain[0] >= mean_gain[1] - 1e-12))


def plot(runs: dict[str, list[Run]]):
    """Gold (when the task has a gold scorer) and proxy reward gained over SFT against KL to SFT:
    per method the mean over seeds of gain(k) with a band from the lowest to the highest seed,
    each measured point faint, the final evaluations' mean marked with a star."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    points = [point for seeds in runs.values() for run in seeds for point in run["trace"]]
    panels = [
        (key, title) for key, title in (
            ("gold_reward", "gold reward gained (the task's oracle)"), ("proxy_reward", "proxy reward gained"),
        ) if points and all(key in point for point in points)
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), constrained_layout=True, squeeze=False)
    for (method, seeds), colour in zip(sorted(runs.items()), plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2]):
        kl_max = max(max(point["kl_to_sft"], 0.0) for run in seeds for point in run["trace"])
        grid = np.linspace(0.0, kl_max, 100)
        for axis, (key, _) in zip(axes[0], panels):
            gains = np.array([gain_at(run["trace"], grid, key) for run in seeds])
            axis.step(grid, gains.mean(0), where="post", color=colour, label=f"{method} ({len(seeds)} seeds)")
            axis.fill_between(grid, gains.min(0), gains.max(0), step="post", color=colour, alpha=0.15)
            for run in seeds:
                base = run["trace"][0][key]
                axis.plot([p["kl_to_sft"] for p in run["trace"]], [p[key] - base for p in run["trace"]], ".",
                          color=colour, alpha=0.35, markersize=3)
            final = f"eval/{key}_mean"
            if all(final in run["final"] for run in seeds):
                axis.plot(np.mean([run["final"]["eval/kl_to_sft"] for run in seeds]),
                          np.mean([run["final"][final] - run["final"][f"eval/sft_{key}_mean"] for run in seeds]),
                          "*", color=colour, markersize=12)
    for axis, (_, title) in zip(axes[0], panels):
        axis.set_xlabel("KL(policy || SFT), nats per response")
        axis.set_ylabel("reward - SFT's")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0][0].legend(title="mean over seeds, band: min-max; star: final evaluation", fontsize=8, title_fontsize=8)
    return figure
