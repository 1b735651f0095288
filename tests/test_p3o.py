"""P3O (Wu et al. 2023): the clipped pairwise losses against hand-computed values, the invariance of
the P3O gradient to a per-prompt reward shift (where REINFORCE's changes), the replay buffer, a
two-step run of the training loop on a tiny model (metrics and frontier probe) and a crashed run
that resumes exactly."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from components.models import lm
from components.rl import METHODS, RLInputs, p3o
from components.rl.p3o import P3OConfig
from components.rl.rollout import collect
from components.sections import SamplingConfig

SAMPLING = SamplingConfig(max_new_tokens=8)

pytestmark = pytest.mark.usefixtures("single_thread")


def loss_and_grads(logprobs_1, logprobs_2, old_1, old_2, rewards_1, rewards_2, version, cliprange=0.2):
    """The loss, its stats and d loss / d logprobs for both responses."""
    lp_1 = torch.tensor(logprobs_1, requires_grad=True)
    lp_2 = torch.tensor(logprobs_2, requires_grad=True)
    loss, stats = p3o.p3o_loss(
        lp_1, lp_2, torch.tensor(old_1), torch.tensor(old_2), torch.tensor(rewards_1), torch.tensor(rewards_2),
        cliprange, version,
    )
    loss.backward()
    return loss.item(), stats, lp_1.grad.tolist(), lp_2.grad.tolist()


@pytest.mark.parametrize("version, expected_loss", [("v1", 0.0), ("v2", 0.05)])
def test_loss_at_ratio_one(version, expected_loss):
    # Two pairs, policy == behaviour policy (every ratio is 1).
    # A = (r_1 - r_2) / 2 = [(1.0 - 0.2) / 2, (0.5 - 1.5) / 2] = [0.4, -0.5]
    # V1: J = 1 * A + 1 * (-A) = 0 for each pair                    -> loss 0
    # V2: J = (1 * 1 / 1) * min(1 * A, 1 * A) = A, mean(A) = -0.05   -> loss 0.05
    # Both: dJ/dlogpi(y_1) = rho_1 rho_2 A = A and dJ/dlogpi(y_2) = -A; the loss is -mean over 2 pairs:
    # d loss / d logprobs_1 = -A / 2 = [-0.2, 0.25],  d loss / d logprobs_2 = A / 2 = [0.2, -0.25]
    logprobs_1, logprobs_2 = [-3.0, -5.0], [-4.0, -2.0]
    loss, stats, grad_1, grad_2 = loss_and_grads(
        logprobs_1, logprobs_2, logprobs_1, logprobs_2, [1.0, 0.5], [0.2, 1.5], version
    )
    assert loss == pytest.approx(expected_loss, abs=1e-7)
    assert grad_1 == pytest.approx([-0.2, 0.25]) and grad_2 == pytest.approx([0.2, -0.25])
    assert stats == {"clipfrac": 0.0, "approx_kl": 0.0}


def test_v1_and_v2_clip_differently_when_ratios_are_off():
    # eps = 0.2, both pairs with r_1 = 1.0, r_2 = 0.2, so A = 0.4 (and -0.4 for y_2).
    # pair a: rho_1 = 1.1, rho_2 = 0.75 (y_1 up, y_2 down: the joint ratio R = 1.1 / 0.75 = 1.4667)
    # pair b: rho_1 = 1.3, rho_2 = 1.25 (both up together: R = 1.3 / 1.25 = 1.04)
    #
    # V1, each response on its own:
    #   a: y_1 unclipped (1.1 < 1.2): 0.75 * 1.1 * 0.4 = 0.33
    #      y_2 clipped (0.75 < 0.8, A < 0): 1.1 * min(0.75 * -0.4, 0.8 * -0.4) = 1.1 * -0.32 = -0.352
    #   b: y_1 clipped (1.3 > 1.2, A > 0): 1.25 * min(1.3 * 0.4, 1.2 * 0.4) = 1.25 * 0.48 = 0.6
    #      y_2 unclipped: 1.3 * min(1.25 * -0.4, 1.2 * -0.4) = 1.3 * -0.5 = -0.65
    #   loss = -mean(0.33 - 0.352, 0.6 - 0.65) = -mean(-0.022, -0.05) = 0.036; clipfrac 2 / 4
    #   gradients (of the loss, 1/2 from the mean): a: y_1 -1.1 * 0.75 * 0.4 / 2 = -0.165, y_2 0
    #                                               b: y_1 0, y_2 +1.3 * 1.25 * 0.4 / 2 = 0.325
    # V2, the joint ratio:
    #   a: R = 1.4667 > 1.2, A > 0: clipped, J = (1.1 * 0.75 / 1.4667) * 1.2 * 0.4 = 0.5625 * 0.48 = 0.27
    #   b: R = 1.04 unclipped: J = (1.3 * 1.25 / 1.04) * 1.04 * 0.4 = 0.65
    #   loss = -mean(0.27, 0.65) = -0.46; clipfrac 1 / 2
    #   gradients: a: 0, 0;  b: y_1 -1.3 * 1.25 * 0.4 / 2 = -0.325, y_2 +0.325
    old_1, old_2 = [-3.0, -6.0], [-4.0, -5.0]
    logprobs_1 = [old_1[0] + math.log(1.1), old_1[1] + math.log(1.3)]
    logprobs_2 = [old_2[0] + math.log(0.75), old_2[1] + math.log(1.25)]
    approx_kl = 0.5 * sum(math.log(r) ** 2 for r in (1.1, 0.75, 1.3, 1.25)) / 4  # 0.02628
    rewards_1, rewards_2 = [1.0, 1.0], [0.2, 0.2]

    loss, stats, grad_1, grad_2 = loss_and_grads(logprobs_1, logprobs_2, old_1, old_2, rewards_1, rewards_2, "v1")
    assert loss == pytest.approx(0.036, abs=1e-6)
    assert stats["clipfrac"] == 0.5 and stats["approx_kl"] == pytest.approx(approx_kl, rel=1e-5)
    assert grad_1 == pytest.approx([-0.165, 0.0], abs=1e-6) and grad_2 == pytest.approx([0.0, 0.325], abs=1e-6)

    loss, stats, grad_1, grad_2 = loss_and_grads(logprobs_1, logprobs_2, old_1, old_2, rewards_1, rewards_2, "v2")
    assert loss == pytest.approx(-0.46, abs=1e-6)
    assert stats["clipfrac"] == 0.5 and stats["approx_kl"] == pytest.approx(approx_kl, rel=1e-5)
    assert grad_1 == pytest.approx([0.0, -0.325], abs=1e-6) and grad_2 == pytest.approx([0.0, 0.325], abs=1e-6)

    with pytest.raises(ValueError):
        p3o.p3o_loss(*[torch.zeros(1)] * 6, 0.2, "v3")


@pytest.mark.parametrize("version", p3o.VERSIONS)
def test_gradient_is_invariant_to_a_per_prompt_reward_shift(version, tiny_world, tiny_tokenizer, tiny_policy):
    """ACCEPTANCE: P3O's gradient is unchanged when a per-prompt constant delta(x) is added to all
    rewards, while the vanilla policy gradient's (REINFORCE) changes."""
    reviews, tokenizer, model = tiny_world, tiny_tokenizer, tiny_policy()
    prompts = [r.prompt(3) for r in reviews[:3] for _ in range(2)]
    completions = [r.completion(3)[:30] for r in reviews[3:9]]
    rollout = lm.make_rollout(tokenizer, prompts, completions, [True] * 6)
    # off-policy: the behaviour log-probs differ from the policy's, so some ratios are clipped
    offsets = torch.tensor([[0.05, -0.1], [0.3, 0.0], [-0.25, 0.1]])
    rewards = torch.tensor([[1.0, 0.25], [-0.5, 0.75], [2.0, -1.0]])
    delta = torch.tensor([[3.0], [-2.0], [10.0]])  # one constant per prompt

    def gradients(loss_of_logprobs):
        model.zero_grad()
        logprobs = (lm.response_logprobs(model, rollout) * rollout.response_mask).sum(1).view(3, 2)
        loss_of_logprobs(logprobs).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    def p3o_loss(rewards):
        def loss(logprobs):
            old = logprobs.detach() + offsets
            return p3o.p3o_loss(
                logprobs[:, 0], logprobs[:, 1], old[:, 0], old[:, 1], rewards[:, 0], rewards[:, 1], 0.2, version
            )[0]
        return loss

    def reinforce_loss(rewards):
        return lambda logprobs: -(rewards * logprobs).mean()

    p3o_grad, p3o_shifted = gradients(p3o_loss(rewards)), gradients(p3o_loss(rewards + delta))
    assert p3o_grad.abs().sum() > 0
    assert torch.equal(p3o_grad, p3o_shifted)
    reinforce_grad, reinforce_shifted = gradients(reinforce_loss(rewards)), gradients(reinforce_loss(rewards + delta))
    assert not torch.allclose(reinforce_grad, reinforce_shifted, atol=1e-4)


