"""The PPO loop on a tiny model: it updates the policy and its own critic (a copy of the reward
model that starts at the normalised reward, or a value head), leaves the reference and the reward
model alone, reports the metrics and the frontier probe, adapts beta with the KL, resumes a crashed
run exactly, refuses a separate critic without a reward network, and trains only the LoRA adapters
of a LoRA policy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from components.models import lm
from components.models.lora import add_lora
from components.rewards import FunctionReward
from components.rl import METHODS, RLInputs, ppo, rollout
from components.rl.ppo import PPOConfig
from components.sections import RLConfig, SamplingConfig
from tests.rl_checks import assert_same_checkpointed, assert_same_weights, crash_and_resume

SAMPLING = SamplingConfig(max_new_tokens=8)

pytestmark = pytest.mark.usefixtures("single_thread")


def ppo_run(policy, reference, reward, tokenizer, prompts, cfg, **kwargs) -> RLInputs:
    return RLInputs(policy, reference, reward, tokenizer, prompts, [], cfg, SAMPLING, seed=0, **kwargs)


def test_ppo_updates_policy_and_critic_adapts_beta_and_probes_every_step(
    tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts, tmp_path
):
    assert METHODS["ppo"].train is ppo.train and METHODS["ppo"].config is PPOConfig
    policy, reward = tiny_policy(), tiny_reward
    ref_policy = copy.deepcopy(policy)
    before = {name: p.clone() for name, p in policy.named_parameters()}
    frozen = {name: p.clone() for name, p in [*ref_policy.named_parameters(), *reward.model.named_parameters()]}

    # k3 is never negative. The first rollout has KL exactly 0 (policy == reference), under the
    # target: beta falls by 0.2 * 8 / 100. After an update the KL passes the tiny target: beta rises.
    cfg = PPOConfig(
        steps=3, batch_size=8, minibatch_size=4, ppo_epochs=2, lr=1e-3, kl_target=1e-4, kl_horizon=100,
        kl_estimator="k3",
    )
    logged, probed = [], []
    trained, metrics = ppo.train(ppo_run(
        policy, ref_policy, reward, tiny_tokenizer, tiny_prompts, cfg, log=lambda m, step: logged.append((step, m)),
        probe=lambda step, total: probed.append((step, total)), checkpoint_dir=tmp_path,
    ))

    assert trained is policy
    assert [step for step, _ in logged] == [0, 1, 2] and metrics == logged[-1][1]
    assert probed == [(1, 3), (2, 3), (3, 3)]
    assert {"kl", "kl_coef", "clipfrac", "approx_kl", "entropy", "explained_variance", "eos_rate"} <= metrics.keys()
    assert "gold_reward_mean" not in metrics  # gold is the rl stage's frontier probe's business
    betas, kls = [m["kl_coef"] for _, m in logged], [m["kl"] for _, m in logged]
    assert kls[0] == 0.0 and kls[1] > 1e-4
    assert betas[0] == 0.1 and betas[1] == 0.1 * (1 - 0.2 * 8 / 100) and betas[2] > betas[1]
    assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters())
    for name, p in [*ref_policy.named_parameters(), *reward.model.named_parameters()]:
        assert torch.equal(p, frozen[name]), name
    # the critic, a copy of the reward model with a bias for the normalisation, trained (the last
    # checkpoint holds it)
    critic = load_file(str(tmp_path / "step-00000003" / "critic.safetensors"))
    assert critic.keys() == reward.model.state_dict().keys() | {"score.bias"}
    assert any(not torch.equal(w, frozen[n]) for n, w in critic.items() if n in frozen)


def test_the_critic_copied_from_the_reward_model_starts_at_the_normalised_score(
    tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts
):
    """The reward normalisation is folded into the critic's head (Huang et al. 2024): its value at
    the last token of a sequence, where the reward model scores it, is the normalised score."""
    policy, reward = tiny_policy(), tiny_reward
    reward.model.config.reward_mean, reward.model.config.reward_std = 0.37, 0.05  # not the identity
    torch.manual_seed(3)
    batch = rollout.generate(policy, tiny_tokenizer, tiny_prompts[:8], 2, SAMPLING)
    critic = ppo.make_critic(ppo_run(policy, None, reward, tiny_tokenizer, tiny_prompts, PPOConfig()), PPOConfig())

    with torch.no_grad():
        hidden = ppo._forward(critic.base_model, batch).last_hidden_state
        last = batch.prompt_ids.shape[1] + batch.response_mask.sum(1) - 1
        values = critic.score(hidden[torch.arange(len(last)), last]).squeeze(-1)
        expected = reward.normalised(batch)
    assert (expected - reward.scores(batch)).abs().min() > 1  # far from the raw score a plain copy starts at
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-5)
    assert all(not p.requires_grad for p in reward.model.parameters())  # the reward model stays frozen


def test_ppo_with_a_value_head_on_the_policy_trains_policy_and_head(
    tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts, tmp_path
):
    policy = tiny_policy()
    before = [p.clone() for p in policy.parameters()]
    cfg = PPOConfig(steps=2, batch_size=8, minibatch_size=4, ppo_epochs=2, lr=1e-3, critic="value_head")
    _, metrics = ppo.train(ppo_run(
        policy, copy.deepcopy(policy), tiny_reward, tiny_tokenizer, tiny_prompts, cfg, checkpoint_dir=tmp_path
    ))

    assert {"value_loss", "explained_variance", "clipfrac"} <= metrics.keys()
    assert all(math.isfinite(v) for k, v in metrics.items() if k != "explained_variance")
    head = load_file(str(tmp_path / "step-00000002" / "critic.safetensors"))
    assert head.keys() == {"score.weight", "score.bias"}  # a head only, no second transformer
    assert head["score.bias"].abs().item() > 0  # moved off its zero start
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), before))  # and the shared trunk moved


def test_a_crashed_run_resumes_its_policy_critic_optimizer_beta_and_rng(
    tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts, tmp_path
):
    """Checkpoints every iteration; a crash after iteration 2 of 3, then the same call again,
    ends with the weights, critic and beta of an uninterrupted run."""
    initial = tiny_policy()
    cfg = PPOConfig(steps=3, batch_size=8, minibatch_size=4, ppo_epochs=1, lr=1e-3, kl_target=1e-3, kl_horizon=100,
                    checkpoint_every=1)

    def run(folder, log):
        return ppo.train(ppo_run(copy.deepcopy(initial), copy.deepcopy(initial), tiny_reward, tiny_tokenizer,
                                 tiny_prompts, cfg, log=log, checkpoint_dir=folder))

    (uninterrupted, whole_metrics), (resumed, metrics) = crash_and_resume(run, tmp_path, crash_step=2)
    assert metrics["kl_coef"] == whole_metrics["kl_coef"]
    assert_same_weights(resumed, uninterrupted)
    assert_same_checkpointed(tmp_path, 3, ("critic",))


def test_a_reward_without_a_network_needs_a_value_head(tiny_policy, tiny_tokenizer, tiny_prompts):
    calls = []

    def length(prompt: str, response: str) -> float:
        calls.append(response)
        return float(len(response))

    reward = FunctionReward(length, "len")
    policy = tiny_policy()
    cfg = PPOConfig(steps=2, batch_size=8, minibatch_size=4, ppo_epochs=2, lr=1e-3, missing_eos_penalty=0.0)
    with pytest.raises(ValueError, match="ppo.critic=value_head"):
        ppo.train(ppo_run(policy, copy.deepcopy(policy), reward, tiny_tokenizer, tiny_prompts, cfg))
    assert calls == []  # refused before any rollout

    before = [p.clone() for p in policy.parameters()]
    logged = []
    _, metrics = ppo.train(ppo_run(
        policy, copy.deepcopy(policy), reward, tiny_tokenizer, tiny_prompts,
        cfg.model_copy(update={"critic": "value_head"}), log=lambda m, step: logged.append(m),
    ))

    assert all(math.isfinite(v) for k, v in metrics.items() if k != "explained_variance")
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), before))
    # the score is the function's value as it is (not normalised, no EOS penalty here)
    assert len(calls) == 16 and max(map(len, calls)) > 0
    assert logged[0]["score_mean"] == pytest.approx(sum(map(len, calls[:8])) / 8)
    assert logged[1]["score_mean"] == pytest.approx(sum(map(len, calls[8:])) / 8)


def test_lora_ppo_trains_only_the_adapters_and_keeps_the_sft_model_as_reference(
    tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts
):
    sft = tiny_policy()
    policy = add_lora(tiny_policy(), RLConfig(lora_r=4), seed=0)
    before = {name: p.clone() for name, p in policy.named_parameters()}
    assert {name for name, p in policy.named_parameters() if p.requires_grad} == {
        name for name in before if "lora_" in name
    }
    cfg = PPOConfig(steps=2, batch_size=8, minibatch_size=4, ppo_epochs=2, lr=1e-2)
    trained, metrics = ppo.train(ppo_run(policy, None, tiny_reward, tiny_tokenizer, tiny_prompts, cfg))

    assert trained is policy and math.isfinite(metrics["policy_loss"])
    changed = {name for name, p in policy.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)  # base weights identical
    assert any("lora_B" in name for name in changed)

    # the reference (adapters off) is the SFT model; the policy (adapters on) is not any more
    torch.manual_seed(5)
    experience = rollout.collect(policy, None, tiny_reward, tiny_tokenizer, tiny_prompts[:6], 2, SAMPLING, 1.0)
    with torch.no_grad():
        sft_logprobs = lm.response_logprobs(sft, experience.rollout) * experience.mask
    torch.testing.assert_close(experience.ref_logprobs, sft_logprobs, rtol=0, atol=1e-5)
    assert (experience.logprobs - sft_logprobs).abs().max() > 1e-3
