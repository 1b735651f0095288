"""NLPO: Natural Language Policy Optimization (Ramamurthy et al. 2022, "Is Reinforcement Learning
(Not) for Natural Language Processing?", RL4LMs, arXiv 2210.01241, Algorithm 1).

PPO (components/rl/ppo.py) whose action space is pruned at every step to the top-p nucleus of a
mask policy pi_mask, a copy of the policy refreshed every `mask_update_every` iterations:

    M(s) = the fewest most probable tokens of pi_mask(. | s) whose probability exceeds top_mask,
           plus EOS
    pi_masked(a | s) = pi_theta(a | s) 1[a in M(s)] / sum_{a' in M(s)} pi_theta(a' | s)

The policy samples from pi_masked, and the clipped ratio is pi_masked / pi_masked_old on the masks
recorded at sampling time; the per-token KL penalty stays log pi_theta - log pi_ref, unmasked.
The stale mask policy keeps the sampler among tokens that a recent policy found likely, which the
paper finds to reduce the variance of the updates in the very large action space of a vocabulary.

Reference code (github.com/allenai/RL4LMs):
- rl4lms/algorithms/common/maskable/logits_processor.py, `MaskLogitsProcessorCasualLM` with
  `mask_type="learned_top_p"`: the mask model's next-token logits, sorted; a token is removed
  where the cumulative probability before it exceeds `top_mask`, at least `min_tokens_to_keep`
  kept, the special tokens always allowed; the policy's logits outside set to -inf in `generate`;
- rl4lms/envs/text_generation/policy/causal_policy.py, `MaskedCausalLMActorCriticPolicy`: the mask
  model is a deepcopy of the policy (`_build_model_heads`, `update_mask_model`); the action masks
  recorded during generation are applied to the distribution of `evaluate_actions` (the ratio);
- rl4lms/envs/text_generation/alg_wrappers.py: `kl_div = raw_log_probs - ref_log_probs`;
- rl4lms/algorithms/nlpo/nlpo.py, `NLPO.learn`: `update_mask_model()` every
  `target_update_iterations` iterations.

Here the mask policy keeps its own KV cache during generation (RL4LMs runs it on the whole
sequence at every step), and it is refreshed once the update of every `mask_update_every`-th
iteration is done (RL4LMs between that iteration's rollout and its update). It is checkpointed
with the policy, so that a killed run resumes with the same mask.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from transformers import LogitsProcessor

from components.models import lm
from components.rl import ppo
from components.rl.base import RLInputs


class NLPOConfig(ppo.PPOConfig):
    """NLPO (Ramamurthy et al. 2022): PPO sampling from the top-p nucleus of a periodically
    updated copy of the policy; every PPO setting, plus the mask's."""

    top_mask: float = Field(
        0.9, gt=0, le=1, description="p of the mask: the policy samples in the mask policy's top-p nucleus (paper 0.9)"
    )
    mask_update_every: int = Field(
        5, ge=1, description="iterations between copies of the policy into the mask policy (RL4LMs' "
        "target_update_iterations; 5 in its GPT-2 IMDB configuration)",
    )
    min_tokens_to_keep: int = Field(
        1, ge=1, description="tokens the mask keeps at least (RL4LMs' GPT-2 configurations keep 100 of 50257)"
    )


def top_p_mask(logits: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """The nucleus of each row's distribution softmax(logits) (Holtzman et al. 2020), as RL4LMs'
    learned_top_p mask computes it: with the tokens sorted by probability, token a is kept when
    the probability of the tokens before it is at most p,

        keep(a) = sum_{a' ranked before a} pi(a') <= p,

    so the kept tokens are the fewest whose probability exceeds p; the `min_tokens_to_keep` most
    probable are kept in any case. Returns a boolean mask of the shape of `logits`.
    """
    sorted_logits, order = torch.sort(logits.float(), dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
    keep = before <= top_p
    keep[..., :min_tokens_to_keep] = True
    return torch.zeros_like(keep).scatter(-1, order, keep)


class MaskPolicy(LogitsProcessor):
    """NLPO's mask (a `ppo.PolicyMask`): the top-p nucleus of a mask policy, a frozen copy of the
    policy refreshed every `update_every` iterations, plus EOS, which the mask never removes so the
    policy can always stop (RL4LMs keeps every special token allowed).

    As the LogitsProcessor of `generate` (`processor` starts a generation), it runs the mask policy
    on the tokens so far with its own KV cache, sets the policy's logits outside the nucleus to
    -inf, and records each step's mask for `applied`.
    """

    def __init__(self, policy, top_p: float, min_tokens_to_keep: int, update_every: int, eos_token_id: int):
        self.mask_policy = copy.deepcopy(policy).eval().requires_grad_(False)
        self.models = {"mask_policy": self.mask_policy}
        self.top_p, self.min_tokens_to_keep, self.update_every = top_p, min_tokens_to_keep, update_every
        self.eos_token_id = eos_token_id
        self.attention_mask, self.cache, self.steps = None, None, []

    def allowed(self, logits: torch.Tensor) -> torch.Tensor:
        """The tokens the policy may sample, given the mask policy's next-token logits."""
        allowed = top_p_mask(logits, self.top_p, self.min_tokens_to_keep)
        allowed[..., self.eos_token_id] = True
        return allowed

    def processor(self, prompt_mask: torch.Tensor) -> "MaskPolicy":
        self.attention_mask, self.cache, self.steps = prompt_mask, None, []
        return self

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.cache is None:  # the first step reads the prompts
            new, self.attention_mask = input_ids, self.attention_mask.to(input_ids.device)
        else:  # later steps read the one token sampled since, the rest is in the cache
            new = input_ids[:, -1:]
            self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(new), 1)], dim=1)
        output = self.mask_policy(
            input_ids=new, attention_mask=self.attention_mask, past_key_values=self.cache, use_cache=True,
            position_ids=lm.position_ids(self.attention_mask)[:, -new.shape[1] :],
        )
        self.cache = output.past_key_values
        allowed = self.allowed(output.logits[:, -1])
        self.steps.append(allowed.cpu())
        return scores.masked_fill(~allowed, -float("inf"))

    def applied(self) -> torch.Tensor:
        self.cache = None  # only a generation needs it
        return torch.stack(self.steps, dim=1)

    def after_iteration(self, iterations: int, policy) -> None:
        if iterations % self.update_every == 0:
            self.mask_policy.load_state_dict(policy.state_dict())


def train(run: RLInputs) -> tuple[torch.nn.Module, dict]:
    """Run `cfg.steps` NLPO iterations: PPO's (`ppo.train`, with its critic, checkpoints and
    resume) with the mask policy's top-p mask on the tokens the policy samples."""
    cfg: NLPOConfig = run.config
    eos = run.tokenizer.eos_token_id
    return ppo.train(run, MaskPolicy(run.policy, cfg.top_mask, cfg.min_tokens_to_keep, cfg.mask_update_every, eos))
