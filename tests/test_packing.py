"""Prefix sharing (components/models/packing.py): the packed layout and mask by hand, and on a tiny
GPT-2 and a tiny Llama, with sdpa and eager attention, each response's logits, log-probs and their
parameter gradients equal those of its own [prompt | response] row."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from components.models import lm, packing

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB, PAD = 64, 0


def test_pack_pairs_layout_and_mask():
    batch = packing.pack_pairs([[1, 2, 3], [9]], [[4, 5, 6], [10]], [[7, 8], [11, 12, 13]], PAD)
    P, C, R, _ = packing.PROMPT, packing.CHOSEN, packing.REJECTED, packing.PADDING
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, PAD, PAD, PAD]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4], [0, 1, 1, 2, 3, 0, 0, 0]]
    assert batch.segments.tolist() == [[P, P, P, C, C, C, R, R], [P, C, R, R, R, _, _, _]]
    # responses as [chosen; rejected], right-padded
    assert batch.response_ids.tolist() == [[4, 5, 6], [10, PAD, PAD], [7, 8, PAD], [11, 12, 13]]
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # a rejected response's first token is predicted by the prompt's last token, not by the chosen's last
    assert batch.predictors.tolist() == [[2, 3, 4], [0, 0, 0], [2, 6, 0], [0, 2, 3]]
    assert batch.last.tolist() == [5, 1, 7, 4]
    assert batch.pair_rows.tolist() == [0, 1, 0, 1]

    allowed = packing.attention_mask(batch.segments, "sdpa", torch.float32)
    assert allowed.shape == (2, 1, 8, 8) and allowed.dtype == torch.bool
    drawn = [["".join("x" if a else "." for a in row) for row in allowed[i, 0].tolist()] for i in range(2)]
    assert drawn[0] == [
        "x.......",
        "xx......",
        "xxx.....",
        "xxxx....",
        "xxxxx...",
        "xxxxxx..",
        "xxx...x.",
        "xxx...xx",
    ]
    # padding attends to the prompt and earlier padding: no row is empty, no real token sees it
    assert drawn[1] == [
        "x.......",
        "xx......",
        "x.x.....",
        "x.xx....",
        "x.xxx...",
        "x....x..",
        "x....xx.",
        "x....xxx",
    ]
    additive = packing.attention_mask(batch.segments, "eager", torch.float32)
    assert torch.equal(additive == 0, allowed) and (additive[~allowed] == torch.finfo(torch.float32).min).all()
    with pytest.raises(ValueError, match="prefix_sharing"):
        packing.attention_mask(batch.segments, "flash_attention_2", torch.float32)


def test_split_common_prefix_keeps_a_token_in_each_rest():
    assert packing.split_common_prefix([1, 2, 3, 4], [1, 2, 5]) == ([1, 2], [3, 4], [5])
    assert packing.split_common_prefix([1, 2], [1, 2, 3]) == ([1], [2], [2, 3])
    assert packing.split_common_prefix([1, 2], [1, 2]) == ([1], [2], [2])
    assert packing.split_common_prefix([1], [2]) == ([], [1], [2])


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_layer=2, n_head=2, n_embd=32))


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    ))


def padded(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids, mask = torch.full((len(rows), width), PAD), torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return ids, mask


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_responses_see_what_their_own_rows_see(build, attention):
    torch.manual_seed(0)
    model = build().eval()
    model.set_attn_implementation(attention)
    # prompts and responses of different lengths (padding on both layouts); pair 2's responses share a first token
    generator = torch.Generator().manual_seed(1)

    def tokens(n):
        return torch.randint(1, VOCAB, (n,), generator=generator).tolist()

    prompts, chosen = [tokens(5), tokens(1), tokens(9)], [tokens(3), tokens(7), tokens(2)]
    rejected = [tokens(6), tokens(1), chosen[2][:1] + tokens(3)]
    batch = packing.pack_pairs(prompts, chosen, rejected, PAD)

    # the unshared rows: [prompt | response] in lm's Rollout layout, [chosen; rejected]
    prompt_ids, prompt_mask = padded(prompts * 2, "left")
    response_ids, response_mask = padded(chosen + rejected, "right")
    rollout = lm.Rollout([""] * 6, prompt_ids, prompt_mask, response_ids, response_mask, [""] * 6, [True] * 6)
    assert torch.equal(response_ids, batch.response_ids) and torch.equal(response_mask, batch.response_mask)

    with torch.no_grad():
        expected = lm.response_logits(model, rollout)
        hidden = packing.hidden_states(model, batch)
        logits = model.get_output_embeddings()(hidden[batch.pair_rows.unsqueeze(1), batch.predictors])
    mask = response_mask.bool()
    torch.testing.assert_close(logits[mask], expected[mask], atol=1e-5, rtol=0)

    # the log-probs and every parameter's gradient of a weighted sum of them
    weights = torch.randn(response_mask.shape, generator=generator) * response_mask
    results = {}
    for name, logprobs_of in (("packed", lambda: packing.response_logprobs(model, batch)),
                              ("unshared", lambda: lm.response_logprobs(model, rollout) * response_mask)):
        model.zero_grad()
        logprobs = logprobs_of()
        (logprobs * weights).sum().backward()
        results[name] = logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (logprobs, packed_grads), (expected_logprobs, expected_grads) = results["packed"], results["unshared"]
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=0)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=0, msg=name)
