"""LM plumbing: log-probs of sampled rollouts under left padding, and the response mask."""

from __future__ import annotations

import pytest
import torch

from components import world
from components.models import lm

MAX_NEW_TOKENS = 12
SEED = 2  # with the EOS bias below this seed samples EOS at several different steps and leaves some rows without


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(single_thread):
    reviews = world.generate_reviews(200, 0.1, 0.3, seed=0)
    tokenizer = lm.train_tokenizer([r.document for r in reviews], vocab_size=400)
    torch.manual_seed(0)
    model = lm.build_model(tokenizer, n_layer=1, n_head=2, n_embd=32, max_length=64).eval()
    with torch.no_grad():
        # Make position embeddings matter (a wrong position id then moves log-probs by ~0.1, not ~1e-4),
        # and push the final hidden state towards the (tied) EOS embedding so that EOS gets sampled.
        model.transformer.wpe.weight.mul_(20)
        eos_row = model.transformer.wte.weight[tokenizer.eos_token_id]
        model.transformer.ln_f.bias.add_(4.0 * eos_row / eos_row.norm() ** 2)
    prompts = [
        "The Quiet River: I",
        reviews[0].prompt(3),
        reviews[1].prompt(6),
        "A",
        reviews[2].prompt(2),
        reviews[3].prompt(1),
    ]
    return model, tokenizer, prompts


def _generate(model, tokenizer, prompts, temperature, seed):
    """The reference: HF generate with the same arguments as lm.sample, returning per-step scores."""
    prompt_ids, prompt_mask = lm.encode_prompts(tokenizer, prompts)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[:, prompt_ids.shape[1] :]
    scores = torch.stack(out.scores, dim=1)  # (B, R, V): processed logits, i.e. logits / temperature
    logprobs = torch.log_softmax(scores.float(), dim=-1).gather(2, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, logprobs


def test_prompts_are_left_padded_to_different_lengths(setup):
    model, tokenizer, prompts = setup
    _, mask = lm.encode_prompts(tokenizer, prompts)
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) >= 4
    assert (mask[:, -1] == 1).all()  # left padding: every row ends with a real token
    assert (mask[lengths < mask.shape[1], 0] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_match_generate_scores(setup, temperature):
    model, tokenizer, prompts = setup
    torch.manual_seed(SEED)
    rollout = lm.sample(model, tokenizer, prompts, MAX_NEW_TOKENS, temperature)
    tokens, reference = _generate(model, tokenizer, prompts, temperature, SEED)
    mask = rollout.response_mask.bool()
    # same seed, same draws
    assert tokens.shape == rollout.response_ids.shape
    assert torch.equal(tokens[mask], rollout.response_ids[mask])
    with torch.no_grad():
        logprobs = lm.response_logprobs(model, rollout, temperature)
    assert logprobs.shape == rollout.response_ids.shape
    assert torch.allclose(logprobs[mask], reference[mask], atol=1e-5, rtol=0)


def test_response_logprobs_independent_of_padding(setup):
    """Each row's log-probs computed alone (no padding at all) equal those from the padded batch."""
    model, tokenizer, prompts = setup
    torch.manual_seed(SEED)
    rollout = lm.sample(model, tokenizer, prompts, MAX_NEW_TOKENS, 1.0)
    with torch.no_grad():
        batched = lm.response_logprobs(model, rollout)
        for i in range(len(prompts)):
            real_prompt = rollout.prompt_mask[i].bool()
            real_response = rollout.response_mask[i].bool()
            single = lm.Rollout(
                [prompts[i]],
                rollout.prompt_ids[i, real_prompt].unsqueeze(0),
                rollout.prompt_mask[i, real_prompt].unsqueeze(0),
                rollout.response_ids[i, real_response].unsqueeze(0),
                rollout.response_mask[i, real_response].unsqueeze(0),
                [rollout.completions[i]],
                [rollout.ended_with_eos[i]],
            )
            alone = lm.response_logprobs(model, single)[0]
            assert torch.allclose(alone, batched[i, real_response], atol=1e-5, rtol=0), i
        # the check has teeth: without position ids from the mask, left-padded rows come out different
        ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)
        att = torch.cat([rollout.prompt_mask, rollout.response_mask], 1)
        naive_logits = model(input_ids=ids, attention_mask=att).logits  # HF's default positions 0..T-1
        naive = lm.logprobs_of(naive_logits[:, rollout.prompt_ids.shape[1] - 1 : -1], rollout.response_ids)
        padded_rows = rollout.prompt_mask.sum(1) < rollout.prompt_mask.shape[1]
        gap = ((naive - batched).abs() * rollout.response_mask)[padded_rows].max()
        assert gap > 1e-2


def test_response_mask_keeps_one_eos_then_pads(setup):
    model, tokenizer, prompts = setup
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(SEED)
    rollout = lm.sample(model, tokenizer, prompts, MAX_NEW_TOKENS, 1.0)
    raw, _ = _generate(model, tokenizer, prompts, 1.0, SEED)
    ended = rollout.ended_with_eos
    # the fixed seed gives both kinds of rows, and EOS at more than one step
    assert any(ended) and not all(ended)
    eos_steps = set()
    width = rollout.response_ids.shape[1]
    for i, (ids, mask) in enumerate(zip(rollout.response_ids, rollout.response_mask)):
        raw_eos = (raw[i] == eos).nonzero().flatten()
        assert ended[i] == (len(raw_eos) > 0)
        if ended[i]:
            k = int(raw_eos[0])  # first sampled EOS
            eos_steps.add(k)
            assert mask.tolist() == [1] * (k + 1) + [0] * (width - k - 1)
            assert int((ids[mask.bool()] == eos).sum()) == 1 and int(ids[k]) == eos
            assert (ids[k + 1 :] == pad).all()
        else:
            assert mask.tolist() == [1] * width
            assert int((ids == eos).sum()) == 0
        # real tokens are the sampled ones
        assert torch.equal(ids[mask.bool()], raw[i, : int(mask.sum())])
        # the completion text is the response without its EOS
        expected_text = tokenizer.decode(ids[mask.bool() & (ids != eos)], skip_special_tokens=True)
        assert rollout.completions[i] == expected_text
    assert len(eos_steps) >= 2


def test_sample_respects_context_length(setup):
    model, tokenizer, prompts = setup
    torch.manual_seed(SEED)
    rollout = lm.sample(model, tokenizer, prompts, 1000, 1.0)
    assert rollout.prompt_ids.shape[1] + rollout.response_ids.shape[1] <= model.config.n_positions


def test_position_ids():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [0, 1, 1, 1, 1]])
    # real tokens count 0, 1, 2, ... from the first real one; padding before them is clamped to 0
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 3], [0, 0, 1, 2, 3]])
    assert torch.equal(lm.position_ids(mask), expected)


def test_logprobs_of_hand_value():
    # logits [0, ln 3] -> softmax [1/4, 3/4]; token 1 -> ln(3/4), token 0 -> ln(1/4)
    logits = torch.tensor([[[0.0, torch.log(torch.tensor(3.0)).item()]] * 2])
    out = lm.logprobs_of(logits, torch.tensor([[1, 0]]))
    assert torch.allclose(out, torch.log(torch.tensor([[0.75, 0.25]])), atol=1e-6)
