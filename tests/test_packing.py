"""Prefix sharing (components/models/packing.py): the packed layout and mask by hand, one pair per
row and padding-free (all pairs in one row), and on a tiny GPT-2 and a tiny Llama, with sdpa and
eager attention, each response's logits, log-probs and their parameter gradients equal those of its
own [prompt | response] row; padding-free, the reward model's and DPO's loss and gradients equal
those of the unshared rows."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from components.data.records import PreferencePair
from components.models import lm, packing
from components.sections import DPOConfig
from components.trainers import dpo, reward_model

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
    assert batch.pair_index.tolist() == [[0] * 8, [1] * 8]

    allowed = packing.attention_mask(batch.segments, batch.pair_index, "sdpa", torch.float32)
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
    additive = packing.attention_mask(batch.segments, batch.pair_index, "eager", torch.float32)
    assert torch.equal(additive == 0, allowed) and (additive[~allowed] == torch.finfo(torch.float32).min).all()
    with pytest.raises(ValueError, match="prefix_sharing"):
        packing.attention_mask(batch.segments, batch.pair_index, "flash_attention_2", torch.float32)


def test_padding_free_puts_the_pairs_in_one_row_each_attending_only_to_itself():
    pairs = [[1, 2, 3], [9]], [[4, 5, 6], [10]], [[7, 8], [11, 12, 13]]
    batch = packing.pack_pairs(*pairs, PAD, padding_free=True)
    P, C, R = packing.PROMPT, packing.CHOSEN, packing.REJECTED
    # pair 1 follows pair 0 with no padding, its positions restarting at 0
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4, 0, 1, 1, 2, 3]]
    assert batch.segments.tolist() == [[P, P, P, C, C, C, R, R, P, C, R, R, R]]
    assert batch.pair_index.tolist() == [[0] * 8 + [1] * 5]
    # the responses as one pair per row lists them; their indices are offsets into the one row
    assert batch.response_ids.tolist() == [[4, 5, 6], [10, PAD, PAD], [7, 8, PAD], [11, 12, 13]]
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert batch.predictors.tolist() == [[2, 3, 4], [8, 0, 0], [2, 6, 0], [8, 10, 11]]
    assert batch.last.tolist() == [5, 9, 7, 12]
    assert batch.pair_rows.tolist() == [0, 0, 0, 0]

    allowed = packing.attention_mask(batch.segments, batch.pair_index, "sdpa", torch.float32)
    assert allowed.shape == (1, 1, 13, 13)
    # no token of pair 1 sees pair 0 (nor the reverse, which causality forbids anyway)
    assert not allowed[0, 0, 8:, :8].any() and not allowed[0, 0, :8, 8:].any()
    # each pair's block is its mask of the one-pair-per-row layout, without the padding
    one_per_row = packing.pack_pairs(*pairs, PAD)
    rows = packing.attention_mask(one_per_row.segments, one_per_row.pair_index, "sdpa", torch.float32)
    assert torch.equal(allowed[0, 0, :8, :8], rows[0, 0]) and torch.equal(allowed[0, 0, 8:, 8:], rows[1, 0, :5, :5])
    additive = packing.attention_mask(batch.segments, batch.pair_index, "eager", torch.float32)
    assert torch.equal(additive == 0, allowed) and (additive[~allowed] == torch.finfo(torch.float32).min).all()


def test_split_common_prefix_keeps_a_token_in_each_rest():
    assert packing.split_common_prefix([1, 2, 3, 4], [1, 2, 5]) == ([1, 2], [3, 4], [5])
    assert packing.split_common_prefix([1, 2], [1, 2, 3]) == ([1], [2], [2, 3])
    assert packing.split_common_prefix([1, 2], [1, 2]) == ([1], [2], [2])
    assert packing.split_common_prefix([1], [2]) == ([], [1], [2])


def tiny_gpt2(scalar_head: bool = False, **config):
    """A causal LM, or with `scalar_head` a reward model (transformers' causal sequence classifier)."""
    config = GPT2Config(**{"vocab_size": VOCAB, **config}, n_positions=64, n_layer=2, n_head=2, n_embd=32)
    return GPT2ForSequenceClassification(config) if scalar_head else GPT2LMHeadModel(config)


def tiny_llama(scalar_head: bool = False, **config):
    """As `tiny_gpt2`, a Llama (rotary positions, grouped-query attention, RMSNorm)."""
    config = LlamaConfig(
        **{"vocab_size": VOCAB, **config}, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
    )
    return LlamaForSequenceClassification(config) if scalar_head else LlamaForCausalLM(config)


def padded(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids, mask = torch.full((len(rows), width), PAD), torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return ids, mask


@pytest.mark.parametrize("padding_free", [False, True], ids=["row_per_pair", "padding_free"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_responses_see_what_their_own_rows_see(build, attention, padding_free):
    torch.manual_seed(0)
    model = build().eval()
    model.set_attn_implementation(attention)
    # prompts and responses of different lengths (padding on both layouts); pair 2's responses share a first token
    generator = torch.Generator().manual_seed(1)

    def tokens(n):
        return torch.randint(1, VOCAB, (n,), generator=generator).tolist()

    prompts, chosen = [tokens(5), tokens(1), tokens(9)], [tokens(3), tokens(7), tokens(2)]
    rejected = [tokens(6), tokens(1), chosen[2][:1] + tokens(3)]
    batch = packing.pack_pairs(prompts, chosen, rejected, PAD, padding_free=padding_free)
    assert batch.input_ids.shape[0] == (1 if padding_free else 3)

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


# pairs of clearly different lengths: in the one row, the last pairs lie past the models' 64 positions
PAIRS = [
    PreferencePair("the movie was", " great and fun to watch with friends on a long and rainy evening", " dull", 0.5),
    PreferencePair("a", " fine film", " slow and boring and far too long for anyone to sit through", 1.0),
    PreferencePair("i thought the plot of this long film was, from start to end, quite", " clever", " a mess", 0.0),
    PreferencePair("the acting", " felt warm", " felt warm but the music was loud", 2.0),
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [p.prompt + p.chosen for p in PAIRS] + [p.prompt + p.rejected for p in PAIRS]
    return lm.train_tokenizer(texts * 4, 300)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_padding_free_reward_model_gives_the_unshared_scores_loss_and_gradients(tokenizer, build, attention):
    torch.manual_seed(0)
    model = build(scalar_head=True, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=1)
    model.eval().set_attn_implementation(attention)
    tokenizer.model_max_length = 64
    _, chosen_mask = reward_model.encode(tokenizer, [p.prompt for p in PAIRS], [p.chosen for p in PAIRS])
    assert chosen_mask.sum() > 64  # the one row holds more: each pair's prefix and both responses
    results = {}
    for prefix_sharing, padding_free in ((True, True), (False, False)):
        candidate = copy.deepcopy(model)
        objective = reward_model.PairwiseObjective(tokenizer, PAIRS, True, prefix_sharing, padding_free)
        loss, metrics = objective.loss(candidate, list(range(len(PAIRS))))
        loss.backward()
        with torch.no_grad():
            scores = torch.stack(reward_model._pair_rewards(candidate, tokenizer, PAIRS, prefix_sharing, padding_free))
        results[padding_free] = loss, metrics, scores, {n: p.grad for n, p in candidate.named_parameters()}
    (loss, metrics, scores, grads), (expected_loss, expected_metrics, expected_scores, expected_grads) = (
        results[True], results[False]
    )
    assert scores.std() > 1e-3  # the pairs are told apart: a score read at the wrong token would show
    torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=0)
    assert metrics == expected_metrics
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_padding_free_dpo_gives_the_unshared_loss_and_gradients(tokenizer, build, attention):
    torch.manual_seed(0)
    reference = build(vocab_size=len(tokenizer)).eval()
    reference.set_attn_implementation(attention)
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a policy that has moved away from the reference: the log-ratios are not all zero
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    tokens = dpo.encode_pairs(tokenizer, PAIRS, 64)
    packed = dpo.model_input(tokenizer, PAIRS, tokens, prefix_sharing=True, padding_free=True)
    assert packed.input_ids.shape == (1, sum(len(t.prompt) + len(t.chosen) + len(t.rejected) for t in tokens))
    assert packed.input_ids.shape[1] > 64
    results = {}
    for prefix_sharing, padding_free in ((True, True), (False, False)):
        candidate = copy.deepcopy(policy)
        cfg = DPOConfig(beta=0.3, prefix_sharing=prefix_sharing, padding_free=padding_free)
        objective = dpo.DPOObjective(tokenizer, PAIRS, tokens, cfg, ref_model=reference)
        loss, metrics = objective.loss(candidate, list(range(len(PAIRS))))
        loss.backward()
        results[padding_free] = loss, metrics, {n: p.grad for n, p in candidate.named_parameters()}
    (loss, metrics, grads), (expected_loss, expected_metrics, expected_grads) = results[True], results[False]
    assert loss.item() > 0.01
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=0)
    assert metrics.keys() == expected_metrics.keys()
    for key, value in metrics.items():
        assert value == pytest.approx(expected_metrics[key], abs=1e-5), key
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=0, msg=name)
    assert sum(float(grad.abs().sum()) for grad in grads.values()) > 1e-2
