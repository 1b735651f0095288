"""The rollout engine: K samples per prompt grouped by prompt, log-probs that score the sampled
tokens, scores from any reward source (a reward model or a function), and with a LoRA policy the
reference is the base model (adapter disabled)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from components.models import lm
from components.rewards import FunctionReward
from components.rl import rollout
from components.sections import SamplingConfig
from components.trainers import reward_model

SAMPLING = SamplingConfig(max_new_tokens=8)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_lora_policy_uses_its_base_model_as_reference_and_groups_k_samples(
    tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts
):
    base = tiny_policy()
    frozen_base = copy.deepcopy(base)
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, fan_in_fan_out=True,
                                             target_modules=["c_attn"])).eval()
    prompts = tiny_prompts[:3]

    torch.manual_seed(0)
    experience = rollout.collect(policy, None, tiny_reward, tiny_tokenizer, prompts, 4, SAMPLING, 1.0)

    assert experience.rollout.prompts == [p for p in prompts for _ in range(4)] and experience.k == 4
    mask = experience.mask
    with torch.no_grad():
        expected_ref = lm.response_logprobs(frozen_base, experience.rollout) * mask
        expected_policy = lm.response_logprobs(policy, experience.rollout) * mask
    torch.testing.assert_close(experience.ref_logprobs, expected_ref)
    torch.testing.assert_close(experience.logprobs, expected_policy)
    assert (experience.logprobs - experience.ref_logprobs).abs().max() > 1e-3  # the adapter changes the policy
    eos = torch.tensor(experience.rollout.ended_with_eos, dtype=torch.float)
    # the reward source's normalised score: the reward model's head on the rollout's own tokens
    # (its config's reward_mean 0 and reward_std 1 leave it as it is), minus the missing-EOS penalty
    raw = reward_model.scores(tiny_reward.model, experience.rollout).detach()
    torch.testing.assert_close(experience.scores, raw - (1 - eos))
    assert raw.std() > 0


def test_collect_scores_with_a_function_reward(tiny_policy, tiny_tokenizer, tiny_prompts):
    policy = tiny_policy()
    reward = FunctionReward(lambda prompt, response: float(len(response)), "len")
    torch.manual_seed(1)
    experience = rollout.collect(policy, policy, reward, tiny_tokenizer, tiny_prompts[:4], 2, SAMPLING, 0.5)

    completions, eos = experience.rollout.completions, experience.rollout.ended_with_eos
    assert len(completions) == 8 and any(completions)
    expected = [len(c) - 0.5 * (not e) for c, e in zip(completions, eos)]
    assert experience.scores.tolist() == pytest.approx(expected)
    torch.testing.assert_close(experience.ref_logprobs, experience.logprobs)  # the reference is the policy
