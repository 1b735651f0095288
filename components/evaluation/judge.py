"""Judge win-rates: how often an LLM judge prefers one model's answers to another's.

- win rate: the mean over prompts of the pair's preference (1 win, 0.5 tie or inconsistent
  orders, 0 loss; components/judges); unparsable pairs are counted and left out;
- its 95% confidence interval: the percentile bootstrap over prompts (scipy.stats.bootstrap,
  `judge.bootstrap_resamples` resamples, seeded);
- the length-controlled win-rate of AlpacaEval 2 (Dubois et al. 2024): a logistic regression of
  the preference on the normalised length difference,

      P(output_1 preferred) = sigmoid(theta + phi * tanh((len_1 - len_2) / std(len_1 - len_2)))

  (lengths in characters, ties as half a win and half a loss), and the win-rate with the length
  term set to zero, sigmoid(theta): what the judge would say of answers of equal length.
  AlpacaEval 2 also fits an instruction-difficulty term across its leaderboard's many models; with
  one pair of models it is not identifiable and is left out. Unregularised, so theta is the
  maximum-likelihood estimate (scikit-learn's lbfgs).
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.linear_model import LogisticRegression

from components.judges import Comparison, JudgeClient, PairResult, judge, summary_stats


def length_controlled_win_rate(preferences: list[float], lengths_1: list[int], lengths_2: list[int]) -> float:
    """sigmoid(theta) of the fit in the module docstring; the plain win-rate when the lengths never differ."""
    p = np.asarray(preferences, dtype=float)
    diff = np.asarray(lengths_1, dtype=float) - np.asarray(lengths_2, dtype=float)
    if p.min() == p.max() or diff.std() == 0:  # one outcome only, or no length signal to remove
        return float(p.mean())
    x = np.tanh(diff / diff.std())[:, None]
    # a preference p is a win with weight p and a loss with weight 1 - p
    features, labels = np.vstack([x, x]), np.concatenate([np.ones(len(p)), np.zeros(len(p))])
    weights = np.concatenate([p, 1 - p])
    model = LogisticRegression(C=np.inf, max_iter=1000, tol=1e-10).fit(features, labels, sample_weight=weights)
    return float(1 / (1 + np.exp(-model.intercept_[0])))


def win_rate_summary(results: list[PairResult], resamples: int = 10000, seed: int = 0) -> dict[str, float]:
    """win_rate, ci_low, ci_high (95%, percentile bootstrap), lc_win_rate, pairs, ties, unparsable."""
    parsed = [r for r in results if r.preference is not None]
    summary = {"pairs": float(len(results)), "ties": float(sum(r.preferred == "tie" for r in results)),
               "unparsable": float(len(results) - len(parsed))}
    if not parsed:
        return {**summary, **dict.fromkeys(("win_rate", "ci_low", "ci_high", "lc_win_rate"), float("nan"))}
    preferences = np.array([r.preference for r in parsed])
    if preferences.min() == preferences.max():  # every resample has the same mean
        low = high = float(preferences[0])
    else:
        interval = stats.bootstrap(
            (preferences,), np.mean, confidence_level=0.95, n_resamples=resamples, method="percentile",
            random_state=np.random.default_rng(seed),
        ).confidence_interval
        low, high = float(interval.low), float(interval.high)
    lc = length_controlled_win_rate(
        preferences.tolist(), [len(r.comparison.output_1) for r in parsed], [len(r.comparison.output_2) for r in parsed]
    )
    return {**summary, "win_rate": float(preferences.mean()), "ci_low": low, "ci_high": high, "lc_win_rate": lc}


def judge_win_rate(
    client: JudgeClient, instructions: list[str], ours: list[str], theirs: list[str], seed: int = 0,
) -> tuple[dict[str, float], list[PairResult]]:
    """(summary, results) of `ours` against `theirs`, answer by answer: `win_rate_summary` and the
    judge's statistics (calls, retries, cache_hits, tokens, unparsable_share, position_consistency)."""
    results = judge(client, [Comparison(i, a, b) for i, a, b in zip(instructions, ours, theirs)])
    return {**summary_stats(client, results), **win_rate_summary(results, client.cfg.bootstrap_resamples, seed)}, results


def as_metrics(summary: dict[str, float], name: str) -> dict[str, float]:
    """eval/judge_win_rate_vs_NAME with _ci_low and _ci_high, eval/judge_lc_win_rate_vs_NAME,
    eval/judge_ties_vs_NAME, and the judge's statistics as judge/*."""
    evaluated = {"win_rate": f"win_rate_vs_{name}", "ci_low": f"win_rate_vs_{name}_ci_low",
                 "ci_high": f"win_rate_vs_{name}_ci_high", "lc_win_rate": f"lc_win_rate_vs_{name}",
                 "ties": f"ties_vs_{name}"}
    return {f"eval/judge_{evaluated[key]}" if key in evaluated else f"judge/{key}": value for key, value in summary.items()}
