"""ReST and best-of-n: the Improve filter against a hand example, the analytic best-of-n KL against
its closed form and an exact computation, best-of-n's pick against scoring every sample directly,
and both train() end to end on a tiny GPT-2 policy and reward model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from components.models import lm
from components.rl import best_of_n, rest, rollout
from components.trainers import reward_model
from components.world import gold
from components.config import BestOfNConfig, RestConfig, SamplingConfig
from components.world import generate_reviews

SAMPLING = SamplingConfig(max_new_tokens=8, batch_size=64)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny GPT-2 policy, a tiny GPT-2 reward model saved and loaded via reward_model.load, prompts."""
    torch.manual_seed(0)
    reviews = generate_reviews(200, 0.1, 0.3, seed=0)
    tokenizer = lm.train_tokenizer([r.document for r in reviews], 400)
    policy = lm.build_model(tokenizer, n_layer=1, n_head=2, n_embd=32, max_length=64).eval()
    path = tmp_path_factory.mktemp("sft")
    lm.save_policy(policy, tokenizer, path)
    reward = reward_model.load(path).eval()
    reward.config.reward_mean, reward.config.reward_std = 0.0, 1.0
    return policy, reward, tokenizer, [r.prompt(3) for r in reviews[:40]]


# ---------------------------------------------------------------------------------- ReST filter


def test_improve_filter_keeps_exactly_the_samples_above_the_quantile():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.2, 0.0, 0.8, -0.4])
    # sorted: -1.0 -0.4 0.0 0.3 0.5 0.8 1.2 2.0; quantile q sits at position 7q, linearly interpolated
    expected = {0.5: (0.4, [2, 3, 4, 6]), 0.75: (0.9, [2, 4]), 0.9: (1.44, [2])}
    kept = []
    for quantile, (threshold, indices) in expected.items():
        tau, keep = rest.improve_filter(scores, quantile)
        assert tau == pytest.approx(threshold)
        assert keep.nonzero().squeeze(1).tolist() == indices
        kept.append(int(keep.sum()))
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == 3


def test_improve_filter_keeps_nothing_when_all_scores_tie():
    threshold, keep = rest.improve_filter(torch.full((6,), 0.25), 0.5)
    assert threshold == 0.25 and not keep.any()


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


def test_sample_scored_groups_samples_by_prompt_across_batches(world):
    policy, reward, tokenizer, prompts = world
    sampling = SamplingConfig(max_new_tokens=8, batch_size=8)  # two prompts' groups per batch
    samples = best_of_n.sample_scored(policy, reward, tokenizer, prompts[:5], 4, sampling, 1.0)
    assert [s.prompt for s in samples] == [p for p in prompts[:5] for _ in range(4)]


def test_best_of_n_picks_the_argmax_of_the_scores(world):
    policy, reward, tokenizer, prompts = world
    prompts, n, penalty = prompts[:6], 5, 1.0
    torch.manual_seed(3)
    best = best_of_n.best_of_n(policy, reward, tokenizer, prompts, n, SAMPLING, penalty)

    # the same samples (one batch, same seed), each scored on its own
    torch.manual_seed(3)
    samples = rollout.generate(policy, tokenizer, prompts, n, SAMPLING)
    with torch.no_grad():
        scores = torch.stack([
            reward_model.normalised_scores(reward, samples.select(torch.tensor([i])))[0]
            - penalty * (not samples.ended_with_eos[i])
            for i in range(len(samples.prompts))
        ]).view(len(prompts), n)
    assert len(set(samples.completions)) > len(prompts)  # the n samples of a prompt differ
    assert len(best) == len(prompts)
    for i, (prompt, completion, eos, score) in enumerate(best):
        j = i * n + int(scores[i].argmax())
        assert (prompt, completion, eos) == (prompts[i], samples.completions[j], samples.ended_with_eos[j])
        assert score == pytest.approx(float(scores[i].max()), abs=1e-5)


def test_best_of_n_evaluate_reports_the_eval_metrics(world):
    policy, reward, tokenizer, prompts = world
    metrics, rows = best_of_n.evaluate(policy, reward, tokenizer, prompts[:8], 4, SAMPLING, seed=1)
    assert {
        "eval/gold_win_rate_vs_sft", "eval/proxy_win_rate_vs_sft", "eval/kl_to_sft", "eval/gold_reward_mean",
        "eval/sft_gold_reward_mean", "eval/response_length_mean", "eval/eos_rate",
    } == metrics.keys()
    assert metrics["eval/kl_to_sft"] == best_of_n.best_of_n_kl(4)
    assert all(math.isfinite(v) for v in metrics.values())
    # the SFT answers are those lm.sample_many (and so evaluation.evaluate) draws with this seed
    sft = [(r["prompt"], r["completion"], r["ended_with_eos"]) for r in rows if r["model"] == "sft"]
    assert sft == lm.sample_many(policy, tokenizer, prompts[:8], SAMPLING, 1)
    # best-of-n wins on the proxy it picks by, up to ties and the missing-EOS penalty
    assert metrics["eval/proxy_win_rate_vs_sft"] >= 0.5


# ---------------------------------------------------------------------------------- end to end


def _train(module, cfg, world):
    policy, reward, tokenizer, prompts = world
    policy, ref_policy = copy.deepcopy(policy), copy.deepcopy(policy)
    before = {name: p.clone() for name, p in policy.named_parameters()}
    frozen = {name: p.clone() for name, p in [*ref_policy.named_parameters(), *reward.named_parameters()]}
    logged = []
    metrics = module.train(
        policy, ref_policy, reward, tokenizer, prompts, cfg, SAMPLING, seed=0,
        log=lambda m, step: logged.append((step, m)), gold_reward=gold.gold_reward,
    )
    assert metrics == logged[-1][1]
    assert all(math.isfinite(v) for _, m in logged for v in m.values())
    assert any(not torch.equal(p, before[name]) for name, p in policy.named_parameters())
    for name, p in [*ref_policy.named_parameters(), *reward.named_parameters()]:
        assert torch.equal(p, frozen[name]), name
    return logged


def test_rest_train_end_to_end(world):
    cfg = RestConfig(
        grow_steps=2, improve_steps=3, n_prompts=8, n_samples=4, thresholds=[0.25, 0.5, 0.75], batch_size=4,
        lr=1e-3, checkpoint_every=0,
    )
    logged = _train(rest, cfg, world)
    assert [step for step, _ in logged] == list(range(6))
    for grow in (logged[:3], logged[3:]):
        kept = [m["kept"] for _, m in grow]
        assert kept == sorted(kept, reverse=True) and len(set(kept)) == 3
        assert all(m["score_mean"] > m["threshold"] for _, m in grow)
        assert {"threshold", "kept", "score_mean", "gold_reward_mean", "nll", "grow_score_mean"} <= grow[-1][1].keys()


def test_best_of_n_train_end_to_end(world):
    cfg = BestOfNConfig(n=4, n_prompts=8, epochs=1, batch_size=4, lr=1e-3, checkpoint_every=0)
    (step, metrics), = _train(best_of_n, cfg, world)
    assert metrics["score_mean"] > metrics["sample_score_mean"]
    assert {"gold_reward_mean", "sample_gold_reward_mean", "nll", "eos_rate"} <= metrics.keys()
