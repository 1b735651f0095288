"""Prefix sharing for preference pairs: the prompt once, then both responses, in one row.

A pair's two responses share their prompt. Scored as two rows [prompt | chosen] and [prompt |
rejected], the prompt goes through the model twice; prefix sharing (Wang and Hegde 2024,
"Accelerating Direct Preference Optimization with Prefix Sharing", arXiv 2410.20305, who report
1.1-1.5x DPO training throughput) puts it in one row with both responses, right-padded:

    tokens     p0 p1 p2 | c0 c1 c2 | r0 r1 | pad
    positions   0  1  2 |  3  4  5 |  3  4 |  0
    segment     P  P  P |  C  C  C |  R  R |  -

and an attention mask in which a token sees the earlier tokens of its own segment and the prompt
(x: attends):

          p0 p1 p2 c0 c1 c2 r0 r1
      p0   x
      p1   x  x
      p2   x  x  x
      c0   x  x  x  x
      c1   x  x  x  x  x
      c2   x  x  x  x  x  x
      r0   x  x  x           x
      r1   x  x  x           x  x

The rejected response restarts at position len(prompt): each response sees the same tokens at
the same positions as in its own row, so its hidden states, logits and scores are those of the
unshared rows (up to float rounding), while the prompt is computed once. Padding attends to the
prompt and earlier padding (never an empty row, which would give NaN); no real token attends to it.

Padding-free (`padding_free`): pairs of clearly different lengths leave those rows mostly
padding, which every layer computes. Sequence packing without cross-contamination (Krell et al.
2021, arXiv 2107.02027; "padding-free" in TRL), which Wang and Hegde combine with prefix sharing
for 1.3-1.6x, puts the batch's B pairs one after another in ONE row, [p0 c0 r0 p1 c1 r1 ...],
each pair's positions restarting at 0, and the mask gains one rule: a token attends only within
its own pair (block-diagonal, each block the pair's mask above; no padding at all). The token-wise
layers then compute no padding; the attention, given a dense mask, still computes the row's
L x L scores, L the sum of the pairs' lengths (their block-sparse kernel skips the empty blocks).

The mask goes to the model as a 4-D (rows, 1, L, L) tensor, which transformers passes to the
attention as it is: boolean (True: attend) for "sdpa", additive (0 or the dtype's minimum) for
"eager". Flash attention takes no such mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from components.models import lm
from components.models.training import unwrap

PROMPT, CHOSEN, REJECTED, PADDING = range(4)


@dataclass
class PackedPairs:
    """B pairs packed one per row, or all in one row (see the module docstring), and where their 2B
    responses lie.

    Responses are listed as the Rollout layout lists its rows, [chosen; rejected]: response j
    belongs to pair j mod B, and `response_ids` / `response_mask` are right-padded as there.
    """

    input_ids: torch.Tensor  # (rows, L), right-padded; rows = B, or 1 padding-free
    position_ids: torch.Tensor  # (rows, L)
    segments: torch.Tensor  # (rows, L): PROMPT, CHOSEN, REJECTED or PADDING
    pair_index: torch.Tensor  # (rows, L): the pair of each token (a row's padding: the row's pair)
    response_ids: torch.Tensor  # (2B, R)
    response_mask: torch.Tensor  # (2B, R)
    pair_rows: torch.Tensor  # (2B,): the packed row of each response
    predictors: torch.Tensor  # (2B, R): index in its row of the token whose logits predict each response token
    last: torch.Tensor  # (2B,): index in its row of each response's last token


def pack_pairs(
    prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], pad_token_id: int,
    padding_free: bool = False,
) -> PackedPairs:
    """Token ids of B pairs (responses non-empty) packed as [prompt | chosen | rejected | pad], one
    pair per row, or with `padding_free` all in one row with no padding."""
    n = len(prompts)
    lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)]
    if padding_free:
        rows, offsets, width = [0] * n, [sum(lengths[:i]) for i in range(n)], sum(lengths)
    else:
        rows, offsets, width = list(range(n)), [0] * n, max(lengths)
    n_rows = rows[-1] + 1
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segments = torch.full((n_rows, width), PADDING, dtype=torch.long)
    pair_index = torch.arange(n_rows).unsqueeze(1).repeat(1, width)
    response_width = max(len(r) for r in chosen + rejected)
    response_ids = torch.full((2 * n, response_width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((2 * n, response_width), dtype=torch.long)
    predictors = torch.zeros((2 * n, response_width), dtype=torch.long)
    last = torch.zeros(2 * n, dtype=torch.long)
    for i, (prompt, chosen_ids, rejected_ids) in enumerate(zip(prompts, chosen, rejected)):
        row, span = rows[i], slice(offsets[i], offsets[i] + lengths[i])
        input_ids[row, span] = torch.tensor(prompt + chosen_ids + rejected_ids)
        segments[row, span] = torch.tensor(
            [PROMPT] * len(prompt) + [CHOSEN] * len(chosen_ids) + [REJECTED] * len(rejected_ids)
        )
        pair_index[row, span] = i
        # both responses continue the prompt: the rejected one's positions restart after it
        position_ids[row, span] = torch.tensor(
            list(range(len(prompt) + len(chosen_ids))) + list(range(len(prompt), len(prompt) + len(rejected_ids)))
        )
        prompt_end = offsets[i] + len(prompt)
        for j, response, start in ((i, chosen_ids, prompt_end), (n + i, rejected_ids, prompt_end + len(chosen_ids))):
            response_ids[j, : len(response)] = torch.tensor(response)
            response_mask[j, : len(response)] = 1
            # a response's first token is predicted by the prompt's last (-1 for an empty prompt:
            # nothing predicts it), the others by their predecessor in the row
            first = prompt_end - 1 if prompt else -1
            predictors[j, : len(response)] = torch.tensor([first, *range(start, start + len(response) - 1)])
            last[j] = start + len(response) - 1
    pair_rows = torch.tensor(rows).repeat(2)
    return PackedPairs(
        input_ids, position_ids, segments, pair_index, response_ids, response_mask, pair_rows, predictors, last
    )


def split_common_prefix(first: list[int], second: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(prefix, first's rest, second's rest) with the longest common prefix of two token rows, each
    rest keeping at least one token (the one a reward head reads)."""
    longest = min(len(first), len(second)) - 1
    shared = next((k for k in range(longest) if first[k] != second[k]), longest)
    return first[:shared], first[shared:], second[shared:]


