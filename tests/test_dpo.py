"""DPO, IPO and cDPO: the pure loss against hand-computed numbers and finite differences, the loss
and every parameter gradient against TRL 1.16's DPOTrainer (with and without prefix sharing),
LoRA with the adapter-disabled reference, the reference cache, resuming, and `run` end to end on a
tiny GPT-2."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict

import pytest
import torch

from components.models import lm, lora
from components.trainers import dpo
from components.config import load_config
from components.sections import DPOConfig
from components.data.records import PreferencePair
from components.models.training import train_loop

D = torch.float64
MAX_LENGTH = 64

PAIRS = [
    PreferencePair("the movie was", " great and fun to watch", " dull"),
    PreferencePair("this film is", " a real delight", " slow and boring and far too long"),
    PreferencePair("i thought the plot was", " clever", " a mess from start to end"),
    PreferencePair("the acting felt", " warm and honest", " flat"),
    PreferencePair("overall the story is", " moving and well told", " hard to follow"),
    PreferencePair("the ending was", " perfect", " rushed and silly"),
    PreferencePair("my friends said it was", " the best film this year", " a waste of time"),
    PreferencePair("the music is", " lovely", " loud and dull"),
]


def t(values):
    return torch.tensor(values, dtype=D)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(single_thread):
    texts = [p.prompt + p.chosen for p in PAIRS] + [p.prompt + p.rejected for p in PAIRS]
    tokenizer = lm.train_tokenizer(texts * 4, 300)
    torch.manual_seed(0)
    model = lm.build_model(tokenizer, n_layer=1, n_head=2, n_embd=32, max_length=MAX_LENGTH)
    dpo.disable_dropout(model)
    return tokenizer, model


def perturbed(model, scale=0.05, seed=1):
    """A policy that has moved away from `model`, so that the log-ratios are not all zero."""
    policy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return policy


def rewards_metrics(policy, initial, tokenizer, cfg):
    """Accuracy and mean margin of the implicit rewards on PAIRS, against `initial` as reference."""
    tokens = dpo.encode_pairs(tokenizer, PAIRS, MAX_LENGTH)
    objective = dpo.DPOObjective(tokenizer, PAIRS, tokens, cfg, ref_model=initial)
    with torch.no_grad():
        _, sums = objective.loss(policy, list(range(len(PAIRS))))
    return sums["accuracy"] / len(PAIRS), sums["margin"] / len(PAIRS)


# --------------------------------------------------------------------------------------------
# dpo_loss
# --------------------------------------------------------------------------------------------

# beta = 0.5; chosen log-ratios c = [-2 - -3, -3 - -3] = [1, 0]; rejected r = [-4 - -3, -1 - -2] = [-1, 1]
# h = c - r = [2, -1]; beta * h = [1, -0.5]; rewards: beta * c = [0.5, 0], beta * r = [-0.5, 0.5]
LOGPROBS = dict(
    chosen_logprobs=t([-2.0, -3.0]),
    rejected_logprobs=t([-4.0, -1.0]),
    ref_chosen_logprobs=t([-3.0, -3.0]),
    ref_rejected_logprobs=t([-3.0, -2.0]),
)


def test_sigmoid_hand_value():
    # -log sigmoid(x) = log(1 + e^-x):  x = 1: log(1.3678794) = 0.3132617;  x = -0.5: log(2.6487213) = 0.9740770
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(**LOGPROBS, beta=0.5)
    torch.testing.assert_close(losses, t([0.3132616875, 0.9740769842]), atol=1e-9, rtol=0)
    torch.testing.assert_close(chosen_rewards, t([0.5, 0.0]))
    torch.testing.assert_close(rejected_rewards, t([-0.5, 0.5]))
    # dL/d chosen_logprobs = -beta * sigmoid(-beta * h) = -0.5 * [sigmoid(-1), sigmoid(0.5)]
    #                      = -0.5 * [0.2689414, 0.6224593] = [-0.1344707, -0.3112297]
    chosen = LOGPROBS["chosen_logprobs"].clone().requires_grad_()
    losses, _, _ = dpo.dpo_loss(**{**LOGPROBS, "chosen_logprobs": chosen}, beta=0.5)
    (grad,) = torch.autograd.grad(losses.sum(), chosen)
    torch.testing.assert_close(grad, t([-0.1344707107, -0.3112296656]), atol=1e-9, rtol=0)


def test_cdpo_hand_value():
    # eps = 0.1: L = 0.9 * -log sigmoid(x) + 0.1 * -log sigmoid(-x), and -log sigmoid(-x) = x - log sigmoid(x),
    # so L = -log sigmoid(x) + 0.1 * x:  x = 1: 0.3132617 + 0.1 = 0.4132617;  x = -0.5: 0.9740770 - 0.05 = 0.9240770
    losses, chosen_rewards, _ = dpo.dpo_loss(**LOGPROBS, beta=0.5, loss_type="cdpo", label_smoothing=0.1)
    torch.testing.assert_close(losses, t([0.4132616875, 0.9240769842]), atol=1e-9, rtol=0)
    torch.testing.assert_close(chosen_rewards, t([0.5, 0.0]))
    # eps = 0 is DPO; sigmoid ignores label_smoothing
    cdpo0, _, _ = dpo.dpo_loss(**LOGPROBS, beta=0.5, loss_type="cdpo", label_smoothing=0.0)
    sigmoid, _, _ = dpo.dpo_loss(**LOGPROBS, beta=0.5, loss_type="sigmoid", label_smoothing=0.3)
    torch.testing.assert_close(cdpo0, sigmoid)


def test_ipo_hand_value():
    # tau = 0.5: target 1 / (2 tau) = 1. Lengths chosen [2, 4], rejected [1, 2]:
    # c / |y_w| = [1/2, 0/4] = [0.5, 0];  r / |y_l| = [-1/1, 1/2] = [-1, 0.5];  difference [1.5, -0.5]
    # L = (difference - 1)^2 = [0.25, 2.25]; rewards are not length-normalised: [0.5, 0] and [-0.5, 0.5]
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(
        **LOGPROBS, beta=0.5, loss_type="ipo", chosen_lengths=t([2, 4]), rejected_lengths=t([1, 2])
    )
    torch.testing.assert_close(losses, t([0.25, 2.25]), atol=1e-12, rtol=0)
    torch.testing.assert_close(rejected_rewards, t([-0.5, 0.5]))
    # without lengths, eq. 17 as written: h = c - r = [1 - (-1), 0 - 1] = [2, -1]; L = (h - 1)^2 = [1, 4]
    losses, _, _ = dpo.dpo_loss(**LOGPROBS, beta=0.5, loss_type="ipo")
    torch.testing.assert_close(losses, t([1.0, 4.0]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "cdpo", "ipo"])
def test_loss_gradient_finite_differences(loss_type):
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(5, dtype=D, generator=generator).requires_grad_() for _ in range(4))
    lengths = t([1, 3, 7, 2, 5]), t([4, 1, 2, 6, 3])

    def losses(*logprobs):
        return dpo.dpo_loss(*logprobs, 0.3, loss_type, 0.2, *lengths)[0]

    assert torch.autograd.gradcheck(losses, inputs)


# --------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------


def test_truncate_keeps_prompt_end_and_completion_start():
    pair = dpo.PairTokens(list(range(10)), [20, 21, 22], [30, 31, 32, 33, 34, 35])
    assert dpo.truncate(pair, 16) == pair  # 10 + 6 fits
    # 12 tokens: the prompt keeps its last max(6, 12 - 6) = 6, completions get 6
    assert dpo.truncate(pair, 12) == dpo.PairTokens(list(range(4, 10)), [20, 21, 22], [30, 31, 32, 33, 34, 35])
    # 8 tokens: the prompt keeps half (4), completions lose their ends
    assert dpo.truncate(pair, 8) == dpo.PairTokens([6, 7, 8, 9], [20, 21, 22], [30, 31, 32, 33])


def test_encode_appends_eos_and_fits_the_context(setup):
    tokenizer, model = setup
    eos = tokenizer.eos_token_id
    pairs = [
        PAIRS[0],
        PreferencePair("the movie was " * 30, " great", " dull"),
        PreferencePair("the", " great" * 60, " dull"),
        PreferencePair("", " lovely", " flat"),
    ]
    short, long_prompt, long_chosen, empty = tokens = dpo.encode_pairs(tokenizer, pairs, MAX_LENGTH)
    ids = [tokenizer(text)["input_ids"] for text in (PAIRS[0].prompt, PAIRS[0].chosen, PAIRS[0].rejected)]
    assert short == (ids[0], ids[1] + [eos], ids[2] + [eos])
    assert len(long_prompt.prompt) + len(long_prompt.chosen) == MAX_LENGTH and long_prompt.chosen[-1] == eos
    assert len(long_chosen.prompt) + len(long_chosen.chosen) == MAX_LENGTH and long_chosen.chosen[-1] != eos
    assert empty.prompt == [eos]

    # the padded batch is wider than the context, but each row fits and scores as it does alone
    batch = dpo.collate(tokenizer, pairs, tokens)
    assert batch.prompt_ids.shape[1] + batch.response_ids.shape[1] > MAX_LENGTH
    assert batch.ended_with_eos == [True, True, False, True] + [True] * 4
    with torch.no_grad():
        logprobs, lengths = dpo.sequence_logprobs(model, batch)
        alone = [dpo.sequence_logprobs(model, dpo.collate(tokenizer, [p], [t]))[0] for p, t in zip(pairs, tokens)]
    assert lengths.tolist() == [len(t.chosen) for t in tokens] + [len(t.rejected) for t in tokens]
    torch.testing.assert_close(logprobs, torch.stack(alone).T.reshape(-1))

    # prefix sharing: one row per pair, the same tokens, the same log-probs and lengths
    packed = dpo.model_input(tokenizer, pairs, tokens, prefix_sharing=True)
    assert packed.input_ids.shape == (len(pairs), max(len(t.prompt) + len(t.chosen) + len(t.rejected) for t in tokens))
    assert torch.equal(packed.response_ids, batch.response_ids)
    assert torch.equal(packed.response_mask, batch.response_mask)
    with torch.no_grad():
        packed_logprobs, packed_lengths = dpo.sequence_logprobs(model, packed)
    assert torch.equal(packed_lengths, lengths)
    torch.testing.assert_close(packed_logprobs, logprobs, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# TRL 1.16 DPOTrainer
# --------------------------------------------------------------------------------------------


def trl_loss_and_grads(policy, ref_model, tokenizer, pairs, tmp_path, **dpo_args):
    """TRL's loss and parameter gradients on one batch of `pairs`, made by its own tokenisation and collator."""
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    args = TRLDPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False,
        max_length=None, per_device_train_batch_size=len(pairs), save_strategy="no", **dpo_args,
    )
    trainer = DPOTrainer(
        model=policy, ref_model=ref_model, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list([asdict(p) for p in pairs]),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), batch, {name: p.grad for name, p in trainer.model.named_parameters()}


