"""Simulated annotators: tau calibration, realised agreement, pairing and determinism."""

from __future__ import annotations

import math
import random

import pytest

from components.data.records import PreferencePair, pair_id
from components.labelers import annotators
from components.labelers.annotators import GoldScored

TARGET = 0.726


def synthetic(n_prompts: int = 400, k: int = 4, seed: int = 7) -> dict[str, list[GoldScored]]:
    rng = random.Random(seed)
    return {
        f"prompt {i}:": [GoldScored(f"prompt {i}:", f"completion {i}-{j}", rng.gauss(0.0, 1.0)) for j in range(k)]
        for i in range(n_prompts)
    }


def test_expected_agreement_hand_values():
    # diffs [1, -1, 0] at tau = 1: p = sigmoid(1) = 0.7310586 twice and 1/2 for the tie
    p = 1 / (1 + math.exp(-1))
    assert annotators.expected_agreement([1.0, -1.0, 0.0], 1.0, "gold") == pytest.approx((2 * p + 0.5) / 3, abs=1e-12)
    # two annotators agree when both pick a (p^2) or both pick b ((1-p)^2); a tie agrees half the time
    both = p**2 + (1 - p) ** 2  # 0.6066...
    assert annotators.expected_agreement([1.0, -1.0, 0.0], 1.0) == pytest.approx((2 * both + 0.5) / 3, abs=1e-12)


def test_calibrate_tau_hits_target():
    rng = random.Random(3)
    diffs = [rng.gauss(0, 1) - rng.gauss(0, 1) for _ in range(500)]
    for between in ("inter_annotator", "gold"):
        for target in (0.6, TARGET, 0.9):
            tau = annotators.calibrate_tau(diffs, target, between)
            assert annotators.expected_agreement(diffs, tau, between) == pytest.approx(target, abs=1e-6)
    # a single diff d, gold: sigmoid(|d| / tau) = q  <=>  tau = |d| / logit(q); d = 2, q = 0.726:
    tau = annotators.calibrate_tau([2.0], TARGET, "gold")
    assert tau == pytest.approx(2.0 / math.log(0.726 / 0.274), rel=1e-6)
    # inter-annotator: p^2 + (1-p)^2 = 0.726  <=>  p = (1 + sqrt(2 * 0.726 - 1)) / 2 = 0.83619...
    p = (1 + math.sqrt(2 * TARGET - 1)) / 2
    assert annotators.calibrate_tau([2.0], TARGET) == pytest.approx(2.0 / math.log(p / (1 - p)), rel=1e-6)


def test_an_unreachable_target_is_an_error():
    # half the pairs tie: noiseless annotators agree on 1/2 * 1 + 1/2 * 1/2 = 0.75 at most
    with pytest.raises(ValueError, match=r"target_agreement=0.8 is unreachable.*0.5 and 0.7500"):
        annotators.calibrate_tau([1.0, 0.0], 0.8)
    with pytest.raises(ValueError, match="unreachable"):
        annotators.calibrate_tau([1.0, -2.0], 0.5)


def test_two_annotators_agree_with_each_other_at_the_target():
    """Two annotators (two seeds) label the same 5,000 pairs: they agree on TARGET of them within 0.02,
    and each agrees with the gold ordering more often than with the other (p > p^2 + (1-p)^2)."""
    samples = synthetic(n_prompts=5000, k=2)
    first, stats = annotators.label(samples, 1, TARGET, seed=1)
    second, _ = annotators.label(samples, 1, TARGET, seed=2)
    assert [label.pair_id for label in first] == [label.pair_id for label in second] and len(first) == 5000
    agreement = sum(a.chosen == b.chosen for a, b in zip(first, second)) / len(first)
    assert agreement == pytest.approx(TARGET, abs=0.02)
    assert stats["expected_inter_annotator_agreement"] == pytest.approx(TARGET, abs=1e-6)
    assert stats["agreement_with_gold"] == pytest.approx(stats["expected_agreement_with_gold"], abs=0.02)
    assert stats["expected_agreement_with_gold"] > 0.8


def test_label_realised_agreement_and_stats():
    samples = synthetic()
    labels, stats = annotators.label(samples, n_annotators=5, target_agreement=TARGET, seed=11, calibrate_to="gold")
    assert stats["pairs"] == len(labels) == 400 * 6
    assert stats["expected_agreement_with_gold"] == pytest.approx(TARGET, abs=1e-6)
    realised = sum(label.meta["agrees_with_gold"] for label in labels) / len(labels)
    assert realised == pytest.approx(stats["agreement_with_gold"], abs=1e-12)
    assert 0.70 <= realised <= 0.75
    # agrees_with_gold is consistent with the gold values of chosen and rejected
    gold = {s.completion: s.gold for group in samples.values() for s in group}
    for label in labels[:200]:
        assert label.meta["agrees_with_gold"] == float(gold[label.chosen] > gold[label.rejected])
        assert label.annotator in {f"simulated-{i}" for i in range(5)}
        assert label.source == "simulated"


