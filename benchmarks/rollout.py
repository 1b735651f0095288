"""Rollout: `components.lm.sample` against bare `model.generate` with the same settings.

Both sample `rollout_new_tokens` tokens for the same `rollout_batch` prompts at temperature 1
with the KV cache, from the same seed, so they produce the same tokens. Ours is timed end to end
(tokenising the prompts, generating, masking after EOS, decoding); the peer only `generate` on
prompts tokenised beforehand. Work is the generated positions, batch x new tokens. Calls
alternate in one process (ours, peer, peer, ours, ...), after one warm-up call each; of the pairs
of calls made together, the one with the median ratio is reported.
"""

from __future__ import annotations

import time

import torch

from benchmarks import measure, workload
from benchmarks.workload import SEED
from components.models import lm

UNIT = "tokens/s"
TEMPERATURE = 1.0


def _rates(sizes, calls: int) -> dict[str, list[float]]:
    workload.use_threads(sizes)
    work = workload.build(sizes)
    model = workload.causal_lm(work).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    tok = work.tokenizer
    prompt_ids, prompt_mask = lm.encode_prompts(tok, work.prompts)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

    def ours() -> int:
        rollout = lm.sample(model, tok, work.prompts, sizes.rollout_new_tokens, TEMPERATURE)
        return rollout.response_ids.numel()

    @torch.no_grad()
    def peer() -> int:
        output = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            temperature=TEMPERATURE,
            top_p=1.0,
            top_k=0,
            max_new_tokens=sizes.rollout_new_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        return output[:, prompt_ids.shape[1] :].numel()

    rates: dict[str, list[float]] = {"ours": [], "peer": []}
    for i in range(calls + 1):
        for name, call in (("ours", ours), ("peer", peer)) if i % 2 == 0 else (("peer", peer), ("ours", ours)):
            torch.manual_seed(SEED + i)
            start = time.perf_counter()
            tokens = call()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i > 0:  # the first call of each warms up
                rates[name].append(tokens / (time.perf_counter() - start))
    return rates


def compare(sizes, repeats: int) -> list[dict]:
    rates = measure.in_fresh_process(_rates, sizes, 2 * repeats + 1)
    ours, peer = measure.median_pair(list(zip(rates["ours"], rates["peer"])))
    return [measure.row("rollout_throughput", ours, peer, UNIT)]
