"""The bucketed rollout engine (components/models/sampler.py) against transformers' `generate`:
the same tokens where sampling is made deterministic, the same distribution at every step, and
`lm.sample`'s Rollout layout; on a tiny GPT-2 and a tiny Llama (SmolLM2's architecture)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TopPLogitsWarper

from components.models import lm, sampler
from components.rl import nlpo, rollout
from components.sections import SamplingConfig

MAX_NEW_TOKENS = 12
CONTEXT = 64
SEED = 2

pytestmark = pytest.mark.usefixtures("single_thread")


def _gpt2(tokenizer, push_eos: bool):
    torch.manual_seed(0)
    model = lm.build_model(tokenizer, n_layer=1, n_head=2, n_embd=32, max_length=CONTEXT).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(20)  # positions that matter: a wrong position id changes the tokens
        if push_eos:  # the final hidden state towards the (tied) EOS embedding: rows end at different steps
            eos_row = model.transformer.wte.weight[tokenizer.eos_token_id]
            model.transformer.ln_f.bias.add_(2.0 * eos_row / eos_row.norm() ** 2)
    return model


def _llama(tokenizer, push_eos: bool):
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=CONTEXT, tie_word_embeddings=False, mlp_bias=True,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # logits far from uniform
        if push_eos:  # a constant direction in the last residual stream, which the EOS row reads
            direction = torch.randn(config.hidden_size)
            direction /= direction.norm()
            model.model.layers[-1].mlp.down_proj.bias.copy_(direction)
            model.lm_head.weight[tokenizer.eos_token_id] = 3.0 * direction
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, tiny_tokenizer, tiny_world):
    """A tiny model that samples EOS at varied steps, the same model unpushed (its greedy
    decoding does not collapse onto EOS), the tokenizer, and prompts of 1 to 44 tokens: most rows
    left-padded, by very different amounts."""
    build = {"gpt2": _gpt2, "llama": _llama}[request.param]
    prompts = [review.prompt(1 + (7 * i) % 10) for i, review in enumerate(tiny_world[:20])]
    prompts += ["A", "The Quiet River: I"]
    return build(tiny_tokenizer, push_eos=True), build(tiny_tokenizer, push_eos=False), tiny_tokenizer, prompts


def _always(choose):
    """Both engines' draw replaced by `choose(probs)` -> (B, 1) indices: `generate`'s
    torch.multinomial and the engine's `sampler.draw` (over its nucleus ids, where it has them)."""

    def draw(scores, ids):
        picked = choose(scores.softmax(dim=-1))
        return (picked if ids is None else ids.gather(1, picked)).squeeze(1)

    return (lambda probs, num_samples: choose(probs)), draw


@pytest.fixture
def greedy(monkeypatch):
    """Sampling made deterministic in both engines: the most probable token instead of a draw."""
    multinomial, draw = _always(lambda probs: probs.argmax(-1, keepdim=True))
    monkeypatch.setattr(torch, "multinomial", multinomial)
    monkeypatch.setattr(sampler, "draw", draw)


def _generate(model, prompt_ids, prompt_mask, eos, pad):
    """The reference: bare `generate` with lm.sample's settings; the response part of its output."""
    output = model.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
        max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos, pad_token_id=pad,
    )
    return output[:, prompt_ids.shape[1] :]


def _stop_token(model, prompt_ids, prompt_mask, pad: int) -> int:
    """The token that greedy decoding first reaches at the most different steps across rows: as
    the stop token it ends rows at many steps, so that rows leave the engine's batch one by one."""
    responses = _generate(model, prompt_ids, prompt_mask, pad, pad)  # only the (unlikely) pad token stops it

    def first_steps(token):
        hits = responses == token
        return len({int(row.float().argmax()) for row in hits if row.any()})

    return max((t for t in responses.unique().tolist() if t != pad), key=first_steps)


@pytest.mark.parametrize("bucket_size", [1, 3, 8, 64])
def test_greedy_tokens_equal_generate(setup, greedy, bucket_size):
    _, model, tokenizer, prompts = setup
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = lm.encode_prompts(tokenizer, prompts)
    stop = _stop_token(model, prompt_ids, prompt_mask, pad)
    expected = _generate(model, prompt_ids, prompt_mask, stop, pad)
    ended = (expected == stop).any(1)
    assert ended.any() and not ended.all()
    assert len({int((row == stop).float().argmax()) for row in expected[ended]}) >= 3

    got = sampler.generate(model, prompt_ids, prompt_mask, MAX_NEW_TOKENS, 1.0, 1.0, stop, pad, bucket_size)
    assert torch.equal(got, expected)