# label smoothing: TRL 1.16's "sigmoid" ignores label_smoothing (cDPO is not one of its loss types).
# Its "robust" loss (rDPO) is R = (-(1-e) log s(x) + e log s(-x)) / (1-2e) and "sigmoid" is S = -log s(x),
# so cDPO = -(1-e) log s(x) - e log s(-x) = 2(1-e) S - (1-2e) R: TRL's weighted sum of the two losses.
EPS = 0.1
TRL_ARGS = {
    "sigmoid": dict(loss_type=["sigmoid"]),
    "ipo": dict(loss_type=["ipo"]),
    "cdpo": dict(loss_type=["sigmoid", "robust"], loss_weights=[2 * (1 - EPS), -(1 - 2 * EPS)], label_smoothing=EPS),
}


@pytest.mark.parametrize("prefix_sharing", [True, False])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "cdpo"])
def test_loss_and_gradients_equal_trl(setup, tmp_path, loss_type, prefix_sharing):
    tokenizer, model = setup
    beta = 0.3
    policy = perturbed(model)
    trl_loss, trl_batch, trl_grads = trl_loss_and_grads(
        copy.deepcopy(policy), copy.deepcopy(model), tokenizer, PAIRS, tmp_path, beta=beta, **TRL_ARGS[loss_type]
    )

    cfg = DPOConfig(  # ipo_token_mean: TRL's ipo
        loss_type=loss_type, beta=beta, label_smoothing=EPS, ipo_token_mean=True, prefix_sharing=prefix_sharing
    )
    tokens = dpo.encode_pairs(tokenizer, PAIRS, MAX_LENGTH)
    objective = dpo.DPOObjective(tokenizer, PAIRS, tokens, cfg, ref_model=copy.deepcopy(model))
    loss_sum, _ = objective.loss(policy, list(range(len(PAIRS))))
    loss = loss_sum / len(PAIRS)
    loss.backward()

    # both sides see the same token ids: [prompt | completion + EOS], the completion marked
    batch = dpo.collate(tokenizer, PAIRS, tokens)
    for row in range(2 * len(PAIRS)):
        real = trl_batch["attention_mask"][row].bool()
        completion = trl_batch["completion_mask"][row][real].bool()
        prompt = batch.prompt_ids[row][batch.prompt_mask[row].bool()]
        response = batch.response_ids[row][batch.response_mask[row].bool()]
        assert trl_batch["input_ids"][row][real].tolist() == prompt.tolist() + response.tolist()
        assert completion.tolist() == [False] * len(prompt) + [True] * len(response)

    assert loss.item() > 0.01
    torch.testing.assert_close(loss.detach(), trl_loss, atol=1e-5, rtol=0)
    grads = dict(policy.named_parameters())
    assert grads.keys() == trl_grads.keys()
    for name, p in grads.items():
        torch.testing.assert_close(p.grad, trl_grads[name], atol=1e-5, rtol=0, msg=name)
    assert sum(float(p.grad.abs().sum()) for p in grads.values()) > 1e-2


