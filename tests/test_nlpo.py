"""NLPO (Ramamurthy et al. 2022): the top-p mask worked out by hand, a masked rollout (samples
inside the mask policy's nucleus, the masks recorded as the mask policy computes them, the
renormalised log-probs), the mask policy refreshed every `mask_update_every` iterations, training
that raises the reward of the policy's samples, a crashed run that resumes exactly (mask policy
included), and the configuration that selects it."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from components.models import lm
from components.rl import METHODS, RLInputs, nlpo, ppo, rollout
from components.rl.nlpo import NLPOConfig
from components.sections import SamplingConfig
from tests.conftest import REPO
from tests.rl_checks import assert_same_checkpointed, assert_same_weights, calibrate, crash_and_resume, mean_score

SAMPLING = SamplingConfig(max_new_tokens=8, batch_size=64)

pytestmark = pytest.mark.usefixtures("single_thread")


def nlpo_run(policy, reward, tokenizer, prompts, cfg, **kwargs) -> RLInputs:
    return RLInputs(policy, copy.deepcopy(policy), reward, tokenizer, prompts, [], cfg, SAMPLING, seed=0, **kwargs)


def test_the_top_p_mask_by_hand_and_the_renormalised_distribution(tiny_policy):
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]])
    logits = probs.log()
    # row 0 sorted: 0.5, 0.3, 0.15, 0.05, the probability before each 0, 0.5, 0.8, 0.95;
    # row 1: 0, 0.25, 0.5, 0.75. A token is kept while the probability before it is at most p.
    assert nlpo.top_p_mask(logits, 0.7).tolist() == [[False, True, True, False], [True, True, True, False]]
    assert nlpo.top_p_mask(logits, 0.9).tolist() == [[False, True, True, True], [True, True, True, True]]
    assert nlpo.top_p_mask(logits, 0.3).tolist() == [[False, True, False, False], [True, True, False, False]]
    assert nlpo.top_p_mask(logits, 0.3, min_tokens_to_keep=3).tolist() == [
        [False, True, True, True], [True, True, True, False]
    ]
    assert nlpo.top_p_mask(logits, 1.0).all()

    # the policy renormalised over the allowed tokens: 0 outside, 0.5 / 0.8 and 0.3 / 0.8 inside
    allowed = nlpo.top_p_mask(logits, 0.7)
    masked = torch.softmax(rollout.masked_logits(logits, allowed), dim=-1)
    torch.testing.assert_close(masked[0], torch.tensor([0.0, 0.625, 0.375, 0.0]))
    torch.testing.assert_close(masked[1], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))
    # entropy of the masked distribution: finite, as PPO logs it
    assert math.isfinite(ppo.entropy(rollout.masked_logits(logits, allowed).unsqueeze(0), torch.ones(1, 2)))

    # EOS is never masked: the policy may always stop
    mask = nlpo.MaskPolicy(tiny_policy(), 0.3, 1, 5, eos_token_id=3)
    assert mask.allowed(logits).tolist() == [[False, True, False, True], [True, True, False, True]]


def test_a_masked_rollout_samples_inside_the_mask_policys_nucleus_with_renormalised_logprobs(
    tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts
):
    policy, other = tiny_policy(), tiny_policy()
    torch.manual_seed(0)
    with torch.no_grad():  # a mask policy that differs from the policy, and is more peaked
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    mask = nlpo.MaskPolicy(other, 0.5, 1, 5, tiny_tokenizer.eos_token_id)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.7)
    torch.manual_seed(0)
    experience = rollout.collect(
        policy, copy.deepcopy(policy), tiny_reward, tiny_tokenizer, tiny_prompts[:6], 2, sampling, 1.0, mask
    )
    batch, response = experience.rollout, experience.rollout.response_mask.bool()
    allowed = experience.allowed
    assert allowed.shape == (*batch.response_ids.shape, len(tiny_tokenizer)) and allowed.dtype == torch.bool

    # every sampled token is inside the mask, a few tokens of the vocabulary (the policy's own
    # distribution is nearly uniform: unmasked, it would sample almost anything)
    assert allowed.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)[response].all()
    assert allowed.sum(-1)[response].float().mean() < 0.1 * len(tiny_tokenizer)
    # the masks recorded while sampling (mask policy on its KV cache) are the top-p nucleus of the
    # mask policy's distribution on the whole sequence, plus EOS
    with torch.no_grad():
        expected = mask.allowed(lm.response_logits(other, batch))
    assert torch.equal(allowed[response], expected[response])
    assert allowed[~response].all()  # padding allows every token

    # log-probs: the policy's own, and those of its distribution at temperature renormalised over the mask
    with torch.no_grad():
        logits = lm.response_logits(policy, batch, 0.7)
    own = lm.logprobs_of(logits, batch.response_ids) * experience.mask
    renormalised = torch.log_softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)
    expected_masked = renormalised.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1) * experience.mask
    torch.testing.assert_close(experience.logprobs, own, rtol=0, atol=1e-5)
    torch.testing.assert_close(experience.masked_logprobs, expected_masked, rtol=0, atol=1e-5)
    torch.testing.assert_close(experience.behaviour_logprobs, experience.masked_logprobs)
    assert (experience.masked_logprobs - own)[response].min() > 0  # the mass outside the mask moved inside


def test_the_mask_policy_is_refreshed_every_mask_update_every_iterations(
    tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts, tmp_path
):
    """The checkpoint before iteration s holds the policy and the mask policy after s iterations:
    the mask policy is the policy after 0, 2, 2 and 4 of them with mask_update_every 2."""
    initial = tiny_policy()
    cfg = NLPOConfig(steps=4, batch_size=8, minibatch_size=4, ppo_epochs=1, lr=1e-2, top_mask=0.5,
                     mask_update_every=2, checkpoint_every=1)
    policies, masks, logged = {0: initial.state_dict()}, {}, []

    def record(metrics, step):
        logged.append(metrics)
        if step:
            saved = tmp_path / f"step-{step:08d}"
            policies[step] = load_file(saved / "policy.safetensors")
            masks[step] = load_file(saved / "mask_policy.safetensors")

    trained, _ = nlpo.train(nlpo_run(copy.deepcopy(initial), tiny_reward, tiny_tokenizer, tiny_prompts, cfg,
                                     log=record, checkpoint_dir=tmp_path))
    masks[4] = load_file(tmp_path / "step-00000004" / "mask_policy.safetensors")
    policies[4] = trained.state_dict()

    def same(a, b):
        return all(torch.equal(a[name], b[name]) for name in a)

    for step, refreshed_at in {1: 0, 2: 2, 3: 2, 4: 4}.items():
        assert same(masks[step], policies[refreshed_at]), step
    assert not same(policies[1], policies[0]) and not same(policies[3], policies[2])  # the policy moved in between
    vocabulary = len(tiny_tokenizer)
    assert all(0 < m["allowed_tokens"] < vocabulary for m in logged)


def test_train_raises_the_reward_of_the_policy_samples(tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts):
    # lr 3e-2 over 20 steps gained 0.13-1.36 as the calibration draw moved the reward mean by 0.005
    cfg = NLPOConfig(steps=30, batch_size=16, minibatch_size=8, ppo_epochs=2, lr=1e-2, kl_coef=0.01,
                     missing_eos_penalty=0.0, mask_update_every=2)
    assert METHODS["nlpo"].config is NLPOConfig and METHODS["nlpo"].section == "nlpo"
    policy, reward = tiny_policy(), tiny_reward
    calibrate(reward, policy, tiny_tokenizer, tiny_prompts)
    logged = []
    run = nlpo_run(policy, reward, tiny_tokenizer, tiny_prompts, cfg, log=lambda m, step: logged.append((step, m)))
    frozen = {n: p.clone() for n, p in [*run.reference.named_parameters(), *reward.model.named_parameters()]}
    # the policy as the pipeline uses it: sampled without the mask
    start = mean_score(policy, reward, tiny_tokenizer, tiny_prompts, 123)
    trained, metrics = METHODS["nlpo"].train(run)
    end = mean_score(trained, reward, tiny_tokenizer, tiny_prompts, 123)

    assert trained is policy and metrics == logged[-1][1]
    assert [step for step, _ in logged] == list(range(cfg.steps))
    assert all(math.isfinite(v) for _, m in logged for k, v in m.items() if k != "explained_variance")
    assert logged[0][1]["kl"] == 0.0  # the first rollout comes from the reference itself
    # in units of the initial policy's score std: seeds 0-2 gained 0.67-1.07 with torch.multinomial's
    # draws, seeds 0-3 0.42-0.89 with the engine's inverse-CDF draw (the calibration moves with them)
    assert end > start + 0.3
    for n, p in [*run.reference.named_parameters(), *reward.model.named_parameters()]:
        assert torch.equal(p, frozen[n]), n


def test_a_crashed_run_resumes_its_policy_critic_mask_policy_optimizer_and_rng(
    tiny_policy, tiny_reward, tiny_tokenizer, tiny_prompts, tmp_path
):
    """Checkpoints every iteration; a crash in iteration 2 of 3, then the same call again from the
    initial weights (a fresh process), ends with the weights of an uninterrupted run. The mask
    policy was refreshed after iteration 2: a resumed run with a fresh copy would sample otherwise."""
    initial = tiny_policy()
    cfg = NLPOConfig(steps=3, batch_size=8, minibatch_size=4, ppo_epochs=1, lr=1e-2, top_mask=0.5,
                     mask_update_every=2, checkpoint_every=1)

    def run(folder, log):
        return nlpo.train(RLInputs(
            copy.deepcopy(initial), copy.deepcopy(initial), tiny_reward, tiny_tokenizer, tiny_prompts, [], cfg,
            SAMPLING, seed=0, log=log, checkpoint_dir=folder,
        ))

    (uninterrupted, whole_metrics), (resumed, metrics) = crash_and_resume(run, tmp_path, crash_step=2)
    assert metrics == pytest.approx(whole_metrics, abs=1e-5)
    assert_same_weights(resumed, uninterrupted)
    assert_same_checkpointed(tmp_path, 3, ("critic", "mask_policy"))
    assert any(not torch.equal(a, b) for a, b in zip(resumed.parameters(), initial.parameters()))


def test_the_rl_stage_accepts_nlpo_and_reads_its_section_only():
    from components.config import ConfigError, load_config
    from components.pipeline.layout import stage_params

    cfg = load_config(REPO / "params.yaml", {"rl": {"algorithm": "nlpo"}, "nlpo": {"steps": 3, "top_mask": 0.5}})
    assert (cfg.nlpo.steps, cfg.nlpo.top_mask) == (3, 0.5) and cfg.ppo.steps != 3
    params = stage_params(cfg, "rl")
    assert "nlpo" in params and "ppo" not in params
    with pytest.raises(ConfigError):
        load_config(REPO / "params.yaml", {"rl": {"algorithm": "nlpo"}, "nlpo": {"batch_size": 3, "minibatch_size": 5}})
    for bad in ({"top_mask": 0.0}, {"top_mask": 1.5}, {"mask_update_every": 0}, {"min_tokens_to_keep": 0}):
        with pytest.raises(ValidationError):
            NLPOConfig(**bad)