def _assert_same_rollout(a: lm.Rollout, b: lm.Rollout):
    assert a.prompts == b.prompts
    for field in ("prompt_ids", "prompt_mask", "response_ids", "response_mask"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.completions == b.completions
    assert a.ended_with_eos == b.ended_with_eos


def test_greedy_rollout_equals_generate(setup, greedy):
    """The whole Rollout of lm.sample, padding, masks and texts included, whichever the engine."""
    model, _, tokenizer, prompts = setup
    by_generate = lm.sample(model, tokenizer, prompts, MAX_NEW_TOKENS, 1.0)
    by_engine = lm.sample(model, tokenizer, prompts, MAX_NEW_TOKENS, 1.0, engine="bucketed")
    _assert_same_rollout(by_engine, by_generate)
    assert any(by_generate.ended_with_eos)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_each_step_samples_generates_distribution(setup, monkeypatch, temperature, top_p):
    """Every distribution the engine drew a token from equals the one a single forward pass over
    prompt + response gives at a response position, after the temperature and transformers' own
    top-p warper; each real response position is drawn from exactly once, its token from it.
    Where a token's cumulative probability lies within float rounding of top_p (the engine's
    cached logits and the single pass differ by about 1e-6), either side of it is the warper's."""
    model, _, tokenizer, prompts = setup
    drawn = []

    def recording_draw(scores, ids):
        tokens = draw(scores, ids)
        if ids is not None:  # the nucleus' scores in the vocabulary, -inf elsewhere
            scores = torch.full((len(scores), model.config.vocab_size), float("-inf")).scatter(1, ids, scores)
        drawn.extend(zip(scores.log_softmax(-1), tokens.tolist()))
        return tokens

    draw = sampler.draw
    monkeypatch.setattr(sampler, "draw", recording_draw)
    torch.manual_seed(SEED)
    result = lm.sample(model, tokenizer, prompts, MAX_NEW_TOKENS, temperature, top_p, engine="bucketed")

    with torch.no_grad():
        logits = lm.response_logits(model, result, temperature).float()  # (B, R, V)
    real = result.response_mask.bool()
    tops = [top_p] if top_p == 1 else [top_p, top_p - 1e-6, top_p + 1e-6]
    # one row per real response position, for each top_p
    references = [(TopPLogitsWarper(p)(None, logits[real]) if p < 1 else logits[real]).log_softmax(-1) for p in tops]
    tokens = result.response_ids[real]

    assert len(drawn) == len(tokens)
    unmatched = torch.ones(len(tokens), dtype=torch.bool)
    for logprobs, token in drawn:
        same = torch.zeros(len(tokens), dtype=torch.bool)
        for reference in references:
            same_support = (logprobs.isinf() == reference.isinf()).all(-1)
            gap = torch.where(reference.isinf(), 0.0, reference - logprobs).abs().amax(-1)
            same |= same_support & (gap < 1e-5)
        # positions with this distribution (several, where a nucleus holds one token) and this token
        candidates = same & (tokens == token) & unmatched
        assert candidates.any()
        unmatched[int(candidates.float().argmax())] = False
    if top_p < 1:
        assert references[0].isinf().any()  # the nucleus cut tokens: the check covers it


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
@pytest.mark.parametrize("spread", [0.1, 3.0])
def test_nucleus_equals_top_p_warper(top_p, spread):
    """The nucleus from topk is TopPLogitsWarper's: the same tokens kept, the same scores, also
    where it is wider than the first search (flat logits) and where it holds one token."""
    torch.manual_seed(SEED)
    logits = spread * torch.randn(6, 5000)
    logits[0, 7] = 50.0  # one token holds nearly all the probability
    reference = TopPLogitsWarper(top_p)(None, logits / 0.7)
    scores, ids = sampler.nucleus(logits, 0.7, top_p)
    got = torch.full_like(logits, float("-inf")).scatter(1, ids, scores)
    assert torch.equal(got.isinf(), reference.isinf())
    assert torch.allclose(got[~got.isinf()], reference[~reference.isinf()])
    kept = (~reference.isinf()).sum(1)
    assert kept[0] == 1 and (spread == 3.0 or kept[1:].min() > sampler.NUCLEUS_SEARCH)


def test_draw_follows_the_softmax():
    """The inverse-CDF draw's frequencies over 400,000 draws equal softmax(scores) within 5
    standard errors, over the vocabulary and over nucleus ids; a token of probability 0 (-inf, a
    cut nucleus' tail) is never drawn, not even where u rounds up to the row's total."""
    torch.manual_seed(SEED)
    scores = torch.tensor([[2.0, 0.5, float("-inf"), -1.0, 1.0, float("-inf")], [0.0, 3.0, 0.1, -2.0, 0.2, 0.3]])
    ids = torch.tensor([[10, 11, 12, 13, 14, 15], [5, 4, 3, 2, 1, 0]])
    n = 200_000
    tokens = sampler.draw(scores.repeat_interleave(n, dim=0), ids.repeat_interleave(n, dim=0)).view(2, n)
    for row in range(2):
        expected = scores[row].softmax(-1)
        observed = torch.stack([(tokens[row] == token).float().mean() for token in ids[row]])
        standard_error = (expected * (1 - expected) / n).sqrt()
        assert ((observed - expected).abs() <= 5 * standard_error).all()
        assert (observed[expected == 0] == 0).all()
    whole = sampler.draw(scores, None)
    assert all(scores[row, token] > float("-inf") for row, token in enumerate(whole.tolist()))

    # u = the total exactly: the last token of positive probability, not the -inf one after it
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "rand", lambda *size, **kwargs: torch.ones(*size, **kwargs))
        assert sampler.draw(scores, ids).tolist() == [14, 0]


