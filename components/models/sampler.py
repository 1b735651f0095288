"""A rollout engine: the sampling distribution of `model.generate` (do_sample, temperature, top-p,
top_k 0, KV cache) with less wasted work, behind `lm.sample(..., engine="bucketed")`. On a CPU,
for SmolLM2 continuing HH-RLHF conversations (benchmarks/README.md), a `generate` call spends
about a third of its time in the prefill of left-padded prompts, a sixth sorting and sampling
the whole vocabulary at every step, and a sixth copying its growing KV cache; this engine cuts
all three.

- Prefill in length buckets: prompts sorted by token count run the prefill `bucket_size` rows
  at a time, each bucket cut to its longest prompt, so little padding goes through the model;
  their keys and values are then left-padded to one width in one cache, and every row decodes
  together (a decoding step costs about the same for 16 rows as for 8: reading the weights).
- A preallocated KV cache (transformers' StaticCache): each step writes its keys and values in
  place, where `generate`'s DynamicCache concatenates, copying the whole cache at every step.
- Finished rows dropped: a row that samples EOS leaves the batch and the cache; `generate`
  computes every row until the last one stops.
- The nucleus from `topk` rather than a sort of the vocabulary, and the draw among its tokens.
- The draw by inverting the cumulative distribution with one uniform number a row, where
  torch.multinomial draws an exponential number for every token of the vocabulary (29% of a
  sampling call of the demo's model, 64 rows and 2,048 tokens).

Each step samples as `generate` does: the last position's logits in float32, divided by the
temperature, cut to the top-p nucleus (the smallest set of most probable tokens whose probability
reaches top_p, as transformers' TopPLogitsWarper keeps it), then softmax and a draw from it.
The distribution is the same, the draws are not: the random stream is consumed otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import StaticCache

from components.models import lm

# Rows prefilled together: sorted prompts of mixed lengths share little padding in small buckets,
# and a prefill of a few hundred tokens a row keeps a CPU's matmuls compute-bound at any size.
BUCKET_SIZE = 4
# Tokens first searched for the nucleus; rows whose nucleus is wider search again with 8x more.
NUCLEUS_SEARCH = 64


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens `generate` samples among: (scores, token ids), both (B, k), the scores divided
    by the temperature and -inf outside the top-p nucleus (Holtzman et al. 2020); ids None where
    top_p is 1 (the whole vocabulary, scores (B, V)).

    TopPLogitsWarper sorts the vocabulary ascending and removes the tokens whose cumulative
    probability is at most 1 - top_p: in descending order, it keeps a token while the probability
    of the tokens before it is below top_p (the first always). That set lies within the k most
    probable tokens when those hold top_p together, so only the top k are needed."""
    scores = logits / temperature  # generate skips this at temperature 1, where it is exact anyway
    if top_p >= 1.0:
        return scores, None
    log_total = scores.logsumexp(dim=-1, keepdim=True)
    k = min(NUCLEUS_SEARCH, scores.shape[-1])
    while True:
        top, ids = scores.topk(k, dim=-1)
        cumulative = (top - log_total).exp().cumsum(dim=-1)
        if k == scores.shape[-1] or bool((cumulative[:, -1] >= top_p).all()):
            break
        k = min(8 * k, scores.shape[-1])
    before = F.pad(cumulative[:, :-1], (1, 0))  # probability of the tokens ranked before each
    return top.masked_fill(before >= top_p, float("-inf")), ids


def draw(scores: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """One token per row from softmax(scores) over `ids` (the vocabulary where None): the first
    token whose cumulative probability exceeds u ~ U[0, total), total the row's summed probability
    (1 up to rounding). A token of probability 0 spans an empty interval. u is kept below the total
    (U[0, 1) times it can round up to it), which the last token of positive probability reaches."""
    probs = scores.softmax(dim=-1)
    cumulative = probs.cumsum(dim=-1)
    total = cumulative[:, -1:]
    u = torch.minimum(torch.rand(len(probs), 1, device=probs.device) * total, total.nextafter(total.new_zeros(())))
    picked = torch.searchsorted(cumulative, u, right=True)
    return (picked if ids is None else ids.gather(1, picked)).squeeze(1)


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
    rows, logits, cache = _prefill(model, prompt_ids, prompt_mask, bucket_size, max_new_tokens)
    mask = prompt_mask[rows]
    # the attention mask of the whole generation, built once: the prompt's, then every new token
    # (the cache's positions not written yet are after the query's, out of its causal reach)
    attention = torch.cat([mask, mask.new_ones(len(mask), max_new_tokens)], dim=1)
    position = lm.position_ids(mask)[:, -1:] + 1  # real tokens only, as lm.forward counts them
    responses = torch.full((len(prompt_ids), max_new_tokens), pad_token_id, device=device)
    for step in range(max_new_tokens):
        tokens = draw(*nucleus(logits.float(), temperature, top_p))
        responses[rows, step] = tokens
        running = tokens != eos_token_id
        n_running = int(running.sum())  # the one host sync a step, as generate's stopping check
        if n_running == 0 or step + 1 == max_new_tokens:
            return responses[:, : step + 1].cpu()
        if n_running < len(rows):
            keep = running.nonzero().squeeze(1)
            rows, tokens, position, attention = rows[keep], tokens[keep], position[keep], attention[keep]
            for layer in cache.layers:  # StaticLayer has no batch_select_indices
                layer.keys, layer.values = layer.keys[keep], layer.values[keep]
        logits = model(
            input_ids=tokens.unsqueeze(1), attention_mask=attention,
            position_ids=position, past_key_values=cache, use_cache=True,
        ).logits[:, -1]
        position = position + 1
    return responses.cpu()  # max_new_tokens 0


def _prefill(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, bucket_size: int, max_new_tokens: int):
    """The prompts' prefill in length buckets: (rows, last logits, KV cache), the rows in sorted
    order (`rows` maps each to its prompt); the cache holds the prompts left-padded to the widest
    and room for `max_new_tokens` more."""
    width = prompt_mask.shape[1]
    lengths = prompt_mask.sum(dim=1)
    order = lengths.argsort(stable=True)
    logits, layers = [], []
    for rows in order.split(bucket_size):
        longest = int(lengths[rows].max())  # the bucket's columns: the prompts' left padding beyond it is cut
        ids, mask = prompt_ids[rows, -longest:], prompt_mask[rows, -longest:]
        output = model(
            input_ids=ids, attention_mask=mask, position_ids=lm.position_ids(mask), use_cache=True, logits_to_keep=1
        )
        logits.append(output.logits[:, -1])
        # keys and values (rows, heads, longest, head dim) padded on the left to the prompts' width
        layers.append([
            tuple(F.pad(state, (0, 0, width - longest, 0)) for state in (layer.keys, layer.values))
            for layer in output.past_key_values.layers
        ])
    cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
    for index, per_bucket in enumerate(zip(*layers)):
        cache.update(*(torch.cat(states) for states in zip(*per_bucket)), index)
    return order, torch.cat(logits), cache
