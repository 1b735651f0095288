"""The rollout engine: K samples per prompt grouped by prompt, log-probs that score the sampled
tokens, and with a LoRA policy the reference is the base model (adapter disabled)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from components.models import lm
from components.rl import rollout
from components.trainers import reward_model
from components.config import SamplingConfig
from components.world import generate_reviews

pytestmark = pytest.mark.usefixtures("single_thread")


def test_lora_policy_uses_its_base_model_as_reference_and_groups_k_samples(tmp_path):
    torch.manual_seed(0)
    reviews = generate_reviews(100, 0.1, 0.3, seed=0)
    tokenizer = lm.train_tokenizer([r.document for r in reviews], 400)
    base = lm.build_model(tokenizer, n_layer=1, n_head=2, n_embd=32, max_length=64).eval()
    lm.save_policy(base, tokenizer, tmp_path / "sft")
    reward = reward_model.load(tmp_path / "sft").eval()
    reward.config.reward_mean, reward.config.reward_std = 0.0, 1.0
    frozen_base = copy.deepcopy(base)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, fan_in_fan_out=True,
                                             target_modules=["c_attn"])).eval()
    prompts = [r.prompt(3) for r in reviews[:3]]

    experience = rollout.collect(policy, None, reward, tokenizer, prompts, 4, SamplingConfig(max_new_tokens=8), 1.0)

    assert experience.rollout.prompts == [p for p in prompts for _ in range(4)]
    mask = experience.mask
    with torch.no_grad():
        expected_ref = lm.response_logprobs(frozen_base, experience.rollout) * mask
        expected_policy = lm.response_logprobs(policy, experience.rollout) * mask
    torch.testing.assert_close(experience.ref_logprobs, expected_ref)
    torch.testing.assert_close(experience.logprobs, expected_policy)
    assert (experience.logprobs - experience.ref_logprobs).abs().max() > 1e-3  # the adapter changes the policy
    eos = torch.tensor(experience.rollout.ended_with_eos, dtype=torch.float)
    expected_scores = reward_model.normalised_scores(reward, experience.rollout).detach() - (1 - eos)
    torch.testing.assert_close(experience.scores, expected_scores)
