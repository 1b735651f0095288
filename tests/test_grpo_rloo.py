"""GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024): advantages and losses against values
worked out by hand, a gradient check of GRPO's loss, RLOO's clipped loss against REINFORCE's
gradient at ratio 1, both methods trained end to end on the tiny shared policy and reward model
(the mean reward of the policy's samples rises), a crashed run that resumes exactly, and the
configuration that selects them."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError

from components.rl import METHODS, RLInputs, grpo, rloo
from components.rl.grpo import GRPOConfig
from components.rl.rloo import RLOOConfig
from tests.conftest import REPO
from tests.rl_checks import SAMPLING, assert_same_weights, calibrate, crash_and_resume, mean_score

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------- GRPO, by hand


def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5])
    # group 1: mean 3, deviations -2 -1 0 3, sample variance (4 + 1 + 0 + 9) / 3; group 2 ties
    std = math.sqrt(14 / 3)
    expected = [-2 / (std + 1e-4), -1 / (std + 1e-4), 0.0, 3 / (std + 1e-4), 0.0, 0.0, 0.0, 0.0]
    assert grpo.group_advantages(rewards, 4).tolist() == pytest.approx(expected)
    # Dr. GRPO: no division by the std
    assert grpo.group_advantages(rewards, 4, scale_rewards=False).tolist() == pytest.approx([-2, -1, 0, 3, 0, 0, 0, 0])


def _grpo_example():
    """Two responses, 3 and 2 tokens (the third token of row 1 is padding with wild values).
    Ratios to the sampling policy: row 0 [1.0, 1.5, 0.5] with A = 2, row 1 [1.1, 0.7] with A = -1;
    ref_logprobs - logprobs: row 0 [0, ln 2, -ln 2], row 1 [0, ln 3]."""
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]], dtype=torch.float64)
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 5.0]], dtype=torch.float64)
    old_logprobs = logprobs - ratios.log()
    d = torch.tensor([[0.0, math.log(2), -math.log(2)], [0.0, math.log(3), 3.0]], dtype=torch.float64)
    ref_logprobs = logprobs + d
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    advantages = torch.tensor([2.0, -1.0], dtype=torch.float64)
    return logprobs, old_logprobs, ref_logprobs, advantages, mask


def test_grpo_loss_by_hand_for_each_aggregation():
    logprobs, old_logprobs, ref_logprobs, advantages, mask = _grpo_example()
    beta, eps = 0.1, 0.2
    # min(ratio * A, clip(ratio, 0.8, 1.2) * A): row 0: 2, min(3, 2.4), min(1, 1.6); row 1: -1.1, min(-0.7, -0.8)
    surrogate = [[2.0, 2.4, 1.0], [-1.1, -0.8]]
    # k3 = e^d - d - 1 with d = ref_logprobs - logprobs
    k3 = [[0.0, 2 - math.log(2) - 1, 0.5 + math.log(2) - 1], [0.0, 3 - math.log(3) - 1]]
    per_token = [[-(s - beta * k) for s, k in zip(srow, krow)] for srow, krow in zip(surrogate, k3)]
    row_sums = [sum(row) for row in per_token]
    expected = {
        "seq-mean-token-mean": (row_sums[0] / 3 + row_sums[1] / 2) / 2,
        "token-mean": (row_sums[0] + row_sums[1]) / 5,
        "seq-mean-token-sum-norm": (row_sums[0] / 4 + row_sums[1] / 4) / 2,
    }
    for mode, value in expected.items():
        loss, stats = grpo.grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, eps, beta, mode, 4)
        assert loss.item() == pytest.approx(value, abs=1e-12), mode
    assert stats["clipfrac"] == pytest.approx(2 / 5)  # row 0 token 1 and row 1 token 1
    assert stats["kl_loss"] == pytest.approx(sum(k3[0] + k3[1]) / 5)
    # without the KL term, the clipped surrogate alone
    loss, _ = grpo.grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, eps, 0.0)
    assert loss.item() == pytest.approx(-(sum(surrogate[0]) / 3 + sum(surrogate[1]) / 2) / 2, abs=1e-12)


def test_grpo_loss_gradient_matches_finite_differences():
    logprobs, old_logprobs, ref_logprobs, advantages, mask = _grpo_example()
    # away from the clip's kinks (1 +- eps exactly), where the loss is differentiable
    for mode in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"):
        assert torch.autograd.gradcheck(
            lambda lp: grpo.grpo_loss(lp, old_logprobs, ref_logprobs, advantages, mask, 0.2, 0.1, mode, 4)[0],
            (logprobs.clone().requires_grad_(True),),
        )
    # and by hand at one token: d/d logprob of row 0, token 0 (ratio 1, inside the clip, d = 0) is
    # -(A * ratio - beta * (-e^d + 1)) / 3 / 2 = -2 / 6
    lp = logprobs.clone().requires_grad_(True)
    grpo.grpo_loss(lp, old_logprobs, ref_logprobs, advantages, mask, 0.2, 0.1)[0].backward()
    assert lp.grad[0, 0].item() == pytest.approx(-2 / 6)
    assert lp.grad[0, 1].item() == pytest.approx(0.1 * (1 - 2) / 6)  # clipped: only the KL term, -beta*(e^d - 1)/6
    assert lp.grad[1, 2].item() == 0.0  # padding


# ------------------------------------------------------------------------------- RLOO, by hand


def test_leave_one_out_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    # baselines (9 - R_i) / 2 = 4, 3.5, 1.5 and (3 - R_i) / 2 = 1.5, 1.5, 0
    assert rloo.leave_one_out_advantages(rewards, 3).tolist() == pytest.approx([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])


def test_sequence_rewards_put_the_summed_kl_in_the_reward():
    scores = torch.tensor([1.0, 0.5])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -9.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # sum_t (logprobs - ref_logprobs): 0.5 - 1 + 0 = -0.5 and 0.5
    rewards = rloo.sequence_rewards(scores, logprobs, ref_logprobs, mask, 0.1)
    assert rewards.tolist() == pytest.approx([1.0 + 0.05, 0.5 - 0.05])


def test_rloo_losses_by_hand_and_reinforce_gradient_at_ratio_one():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    advantages = torch.tensor([2.0, -1.0], dtype=torch.float64)
    # REINFORCE: -(2 * (-6) + (-1) * (-0.5)) / 2
    assert rloo.reinforce_loss(logprobs, advantages, mask).item() == pytest.approx(5.75)

    # sequence ratios 1.5 (A = 2: max(-3, -2.4) = -2.4, clipped) and 0.9 (A = -1: 0.9, inside)
    old_logprobs = logprobs.clone()
    old_logprobs[0, 1] -= math.log(1.5)
    old_logprobs[1, 0] -= math.log(0.9)
    old_logprobs[1, 2] += 7.0  # padding: ignored
    loss, stats = rloo.rloo_loss(logprobs, old_logprobs, advantages, mask, 0.2)
    assert loss.item() == pytest.approx((-2.4 + 0.9) / 2)
    assert stats["clipfrac"] == 0.5

    # at ratio 1 the clipped loss has REINFORCE's gradient
    lp_clipped, lp_reinforce = logprobs.clone().requires_grad_(True), logprobs.clone().requires_grad_(True)
    rloo.rloo_loss(lp_clipped, logprobs, advantages, mask, 0.2)[0].backward()
    rloo.reinforce_loss(lp_reinforce, advantages, mask).backward()
    expected = torch.tensor([[-1.0, -1.0, -1.0], [0.5, 0.0, 0.0]], dtype=torch.float64)  # -A_i / B on each token
    torch.testing.assert_close(lp_clipped.grad, expected)
    torch.testing.assert_close(lp_reinforce.grad, expected)


# ---------------------------------------------------------------------------------- end to end


TRAINED = {
    "grpo": GRPOConfig(steps=20, batch_size=16, group_size=4, minibatch_size=32, update_epochs=2, lr=1e-2, kl_coef=0.01,
                       missing_eos_penalty=0.0),
    "rloo": RLOOConfig(steps=20, batch_size=16, k=4, minibatch_size=32, update_epochs=2, lr=1e-2, kl_coef=0.01,
                       missing_eos_penalty=0.0),
}


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_train_raises_the_reward_of_the_policy_samples(name, tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts):
    cfg = TRAINED[name]
    assert METHODS[name].config is type(cfg) and METHODS[name].section == name
    policy, reward = tiny_policy(), tiny_reward
    ref_policy = copy.deepcopy(policy)
    calibrate(reward, policy, tiny_tokenizer, tiny_prompts)
    frozen = {n: p.clone() for n, p in [*ref_policy.named_parameters(), *reward.model.named_parameters()]}
    start = mean_score(policy, reward, tiny_tokenizer, tiny_prompts, 123)
    logged, probed = [], []
    trained, metrics = METHODS[name].train(RLInputs(
        policy, ref_policy, reward, tiny_tokenizer, tiny_prompts, [], cfg, SAMPLING, seed=0,
        log=lambda m, step: logged.append((step, m)), probe=lambda step, total: probed.append((step, total)),
    ))
    end = mean_score(trained, reward, tiny_tokenizer, tiny_prompts, 123)

    assert trained is policy and metrics == logged[-1][1]
    assert [step for step, _ in logged] == list(range(cfg.steps))
    assert probed == [(step, cfg.steps) for step in range(1, cfg.steps + 1)]
    expected = {"score_mean", "kl", "reward_mean", "policy_loss", "clipfrac", "approx_kl", "entropy", "response_length",
                "eos_rate"}
    assert all(expected <= m.keys() and all(math.isfinite(v) for v in m.values()) for _, m in logged)
    assert logged[0][1]["kl"] == 0.0  # the first rollout comes from the reference itself
    assert end > start + 0.25  # in units of the initial policy's score std (seeds 0-3 gain 0.43-0.70)
    assert any(not torch.equal(p, ref) for p, ref in zip(policy.parameters(), ref_policy.parameters()))
    for n, p in [*ref_policy.named_parameters(), *reward.model.named_parameters()]:
        assert torch.equal(p, frozen[n]), n


# ------------------------------------------------------------------------------ resume after a crash

RESUMED = {
    # the variants the end-to-end test leaves out: KL in the reward, Dr. GRPO's unscaled advantages and loss
    "grpo": GRPOConfig(steps=3, batch_size=4, group_size=2, minibatch_size=4, update_epochs=2, lr=1e-3,
                       kl_in_reward=True, scale_rewards=False, loss_agg_mode="seq-mean-token-sum-norm",
                       checkpoint_every=1),
    "rloo": RLOOConfig(steps=3, batch_size=4, k=2, minibatch_size=None, update_epochs=1, lr=1e-3, kl_estimator="k3",
                       checkpoint_every=1),
}


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_a_crashed_run_resumes_its_policy_optimizer_and_rng(
    name, tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts, tmp_path
):
    """Checkpoints every iteration; a crash in iteration 2 of 3, then the same call again from the
    initial weights (a fresh process), ends with the weights of an uninterrupted run."""
    initial, cfg = tiny_policy(), RESUMED[name]

    def run(folder, log):
        return METHODS[name].train(RLInputs(
            copy.deepcopy(initial), copy.deepcopy(initial), tiny_reward, tiny_tokenizer, tiny_prompts, [], cfg,
            SAMPLING, seed=0, log=log, checkpoint_dir=folder,
        ))

    (uninterrupted, whole_metrics), (resumed, metrics) = crash_and_resume(run, tmp_path, crash_step=2)
    assert metrics == pytest.approx(whole_metrics, abs=1e-5)
    assert_same_weights(resumed, uninterrupted)
    assert any(not torch.equal(a, b) for a, b in zip(resumed.parameters(), initial.parameters()))


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_lora_trains_only_the_adapters_against_the_base_as_reference(
    name, tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts
):
    from components.models.lora import add_lora
    from components.sections import RLConfig

    policy = add_lora(tiny_policy(), RLConfig(lora_r=4), seed=0)
    before = {key: p.clone() for key, p in policy.named_parameters()}
    cfg = RESUMED[name].model_copy(update={"steps": 2, "lr": 1e-2})
    logged = []
    trained, _ = METHODS[name].train(RLInputs(
        policy, None, tiny_reward, tiny_tokenizer, tiny_prompts, [], cfg, SAMPLING, seed=0,
        log=lambda m, step: logged.append(m),
    ))
    changed = {key for key, p in trained.named_parameters() if not torch.equal(p, before[key])}
    assert changed and all("lora_" in key for key in changed)
    assert logged[0]["kl"] == 0.0 and logged[1]["kl"] != 0.0  # the reference is the base, adapters off


# ------------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_the_rl_stage_accepts_the_method_and_reads_its_section_only(name):
    from components.config import ConfigError, load_config
    from components.pipeline.layout import stage_params

    cfg = load_config(REPO / "params.yaml", {"rl": {"algorithm": name}, name: {"steps": 3}})
    assert getattr(cfg, name).steps == 3
    params = stage_params(cfg, "rl")
    assert name in params and not {"ppo", "p3o", "grpo", "rloo"} - {name} & set(params)
    with pytest.raises(ConfigError):
        load_config(REPO / "params.yaml", {"rl": {"algorithm": name}, name: {"batch_size": 3, "minibatch_size": 5}})


def test_config_rejects_groups_too_small_for_a_baseline():
    with pytest.raises(ValidationError):
        GRPOConfig(group_size=1)
    with pytest.raises(ValidationError):
        RLOOConfig(k=1)
    with pytest.raises(ValidationError):
        GRPOConfig(loss_agg_mode="token-sum")
