"""The embedded review world and its gold scorer."""

from __future__ import annotations

import pytest

from components import world
from components.world import gold

PROMPT = "The Quiet River: I watched"


@pytest.fixture(scope="module")
def reviews():
    return world.generate_reviews(n_reviews=600, eval_fraction=0.1, low_quality_fraction=0.3, seed=123)


# --------------------------------------------------------------------------------------------
# world
# --------------------------------------------------------------------------------------------


def test_generate_reviews_deterministic(reviews):
    again = world.generate_reviews(n_reviews=600, eval_fraction=0.1, low_quality_fraction=0.3, seed=123)
    assert again == reviews
    other = world.generate_reviews(n_reviews=600, eval_fraction=0.1, low_quality_fraction=0.3, seed=124)
    assert [r.text for r in other] != [r.text for r in reviews]


def test_eval_titles_never_in_train(reviews):
    train_titles = {r.title for r in reviews if r.split == "train"}
    eval_titles = {r.title for r in reviews if r.split == "eval"}
    assert eval_titles, "the corpus should hold some held-out reviews"
    assert train_titles, "the corpus should hold some training reviews"
    assert not train_titles & eval_titles
    # no train prompt or document names a held-out film either
    for review in reviews:
        if review.split == "train":
            assert not any(title in review.document for title in eval_titles), review.document
    # the held-out films are int(n_films * eval_fraction) of the catalogue at most
    n_films = len(world.TITLE_ADJECTIVES) * len(world.TITLE_NOUNS)
    assert len(eval_titles) <= int(n_films * 0.1)
    assert {r.split for r in reviews} == {"train", "eval"}


def test_review_fields(reviews):
    for review in reviews[:50]:
        assert -1.0 <= review.sentiment <= 1.0
        assert review.document == f"{review.title}: {review.text}"
        assert review.prompt(3) == f"{review.title}: " + " ".join(review.text.split()[:3])
    share_low = sum(r.low_quality for r in reviews) / len(reviews)
    assert 0.2 < share_low < 0.4  # 600 draws at p = 0.3: standard error 0.019


def test_normalise_words():
    assert world.normalise_words('The "Plot" was GREAT!  (really) ...') == ["the", "plot", "was", "great", "really"]


# --------------------------------------------------------------------------------------------
# gold
# --------------------------------------------------------------------------------------------


def test_positive_beats_negative():
    positive = gold.score(PROMPT, "The acting was wonderful and the plot brilliant. I loved this film.")
    negative = gold.score(PROMPT, "The acting was awful and the plot boring. I hated this film.")
    assert positive.sentiment > 0.5
    assert negative.sentiment < -0.5
    assert positive.sentiment > negative.sentiment
    # same topic, fluency and repetition: the totals differ by the sentiment alone
    assert positive.quality == pytest.approx(negative.quality, abs=1e-12)
    assert positive.total - negative.total == pytest.approx(positive.sentiment - negative.sentiment, abs=1e-12)


def test_repetition_zero_for_distinct_words():
    assert gold.repetition("the plot is great".split()) == 0.0
    assert gold.repetition([]) == 0.0
    assert gold.repetition(["one"]) == 0.0
    assert gold.score(PROMPT, "The plot is great.").repetition == 0.0


def test_repetition_hand_computed():
    # "a b a b": bigrams (a,b), (b,a), (a,b): 2 distinct of 3 -> 1 - 2/3 = 1/3
    assert gold.repetition("a b a b".split()) == pytest.approx(1 / 3, abs=1e-12)
    # "great great great great": bigrams (g,g) x3: 1 distinct of 3 -> 1 - 1/3 = 2/3
    assert gold.repetition(["great"] * 4) == pytest.approx(2 / 3, abs=1e-12)
    # through score(): punctuation and case are normalised away, "A b. a B" is "a b a b"
    assert gold.score(PROMPT, "A b. a B").repetition == pytest.approx(1 / 3, abs=1e-12)


def test_total_hand_computed():
    # "a b a b": no sentiment words (VADER compound 0), no film word -> on_topic 0,
    # fluency: "a" is in the lexicon, "b" is not -> 2/4 = 0.5, repetition 1/3, EOS present
    # total = 0 + 0.25 * 0 + 0.25 * 0.5 - 1 * (1/3) - 0 = 0.125 - 0.3333333 = -0.2083333
    s = gold.score(PROMPT, "a b a b")
    assert (s.sentiment, s.on_topic, s.fluency, s.missing_eos) == (0.0, 0.0, 0.5, 0.0)
    assert s.total == pytest.approx(0.125 - 1 / 3, abs=1e-12)
    assert gold.gold_reward(PROMPT, "a b a b") == pytest.approx(s.total, abs=1e-12)


def test_missing_eos_costs_exactly_half():
    text = "The soundtrack is lovely but the pacing is slow."
    with_eos = gold.score(PROMPT, text, ended_with_eos=True)
    without = gold.score(PROMPT, text, ended_with_eos=False)
    assert (with_eos.missing_eos, without.missing_eos) == (0.0, 1.0)
    assert with_eos.total - without.total == pytest.approx(0.5, abs=1e-12)
    assert gold.gold_reward(PROMPT, text) - gold.gold_reward(PROMPT, text, False) == pytest.approx(0.5, abs=1e-12)


def test_on_topic():
    assert gold.score(PROMPT, "My cousin likes pizza.").on_topic == 0.0
    assert gold.score(PROMPT, "My cousin likes this movie.").on_topic == 1.0
    assert gold.score(PROMPT, "The cinematography, though!").on_topic == 1.0  # an aspect counts as a film word
    # a word of the film's title counts; "the" does not
    assert gold.score(PROMPT, "The river was cold.").on_topic == 1.0
    assert gold.score(PROMPT, "The weather was cold.").on_topic == 0.0


def test_empty_completion():
    s = gold.score(PROMPT, "")
    assert (s.sentiment, s.on_topic, s.fluency, s.repetition) == (0.0, 0.0, 0.0, 0.0)
    assert s.total == 0.0
