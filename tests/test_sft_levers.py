"""SFT's speed levers: the LM head on the loss's tokens only (`sft.head_on_targets`) and
padding-free batches (`sft.one_row`). Each gives the loss and every gradient of the padded batch
under the full head's `masked_lm_loss` (padded and packed rows for the head), for GPT-2 and a
Llama-family model (SmolLM2's architecture, its LM head untied), and the same training run."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from components.models import lm
from components.trainers import sft
# the tiny GPT-2 (position embeddings that matter) and the fixtures of the SFT tests
from tests.test_sft import MAX_LENGTH, reviews, tokenizer  # noqa: F401 (fixtures)
from tests.test_sft import tiny_model as gpt2
from components.sections import SFTConfig

targets_nll = sft.targets_nll

pytestmark = pytest.mark.usefixtures("single_thread")


def llama(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=MAX_LENGTH, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def demos(reviews, n: int) -> list[sft.Demonstration]:
    """Prompts and responses of varied lengths (rows padded differently; several share a packed
    row), and a whole review with an empty prompt (pretraining's case) truncated to MAX_LENGTH."""
    short = [
        sft.Demonstration(r.prompt(2 + i % 3), " " + " ".join(r.text.split()[3 : 4 + i % 7]))
        for i, r in enumerate(reviews[:n])
    ]
    return short + [sft.Demonstration("", next(r.document for r in reviews if len(r.document) > 3 * MAX_LENGTH))]


def mean_loss_and_grads(model, objective: sft.LMObjective, indices: list[int]):
    model.zero_grad()
    loss = objective.loss(model, indices)[0] / objective.n_terms(indices)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("build", [gpt2, llama])
def test_head_on_targets_gives_the_loss_and_gradients_of_the_full_head(reviews, tokenizer, build, packing, monkeypatch):
    # chunks of 16 positions: the targets span several chunks, one of them partial
    monkeypatch.setattr(lm, "head_logprobs", functools.partial(lm.head_logprobs, chunk_size=16))
    model = build(tokenizer)
    examples = demos(reviews, 12)
    full = sft.lm_objective(tokenizer, examples, MAX_LENGTH, packing=packing)
    on_targets = sft.lm_objective(tokenizer, examples, MAX_LENGTH, packing=packing, head_on_targets=True)
    rows = list(range(full.n_examples))
    batch = rows[1:] + rows[:1]  # not in row order, and (padded) the longest row not first
    assert full.n_terms(batch) > 16 and full.n_terms(batch) % 16

    loss, grads = mean_loss_and_grads(model, full, batch)
    loss_on_targets, grads_on_targets = mean_loss_and_grads(model, on_targets, batch)
    assert loss_on_targets.item() == pytest.approx(loss.item(), abs=1e-5)
    assert grads.keys() == grads_on_targets.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_on_targets[name], grad, rtol=0, atol=1e-5, msg=name)

    # the head ran on the predictors of the loss-masked tokens only, not on the prompts or the padding
    positions = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: positions.append(args[0].shape[:-1].numel())
    )
    with torch.no_grad():
        on_targets.loss(model, batch)
    hook.remove()
    assert sum(positions) == on_targets.n_terms(batch) < on_targets.attention_mask[batch].sum()


@pytest.mark.parametrize("head_on_targets", [False, True])
@pytest.mark.parametrize("build", [gpt2, llama])
def test_padding_free_gives_the_loss_and_gradients_of_the_padded_batch(reviews, tokenizer, build, head_on_targets):
    model = build(tokenizer)
    examples = demos(reviews, 12)
    padded = sft.lm_objective(tokenizer, examples, MAX_LENGTH)
    free = sft.lm_objective(tokenizer, examples, MAX_LENGTH, head_on_targets=head_on_targets, padding_free=True)
    rows = list(range(padded.n_examples))
    batch = rows[1:] + rows[:1]  # the longest row not first
    lengths = padded.attention_mask[batch].sum(1)
    assert lengths.min() < lengths.max()  # the padded batch holds padding

    loss, grads = mean_loss_and_grads(model, padded, batch)
    loss_free, grads_free = mean_loss_and_grads(model, free, batch)
    assert loss_free.item() == pytest.approx(loss.item(), abs=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_free[name], grad, rtol=0, atol=1e-5, msg=name)

    # the model ran on one row of the batch's real tokens, nothing else
    shapes = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(kwargs["input_ids"].shape), with_kwargs=True)
    with torch.no_grad():
        free.loss(model, batch)
    hook.remove()
    assert shapes == [(1, int(lengths.sum()))]


@pytest.mark.parametrize(
    "lever, packing", [("head_on_targets", False), ("head_on_targets", True), ("padding_free", False)],
    ids=["head_on_targets-padded", "head_on_targets-packed", "padding_free"],
)
def test_sft_train_with_a_lever_ends_at_the_same_loss_and_weights(reviews, tokenizer, lever, packing, monkeypatch):
    examples = demos(reviews, 40)  # packed: 4 rows or more, a batch
    calls = []
    spied = {"head_on_targets": "targets_nll", "padding_free": "one_row"}[lever]
    original = getattr(sft, spied)
    monkeypatch.setattr(sft, spied, lambda *args: calls.append(1) or original(*args))
    results = {}
    for on in (False, True):
        model = gpt2(tokenizer)
        for module in model.modules():  # no dropout: a padding-free batch's other shapes draw other masks
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        levers = {"head_on_targets": False, "padding_free": False, lever: on}  # only `lever` on
        cfg = SFTConfig(epochs=2, batch_size=4, lr=3e-3, checkpoint_every=0, mixed_precision="no", **levers)
        metrics = sft.train(
            model, tokenizer, examples, MAX_LENGTH, cfg, seed=0, packing=packing, head_on_targets=cfg.head_on_targets
        )
        assert bool(calls) == on  # the switch reaches the objective
        results[on] = metrics["loss"], dict(model.named_parameters())
    (loss, weights), (loss_on, weights_on) = results[False], results[True]
    assert loss_on == pytest.approx(loss, abs=1e-4)
    for name, weight in weights.items():
        torch.testing.assert_close(weights_on[name], weight, rtol=0, atol=1e-4, msg=name)
