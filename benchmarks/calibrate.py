"""How fast this machine is right now, to put beside a timing taken on it (the demo's, a stage's):

    python -m benchmarks.calibrate

One float32 training step of the demo's model (GPT-2 as `base` builds it, no dropout) on 32 rows
of 64 random tokens: forward, backward, AdamW. Prints the median of 20 steps after 5 warm-up
steps, in ms. The project's 2-core machines gave 156-234 ms on a quiet evening (benchmarks/README.md,
"The demo's speed"); compare timings taken at similar figures.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from components.sections import BaseModelConfig


def step_ms(rows: int = 32, tokens: int = 64, warmup: int = 5, steps: int = 20) -> float:
    base = BaseModelConfig()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=base.vocab_size, n_positions=base.max_length, n_layer=base.n_layer, n_head=base.n_head,
        n_embd=base.n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_pytorch_tanh",
        bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, base.vocab_size, (rows, tokens))
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        logits = model(input_ids=ids).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[warmup:])


if __name__ == "__main__":
    print(f"calibration step: {step_ms():.0f} ms ({torch.get_num_threads()} threads)")
