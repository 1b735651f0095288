"""Methods over seeds: Student-t intervals, the frontier's gain step function, its area, dominance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.evaluation import frontier


def trace(*points: tuple[float, float]) -> list[dict]:
    """Frontier points (KL, gold reward); the first is the SFT policy at KL 0."""
    return [{"kl_to_sft": kl, "gold_reward": gold, "proxy_reward": gold} for kl, gold in points]


def test_mean_ci_is_the_student_t_interval():
    # values 0.7, 0.8, 0.9: mean 0.8, s = 0.1, t_{0.975, 2} = 4.302653 -> half-width 4.302653 * 0.1 / sqrt(3)
    stat = frontier.mean_ci([0.7, 0.8, 0.9])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert stat["mean"] == pytest.approx(0.8)
    assert (stat["ci_low"], stat["ci_high"]) == pytest.approx((0.8 - half, 0.8 + half), abs=1e-9)
    assert frontier.mean_ci([0.75]) == {"mean": 0.75, "ci_low": None, "ci_high": None, "n": 1}


def test_gain_is_the_best_reward_gained_within_each_kl_budget():
    # SFT at 1.0; then (KL 2, 1.5), (KL 1, 1.2), (KL 3, 1.1): a worse later point does not lower the gain,
    # a negative KL estimate counts at 0
    run = trace((0.0, 1.0), (2.0, 1.5), (1.0, 1.2), (3.0, 1.1), (-0.1, 0.9))
    kl, gain = frontier.gain_steps(run)
    assert kl.tolist() == [0.0, 0.0, 0.0, 1.0, 2.0, 3.0]
    assert gain == pytest.approx([0.0, 0.0, 0.0, 0.2, 0.5, 0.5])
    assert frontier.gain_at(run, np.array([0.0, 0.5, 1.0, 1.99, 2.0, 10.0])) == pytest.approx(
        [0.0, 0.0, 0.2, 0.2, 0.5, 0.5]
    )


def test_frontier_area_integrates_the_step_function_up_to_the_common_kl():
    run = trace((0.0, 1.0), (1.0, 1.2), (2.0, 1.5), (3.0, 1.1))
    # gain 0 on [0, 1), 0.2 on [1, 2), 0.5 from 2: up to K = 2.5 -> (0 + 0.2 + 0.5 * 0.5) / 2.5 = 0.18
    assert frontier.frontier_area(run, 2.5) == pytest.approx(0.18)
    assert frontier.frontier_area(run, 1.0) == pytest.approx(0.0)
    assert frontier.frontier_area(run, 4.0) == pytest.approx((0.2 + 0.5 * 2) / 4)


def test_summary_per_method_with_a_common_kl_and_dominance():
    steep = [  # gains 0.3 at KL 1 and 0.6 at KL 2 (seed 0), 0.4 and 0.5 (seed 1)
        {"final": {"eval/gold_win_rate_vs_sft": 0.8, "eval/kl_to_sft": 2.0}, "trace": trace((0, 0), (1, 0.3), (2, 0.6))},
        {"final": {"eval/gold_win_rate_vs_sft": 0.9, "eval/kl_to_sft": 2.2}, "trace": trace((0, 0), (1, 0.4), (2, 0.5))},
    ]
    flat = [  # reaches KL 1.5 only, gaining 0.2 there
        {"final": {"eval/gold_win_rate_vs_sft": 0.6, "eval/kl_to_sft": 1.5}, "trace": trace((0, 0), (1.5, 0.2))},
        {"final": {"eval/gold_win_rate_vs_sft": 0.6, "eval/kl_to_sft": 1.4}, "trace": trace((0, 0), (1.5, 0.2))},
    ]
    summary = frontier.summarise({"steep": steep, "flat": flat})
    assert summary["_frontier_kl"] == 2  # the largest KL measured
    assert summary["steep"]["gold_win_rate_vs_sft"]["mean"] == pytest.approx(0.85)
    assert "proxy_win_rate_vs_sft" not in summary["steep"]  # not measured, not invented
    # over budgets 0..2: steep, seed 0: 0.3 on [1, 2) -> 0.3 / 2; seed 1: 0.4 / 2; flat keeps 0.2 from 1.5 on: 0.1 / 2
    assert summary["steep"]["frontier_area"] == pytest.approx((0.15 + 0.2) / 2)
    assert summary["flat"]["frontier_area"] == pytest.approx(0.05)
    assert frontier.dominates(steep, flat) and not frontier.dominates(flat, steep)


def test_the_plot_draws_a_band_per_method():
    runs = {"a": [{"final": {}, "trace": trace((0, 0), (1, 0.3))}, {"final": {}, "trace": trace((0, 0), (1, 0.5))}]}
    figure = frontier.plot(runs)
    axis = figure.axes[0]
    assert [line.get_label() for line in axis.get_lines()][0] == "a (2 seeds)"
    assert len(axis.collections) == 1  # the min-max band
