"""LoRA adapters (Hu et al. 2021) through peft, for every trainer and RL method.

Only the adapters train; the reference policy is the same weights with the adapters switched
off (`with policy.disable_adapter():`), so one copy of the model is in memory. The trained policy
is saved with the adapters merged in: an ordinary causal LM again.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D


def add_lora(model, settings, seed: int):
    """Wrap `model` in adapters of rank `settings.lora_r` (B = 0 at first: the wrapped model is the
    initial policy); `seed` fixes the A matrices' initial weights.

    GPT-2's attention and MLP are transformers' Conv1D, whose weight is stored (in, out): peft needs
    fan_in_fan_out=True for them. peft's default targets are c_attn for GPT-2, q_proj and v_proj
    for Llama.
    """
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_target_modules,
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def merged(model):
    """The policy to save: adapters merged into the weights (a model without adapters as it is)."""
    if isinstance(model, PeftModel):
        # peft froze the base weights; the merged model is an ordinary causal LM again
        return model.merge_and_unload().requires_grad_(True)
    return model
