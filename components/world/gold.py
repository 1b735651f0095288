"""The gold scorer: the stand-in for human judgment in the embedded review world.

    gold = sentiment + 0.25 * on_topic + 0.25 * fluency - repetition - 0.5 * missing_eos

- sentiment: VADER compound score of the completion, in [-1, 1] (Hutto & Gilbert 2014; the
  `vaderSentiment` package, a scorer nobody on this project wrote);
- on_topic: 1 when the completion talks about the film (a film word or a word of its title);
- fluency: share of the completion's words that belong to the world's lexicon, in [0, 1];
- repetition: share of the completion's word bigrams that repeat an earlier one, in [0, 1];
- missing_eos: 1 when generation stopped at the token limit instead of at EOS.

The reward model never sees this function: it learns from the simulated annotators' noisy
labels, and evaluation measures how far optimising the learned proxy moved the gold score.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from components.world import ASPECTS, GENRES, lexicon, normalise_words

FILM_WORDS = frozenset({"film", "movie", "watch", "performance", *ASPECTS, *GENRES})
TOPIC_WEIGHT = 0.25
FLUENCY_WEIGHT = 0.25
REPETITION_WEIGHT = 1.0
MISSING_EOS_WEIGHT = 0.5


@dataclass(frozen=True)
class GoldScore:
    sentiment: float
    on_topic: float
    fluency: float
    repetition: float
    missing_eos: float

    @property
    def quality(self) -> float:
        """Everything but sentiment: what LIMA-style curation of demonstrations filters on."""
        return (
            TOPIC_WEIGHT * self.on_topic
            + FLUENCY_WEIGHT * self.fluency
            - REPETITION_WEIGHT * self.repetition
            - MISSING_EOS_WEIGHT * self.missing_eos
        )

    @property
    def total(self) -> float:
        return self.sentiment + self.quality


@lru_cache(maxsize=1)
def _vader() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()


def repetition(words: list[str]) -> float:
    bigrams = list(zip(words, words[1:]))
    if not bigrams:
        return 0.0
    return 1.0 - len(set(bigrams)) / len(bigrams)


def score(prompt: str, completion: str, ended_with_eos: bool = True) -> GoldScore:
    """Score `completion`, the text generated after `prompt` (the title comes before ':')."""
    words = normalise_words(completion)
    title_words = set(normalise_words(prompt.split(":", 1)[0])) - {"the"}
    known = lexicon()
    return GoldScore(
        sentiment=_vader().polarity_scores(completion)["compound"] if words else 0.0,
        on_topic=float(any(w in FILM_WORDS or w in title_words for w in words)),
        fluency=sum(w in known for w in words) / len(words) if words else 0.0,
        repetition=repetition(words),
        missing_eos=0.0 if ended_with_eos else 1.0,
    )


def gold_reward(prompt: str, completion: str, ended_with_eos: bool = True) -> float:
    return score(prompt, completion, ended_with_eos).total
