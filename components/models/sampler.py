"""A rollout engine: the sampling distribution of `model.generate` (do_sample, temperature, top-p,
top_k 0, KV cache) with less wasted work, behind `lm.sample(..., engine="bucketed")`.

- Prompts bucketed by length: sorted by their token count and generated in sub-batches of
  `bucket_size` rows, so the left padding a sub-batch carries through the prefill and through
  every decoding step's attention over the KV cache is small.
- Finished rows dropped: a row that samples EOS leaves the batch, and the KV cache keeps only the
  rows still generating (`Cache.batch_select_indices`); `generate` computes every row until the
  last one stops.

Each step samples as `generate` does: the last position's logits in float32, divided by the
temperature, cut to the top-p nucleus by transformers' TopPLogitsWarper, then softmax and
torch.multinomial. The distribution is the same, the draws are not: the random stream is consumed
by other batches than `generate`'s.
"""

from __future__ import annotations

import torch
from transformers import TopPLogitsWarper

from components.models import lm

# Rows generated together. Small enough that sorted prompts of mixed lengths share little padding,
# large enough that a CPU's matmuls are compute-bound; on an accelerator where a step's cost is
# its kernel launches, larger buckets (up to the whole batch) pay.
BUCKET_SIZE = 8


def warp(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """`generate`'s processing of next-token logits: divided by the temperature, then cut to the
    top-p nucleus (Holtzman et al. 2020) by transformers' own TopPLogitsWarper."""
    scores = logits / temperature  # generate skips this at temperature 1, where it is exact anyway
    return TopPLogitsWarper(top_p)(None, scores) if top_p < 1.0 else scores


def draw(scores: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(scores), as `generate` draws it."""
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)


@torch.no_grad()
def generate(
    model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int, temperature: float,
    top_p: float, eos_token_id: int, pad_token_id: int, bucket_size: int = BUCKET_SIZE,
) -> torch.Tensor:
    """Response ids (B, R) on the CPU for left-padded prompts, in the prompts' order: each row's
    sampled tokens up to and including its first EOS, then `pad_token_id`; R is the longest
    response (at most `max_new_tokens`), as in `generate`'s output after the prompt."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    lengths = prompt_mask.sum(dim=1)
    responses = torch.full((len(prompt_ids), max_new_tokens), pad_token_id, device=device)
    width = 0
    for rows in lengths.argsort(stable=True).split(bucket_size):
        longest = int(lengths[rows].max())  # the bucket's columns: the prompts' left padding beyond it is cut
        steps = _decode(
            model, prompt_ids[rows, -longest:], prompt_mask[rows, -longest:], rows, responses, temperature, top_p,
            eos_token_id,
        )
        width = max(width, steps)
    return responses[:, :width].cpu()


def _decode(
    model, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, responses: torch.Tensor, temperature: float,
    top_p: float, eos_token_id: int,
) -> int:
    """Sample one bucket's responses into `responses[rows]`, dropping each row from the batch once
    it samples EOS; returns the number of steps taken (the bucket's longest response)."""
    max_new_tokens = responses.shape[1]
    # the attention mask of the whole generation, built once: the prompt's, then every new token
    attention = torch.cat([mask, mask.new_ones(len(mask), max_new_tokens)], dim=1)
    positions = lm.position_ids(mask)  # real tokens only, as lm.forward counts them
    output = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, position = output.past_key_values, positions[:, -1:] + 1
    for step in range(max_new_tokens):
        tokens = draw(warp(output.logits[:, -1].float(), temperature, top_p))
        responses[rows, step] = tokens
        running = tokens != eos_token_id
        n_running = int(running.sum())  # the one host sync a step, as generate's stopping check
        if n_running == 0 or step + 1 == max_new_tokens:
            return step + 1
        if n_running < len(rows):
            keep = running.nonzero().squeeze(1)
            rows, tokens, position, attention = rows[keep], tokens[keep], position[keep], attention[keep]
            cache.batch_select_indices(keep)
        output = model(
            input_ids=tokens.unsqueeze(1), attention_mask=attention[:, : mask.shape[1] + step + 1],
            position_ids=position, past_key_values=cache, use_cache=True,
        )
        position = position + 1
    return max_new_tokens