def test_rollout_layout(setup):
    """Prompts in the caller's order, one EOS kept at the end of a response and padding after it,
    completions without it, responses cut at max_new_tokens without EOS."""
    model, _, tokenizer, prompts = setup
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(SEED)
    result = lm.sample(model, tokenizer, prompts, MAX_NEW_TOKENS, 1.0, engine="bucketed")
    prompt_ids, prompt_mask = lm.encode_prompts(tokenizer, prompts)
    assert result.prompts == prompts
    assert torch.equal(result.prompt_ids, prompt_ids) and torch.equal(result.prompt_mask, prompt_mask)

    lengths = result.response_mask.sum(1)
    width = result.response_ids.shape[1]
    assert width == int(lengths.max()) <= MAX_NEW_TOKENS
    ended = result.ended_with_eos
    assert any(ended) and not all(ended)
    assert len({int(n) for n, e in zip(lengths, ended) if e}) >= 2  # rows left the batch at different steps
    for ids, mask, n, eos_ended, completion in zip(
        result.response_ids, result.response_mask, lengths.tolist(), ended, result.completions
    ):
        assert mask.tolist() == [1] * n + [0] * (width - n)
        assert (ids[n:] == pad).all()
        if eos_ended:
            assert int(ids[n - 1]) == eos and int((ids[:n] == eos).sum()) == 1
        else:
            assert n == MAX_NEW_TOKENS and not (ids == eos).any()
        real = ids[:n]
        assert completion == tokenizer.decode(real[real != eos], skip_special_tokens=True)


def test_responses_stop_at_the_context(setup):
    _, model, tokenizer, prompts = setup  # the model not pushed towards EOS: rows reach the context
    torch.manual_seed(SEED)
    result = lm.sample(model, tokenizer, prompts, 1000, 1.0, engine="bucketed")
    room = CONTEXT - result.prompt_ids.shape[1]
    assert result.response_ids.shape[1] <= room
    cut = [n for n, e in zip(result.response_mask.sum(1).tolist(), result.ended_with_eos) if not e]
    assert cut and all(n == room for n in cut)


def test_empty_completions(setup, monkeypatch):
    """EOS as every row's first token: one-token responses, empty completions, as generate gives."""
    model, _, tokenizer, prompts = setup
    eos = tokenizer.eos_token_id
    multinomial, draw = _always(lambda probs: torch.full((len(probs), 1), eos))
    monkeypatch.setattr(torch, "multinomial", multinomial)
    monkeypatch.setattr(sampler, "draw", draw)
    by_engine = lm.sample(model, tokenizer, prompts, MAX_NEW_TOKENS, 1.0, engine="bucketed")
    _assert_same_rollout(by_engine, lm.sample(model, tokenizer, prompts, MAX_NEW_TOKENS, 1.0))
    assert by_engine.response_ids.tolist() == [[eos]] * len(prompts)
    assert by_engine.completions == [""] * len(prompts) and all(by_engine.ended_with_eos)


def test_nlpo_mask_samples_with_generate(setup):
    """A logits processor (NLPO's mask) takes `generate` whatever the engine: the same draws."""
    model, _, tokenizer, prompts = setup
    rollouts = []
    for engine in ("generate", "bucketed"):
        mask = nlpo.MaskPolicy(model, 0.5, 1, 1, tokenizer.eos_token_id)
        torch.manual_seed(SEED)
        rollouts.append(lm.sample(model, tokenizer, prompts, MAX_NEW_TOKENS, 1.0, 1.0, mask.processor, engine=engine))
        assert mask.applied().shape[:2] == rollouts[-1].response_ids.shape
    _assert_same_rollout(*rollouts)


def test_sampling_config_picks_the_engine(setup, monkeypatch):
    model, _, tokenizer, prompts = setup
    calls = []
    engine = sampler.generate
    monkeypatch.setattr(sampler, "generate", lambda *args, **kwargs: calls.append(1) or engine(*args, **kwargs))
    lm.sample_many(model, tokenizer, prompts[:4], SamplingConfig(max_new_tokens=4, batch_size=2, engine="generate"), seed=0)
    assert calls == []
    bucketed = SamplingConfig(max_new_tokens=4, batch_size=2)
    assert bucketed.engine == "bucketed"  # the default
    lm.sample_many(model, tokenizer, prompts[:4], bucketed, seed=0)
    assert len(calls) == 2
    rollout.generate(model, tokenizer, prompts[:2], 2, bucketed)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="unknown sampling engine"):
        lm.sample(model, tokenizer, prompts, MAX_NEW_TOKENS, 1.0, engine="vllm")
