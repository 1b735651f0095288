"""P3O (Wu et al. 2023) as its first author implements it (thwu1/trlx): the loss and its gradient
against a transcription of the author's `p3o_loss` on random inputs (V1 and V2, with the weight clamp
and the log-ratio clip active), a case worked out by hand, the invariance of the gradient to a
per-prompt reward shift (where REINFORCE's changes), an update that sees only the latest rollout, a
two-step run of the training loop, training that raises the reward of the policy's samples, and a
crashed run that resumes exactly."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from components.models import lm
from components.rl import METHODS, RLInputs, p3o
from components.rl.p3o import P3OConfig
from components.sections import SamplingConfig
from tests.rl_checks import assert_same_weights, calibrate, crash_and_resume, mean_score

SAMPLING = SamplingConfig(max_new_tokens=8)

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------ the author's loss


def author_p3o_loss(logratio, rewards, old_logratio, logprobs, old_logprobs, masks, kl_coef, cliprange_ratio, cliprange,
                    clip_tokenwise, avg_tokenwise):
    """thwu1/trlx (HEAD a87c31e), trlx/trainer/accelerate_p3o_trainer.py, `AccelerateP3OTrainer.p3o_loss`,
    transcribed: the `self.config.method` fields are arguments, `scale_q` (off in all the author's
    configs) is left out and of the logged stats only policy_clipfrac is kept. Lists hold
    [first responses, second responses]: `logratio`, `rewards`, `old_logratio` of shape (B,), the
    others (B, T)."""
    logprobs, old_logprobs = list(logprobs), list(old_logprobs)
    n = masks[0].sum() + masks[1].sum()
    q_diff = (rewards[0] - rewards[1] - kl_coef * (logratio[0] - logratio[1])).detach()
    ratio = torch.exp((logratio[0] - old_logratio[0]) + (logratio[1] - old_logratio[1])).detach()
    cliped_ratio_old = torch.clamp(ratio, 1 / cliprange_ratio, cliprange_ratio)

    if not clip_tokenwise:
        loss1 = -q_diff * cliped_ratio_old.detach() * (logratio[0] - logratio[1])
        loss1_clip = (
            -q_diff
            * cliped_ratio_old.detach()
            * torch.clamp(logratio[0] - logratio[1], old_logratio[0] - old_logratio[1] - cliprange, old_logratio[0] - old_logratio[1] + cliprange)  # noqa: E501
        )
        if not avg_tokenwise:
            loss = torch.max(loss1, loss1_clip).mean() / 2
        else:
            loss = torch.sum(torch.max(loss1, loss1_clip)) / n
        policy_clipfrac = torch.sum((loss1_clip > loss1).float()) / loss1_clip.shape[0]
    else:
        weights = (-q_diff * cliped_ratio_old.detach()).unsqueeze(-1)
        logprobs[0] = logprobs[0] * masks[0]
        logprobs[1] = logprobs[1] * masks[1]
        old_logprobs[0] = old_logprobs[0] * masks[0]
        old_logprobs[1] = old_logprobs[1] * masks[1]
        loss0 = weights * logprobs[0]
        loss0_cl = weights * torch.clamp(logprobs[0], old_logprobs[0] - cliprange, old_logprobs[0] + cliprange)
        loss1 = -weights * logprobs[1]
        loss1_cl = -weights * torch.clamp(logprobs[1], old_logprobs[1] - cliprange, old_logprobs[1] + cliprange)
        loss = (torch.sum(torch.max(loss0, loss0_cl)) + torch.sum(torch.max(loss1, loss1_cl))) / n
        policy_clipfrac = (torch.sum((loss0_cl > loss0).float() * masks[0]) + torch.sum((loss1_cl > loss1).float() * masks[1])) / n  # noqa: E501
    return loss, policy_clipfrac


def author_loss_of(logprobs, old_logprobs, ref_logprobs, scores, mask, kl_coef, cliprange, cliprange_ratio, version,
                   avg_tokenwise):
    """The author's inputs built as his trainer builds them from our (2m, T) rows (pair j in rows 2j,
    2j + 1): `make_experience` stores old_logratio = sum_t (old_logprobs - ref_logprobs) * mask and the
    unmasked old log-probs; `loss` masks the current and reference log-probs and sums their difference."""
    first, second = slice(0, None, 2), slice(1, None, 2)
    logprobs, ref_logprobs = logprobs * mask, ref_logprobs * mask
    logratio = (logprobs - ref_logprobs.detach()).sum(1)
    old_logratio = ((old_logprobs - ref_logprobs) * mask).sum(1)
    return author_p3o_loss(
        [logratio[first], logratio[second]], [scores[first], scores[second]],
        [old_logratio[first], old_logratio[second]], [logprobs[first], logprobs[second]],
        [old_logprobs[first], old_logprobs[second]], [mask[first], mask[second]],
        kl_coef, cliprange_ratio, cliprange, clip_tokenwise=version == "v1", avg_tokenwise=avg_tokenwise,
    )


def random_pairs(seed: int, pairs: int = 8, width: int = 7):
    """Random float64 rows of `pairs` prompt pairs: responses of 1 to `width` tokens, behaviour and
    reference log-probs 0.5 (per token) away from the current ones, so that some pairs have
    rho_1 rho_2 beyond [1/10, 10] and some log-ratios are beyond the clip, but not all."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (2 * pairs,), generator=g)
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).double()
    logprobs = -3 * torch.rand(2 * pairs, width, generator=g, dtype=torch.double)
    old_logprobs = logprobs + 0.5 * torch.randn(2 * pairs, width, generator=g, dtype=torch.double)
    ref_logprobs = logprobs + 0.5 * torch.randn(2 * pairs, width, generator=g, dtype=torch.double)
    scores = torch.randn(2 * pairs, generator=g, dtype=torch.double)
    return logprobs.requires_grad_(True), old_logprobs, ref_logprobs, scores, mask


