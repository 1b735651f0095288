"""ReST and best-of-n: the Improve filter (absolute and quantile thresholds) against a hand
example, the learning rate of each Improve step, the Improve data (Grow samples joined with the
demonstrations, filtered alike) against a hand-scored example, the analytic best-of-n KL against
its closed form and an exact computation, best-of-n's pick against scoring every sample directly,
and both train() end to end on a tiny GPT-2 policy and reward source (metrics, frontier probe)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from components.rl import METHODS, RLInputs, best_of_n, rest, rollout
from components.rl.best_of_n import BestOfNConfig
from components.rl.rest import RestConfig
from components.rewards import FunctionReward
from components.sections import SamplingConfig
from components.trainers.sft import Demonstration

SAMPLING = SamplingConfig(max_new_tokens=8, batch_size=64)


pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------- ReST filter

SCORES = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.2, 0.0, 0.8, -0.4])


def test_improve_filter_keeps_exactly_the_samples_above_an_absolute_threshold():
    # strictly above: 0.0 itself (index 5) and 0.5 itself (index 3) are left out
    expected = {0.0: [0, 2, 3, 4, 6], 0.5: [2, 4, 6], 1.0: [2, 4], 2.0: []}
    for threshold, indices in expected.items():
        tau, keep = rest.improve_filter(SCORES, threshold, "absolute")
        assert tau == threshold and keep.nonzero().squeeze(1).tolist() == indices
    # a better Grow set (every score + 1: only -1.0 + 1 is not above 0.5) keeps more above the same value
    assert rest.improve_filter(SCORES + 1, 0.5, "absolute")[1].nonzero().squeeze(1).tolist() == [0, 2, 3, 4, 5, 6, 7]


def test_improve_filter_keeps_exactly_the_samples_above_the_quantile():
    # sorted: -1.0 -0.4 0.0 0.3 0.5 0.8 1.2 2.0; quantile q sits at position 7q, linearly interpolated
    expected = {0.5: (0.4, [2, 3, 4, 6]), 0.75: (0.9, [2, 4]), 0.9: (1.44, [2])}
    kept = []
    for quantile, (threshold, indices) in expected.items():
        tau, keep = rest.improve_filter(SCORES, quantile, "quantile")
        assert tau == pytest.approx(threshold)
        assert keep.nonzero().squeeze(1).tolist() == indices
        kept.append(int(keep.sum()))
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == 3
    # a better Grow set keeps the same share: the threshold moves with it
    assert rest.improve_filter(SCORES + 1, 0.5, "quantile")[1].nonzero().squeeze(1).tolist() == [2, 3, 4, 6]


def test_improve_filter_keeps_nothing_when_all_scores_tie():
    threshold, keep = rest.improve_filter(torch.full((6,), 0.25), 0.5, "quantile")
    assert threshold == 0.25 and not keep.any()


def test_the_learning_rate_falls_with_each_improve_step():
    cfg = RestConfig(improve_steps=3, thresholds=[0.0, 0.5, 1.0], lr=1e-3, lr_decay=0.5)
    assert [rest.improve_lr(cfg, i) for i in range(3)] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    assert RestConfig().threshold_kind == "absolute" and RestConfig().with_demonstrations


def test_config_rejects_thresholds_that_do_not_rise_or_quantiles_outside_0_1():
    with pytest.raises(ValueError):
        RestConfig(improve_steps=2, thresholds=[1.0, 0.5])
    with pytest.raises(ValueError):
        RestConfig(improve_steps=2, thresholds=[0.5])
    with pytest.raises(ValueError):
        RestConfig(improve_steps=2, thresholds=[0.5, 1.5], threshold_kind="quantile")
    RestConfig(improve_steps=2, thresholds=[0.5, 1.5])  # absolute: any rising reward values


# ------------------------------------------------------------------------------ ReST Improve data

DEMONSTRATIONS = [Demonstration("the plot", " was great"), Demonstration("the cast", " was fine"),
                  Demonstration("the music", " was dull")]
# a programmatic reward (not normalised): the demonstrations 3, 1 and -1, every policy sample 0.75
DEMO_SCORES = {" was great": 3.0, " was fine": 1.0, " was dull": -1.0}


@pytest.mark.parametrize("kind, thresholds, expected", [
    # absolute 0.5: the 8 samples (0.75) and the demonstrations scored 3 and 1; absolute 2: only 3's
    ("absolute", [0.5, 2.0], [(8, [" was great", " was fine"]), (0, [" was great"])]),
    # D_g's 11 scores sorted: -1, 0.75 x 8, 1, 3; the 0.5 quantile (position 5) is 0.75, kept strictly
    # above it: 1 and 3; the 0.95 quantile (position 9.5) is 2: only 3
    ("quantile", [0.5, 0.95], [(0, [" was great", " was fine"]), (0, [" was great"])]),
])
def test_improve_fine_tunes_on_the_grow_samples_and_demonstrations_above_the_threshold(
    kind, thresholds, expected, monkeypatch, tiny_policy, tiny_tokenizer, tiny_prompts
):
    calls = []

    def fine_tune(policy, tokenizer, samples, cfg, seed):
        calls.append((samples, cfg.lr))
        return {"loss": 1.0}

    monkeypatch.setattr(rest, "fine_tune", fine_tune)
    reward = FunctionReward(lambda prompt, response: DEMO_SCORES.get(response, 0.75), "toy")
    cfg = RestConfig(grow_steps=2, improve_steps=2, n_prompts=4, n_samples=2, threshold_kind=kind,
                     thresholds=thresholds, lr=1e-3, lr_decay=0.5, missing_eos_penalty=0.0)
    logged = []
    rest.train(RLInputs(
        tiny_policy(), None, reward, tiny_tokenizer, tiny_prompts, [], cfg, SAMPLING, seed=0,
        log=lambda m, step: logged.append(m), demonstrations=DEMONSTRATIONS,
    ))

    assert [lr for _, lr in calls] == pytest.approx([1e-3, 5e-4, 1e-3, 5e-4])  # decays within each Grow
    for (samples, _), (n_samples, demonstrations), metrics in zip(calls, expected * 2, logged):
        assert sum(s.score == 0.75 for s in samples) == n_samples
        assert [(s.prompt, s.completion, s.ended_with_eos) for s in samples if s.score != 0.75] == [
            (d.prompt, d.response, True) for d in DEMONSTRATIONS if d.response in demonstrations
        ]
        assert metrics["kept"] == len(samples) and metrics["kept_demonstrations"] == len(demonstrations)
    assert [m["threshold"] for m in logged[:2]] == pytest.approx([0.5, 2.0] if kind == "absolute" else [0.75, 2.0])


def test_rest_without_demonstrations_fine_tunes_on_the_grow_samples_alone_or_asks_for_them(
    tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts
):
    cfg = RestConfig(grow_steps=1, improve_steps=1, thresholds=[0.0], n_prompts=2, n_samples=2)
    with pytest.raises(ValueError, match="demonstrations"):
        rest.train(RLInputs(tiny_policy(), None, tiny_reward, tiny_tokenizer, tiny_prompts, [], cfg, SAMPLING, seed=0))


# ----------------------------------------------------------------------------------- best-of-n


def test_best_of_n_kl_closed_form():
    assert best_of_n.best_of_n_kl(1) == 0.0
    assert best_of_n.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)


def test_best_of_n_kl_bounds_the_exact_kl_of_a_categorical_policy():
    # m outcomes of distinct rewards, outcome i the i-th best: best-of-n picks it with probability
    # F(i)^n - F(i-1)^n, F the policy's CDF from the best down. The exact KL approaches
    # log n - (n-1)/n from below as the largest outcome probability shrinks (Beirami et al. 2024).
    torch.manual_seed(0)
    p = torch.distributions.Dirichlet(torch.full((2000,), 5.0, dtype=torch.float64)).sample()
    cdf = p.cumsum(0)
    for n in (2, 4, 16):
        p_best = cdf**n - torch.cat([cdf.new_zeros(1), cdf[:-1]]) ** n
        exact = float((p_best * (p_best / p).log()).sum())
        assert exact <= best_of_n.best_of_n_kl(n) + 1e-12
        assert exact == pytest.approx(best_of_n.best_of_n_kl(n), abs=2e-3)


def test_sample_scored_groups_samples_by_prompt_across_batches(tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts):
    policy, reward, tokenizer, prompts = tiny_policy(), tiny_reward, tiny_tokenizer, tiny_prompts
    sampling = SamplingConfig(max_new_tokens=8, batch_size=8)  # two prompts' groups per batch
    samples = best_of_n.sample_scored(policy, reward, tokenizer, prompts[:5], 4, sampling, 1.0)
    assert [s.prompt for s in samples] == [p for p in prompts[:5] for _ in range(4)]


def test_best_of_n_picks_the_argmax_of_the_scores(tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts):
    policy, reward, tokenizer, prompts = tiny_policy(), tiny_reward, tiny_tokenizer, tiny_prompts
    prompts, n, penalty = prompts[:6], 5, 1.0
    torch.manual_seed(3)
    best = best_of_n.best_of_n(policy, reward, tokenizer, prompts, n, SAMPLING, penalty)

    # the same samples (one batch, same seed), each scored on its own
    torch.manual_seed(3)
    samples = rollout.generate(policy, tokenizer, prompts, n, SAMPLING)
    with torch.no_grad():
        scores = torch.stack([
            reward.normalised(samples.select(torch.tensor([i])))[0]
            - penalty * (not samples.ended_with_eos[i])
            for i in range(len(samples.prompts))
        ]).view(len(prompts), n)
    assert len(set(samples.completions)) > len(prompts)  # the n samples of a prompt differ
    assert len(best) == len(prompts)
    for i, (prompt, completion, eos, score) in enumerate(best):
        j = i * n + int(scores[i].argmax())
        assert (prompt, completion, eos) == (prompts[i], samples.completions[j], samples.ended_with_eos[j])
        assert score == pytest.approx(float(scores[i].max()), abs=1e-5)


# ---------------------------------------------------------------------------------- end to end


def _train(name, module, cfg, tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts):
    """`name`'s registered train on a fresh tiny policy: the policy trains in place, the reference
    and the reward model do not; returns the logged (step, metrics) and the probe's (step, total)."""
    assert METHODS[name].train is module.train and METHODS[name].config is type(cfg)
    policy, reward = tiny_policy(), tiny_reward
    ref_policy = copy.deepcopy(policy)
    before = {name: p.clone() for name, p in policy.named_parameters()}
    frozen = {name: p.clone() for name, p in [*ref_policy.named_parameters(), *reward.model.named_parameters()]}
    logged, probed = [], []
    trained, metrics = METHODS[name].train(RLInputs(
        policy, ref_policy, reward, tiny_tokenizer, tiny_prompts, [], cfg, SAMPLING, seed=0,
        log=lambda m, step: logged.append((step, m)), probe=lambda step, total: probed.append((step, total)),
    ))
    assert trained is policy
    assert metrics == logged[-1][1]
    assert all(math.isfinite(v) for _, m in logged for v in m.values())
    assert not any("gold" in key for _, m in logged for key in m)  # the stage's frontier probe measures gold
    assert any(not torch.equal(p, before[name]) for name, p in policy.named_parameters())
    for name, p in [*ref_policy.named_parameters(), *reward.model.named_parameters()]:
        assert torch.equal(p, frozen[name]), name
    return logged, probed