# --------------------------------------------------------------------------------------------
# LoRA, reference, training
# --------------------------------------------------------------------------------------------


def test_lora_reference_is_initial_model_and_only_adapters_train(setup):
    tokenizer, model = setup
    cfg = DPOConfig(
        lora_r=4, lora_alpha=16, precompute_ref_logprobs=False, lr=2e-2, batch_size=4, epochs=8,
        warmup_fraction=0, checkpoint_every=0, mixed_precision="no",
    )
    policy = lora.add_lora(copy.deepcopy(model), cfg, seed=0)
    tokens = dpo.encode_pairs(tokenizer, PAIRS, MAX_LENGTH)
    objective = dpo.DPOObjective(tokenizer, PAIRS, tokens, cfg)

    loss, _ = objective.loss(policy, list(range(len(PAIRS))))
    loss.backward()
    adapters = {name for name, _ in policy.named_parameters() if "lora_" in name}
    assert adapters and {name for name, p in policy.named_parameters() if p.grad is not None} == adapters
    assert {name for name, p in policy.named_parameters() if p.requires_grad} == adapters
    policy.zero_grad(set_to_none=True)

    train_loop(policy, objective, cfg, seed=0)

    batch = dpo.collate(tokenizer, PAIRS, tokens)
    with torch.no_grad():
        initial = dpo.sequence_logprobs(model, batch)[0]
        trained = dpo.sequence_logprobs(policy, batch)[0]
    torch.testing.assert_close(dpo.reference_logprobs(policy, None, batch), initial, atol=1e-6, rtol=0)
    assert (trained - initial).abs().max() > 1e-2
    accuracy, margin = rewards_metrics(policy, model, tokenizer, cfg)
    assert margin > 0.1 and accuracy >= 0.75