@pytest.mark.parametrize("version, avg_tokenwise", [("v1", True), ("v2", True), ("v2", False)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_equal_the_authors(version, avg_tokenwise, seed):
    logprobs, old_logprobs, ref_logprobs, scores, mask = random_pairs(seed)
    kl_coef, cliprange, weight_clip = 0.1, 0.2, 10.0

    loss, stats = p3o.p3o_loss(
        logprobs, old_logprobs, ref_logprobs, scores, mask, version, kl_coef, cliprange, weight_clip,
        avg_tokenwise=avg_tokenwise,
    )
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected_loss, expected_clipfrac = author_loss_of(
        logprobs, old_logprobs, ref_logprobs, scores, mask, kl_coef, cliprange, weight_clip, version, avg_tokenwise
    )
    (expected_grad,) = torch.autograd.grad(expected_loss, logprobs)

    # both clips bite somewhere, and not everywhere
    assert 0 < stats["weight_clipfrac"] < 1 and 0 < stats["clipfrac"] < 1
    assert grad.abs().sum() > 0
    assert abs(loss.item() - expected_loss.item()) <= 1e-6
    assert (grad - expected_grad).abs().max() <= 1e-6
    assert stats["clipfrac"] == pytest.approx(expected_clipfrac.item(), abs=1e-12)


def test_the_loss_by_hand():
    # eps = 0.2, c = 10, kl_coef = 0.5 (k1), two pairs of two-token responses: N = 8 tokens.
    # l = sum_t (logprobs - ref_logprobs), l_old = sum_t (old_logprobs - ref_logprobs), log rho = l - l_old
    #
    # pair a, rows 0 and 1:   l_0 = 0.4, l_0_old = 0.3, log rho_0 = 0.1,  KL_0 = 0.4, r_0 = 1.2 - 0.5 * 0.4 = 1.0
    #                         l_1 = 0,   l_1_old = 0.5, log rho_1 = -0.5, KL_1 = 0,   r_1 = 0
    #   q = 1.0, w = exp(0.1 - 0.5) = e^-0.4 = 0.67032 (inside [0.1, 10])
    # pair b, rows 2 and 3:   l_2 = 0,   l_2_old = -3,  log rho_2 = 3,    KL_2 = 0,   r_2 = -0.5
    #                         l_3 = 0.2, l_3_old = 0.2, log rho_3 = 0,    KL_3 = 0.2, r_3 = 0.5 - 0.5 * 0.2 = 0.4
    #   q = -0.9, w = clip(e^3 = 20.1, 0.1, 10) = 10 (clamped)
    logprobs = torch.tensor([[-1.0, -2.0], [-1.5, -0.5], [-0.5, -1.0], [-2.0, -1.0]], requires_grad=True)
    old_logprobs = torch.tensor([[-1.1, -2.0], [-1.0, -0.5], [-2.0, -2.5], [-2.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.0, -2.4], [-1.5, -0.5], [-0.5, -1.0], [-2.1, -1.1]])
    scores, mask = torch.tensor([1.2, 0.0, -0.5, 0.5]), torch.ones(4, 2)
    w = math.exp(-0.4)
    approx_kl = 0.5 * (0.1**2 + 0.5**2 + 3**2 + 0**2) / 4  # 1.1575

    def loss_and_grad(version, avg_tokenwise=True):
        loss, stats = p3o.p3o_loss(
            logprobs, old_logprobs, ref_logprobs, scores, mask, version, 0.5, 0.2, 10.0, avg_tokenwise=avg_tokenwise
        )
        (grad,) = torch.autograd.grad(loss, logprobs)
        return loss.item(), stats, grad

    # V2, d = l_1 - l_2 clipped to d_old +- 0.2:
    #   a: d = 0.4, d_old = -0.2: clipped to 0.0 (q > 0, d above the range): max(-q w 0.4, -q w 0) = 0, no gradient
    #   b: d = -0.2, d_old = -3.2: clip range [-3.4, -3.0], max(-q w d, -q w (-3.0)) = max(9 * -0.2, 9 * -3) = -1.8
    #   loss = (0 - 1.8) / 8 = -0.225; d loss / d logprobs = +-9 / 8 = +-1.125 on pair b's tokens
    loss, stats, grad = loss_and_grad("v2")
    assert loss == pytest.approx(-0.225, abs=1e-6)
    assert stats == pytest.approx({"clipfrac": 0.5, "weight_clipfrac": 0.5, "approx_kl": approx_kl}, abs=1e-6)
    expected = [[0, 0], [0, 0], [1.125, 1.125], [-1.125, -1.125]]
    torch.testing.assert_close(grad, torch.tensor(expected), rtol=0, atol=1e-6)
    # the paper's pair mean instead: mean(0, -1.8) / 2 = -0.45, gradients 9 / (2 * 2) = 2.25
    loss, _, grad = loss_and_grad("v2", avg_tokenwise=False)
    assert loss == pytest.approx(-0.45, abs=1e-6)
    torch.testing.assert_close(grad, 2 * torch.tensor(expected), rtol=0, atol=1e-6)

    # V1, per token max(row_weight * lp, row_weight * clip(lp, old -+ 0.2)), row weights -q w for
    # the first response and +q w for the second:
    #   row 0, -w: lp within 0.2 of old: 1.0 w + 2.0 w = 3.0 w
    #   row 1, +w: token 0 at -1.5, 0.5 below old: max(-1.5 w, -1.2 w) = -1.2 w (clipped); token 1: -0.5 w
    #   row 2, +9: lp far above old, no clip in the descent direction: max(-4.5, -16.2) + max(-9, -20.7) = -13.5
    #   row 3, -9: lp = old: 18 + 9 = 27
    #   loss = (3.0 w - 1.7 w - 13.5 + 27) / 8 = (1.3 w + 13.5) / 8 = 1.79643; clipfrac 1 / 8
    loss, stats, grad = loss_and_grad("v1")
    assert loss == pytest.approx((1.3 * w + 13.5) / 8, abs=1e-6)
    assert stats == pytest.approx({"clipfrac": 0.125, "weight_clipfrac": 0.5, "approx_kl": approx_kl}, abs=1e-6)
    expected = [[-w / 8, -w / 8], [0, w / 8], [1.125, 1.125], [-1.125, -1.125]]
    torch.testing.assert_close(grad, torch.tensor(expected), rtol=0, atol=1e-6)

    with pytest.raises(ValueError):
        p3o.p3o_loss(logprobs, old_logprobs, ref_logprobs, scores, mask, "v3", 0.5, 0.2, 10.0)


@pytest.mark.parametrize("version", p3o.VERSIONS)
def test_gradient_is_invariant_to_a_per_prompt_reward_shift(version, tiny_world, tiny_tokenizer, tiny_policy):
    """ACCEPTANCE: P3O's gradient is unchanged when a per-prompt constant delta(x) is added to all
    rewards, while the vanilla policy gradient's (REINFORCE) changes."""
    reviews, tokenizer, model = tiny_world, tiny_tokenizer, tiny_policy()
    prompts = [r.prompt(3) for r in reviews[:3] for _ in range(2)]
    completions = [r.completion(3)[:30] for r in reviews[3:9]]
    rollout = lm.make_rollout(tokenizer, prompts, completions, [True] * 6)
    mask = rollout.response_mask.float()
    # off-policy: the behaviour log-probs differ from the policy's, so some clips are active
    g = torch.Generator().manual_seed(0)
    offsets = 0.3 * torch.randn(mask.shape, generator=g)
    scores = torch.tensor([1.0, 0.25, -0.5, 0.75, 2.0, -1.0])
    delta = torch.tensor([3.0, 3.0, -2.0, -2.0, 10.0, 10.0])  # one constant per prompt

    def gradients(loss_of_logprobs):
        model.zero_grad()
        loss_of_logprobs(lm.response_logprobs(model, rollout) * mask).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    def p3o_loss(scores):
        def loss(logprobs):
            old, ref = logprobs.detach() + offsets, logprobs.detach() - offsets.flip(0)
            return p3o.p3o_loss(logprobs, old, ref, scores, mask, version, 0.1, 0.2, 10.0)[0]
        return loss

    def reinforce_loss(scores):
        return lambda logprobs: -(scores * logprobs.sum(1)).mean()

    p3o_grad, p3o_shifted = gradients(p3o_loss(scores)), gradients(p3o_loss(scores + delta))
    assert p3o_grad.abs().sum() > 0
    torch.testing.assert_close(p3o_grad, p3o_shifted, rtol=1e-5, atol=1e-6)  # float32 rounding of r + delta
    reinforce_grad, reinforce_shifted = gradients(reinforce_loss(scores)), gradients(reinforce_loss(scores + delta))
    assert not torch.allclose(reinforce_grad, reinforce_shifted, atol=1e-4)


# ------------------------------------------------------------------------------ the training loop


def test_each_update_sees_only_the_latest_rollout_pairs_kept_together(
    monkeypatch, tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts
):
    """The store is emptied every iteration (the author's `post_epoch_callback`): every minibatch of
    iteration t holds whole pairs of rollout t, each row seen once per epoch."""
    rollouts, minibatches = [], []
    collect, loss = p3o.collect, p3o.p3o_loss

    def recording_collect(*args, **kwargs):
        experience = collect(*args, **kwargs)
        rollouts.append(experience)
        return experience

    def recording_loss(logprobs, old_logprobs, ref_logprobs, scores, *args):
        minibatches.append((len(rollouts) - 1, old_logprobs.clone(), scores.clone()))
        return loss(logprobs, old_logprobs, ref_logprobs, scores, *args)

    monkeypatch.setattr(p3o, "collect", recording_collect)
    monkeypatch.setattr(p3o, "p3o_loss", recording_loss)
    cfg = P3OConfig(steps=3, batch_size=4, minibatch_size=3, update_epochs=2, lr=1e-3)
    p3o.train_v1(RLInputs(
        tiny_policy(), tiny_policy(), tiny_reward, tiny_tokenizer, tiny_prompts, [], cfg, SAMPLING, seed=0,
    ))

    assert len(rollouts) == 3 and len(minibatches) == 3 * 2 * 2  # minibatches of 3 and 1 pairs, two epochs
    for iteration, experience in enumerate(rollouts):
        seen = []
        for rollout_index, old_logprobs, scores in minibatches:
            if rollout_index != iteration:
                continue
            for row in range(len(scores)):
                matches = [
                    i for i in range(len(experience.scores))
                    if torch.equal(experience.logprobs[i], old_logprobs[row]) and experience.scores[i] == scores[row]
                ]
                assert matches, "a row from an earlier rollout"
                seen.append(matches[0])
            # rows 2j, 2j + 1 of a minibatch are the two responses to one prompt
            assert all(seen[-len(scores) + 2 * j] // 2 == seen[-len(scores) + 2 * j + 1] // 2
                       for j in range(len(scores) // 2))
        assert sorted(seen) == sorted(list(range(8)) * 2)


@pytest.mark.parametrize("version", p3o.VERSIONS)
def test_train_runs_two_steps_probes_them_and_updates_only_the_policy(
    version, tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts
):
    method = METHODS[f"p3o_{version}"]
    assert method.config is P3OConfig and method.train.keywords == {"version": version}
    policy, reward = tiny_policy(), tiny_reward
    ref_policy = copy.deepcopy(policy)
    before = {name: p.clone() for name, p in policy.named_parameters()}
    frozen = {name: p.clone() for name, p in [*ref_policy.named_parameters(), *reward.model.named_parameters()]}
    cfg = P3OConfig(steps=2, batch_size=4, minibatch_size=2, update_epochs=2, lr=1e-3)
    logged, probed = [], []
    trained, metrics = method.train(RLInputs(
        policy, ref_policy, reward, tiny_tokenizer, tiny_prompts, [], cfg, SAMPLING, seed=0,
        log=lambda m, step: logged.append(m), probe=lambda step, total: probed.append((step, total)),
    ))

    assert trained is policy
    assert len(logged) == 2 and metrics == logged[-1]
    assert probed == [(1, 2), (2, 2)]
    expected = {"score_mean", "kl", "reward_mean", "clipfrac", "weight_clipfrac", "approx_kl", "entropy",
                "response_length", "eos_rate", "policy_loss", "reward_gap"}
    assert expected <= metrics.keys() and "gold_reward_mean" not in metrics
    assert all(math.isfinite(v) for v in metrics.values())
    assert logged[0]["kl"] == 0.0  # the first rollout comes from the reference itself
    assert logged[0]["reward_mean"] == logged[0]["score_mean"]  # so no KL penalty yet
    assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters())
    for name, p in [*ref_policy.named_parameters(), *reward.model.named_parameters()]:
        assert torch.equal(p, frozen[name]), name


TRAINED = P3OConfig(steps=30, batch_size=16, minibatch_size=8, update_epochs=2, lr=1e-2, kl_coef=0.01,
                    missing_eos_penalty=0.0)


@pytest.mark.parametrize("version", p3o.VERSIONS)
def test_train_raises_the_reward_of_the_policy_samples(version, tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts):
    policy, reward = tiny_policy(), tiny_reward
    ref_policy = copy.deepcopy(policy)
    calibrate(reward, policy, tiny_tokenizer, tiny_prompts)
    start = mean_score(policy, reward, tiny_tokenizer, tiny_prompts, 123)
    logged = []
    trained, _ = METHODS[f"p3o_{version}"].train(RLInputs(
        policy, ref_policy, reward, tiny_tokenizer, tiny_prompts, [], TRAINED, SAMPLING, seed=0,
        log=lambda m, step: logged.append(m),
    ))
    end = mean_score(trained, reward, tiny_tokenizer, tiny_prompts, 123)

    assert len(logged) == TRAINED.steps and all(math.isfinite(v) for m in logged for v in m.values())
    assert logged[-1]["kl"] > 0
    # in units of the initial policy's score std; run seeds 0-3 gain 0.58-1.04 (V1) and 0.61-1.17 (V2)
    assert end > start + 0.25, (start, end)


def test_a_crashed_run_resumes_its_policy_optimizer_and_rng(
    tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts, tmp_path
):
    """Checkpoints every iteration; a crash after iteration 3 of 4, then the same call again, ends
    with the weights of an uninterrupted run (no samples to restore: each rollout is dropped after
    its update)."""
    initial = tiny_policy()
    cfg = P3OConfig(steps=4, batch_size=4, minibatch_size=2, update_epochs=1, lr=1e-3, checkpoint_every=1)

    def run(folder, log):
        return p3o.train_v2(RLInputs(
            copy.deepcopy(initial), copy.deepcopy(initial), tiny_reward, tiny_tokenizer, tiny_prompts, [], cfg,
            SAMPLING, seed=0, log=log, checkpoint_dir=folder,
        ))

    (uninterrupted, whole_metrics), (resumed, metrics) = crash_and_resume(run, tmp_path, crash_step=3)
    assert metrics == whole_metrics
    assert_same_weights(resumed, uninterrupted)