def test_rest_train_end_to_end(tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts):
    cfg = RestConfig(
        grow_steps=2, improve_steps=3, n_prompts=8, n_samples=4, threshold_kind="quantile",
        thresholds=[0.25, 0.5, 0.75], with_demonstrations=False, batch_size=4, lr=1e-3, checkpoint_every=0,
    )
    logged, probed = _train("rest", rest, cfg, tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts)
    assert [step for step, _ in logged] == list(range(6))
    assert probed == [(step, 6) for step in range(1, 7)]  # grow_steps * improve_steps
    for grow in (logged[:3], logged[3:]):
        kept = [m["kept"] for _, m in grow]
        # 8 prompts x 4 samples of distinct scores; strictly above the 25%, 50%, 75% quantiles
        assert kept == [24, 16, 8]
        assert all(m["score_mean"] > m["threshold"] for _, m in grow)
        assert [m["lr"] for _, m in grow] == pytest.approx([1e-3, 5e-4, 2.5e-4])
        assert {"threshold", "kept", "score_mean", "nll", "grow_score_mean"} <= grow[-1][1].keys()
        assert all(m["score_mean"] > m["grow_score_mean"] for _, m in grow)


def test_best_of_n_train_end_to_end(tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts):
    cfg = BestOfNConfig(n=4, n_prompts=8, epochs=1, batch_size=4, lr=1e-3, checkpoint_every=0)
    logged, probed = _train("best_of_n", best_of_n, cfg, tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts)
    (step, metrics), = logged
    assert step == 0 and probed == [(1, 1)]
    assert metrics["score_mean"] > metrics["sample_score_mean"]
    assert {"nll", "eos_rate"} <= metrics.keys() and metrics["nll"] > 0