@pytest.mark.parametrize("lora_r", [0, 4])
def test_precomputed_and_on_the_fly_reference_agree(setup, tmp_path, lora_r):
    tokenizer, model = setup
    logged = {}
    for precompute in (True, False):
        cfg = DPOConfig(
            lora_r=lora_r, precompute_ref_logprobs=precompute, lr=1e-2, batch_size=4, epochs=1, warmup_fraction=0,
            mixed_precision="no", log_every=1,
        )
        steps = []
        dpo.train(perturbed(model), tokenizer, PAIRS, MAX_LENGTH, cfg, seed=0, log=lambda m, step: steps.append(m))
        logged[precompute] = steps
    # LoRA starts at the initial policy (log-ratios 0, loss log 2); full fine-tuning at the perturbed one
    assert logged[True][0]["loss"] == pytest.approx(logged[False][0]["loss"], abs=1e-6)
    assert logged[True][1]["loss"] == pytest.approx(logged[False][1]["loss"], abs=1e-5)
    if lora_r:
        assert logged[True][0]["loss"] == pytest.approx(0.6931472, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "cdpo"])
def test_training_raises_accuracy_and_margin(setup, loss_type):
    tokenizer, model = setup
    cfg = DPOConfig(loss_type=loss_type, lr=3e-3, batch_size=4, epochs=6, warmup_fraction=0, mixed_precision="no")
    assert rewards_metrics(model, model, tokenizer, cfg) == (0.0, 0.0)
    trained, metrics = dpo.train(copy.deepcopy(model), tokenizer, PAIRS, MAX_LENGTH, cfg, seed=0)
    accuracy, margin = rewards_metrics(trained, model, tokenizer, cfg)
    assert accuracy >= 0.875 and margin > 0.1
    assert {"loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "grad_norm"} <= metrics.keys()


class Crash(Exception):
    pass


def test_resumed_lora_run_equals_uninterrupted_run(setup, tmp_path):
    tokenizer, model = setup
    cfg = DPOConfig(lora_r=4, lr=1e-2, batch_size=2, epochs=2, checkpoint_every=1, log_every=1, mixed_precision="no")
    uninterrupted, _ = dpo.train(copy.deepcopy(model), tokenizer, PAIRS, MAX_LENGTH, cfg, seed=3)

    def crash_at_step_5(metrics, step):
        if step == 5:
            raise Crash

    folder = tmp_path / "checkpoints"
    with pytest.raises(Crash):
        dpo.train(copy.deepcopy(model), tokenizer, PAIRS, MAX_LENGTH, cfg, 3, crash_at_step_5, folder)
    assert sorted(p.name for p in folder.iterdir()) == [dpo.REF_CACHE, "step-00000004"]
    cached = (folder / dpo.REF_CACHE).read_bytes()

    resumed, _ = dpo.train(copy.deepcopy(model), tokenizer, PAIRS, MAX_LENGTH, cfg, 3, checkpoint_dir=folder)
    assert (folder / dpo.REF_CACHE).read_bytes() == cached
    expected = uninterrupted.state_dict()
    assert type(resumed) is type(model) and resumed.state_dict().keys() == expected.keys()
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_reference_cache_is_reused_and_checked(setup, tmp_path):
    tokenizer, model = setup
    cache = tmp_path / dpo.REF_CACHE
    tokens = dpo.encode_pairs(tokenizer, PAIRS, MAX_LENGTH)
    computed = dpo.precompute_ref_logprobs(model, model, tokenizer, PAIRS, tokens, 3, "no", cache)
    with torch.no_grad():
        chosen_and_rejected = dpo.sequence_logprobs(model, dpo.collate(tokenizer, PAIRS, tokens))[0]
    # other batches, other padding: float32 rounding of sums of ~50 nats
    torch.testing.assert_close(computed.reshape(-1), chosen_and_rejected, atol=1e-5, rtol=1e-6)
    # read back without the model; other pairs invalidate it
    assert torch.equal(dpo.precompute_ref_logprobs(None, None, tokenizer, PAIRS, tokens, 3, "no", cache), computed)
    fewer = dpo.precompute_ref_logprobs(model, model, tokenizer, PAIRS[:3], tokens[:3], 3, "no", cache)
    assert fewer.shape == (2, 3) and torch.equal(fewer, computed[:, :3])


def test_run_trains_lora_and_saves_a_plain_model(setup, tmp_path):
    tokenizer, model = setup
    lm.save_policy(model, tokenizer, tmp_path / "sft")
    rows = [asdict(p) for p in PAIRS] + [{"prompt": "the plot is", "chosen": " fine", "rejected": " ok", "tie": True}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = load_config(overrides={
        "base": {"max_length": 48},
        "dpo": {"lora_r": 4, "lr": 2e-2, "batch_size": 4, "epochs": 3, "checkpoint_every": 1, "mixed_precision": "no"},
    })
    metrics = dpo.run(cfg, str(tmp_path / "sft"), str(tmp_path / "pairs.jsonl"), tmp_path / "dpo")

    assert metrics["pairs"] == len(PAIRS) and metrics["ties_skipped"] == 1 and metrics["accuracy"] > 0.5
    assert not (tmp_path / "dpo" / "checkpoints").exists()
    trained, _ = lm.load_policy(tmp_path / "dpo")
    assert type(trained) is type(model) and not any("lora" in name for name in trained.state_dict())
    accuracy, margin = rewards_metrics(trained, model, tokenizer, cfg.dpo)
    assert accuracy >= 0.75 and margin > 0.05