def attention_mask(
    segments: torch.Tensor, pair_index: torch.Tensor, implementation: str, dtype: torch.dtype
) -> torch.Tensor:
    """The (rows, 1, L, L) mask of the module docstring, as the attention `implementation` takes it:
    boolean for sdpa, additive in `dtype` for eager. `pair_index` keeps each token within its pair
    (in the one-pair-per-row layout it is constant along a row, and changes nothing)."""
    width = segments.shape[1]
    query, key = segments.unsqueeze(2), segments.unsqueeze(1)
    same_pair = pair_index.unsqueeze(2) == pair_index.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    allowed = (causal & same_pair & ((key == query) | (key == PROMPT))).unsqueeze(1)
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        additive = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(
        f"prefix sharing needs the sdpa or eager attention (a 4-D mask), not {implementation!r}: "
        "switch prefix_sharing off"
    )


def hidden_states(model, batch: PackedPairs, **kwargs) -> torch.Tensor:
    """The final hidden states (rows, L, H) of the packed rows (after the final norm: what the heads
    read); `kwargs` go to the model (e.g. `logits_to_keep`)."""
    inner = unwrap(model)
    parameter = next(inner.parameters())
    mask = attention_mask(
        batch.segments.to(parameter.device), batch.pair_index.to(parameter.device),
        inner.config._attn_implementation, parameter.dtype,
    )
    output = model(
        input_ids=batch.input_ids.to(parameter.device),
        attention_mask=mask,
        position_ids=batch.position_ids.to(parameter.device),
        output_hidden_states=True,
        **kwargs,
    )
    return output.hidden_states[-1]


def response_logprobs(model, batch: PackedPairs) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of each response token of a causal LM, (2B, R) laid out as
    `batch.response_ids`, 0 at padding. The LM head runs on the response tokens' predictors only,
    in chunks (`lm.head_logprobs`): no logits for the prompts or padding, nor all at once."""
    # an empty logits_to_keep: the model's own head computes nothing, ours runs where it is needed
    hidden = hidden_states(model, batch, logits_to_keep=torch.zeros(0, dtype=torch.long))
    mask = batch.response_mask.bool()
    rows = batch.pair_rows.unsqueeze(1).expand_as(mask)[mask]
    predicting = hidden[rows.to(hidden.device), batch.predictors[mask].to(hidden.device)]
    logprobs = lm.head_logprobs(predicting, unwrap(model).get_output_embeddings(), batch.response_ids[mask])
    return torch.zeros(mask.shape, device=hidden.device).masked_scatter(mask.to(hidden.device), logprobs)