def test_replay_buffer_keeps_the_newest_pairs_and_round_trips(tiny_world, tiny_tokenizer, tiny_policy, tiny_reward):
    reviews, tokenizer, model, reward = tiny_world, tiny_tokenizer, tiny_policy(), tiny_reward
    prompts = [r.prompt(3) for r in reviews[:6]]
    buffer = p3o.ReplayBuffer(capacity=3)
    pushed = []
    for start in (0, 2, 4):
        experience = collect(model, model, reward, tokenizer, prompts[start : start + 2], 2, SAMPLING, 1.0)
        rewards = torch.arange(4, dtype=torch.float) + start
        buffer.push(experience, rewards)
        pushed.extend(zip(experience.rollout.prompts[0::2], rewards.view(-1, 2).tolist()))
    # 6 pairs pushed, the newest 3 kept, oldest first
    assert len(buffer) == 3
    assert [(p.prompt, p.rewards) for p in buffer.pairs] == pushed[-3:]

    # re-padded, the stored responses have the behaviour log-probs they were sampled with
    rollout, old_logprobs, rewards = buffer.batch([2, 0], tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs = (lm.response_logprobs(model, rollout) * rollout.response_mask).sum(1).view(-1, 2)
    torch.testing.assert_close(logprobs, old_logprobs, atol=1e-4, rtol=0)
    assert rewards.tolist() == [pushed[-1][1], pushed[-3][1]]
    assert rollout.prompts == [pushed[-1][0]] * 2 + [pushed[-3][0]] * 2

    restored = p3o.ReplayBuffer(capacity=1)
    restored.load_state_dict(json.loads(json.dumps(buffer.state_dict())))
    assert restored.capacity == 3 and restored.pairs == buffer.pairs


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
    cfg = P3OConfig(steps=2, batch_size=4, minibatch_size=2, update_epochs=2, buffer_size=6, lr=1e-3)
    logged, probed = [], []
    trained, metrics = method.train(RLInputs(
        policy, ref_policy, reward, tiny_tokenizer, tiny_prompts, [], cfg, SAMPLING, seed=0,
        log=lambda m, step: logged.append(m), probe=lambda step, total: probed.append((step, total)),
    ))

    assert trained is policy
    assert len(logged) == 2 and metrics == logged[-1]
    assert probed == [(1, 2), (2, 2)]
    expected = {"score_mean", "kl", "reward_mean", "clipfrac", "approx_kl", "entropy", "response_length", "eos_rate",
                "policy_loss", "reward_gap"}
    assert expected <= metrics.keys() and "gold_reward_mean" not in metrics
    assert all(math.isfinite(v) for v in metrics.values())
    assert logged[0]["kl"] == 0.0  # the first rollout comes from the reference itself
    assert logged[0]["reward_mean"] == logged[0]["score_mean"]  # so no KL penalty yet
    assert [m["buffer_pairs"] for m in logged] == [4, 6]
    assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters())
    for name, p in [*ref_policy.named_parameters(), *reward.model.named_parameters()]:
        assert torch.equal(p, frozen[name]), name


