"""SFT: the prompt-masked loss against TRL 1.16's SFTTrainer, packing against no packing, chat
templates and curation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from components import world
from components.models import lm
from components.trainers import sft
from components.world import gold
from components.sections import TrainerConfig

MAX_LENGTH = 64
# A user turn and an assistant turn; the assistant turn ends with EOS, so none is appended.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def reviews():
    return world.generate_reviews(200, 0.1, 0.3, seed=0)


@pytest.fixture(scope="module")
def tokenizer(reviews):
    return lm.train_tokenizer([r.document for r in reviews], 300)


def tiny_model(tokenizer):
    torch.manual_seed(0)
    model = lm.build_model(tokenizer, n_layer=1, n_head=2, n_embd=32, max_length=MAX_LENGTH).eval()
    with torch.no_grad():
        # make position embeddings matter, so that a wrong position id shows in the loss
        model.transformer.wpe.weight.mul_(20)
    return model


def short_demos(reviews, n: int) -> list[sft.Demonstration]:
    """Demonstrations of 1 to 5 response words, so several share a packed row, and one whole
    review with an empty prompt (pretraining's case) that is truncated to MAX_LENGTH."""
    demos = [
        sft.Demonstration(r.prompt(2), " " + " ".join(r.text.split()[2 : 3 + i % 5])) for i, r in enumerate(reviews[:n])
    ]
    long = next(r.document for r in reviews if len(r.document) > 3 * MAX_LENGTH)
    return demos + [sft.Demonstration("", long)]


def mean_loss_and_grads(model, objective: sft.LMObjective, indices: list[int]):
    model.zero_grad()
    loss = objective.loss(model, indices)[0] / objective.n_terms(indices)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_loss_and_gradients_equal_trl(reviews, tokenizer, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = tiny_model(tokenizer)
    trl_model = copy.deepcopy(model)
    demos = short_demos(reviews, 5)
    args = SFTConfig(
        output_dir=str(tmp_path), report_to="none", save_strategy="no", use_cpu=True, bf16=False,
        max_length=MAX_LENGTH, completion_only_loss=True, shuffle_dataset=False, per_device_train_batch_size=len(demos),
    )
    dataset = Dataset.from_list([{"prompt": d.prompt, "completion": d.response} for d in demos])
    trainer = SFTTrainer(model=trl_model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trl_model.eval()  # no dropout on either side
    examples = [trainer.train_dataset[i] for i in range(len(demos))]

    objective = sft.lm_objective(tokenizer, demos, MAX_LENGTH)
    batch = trainer.data_collator(examples)
    width = batch["input_ids"].shape[1]
    assert width == MAX_LENGTH  # the whole review is truncated, alike on both sides
    # both sides see the same tokens (TRL appends EOS too), truncated alike, and train on the same ones
    assert torch.equal(batch["input_ids"], objective.input_ids[:, :width])
    assert torch.equal(batch["attention_mask"], objective.attention_mask[:, :width])
    assert torch.equal(batch["labels"][:, 1:] != -100, objective.loss_mask[:, 1:width].bool())

    everyone = list(range(len(demos)))
    loss, grads = mean_loss_and_grads(model, objective, everyone)
    trl_model.zero_grad()
    trl_loss = trainer.compute_loss(trl_model, batch)
    trl_loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    for name, p in trl_model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-5), name

    # gradient accumulation: TRL divides each micro-batch by the tokens of the whole step
    # (num_items_in_batch); our loop divides by n_terms of the step
    trl_model.zero_grad()
    halves = [everyone[:2], everyone[2:]]
    n_items = sum(objective.n_terms(h) for h in halves)
    for half in halves:
        micro_batch = trainer.data_collator([examples[i] for i in half])
        trainer.compute_loss(trl_model, micro_batch, num_items_in_batch=n_items).backward()
    for name, p in trl_model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-5), name


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unpacked(reviews, tokenizer, attention):
    model = tiny_model(tokenizer)
    model.set_attn_implementation(attention)
    demos = short_demos(reviews, 12)
    padded = sft.lm_objective(tokenizer, demos, MAX_LENGTH)
    packed = sft.lm_objective(tokenizer, demos, MAX_LENGTH, packing=True)
    assert packed.n_examples < padded.n_examples
    assert packed.attention_mask.sum(1).max() == MAX_LENGTH
    rows, packed_rows = list(range(padded.n_examples)), list(range(packed.n_examples))
    assert packed.n_terms(packed_rows) == padded.n_terms(rows)

    loss, grads = mean_loss_and_grads(model, padded, rows)
    packed_loss, packed_grads = mean_loss_and_grads(model, packed, packed_rows)
    assert packed_loss.item() == pytest.approx(loss.item(), abs=1e-5)
    for name, grad in grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5), name

    # the test has teeth: plain causal attention over the packed rows, with positions running on
    # across examples, moves the loss by far more than the tolerance
    with torch.no_grad():
        logits = lm.forward(model, packed.input_ids, packed.attention_mask).logits
        leaky = sft.masked_lm_loss(logits, packed.input_ids, packed.loss_mask)
    assert abs(leaky.item() - loss.item()) > 1e-3


