"""Losses and PPO arithmetic checked against hand-computed numbers and finite differences; chunked
log-probabilities against the full log-softmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from components.models import lm
from components.rl import ppo
from components.trainers import reward_model, sft

D = torch.float64


def t(values, dtype=D):
    return torch.tensor(values, dtype=dtype)


# --------------------------------------------------------------------------------------------
# reward_model.bradley_terry_loss
# --------------------------------------------------------------------------------------------


def test_bradley_terry_hand_value():
    # diffs = chosen - rejected = [1.0, -0.5]
    # -log sigmoid(x) = log(1 + exp(-x))
    #   x =  1.0: log(1 + e^-1)   = log(1.3678794) = 0.3132617
    #   x = -0.5: log(1 + e^0.5)  = log(2.6487213) = 0.9740770
    # mean = (0.3132617 + 0.9740770) / 2 = 0.6436693
    chosen, rejected = t([2.0, 0.0]), t([1.0, 0.5])
    loss = reward_model.bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(0.6436693358, abs=1e-9)


def test_bradley_terry_with_margin():
    # margin 0.5 on both pairs: diffs - margin = [0.5, -1.0]
    #   x =  0.5: log(1 + e^-0.5) = 0.4740770
    #   x = -1.0: log(1 + e^1)    = 1.3132617
    # mean = 0.8936693
    chosen, rejected = t([2.0, 0.0]), t([1.0, 0.5])
    loss = reward_model.bradley_terry_loss(chosen, rejected, margin=t([0.5, 0.5]))
    assert loss.item() == pytest.approx(0.8936693358, abs=1e-9)
    # a per-pair margin: [0.0, 0.5] -> diffs [1.0, -1.0] -> (0.3132617 + 1.3132617) / 2 = 0.8132617
    loss = reward_model.bradley_terry_loss(chosen, rejected, margin=t([0.0, 0.5]))
    assert loss.item() == pytest.approx((0.3132616875 + 1.3132616875) / 2, abs=1e-9)


def test_bradley_terry_zero_margin_equals_no_margin():
    chosen, rejected = t([0.3, -1.2, 4.0]), t([0.1, 0.7, 4.5])
    assert reward_model.bradley_terry_loss(chosen, rejected, margin=torch.zeros(3, dtype=D)).item() == pytest.approx(
        reward_model.bradley_terry_loss(chosen, rejected).item(), abs=1e-12
    )


def test_bradley_terry_gradient():
    chosen = t([2.0, 0.0]).requires_grad_()
    rejected = t([1.0, 0.5]).requires_grad_()
    margin = t([0.2, -0.3]).requires_grad_()
    assert torch.autograd.gradcheck(reward_model.bradley_terry_loss, (chosen, rejected, margin))
    # analytic: dL/dchosen_i = -(1/N) * sigmoid(-(diff_i - margin_i)); dL/drejected_i = +(same)
    #   diffs - margin = [0.8, -0.2] -> dL/dchosen = -0.5 * [sigmoid(-0.8), sigmoid(0.2)]
    #                                             = -0.5 * [0.3100255, 0.5498340] = [-0.1550128, -0.2749170]
    loss = reward_model.bradley_terry_loss(chosen, rejected, margin)
    g_chosen, g_rejected = torch.autograd.grad(loss, (chosen, rejected))
    assert torch.allclose(g_chosen, t([-0.15501277, -0.27491700]), atol=1e-7)
    assert torch.allclose(g_rejected, -g_chosen, atol=1e-12)


# --------------------------------------------------------------------------------------------
# ppo.gae
# --------------------------------------------------------------------------------------------


def test_gae_hand_computed_two_lengths():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    # row 0: 3 real tokens; row 1: 2 real tokens and one padded slot holding garbage (9.0 / 7.0)
    rewards = t([[0.1, -0.2, 1.0], [0.3, 2.0, 9.0]])
    values = t([[0.5, 0.4, 0.3], [0.2, -0.1, 7.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    # row 0 (V after the last token is 0):
    #   t=2: delta = 1.0 + 0.9*0   - 0.3 =  0.7          A2 = 0.7
    #   t=1: delta = -0.2 + 0.9*0.3 - 0.4 = -0.33        A1 = -0.33 + 0.72*0.7   = 0.174
    #   t=0: delta = 0.1 + 0.9*0.4 - 0.5 = -0.04         A0 = -0.04 + 0.72*0.174 = 0.08528
    #   returns = A + V = [0.58528, 0.574, 1.0]
    # row 1 (the padded slot contributes nothing; V beyond t=1 is 0):
    #   t=2: masked -> 0
    #   t=1: delta = 2.0 + 0.9*0 - (-0.1) = 2.1          A1 = 2.1
    #   t=0: delta = 0.3 + 0.9*(-0.1) - 0.2 = 0.01       A0 = 0.01 + 0.72*2.1 = 1.522
    #   returns = [1.722, 2.0, 0]
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(advantages, t([[0.08528, 0.174, 0.7], [1.522, 2.1, 0.0]]), atol=1e-12)
    assert torch.allclose(returns, t([[0.58528, 0.574, 1.0], [1.722, 2.0, 0.0]]), atol=1e-12)
    assert advantages[1, 2].item() == 0.0 and returns[1, 2].item() == 0.0


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    # with gamma = lam = 1, A_t = sum_{s >= t} r_s - V_t (telescoping), returns = reward-to-go
    rewards = t([[1.0, 2.0, 3.0, 5.0]])
    values = t([[0.5, -1.0, 2.0, 0.0]])
    mask = t([[1, 1, 1, 0]])
    advantages, returns = ppo.gae(rewards, values, mask, 1.0, 1.0)
    # reward-to-go over real tokens: [6, 5, 3], minus V = [5.5, 6.0, 1.0]
    assert torch.allclose(returns, t([[6.0, 5.0, 3.0, 0.0]]), atol=1e-12)
    assert torch.allclose(advantages, t([[5.5, 6.0, 1.0, 0.0]]), atol=1e-12)


# --------------------------------------------------------------------------------------------
# ppo.policy_loss
# --------------------------------------------------------------------------------------------


def test_policy_loss_at_ratio_one():
    logprobs = t([[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.5]])
    advantages = t([[1.0, -2.0, 0.5], [3.0, 0.25, 100.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    loss, stats = ppo.policy_loss(logprobs, logprobs.clone(), advantages, mask, cliprange=0.2)
    # ratio = 1 everywhere: loss = -masked_mean(A) = -(1 - 2 + 0.5 + 3 + 0.25) / 5 = -2.75 / 5 = -0.55
    assert loss.item() == pytest.approx(-0.55, abs=1e-12)
    assert loss.item() == pytest.approx(-ppo.masked_mean(advantages, mask).item(), abs=1e-12)
    assert stats["clipfrac"] == 0.0
    assert stats["approx_kl"] == 0.0


def _clip_case():
    # eps = 0.2; four real tokens and a padded fifth (garbage there must not count)
    #   t0: ratio 1.5, A = +1:  unclipped -1.5, clipped -1.2 -> max -1.2 (clipped, active)
    #   t1: ratio 1.5, A = -1:  unclipped  1.5, clipped  1.2 -> max  1.5 (unclipped)
    #   t2: ratio 0.5, A = +2:  unclipped -1.0, clipped -1.6 -> max -1.0 (unclipped)
    #   t3: ratio 0.5, A = -2:  unclipped  1.0, clipped  1.6 -> max  1.6 (clipped, active)
    old = t([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    new = old + t([[math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5), 3.0]])
    advantages = t([[1.0, -1.0, 2.0, -2.0, 50.0]])
    mask = t([[1, 1, 1, 1, 0]])
    return new, old, advantages, mask


def test_policy_loss_clipped_hand_values():
    new, old, advantages, mask = _clip_case()
    loss, stats = ppo.policy_loss(new, old, advantages, mask, cliprange=0.2)
    # loss = (-1.2 + 1.5 - 1.0 + 1.6) / 4 = 0.9 / 4 = 0.225
    assert loss.item() == pytest.approx(0.225, abs=1e-12)
    # clipping active on t0 and t3 of 4 real tokens
    assert stats["clipfrac"] == pytest.approx(0.5, abs=1e-12)
    # approx_kl = mean(0.5 * log_ratio^2) = 0.5 * (2 * ln(1.5)^2 + 2 * ln(2)^2) / 4
    #           = 0.25 * (0.1644019 + 0.4804530) = 0.1612137
    assert stats["approx_kl"] == pytest.approx(0.25 * (math.log(1.5) ** 2 + math.log(2) ** 2), abs=1e-12)


def test_policy_loss_gradient_zero_where_clipped():
    new, old, advantages, mask = _clip_case()
    new = new.clone().requires_grad_()
    loss, _ = ppo.policy_loss(new, old, advantages, mask, cliprange=0.2)
    (grad,) = torch.autograd.grad(loss, new)
    # unclipped tokens: d/dlogp (-A * ratio) / 4 = -A * ratio / 4
    #   t1: -(-1) * 1.5 / 4 = 0.375;  t2: -(2) * 0.5 / 4 = -0.25
    # clipped tokens (t0, t3) and the padded t4: 0
    assert torch.allclose(grad, t([[0.0, 0.375, -0.25, 0.0, 0.0]]), atol=1e-12)


def test_policy_loss_gradcheck():
    # finite differences away from the clip boundaries (none of the ratios is within 1e-3 of 0.8 / 1.2)
    new, old, advantages, mask = _clip_case()
    new = new.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda lp: ppo.policy_loss(lp, old, advantages, mask, 0.2)[0], (new,)
    )
    inside = (old + t([[0.05, -0.1, 0.12, -0.03, 0.0]])).requires_grad_()  # all ratios within [0.8, 1.2]
    assert torch.autograd.gradcheck(
        lambda lp: ppo.policy_loss(lp, old, advantages, mask, 0.2)[0], (inside,)
    )


# --------------------------------------------------------------------------------------------
# ppo.value_loss
# --------------------------------------------------------------------------------------------


def test_value_loss_hand_values():
    # eps_v = 0.2; V_clipped = old + clip(V - old, -0.2, 0.2)
    #   t0: V=1.0,  old=0.5, R=0.6: Vc=0.7;  (V-R)^2=0.16,   (Vc-R)^2=0.01   -> max 0.16 (unclipped)
    #   t1: V=0.0,  old=0.5, R=0.0: Vc=0.3;  (V-R)^2=0.0,    (Vc-R)^2=0.09   -> max 0.09 (clipped)
    #   t2: V=0.45, old=0.5, R=2.0: Vc=0.45; both 1.55^2 = 2.4025               -> 2.4025 (tie, not counted)
    #   t3: padded (garbage)
    # loss = 0.5 * (0.16 + 0.09 + 2.4025) / 3 = 0.5 * 2.6525 / 3 = 0.44208333
    values = t([[1.0, 0.0, 0.45, 10.0]])
    old = t([[0.5, 0.5, 0.5, -10.0]])
    returns = t([[0.6, 0.0, 2.0, 3.0]])
    mask = t([[1, 1, 1, 0]])
    loss, stats = ppo.value_loss(values, old, returns, mask, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * 2.6525 / 3, abs=1e-12)
    assert stats["vf_clipfrac"] == pytest.approx(1 / 3, abs=1e-12)


def test_value_loss_gradient():
    values = t([[1.0, 0.0, 0.45, 10.0]]).requires_grad_()
    old = t([[0.5, 0.5, 0.5, -10.0]])
    returns = t([[0.6, 0.0, 2.0, 3.0]])
    mask = t([[1, 1, 1, 0]])
    assert torch.autograd.gradcheck(lambda v: ppo.value_loss(v, old, returns, mask, 0.2)[0], (values,))
    loss, _ = ppo.value_loss(values, old, returns, mask, 0.2)
    (grad,) = torch.autograd.grad(loss, values)
    # t0: unclipped branch: 0.5 * 2 * (V - R) / 3 = 0.4 / 3;  t1: clipped branch, constant in V -> 0
    # t2: tie at max; torch.max splits the gradient evenly between equal inputs, and both branches
    #     have derivative 2 * (V - R) = -3.1 here (Vc = V inside the band) -> 0.5 * -3.1 / 3
    assert torch.allclose(grad, t([[0.4 / 3, 0.0, -3.1 / 6, 0.0]]), atol=1e-12)


# --------------------------------------------------------------------------------------------
# ppo.kl_per_token
# --------------------------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    # token 0: pi = 0.5, ref = 0.25 -> log r = ln 2
    #   k1 = ln 2 = 0.6931472;  k3 = (1/r - 1) + ln r = (0.5 - 1) + 0.6931472 = 0.1931472
    # token 1: pi = 0.25, ref = 0.5 -> log r = -ln 2
    #   k1 = -0.6931472;        k3 = (2 - 1) - 0.6931472 = 0.3068528
    logprobs = t([math.log(0.5), math.log(0.25)])
    ref = t([math.log(0.25), math.log(0.5)])
    assert torch.allclose(ppo.kl_per_token(logprobs, ref, "k1"), t([math.log(2), -math.log(2)]), atol=1e-12)
    assert torch.allclose(
        ppo.kl_per_token(logprobs, ref, "k3"), t([-0.5 + math.log(2), 1.0 - math.log(2)]), atol=1e-12
    )
    with pytest.raises(ValueError, match="k2"):
        ppo.kl_per_token(logprobs, ref, "k2")


def test_k3_never_negative_and_zero_at_equality():
    log_ratio = torch.linspace(-20, 20, 2001, dtype=D)
    k3 = ppo.kl_per_token(log_ratio, torch.zeros_like(log_ratio), "k3")
    assert (k3 >= 0).all()
    assert ppo.kl_per_token(t([-1.3]), t([-1.3]), "k3").item() == 0.0


PI = [0.5, 0.3, 0.2]
REF = [0.2, 0.3, 0.5]
# KL(pi || ref) = 0.5 ln(0.5/0.2) + 0.3 ln(1) + 0.2 ln(0.2/0.5) = 0.5 ln 2.5 - 0.2 ln 2.5 = 0.3 ln 2.5
EXACT_KL = 0.3 * math.log(2.5)  # 0.2748872


def test_kl_estimators_expectation_analytic():
    pi, ref = t(PI), t(REF)
    assert (pi * (pi / ref).log()).sum().item() == pytest.approx(EXACT_KL, abs=1e-12)
    # E_pi[k] = sum_x pi(x) k(x), with the estimator evaluated at each outcome of the categorical
    k1 = ppo.kl_per_token(pi.log(), ref.log(), "k1")
    k3 = ppo.kl_per_token(pi.log(), ref.log(), "k3")
    assert (pi * k1).sum().item() == pytest.approx(EXACT_KL, abs=1e-12)
    # k3: sum pi (ref/pi - 1) + sum pi ln(pi/ref) = (1 - 1) + KL
    assert (pi * k3).sum().item() == pytest.approx(EXACT_KL, abs=1e-12)


def test_kl_estimators_monte_carlo():
    pi, ref = t(PI), t(REF)
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=generator)
    logprobs, ref_logprobs = pi.log()[tokens], ref.log()[tokens]
    # std of k1 per sample ~0.72 -> standard error ~0.0016; k3 smaller still
    for estimator in ("k1", "k3"):
        estimate = ppo.kl_per_token(logprobs, ref_logprobs, estimator).mean().item()
        assert estimate == pytest.approx(EXACT_KL, abs=0.02), estimator


# --------------------------------------------------------------------------------------------
# ppo.per_token_rewards
# --------------------------------------------------------------------------------------------


def test_per_token_rewards_score_on_last_real_token():
    scores = t([2.0, -1.0, 0.5])
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.9], [0.6, 9.9, 9.9]])
    mask = t([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    rewards = ppo.per_token_rewards(scores, kl, mask, kl_coef=0.5)
    # r = -0.5 * KL on real tokens; score added on the last real token; padding 0
    #   row 0: [-0.05, -0.10, -0.15 + 2.0]      = [-0.05, -0.1, 1.85]
    #   row 1: [-0.20, -0.25 - 1.0, 0]          = [-0.2, -1.25, 0]
    #   row 2: [-0.30 + 0.5, 0, 0]              = [0.2, 0, 0]
    expected = t([[-0.05, -0.1, 1.85], [-0.2, -1.25, 0.0], [0.2, 0.0, 0.0]])
    assert torch.allclose(rewards, expected, atol=1e-12)


# --------------------------------------------------------------------------------------------
# ppo.masked_whiten
# --------------------------------------------------------------------------------------------


def test_masked_whiten_hand_values():
    # real entries [1, 2, 3]: mean 2, variance (1 + 0 + 1) / 3 = 2/3 -> [-1, 0, 1] / sqrt(2/3)
    x, mask = t([[1.0, 2.0, 3.0, 100.0]]), t([[1, 1, 1, 0]])
    out = ppo.masked_whiten(x, mask)
    s = math.sqrt(1.5)  # 1 / sqrt(2/3) = 1.2247449
    assert torch.allclose(out[:, :3], t([[-s, 0.0, s]]), atol=1e-7)
    # shift_mean=False adds the mean back: [2 - s, 2, 2 + s]
    assert torch.allclose(ppo.masked_whiten(x, mask, shift_mean=False)[:, :3], t([[2 - s, 2.0, 2 + s]]), atol=1e-7)


def test_masked_whiten_moments():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=generator, dtype=D) * 3.0 + 5.0
    lengths = torch.tensor([10, 7, 3, 1, 9, 4])
    mask = (torch.arange(10).unsqueeze(0) < lengths.unsqueeze(1)).to(D)
    x = x + (1 - mask) * 1000.0  # huge values in padding must not leak into the statistics
    out = ppo.masked_whiten(x, mask)
    mean = (out * mask).sum() / mask.sum()
    var = (((out - mean) ** 2) * mask).sum() / mask.sum()
    assert abs(mean.item()) < 1e-9
    assert var.item() == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------
# sft.masked_lm_loss
# --------------------------------------------------------------------------------------------


def _lm_case():
    input_ids = torch.tensor([[2, 0, 1]])
    logits = t([[[0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [5.0, -5.0, 0.0]]])
    return logits, input_ids


def test_masked_lm_loss_hand_value():
    logits, input_ids = _lm_case()
    # prompt = token 2 (masked out); response = tokens 0, 1
    # logits[0] predicts input_ids[1] = 0: -log softmax([0,0,0])[0] = ln 3 = 1.0986123
    # logits[1] predicts input_ids[2] = 1: logsumexp([1,2,0]) - 2 = ln(e + e^2 + 1) - 2
    #                                      = ln(11.1073379) - 2 = 0.4076060
    # logits[2] predicts nothing.  L = (1.0986123 + 0.4076060) / 2 = 0.7531091
    loss = sft.masked_lm_loss(logits, input_ids, torch.tensor([[0, 1, 1]]))
    assert loss.item() == pytest.approx((math.log(3) + math.log(math.e + math.e**2 + 1) - 2) / 2, abs=1e-7)
    assert loss.item() == pytest.approx(0.7531091, abs=1e-6)
    reference = F.cross_entropy(logits[0, :2], input_ids[0, 1:])
    assert loss.item() == pytest.approx(reference.item(), abs=1e-7)


def test_masked_lm_loss_two_token_prompt():
    logits, input_ids = _lm_case()
    # prompt = tokens 2, 0; only input_ids[2] = 1 is trained, predicted by logits[1]: 0.4076060
    loss = sft.masked_lm_loss(logits, input_ids, torch.tensor([[0, 0, 1]]))
    assert loss.item() == pytest.approx(0.4076059644, abs=1e-7)
    assert loss.item() == pytest.approx(F.cross_entropy(logits[0, 1:2], input_ids[0, 2:3]).item(), abs=1e-7)


def test_masked_lm_loss_gradient():
    logits, input_ids = _lm_case()
    logits = logits.clone().requires_grad_()
    mask = torch.tensor([[0, 1, 1]])
    # masked_lm_loss casts to float32 internally; compare its gradient to the float64 reference
    # gradient of the same quantity, and check the reference against finite differences.
    loss = sft.masked_lm_loss(logits, input_ids, mask)
    (grad,) = torch.autograd.grad(loss, logits)

    def reference(lg):
        return F.cross_entropy(lg[0, :2], input_ids[0, 1:])

    assert torch.autograd.gradcheck(reference, (logits,))
    (expected,) = torch.autograd.grad(reference(logits), logits)
    assert torch.allclose(grad, expected, atol=1e-6)
    # logits at the last position predict nothing: zero gradient
    assert torch.equal(grad[0, 2], torch.zeros(3, dtype=D))
    # row 0 gradient = (softmax - onehot) / 2 = ([1/3, 1/3, 1/3] - [1, 0, 0]) / 2
    assert torch.allclose(grad[0, 0], t([-1 / 3, 1 / 6, 1 / 6]), atol=1e-7)


# --------------------------------------------------------------------------------------------
# ppo.AdaptiveKLController
# --------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_beta_towards_its_target():
    # beta = 0.1, target 6, horizon 10,000, 64 samples a rollout:
    #   KL 12: e = clip((12 - 6) / 6, -0.2, 0.2) = 0.2   -> beta = 0.1 * (1 + 0.2 * 64 / 10000) = 0.100128
    #   KL 3:  e = clip((3 - 6) / 6, -0.2, 0.2) = -0.2   -> beta = 0.1 * (1 - 0.2 * 64 / 10000) = 0.099872
    #   KL 6.6: e = 0.1 (inside the clip)                 -> beta = 0.1 * (1 + 0.1 * 64 / 10000) = 0.100064
    for kl, expected in ((12.0, 0.100128), (3.0, 0.099872), (6.6, 0.100064)):
        controller = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
        controller.update(kl, 64)
        assert controller.value == pytest.approx(expected, rel=1e-12)
    # held above the target, beta keeps growing; at the target it stays put
    controller = ppo.AdaptiveKLController(0.1, target=6.0, horizon=100)
    values = []
    for _ in range(5):
        controller.update(20.0, 10)
        values.append(controller.value)
    assert values == sorted(values) and values[-1] == pytest.approx(0.1 * 1.02**5)
    controller = ppo.AdaptiveKLController(0.1, target=6.0, horizon=100)
    controller.update(6.0, 10)
    assert controller.value == 0.1


def test_fixed_kl_controller_never_moves():
    controller = ppo.FixedKLController(0.05)
    controller.update(100.0, 64)
    assert controller.value == 0.05


# --------------------------------------------------------------------------------------------
# lm.logprobs_of, lm.head_logprobs: chunked log-probabilities
# --------------------------------------------------------------------------------------------

POSITIONS, HIDDEN, VOCAB, CHUNK = (3, 7), 16, 50, 4  # 21 positions: five chunks of 4 and one of 1


def head_and_inputs():
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB)  # its default initialisation: logits of a realistic scale
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(*POSITIONS, HIDDEN, generator=generator).requires_grad_()
    tokens = torch.randint(0, VOCAB, POSITIONS, generator=generator)
    upstream = torch.randn(POSITIONS, generator=generator)  # a weighted sum: every position's gradient differs
    return head, hidden, tokens, upstream


def full_logprobs(logits, tokens):
    return F.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def test_head_logprobs_equal_the_full_log_softmax():
    head, hidden, tokens, upstream = head_and_inputs()
    expected = full_logprobs(head(hidden), tokens)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [hidden, head.weight, head.bias])
    chunked = lm.head_logprobs(hidden, head, tokens, chunk_size=CHUNK)
    grads = torch.autograd.grad((chunked * upstream).sum(), [hidden, head.weight, head.bias])
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, expected, atol=1e-6, rtol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(lm.head_logprobs(hidden, head, tokens, CHUNK), expected, atol=1e-6, rtol=0)


def test_logprobs_of_equals_the_full_log_softmax():
    head, hidden, tokens, upstream = head_and_inputs()
    logits = head(hidden).detach().requires_grad_()
    expected = full_logprobs(logits, tokens)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), logits)
    chunked = lm.logprobs_of(logits, tokens, chunk_size=CHUNK)
    (grad,) = torch.autograd.grad((chunked * upstream).sum(), logits)
    torch.testing.assert_close(chunked, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)


def test_head_logprobs_never_hold_all_logits():
    """The head sees at most CHUNK positions at a time, forward and backward, and no logits are
    kept for the backward pass (the chunks' hidden states are)."""
    head, hidden, tokens, upstream = head_and_inputs()
    head_rows, saved = [], []
    head.register_forward_hook(lambda module, args, output: head_rows.append(output.shape[0]))

    def keep(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        logprobs = lm.head_logprobs(hidden, head, tokens, chunk_size=CHUNK)
    forward_calls = len(head_rows)
    (logprobs * upstream).sum().backward()
    assert forward_calls == 6 and len(head_rows) == 12  # each chunk's logits recomputed in the backward pass
    assert max(head_rows) == CHUNK
    assert max(saved) < CHUNK * VOCAB