def test_label_pairs_every_distinct_completion_once():
    samples = {
        "p1:": [GoldScored("p1:", c, g) for c, g in zip("abcd", (0.1, 0.5, -0.3, 1.0))],  # 4 distinct: 6 pairs
        "p2:": [GoldScored("p2:", c, g) for c, g in zip("xxyz", (0.2, 0.2, 0.9, -1.0))],  # x twice: 3 distinct -> 3 pairs
        "p3:": [GoldScored("p3:", "same", 0.0)] * 4,  # all identical: 0 pairs
    }
    labels, stats = annotators.label(samples, n_annotators=2, target_agreement=TARGET, seed=0)
    per_prompt = {p: sum(label.prompt == p for label in labels) for p in samples}
    assert per_prompt == {"p1:": 6, "p2:": 3, "p3:": 0}
    assert stats["pairs"] == 9
    assert len({label.pair_id for label in labels}) == 9  # no pair labelled twice
    assert all(label.chosen != label.rejected for label in labels)
    p1 = {frozenset((label.chosen, label.rejected)) for label in labels if label.prompt == "p1:"}
    assert p1 == {frozenset(pair) for pair in ("ab", "ac", "ad", "bc", "bd", "cd")}


def test_label_rejects_no_distinct_pairs():
    with pytest.raises(ValueError, match="no pair"):
        annotators.label({"p:": [GoldScored("p:", "same", 0.0)] * 3}, 1, TARGET, 0)


def test_pair_id_stable_and_order_independent():
    first = pair_id("The Quiet River: I watched", "great film", "bad film")
    assert first == pair_id("The Quiet River: I watched", "bad film", "great film")
    assert first == pair_id("The Quiet River: I watched", "great film", "bad film")
    assert len(first) == 16 and int(first, 16) >= 0
    # differs when the prompt or a completion differs
    assert first != pair_id("The Quiet River: I saw", "great film", "bad film")
    assert first != pair_id("The Quiet River: I watched", "great film", "bad movie")
    # a fixed value: the id must not depend on the process (no salted hash())
    import hashlib

    expected = hashlib.sha256("p\x1fa\x1fb".encode()).hexdigest()[:16]
    assert pair_id("p", "b", "a") == expected


def test_label_pair_ids_match_labels():
    labels, _ = annotators.label(synthetic(20), 3, TARGET, seed=5)
    for label in labels:
        assert label.pair_id == pair_id(label.prompt, label.chosen, label.rejected)
    assert len({label.pair_id for label in labels}) == len(labels)


def test_label_same_seed_same_labels():
    samples = synthetic(100)
    first, stats_first = annotators.label(samples, 5, TARGET, seed=42)
    second, stats_second = annotators.label(samples, 5, TARGET, seed=42)
    assert first == second
    assert stats_first == stats_second
    other, _ = annotators.label(samples, 5, TARGET, seed=43)
    assert [l.chosen for l in other] != [l.chosen for l in first]
    row = first[0].to_row()
    assert row == {
        "pair_id": first[0].pair_id,
        "group": first[0].group,
        "prompt": first[0].prompt,
        "chosen": first[0].chosen,
        "rejected": first[0].rejected,
        "margin": None,
        "tie": False,
        "annotator": first[0].annotator,
        "source": "simulated",
        "meta": {"agrees_with_gold": first[0].meta["agrees_with_gold"]},
    }
    assert PreferencePair.from_row(row) == first[0]


def test_empty_completions_become_a_marker_and_every_labelled_pair_passes_validation(tiny_policy, tiny_tokenizer, tiny_prompts):
    """A policy that ends at once (EOS first) answers with the EOS token's text, a legitimately bad
    answer: pairs against it are valid at data.mostly = 1.0, never an empty `rejected`."""
    import torch

    from components.data.validation import validate_preferences
    from components.labelers.annotators import SimulatedAnnotators
    from components.models import lm
    from components.sections import SamplingConfig
    from components.world.gold import gold_reward

    mute = tiny_policy()
    with torch.no_grad():  # a constant final hidden state that scores only EOS
        mute.transformer.ln_f.weight.zero_()
        mute.transformer.ln_f.bias.fill_(1.0)
        mute.lm_head.weight.zero_()
        mute.lm_head.weight[tiny_tokenizer.eos_token_id] = 1.0
    sampling = SamplingConfig(max_new_tokens=8, batch_size=16)
    prompts = [p for p in tiny_prompts[:6] for _ in range(2)]
    empty = lm.samples_to_label(mute, tiny_tokenizer, prompts, sampling, seed=0)
    assert {(s.completion, s.ended_with_eos) for s in empty} == {(tiny_tokenizer.eos_token, True)}
    chatty = lm.samples_to_label(tiny_policy(), tiny_tokenizer, prompts, sampling, seed=0)
    pairs, _ = SimulatedAnnotators(gold_reward, 3, TARGET).label(empty + chatty, seed=0)
    assert pairs and all(p.chosen and p.rejected and p.chosen != p.rejected for p in pairs)
    assert validate_preferences([p.to_row() for p in pairs], mostly=1.0).success