def test_best_fit_decreasing_by_hand():
    # longest first into the fullest bin with room, capacity 8:
    #   7 (#2) -> new bin A (room 1); 5 (#0) -> new bin B (room 3); 4 (#4) -> new bin C (room 4)
    #   3 (#1) -> B, the fullest it fits (room 0); 2 (#3) -> C (room 2); 1 (#5) -> A (room 0)
    assert sft.best_fit_decreasing([5, 3, 7, 2, 4, 1], 8) == [[2, 5], [0, 1], [4, 3]]


def test_pack_layout_by_hand():
    examples = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6, 7, 8, 9], [0, 0, 1, 1])]
    # lengths 3, 2, 4 into rows of 6: [#2, #1] and [#0]; pad id 0
    input_ids, attention_mask, loss_mask, position_ids = sft.pack(examples, 6, pad_token_id=0)
    assert input_ids.tolist() == [[6, 7, 8, 9, 4, 5], [1, 2, 3, 0, 0, 0]]
    assert attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert loss_mask.tolist() == [[0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0]]
    assert position_ids.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]]


def test_plain_demonstration_masks_the_prompt_and_appends_eos(tokenizer):
    ids, mask = sft.tokenize(tokenizer, sft.Demonstration("The film:", " was great"))
    prompt = tokenizer("The film:", add_special_tokens=False)["input_ids"]
    response = tokenizer(" was great", add_special_tokens=False)["input_ids"]
    assert ids == prompt + response + [tokenizer.eos_token_id]
    assert mask == [0] * len(prompt) + [1] * (len(response) + 1)


def test_chat_template_masks_all_but_the_assistant_turn(tokenizer):
    demo = sft.Demonstration("the film", "a fine cast")
    prompt_text, response_text = "<|user|>the film\n<|assistant|>", "a fine cast\n<|endoftext|>"
    assert sft.render(tokenizer, demo, TEMPLATE) == (prompt_text, response_text)

    ids, mask = sft.tokenize(tokenizer, demo, TEMPLATE)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response = tokenizer("a fine cast\n", add_special_tokens=False)["input_ids"]
    # the template's own EOS ends the response: no second one
    assert ids == prompt + response + [tokenizer.eos_token_id]
    assert mask == [0] * len(prompt) + [1] * (len(response) + 1)
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == response_text

    with_template = copy.deepcopy(tokenizer)
    with_template.chat_template = TEMPLATE
    assert sft.tokenize(with_template, demo, "tokenizer") == (ids, mask)


def test_chat_template_whose_prompt_is_not_a_prefix_is_refused(tokenizer):
    # the generation prompt says <|bot|> but the assistant turn renders as <|assistant|>
    template = TEMPLATE.replace("{% if add_generation_prompt %}<|assistant|>", "{% if add_generation_prompt %}<|bot|>")
    with pytest.raises(ValueError, match="is not a prefix") as error:
        sft.tokenize(tokenizer, sft.Demonstration("the film", "a fine cast"), template)
    assert repr(template) in str(error.value)  # named


def test_train_packed_with_a_chat_template(reviews, tokenizer):
    model = tiny_model(tokenizer).train()
    cfg = TrainerConfig(batch_size=2, checkpoint_every=0, mixed_precision="no")
    demos = short_demos(reviews, 8)
    metrics = sft.train(model, tokenizer, demos, MAX_LENGTH, cfg, seed=0, packing=True, chat_template=TEMPLATE)
    assert metrics["loss"] > 0 and metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))


def test_curate_counts_what_each_filter_drops(reviews):
    def scored(prompt: str, response: str) -> sft.Demonstration:  # as the world task writes them
        return sft.Demonstration(prompt, response, gold.score(prompt, response).quality)

    a, b, c = [scored(r.prompt(3), r.completion(3)) for r in reviews if not r.low_quality][:3]
    candidates = [
        a,
        scored(a.prompt, "  " + a.response.upper() + " "),  # a again, but for case and spaces
        scored(b.prompt, " too short"),
        scored(b.prompt, " the film the film the film the film the film the film"),  # repetitive
        b,
        c,
    ]
    kept, dropped = sft.curate(candidates, n=2, min_words=4, max_words=200, min_quality=0.0)
    assert kept == [a, b]
    assert dropped == {"duplicate": 1, "length": 1, "quality": 1}
