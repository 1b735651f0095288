"""The PPO loop on a tiny model: it updates the policy and the critic, leaves the reference and
the reward model alone, reports the metrics, and the adaptive controller moves beta with the KL."""

from __future__ import annotations

import copy

import torch

from components.models import lm
from components.rl import ppo
from components.trainers import reward_model
from components.config import PPOConfig, SamplingConfig
from components.world import generate_reviews


def test_ppo_updates_policy_and_critic_and_adapts_beta(tmp_path):
    torch.manual_seed(0)
    reviews = generate_reviews(200, 0.1, 0.3, seed=0)
    tokenizer = lm.train_tokenizer([r.document for r in reviews], 400)
    policy = lm.build_model(tokenizer, n_layer=1, n_head=2, n_embd=32, max_length=64)
    lm.save_policy(policy, tokenizer, tmp_path / "sft")
    reward = reward_model.load(tmp_path / "sft")
    reward.config.reward_mean, reward.config.reward_std = 0.0, 1.0
    critic, ref_policy = copy.deepcopy(reward), copy.deepcopy(policy)
    before = {name: p.clone() for name, p in [*policy.named_parameters(), *critic.named_parameters()]}
    frozen = {name: p.clone() for name, p in [*ref_policy.named_parameters(), *reward.named_parameters()]}

    # k3 is never negative. The first rollout has KL exactly 0 (policy == reference), under the
    # target: beta falls by 0.2 * 8 / 100. After an update the KL passes the tiny target: beta rises.
    cfg = PPOConfig(
        steps=3, batch_size=8, minibatch_size=4, ppo_epochs=2, lr=1e-3, kl_target=1e-4, kl_horizon=100,
        kl_estimator="k3",
    )
    logged = []
    metrics = ppo.train(
        policy, ref_policy, critic, reward, tokenizer, [r.prompt(3) for r in reviews[:40]], cfg,
        SamplingConfig(max_new_tokens=8), seed=0, log=lambda m, step: logged.append(m),
    )

    assert len(logged) == 3 and metrics == logged[-1]
    assert {"kl", "kl_coef", "clipfrac", "approx_kl", "entropy", "explained_variance", "eos_rate"} <= metrics.keys()
    betas, kls = [m["kl_coef"] for m in logged], [m["kl"] for m in logged]
    assert kls[0] == 0.0 and kls[1] > 1e-4
    assert betas[0] == 0.1 and betas[1] == 0.1 * (1 - 0.2 * 8 / 100) and betas[2] > betas[1]
    assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in critic.named_parameters())
    for name, p in [*ref_policy.named_parameters(), *reward.named_parameters()]:
        assert torch.equal(p, frozen[name]), name


def test_ppo_with_a_value_head_on_the_policy_trains_policy_and_head():
    torch.manual_seed(0)
    reviews = generate_reviews(200, 0.1, 0.3, seed=0)
    tokenizer = lm.train_tokenizer([r.document for r in reviews], 400)
    policy = lm.build_model(tokenizer, n_layer=1, n_head=2, n_embd=32, max_length=64)
    scorer_config = copy.deepcopy(policy.config)
    scorer_config.num_labels = 1
    reward = reward_model.AutoModelForSequenceClassification.from_config(scorer_config)  # an untrained scorer
    reward.config.reward_mean, reward.config.reward_std = 0.0, 1.0
    head = ppo.ValueHead(policy.config.hidden_size)
    before = [p.clone() for p in [*policy.parameters(), *head.parameters()]]

    cfg = PPOConfig(steps=2, batch_size=8, minibatch_size=4, ppo_epochs=2, lr=1e-3)
    metrics = ppo.train(
        policy, copy.deepcopy(policy), head, reward.eval(), tokenizer, [r.prompt(3) for r in reviews[:40]], cfg,
        SamplingConfig(max_new_tokens=8), seed=0,
    )

    assert {"value_loss", "explained_variance", "clipfrac"} <= metrics.keys()
    after = [*policy.parameters(), *head.parameters()]
    assert not torch.equal(after[-1], before[-1])  # the value head's bias moved off zero
    assert any(not torch.equal(a, b) for a, b in zip(after[:-2], before[:-2]))  # and the shared trunk moved
