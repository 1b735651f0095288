"""Length-grouped batches (`group_by_length`): the epoch's examples in full batches of similar
lengths, a function of (seed, epoch) only, so that a resumed run trains on the same batches; and
each trainer's objective reports the lengths they are grouped on."""

from __future__ import annotations

import random

import pytest
import torch

from components.data.records import PreferencePair
from components.models import lm
from components.models.training import step_batches, train_loop
from components.sections import DPOConfig, TrainerConfig
from components.trainers import dpo, reward_model, sft

pytestmark = pytest.mark.usefixtures("single_thread")


def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    """Mostly short examples and a long tail, as demonstrations and preference pairs are."""
    rng = random.Random(seed)
    return [int(8 * rng.lognormvariate(0, 1)) + 1 for _ in range(n)]


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of a batch's positions that are padding, each batch trimmed to its longest example."""
    width = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / width


def ungrouped(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """`step_batches` as it was before grouping: the seeded permutation cut into full batches."""
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(max(1, n_examples // batch_size))]


@pytest.mark.parametrize("n_examples, batch_size", [(1000, 8), (203, 16), (37, 4), (3, 8)])
def test_without_lengths_the_batches_are_the_seeded_permutation_cut(n_examples, batch_size):
    for seed, epoch in ((0, 0), (3, 1)):
        assert step_batches(n_examples, batch_size, seed, epoch) == ungrouped(n_examples, batch_size, seed, epoch)


@pytest.mark.parametrize("n_examples, batch_size", [(1200, 16), (203, 16), (37, 4)])
def test_grouped_batches_are_the_epochs_examples_in_full_batches_a_function_of_seed_and_epoch(n_examples, batch_size):
    lengths = skewed_lengths(n_examples)
    for epoch in range(3):
        plain = step_batches(n_examples, batch_size, seed=1, epoch=epoch)
        grouped = step_batches(n_examples, batch_size, seed=1, epoch=epoch, lengths=lengths)
        assert [len(b) for b in grouped] == [batch_size] * len(plain)
        assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)  # the same examples
        assert padding_fraction(grouped, lengths) < padding_fraction(plain, lengths)
        # the longest example's batch first: a run that does not fit in memory fails at once
        assert max(lengths[i] for i in grouped[0]) == max(lengths[i] for b in grouped for i in b)
        assert grouped == step_batches(n_examples, batch_size, seed=1, epoch=epoch, lengths=lengths)
    assert grouped != step_batches(n_examples, batch_size, seed=1, epoch=0, lengths=lengths)
    assert grouped != step_batches(n_examples, batch_size, seed=2, epoch=2, lengths=lengths)


def test_grouping_cuts_the_padding_of_sft_sized_epochs():
    """1200 demonstrations in batches of 16 (the sft section's defaults): megabatches of 18 batches."""
    lengths = skewed_lengths(1200)
    for epoch in range(3):
        plain = padding_fraction(step_batches(1200, 16, seed=0, epoch=epoch), lengths)
        grouped = padding_fraction(step_batches(1200, 16, seed=0, epoch=epoch, lengths=lengths), lengths)
        assert plain > 0.6 and grouped < plain / 2


def test_a_dataset_smaller_than_a_batch_is_one_grouped_step():
    assert sorted(step_batches(3, 8, seed=0, epoch=0, lengths=[5, 1, 9])[0]) == [0, 1, 2]


class Regression:
    """Least squares on examples of varied lengths, one term per example."""

    def __init__(self, n_examples: int):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n_examples, 3, generator=generator)
        self.y = torch.randn(n_examples, 1, generator=generator)
        self.n_examples, self.lengths = n_examples, skewed_lengths(n_examples)
        self.batches: list[list[int]] = []

    def n_terms(self, indices: list[int]) -> int:
        return len(indices)

    def loss(self, model, indices: list[int]):
        self.batches.append(sorted(indices))
        return ((model(self.x[indices]) - self.y[indices]) ** 2).sum(), {}


class Stop(Exception):
    pass


def run(objective: Regression, checkpoint_dir, group_by_length: bool, stop_at: int = 0):
    """train_loop on a linear model; `stop_at`: stopped at that step, before its checkpoint."""

    def log(metrics: dict, step: int) -> None:
        if step == stop_at:
            raise Stop

    cfg = TrainerConfig(
        epochs=3, batch_size=4, lr=1e-2, mixed_precision="no", checkpoint_every=4, group_by_length=group_by_length,
        log_every=1,  # `log` stops the run at any step
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    train_loop(model, objective, cfg, seed=0, log=log, checkpoint_dir=checkpoint_dir)
    return model


def test_train_loop_groups_by_length_and_a_resumed_run_trains_on_the_same_batches(tmp_path):
    plain, grouped = Regression(64), Regression(64)
    run(plain, None, group_by_length=False)
    uninterrupted = run(grouped, None, group_by_length=True)
    expected = [sorted(b) for epoch in range(3) for b in step_batches(64, 4, 0, epoch, grouped.lengths)]
    assert grouped.batches == expected
    assert padding_fraction(grouped.batches, grouped.lengths) < padding_fraction(plain.batches, plain.lengths)

    stopped = Regression(64)
    with pytest.raises(Stop):
        run(stopped, tmp_path, group_by_length=True, stop_at=21)  # in the second epoch, the last checkpoint at 20
    resumed = Regression(64)
    final = run(resumed, tmp_path, group_by_length=True)
    assert stopped.batches + resumed.batches == expected[:21] + expected[20:]
    for weight, reference in zip(final.parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(weight, reference, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["the film was a quiet wonder", "a warm and honest heart", "the cast gave it everything it had"]
    return lm.train_tokenizer(texts * 10, 300)


def counts(tokenizer, texts: list[str]) -> list[int]:
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def test_objectives_report_their_examples_token_lengths(tokenizer):
    prompts, responses = ["the film", "a"], [" was a quiet wonder", " warm heart"]
    demos = [sft.Demonstration(p, r) for p, r in zip(prompts, responses)]
    expected = [p + r + 1 for p, r in zip(counts(tokenizer, prompts), counts(tokenizer, responses))]  # and EOS
    assert sft.lm_objective(tokenizer, demos, 64).lengths == expected
    assert sft.lm_objective(tokenizer, demos, 64, packing=True).lengths == [sum(expected)]  # one packed row

    rejected = [" gave it", " the cast had"]
    pairs = [PreferencePair(p, c, r) for p, c, r in zip(prompts, responses, rejected)]
    expected = [sum(parts) for parts in zip(*(counts(tokenizer, texts) for texts in (prompts, responses, rejected)))]
    assert reward_model.PairwiseObjective(tokenizer, pairs).lengths == expected
    tokens = dpo.encode_pairs(tokenizer, pairs, 64)
    assert dpo.DPOObjective(tokenizer, pairs, tokens, DPOConfig()).lengths == [e + 2 for e in expected]  # the EOSes

    ranking = reward_model.Ranking("the film", (" was a quiet wonder", " gave it", " had"), (0, 1, 2), (0, 1), (1, 2))
    objective = reward_model.RankingObjective(tokenizer, [ranking, ranking])
    assert objective.lengths == [sum(counts(tokenizer, ["the film", *ranking.completions]))] * 2