def test_a_crashed_run_resumes_its_policy_optimizer_buffer_and_rng(
    tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts, tmp_path
):
    """Checkpoints every iteration; a crash after iteration 3 of 4, then the same call again,
    ends with the weights of an uninterrupted run (the buffer holds pairs from iterations 1-3)."""
    initial = tiny_policy()
    cfg = P3OConfig(steps=4, batch_size=4, minibatch_size=2, update_epochs=1, buffer_size=10, lr=1e-3, checkpoint_every=1)

    def run(policy, folder, log=lambda m, step: None):
        return p3o.train_v2(RLInputs(
            policy, copy.deepcopy(initial), tiny_reward, tiny_tokenizer, tiny_prompts, [], cfg, SAMPLING, seed=0,
            log=log, checkpoint_dir=folder,
        ))

    uninterrupted, _ = run(copy.deepcopy(initial), tmp_path / "whole")

    def crash_at_step_3(metrics, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(copy.deepcopy(initial), tmp_path / "crashed", crash_at_step_3)
    assert [p.name for p in (tmp_path / "crashed").glob("step-*")] == ["step-00000003"]
    steps = []
    resumed, metrics = run(copy.deepcopy(initial), tmp_path / "crashed", lambda m, step: steps.append(step))

    assert steps == [3]  # a fresh process, from the initial weights, resumes at the checkpoint
    assert metrics["buffer_pairs"] == 10
    for (name, weight), (_, expected) in zip(resumed.named_parameters(), uninterrupted.named_parameters()):
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6, msg=name)
