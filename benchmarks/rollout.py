"""Rollout: `components.lm.sample` against bare `model.generate` with the same settings.

Both sample `rollout_new_tokens` tokens for the same `rollout_batch` prompts at the workload's
temperature and top-p (tiny: 1 and 1; hh: 0.7 and 0.9) with the KV cache, from the same seed, so
with `generate` underneath ours they produce the same tokens; with ours' bucketed engine (hh) the
same distribution, other draws. Ours is timed end to end (tokenising the prompts, generating,
masking after EOS, decoding); the peer only `generate` on prompts tokenised beforehand. Work is
the sampled tokens: each response up to and including its EOS (what `generate` computes for a row
after its EOS, until the batch's last row stops, is waste, not work). Calls
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
        rollout = lm.sample(
            model, tok, work.prompts, sizes.rollout_new_tokens, sizes.rollout_temperature, sizes.rollout_top_p,
            **workload.ours_options(sizes, "sample"),
        )
        return int(rollout.response_mask.sum())

    @torch.no_grad()
    def peer() -> int:
        output = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=True,
            temperature=sizes.rollout_temperature,
            top_p=sizes.rollout_top_p,
            top_k=0,
            max_new_tokens=sizes.rollout_new_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        is_eos = output[:, prompt_ids.shape[1] :] == tok.eos_token_id
        # a row's tokens up to its first EOS (included): exclusive cumsum of is_eos is 0 there
        return int(((is_eos.cumsum(1) - is_eos.long()) == 0).sum())

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


def compare(name: str, sizes, repeats: int) -> list[dict]:
    rates = measure.in_fresh_process(_rates, sizes, 2 * repeats + 1)
    ours, peer = measure.median_pair(list(zip(rates["ours"], rates["peer"])))
    return [measure.row(f"{name}_throughput", ours, peer, UNIT)]
