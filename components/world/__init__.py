"""The embedded review world: short movie reviews generated from a seed.

Nothing can be downloaded, so the pipeline's default world is made here. Each review has a latent
sentiment (drawn uniformly in [-1, 1]) that decides, sentence by sentence, whether positive or
negative words are used, and a quality: most reviews are clean, the rest repeat themselves or
ramble off topic. A document is `"{title}: {review}"`; a prompt is the title plus the first
`prompt_words` words of a review. Films are split into train and held-out sets, so evaluation
prompts name films that no stage ever trained on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TITLE_ADJECTIVES = (
    "Silent Crimson Last Hidden Broken Golden Distant Northern Paper Glass Iron Velvet Hollow Quiet "
    "Burning Frozen Lonely Electric Secret Wild Little Endless Midnight Faded Scarlet Lost Bright Copper"
).split()
TITLE_NOUNS = (
    "Harbor Garden Empire River Letter Mirror Winter Station Orchard Signal Country Island Machine "
    "Summer Kingdom Lantern Road Forest Tower Promise Ocean Bridge Circus Engine Valley Shadow Voyage Window"
).split()
GENRES = "drama comedy thriller romance western mystery musical documentary adventure story".split()
ASPECTS = (
    "acting plot story script dialogue soundtrack music cinematography pacing ending cast direction "
    "characters visuals editing lead performance humor"
).split()
POSITIVE = (
    "wonderful brilliant beautiful delightful excellent great charming superb lovely fantastic good "
    "enjoyable stunning impressive heartfelt sweet clever funny amazing gorgeous"
).split()
NEGATIVE = (
    "boring awful terrible dull bad horrible weak painful disappointing poor messy nasty ugly stupid "
    "annoying dreadful pathetic lame dumb miserable"
).split()
NEUTRAL = "long quiet slow familiar ordinary unusual simple strange".split()
ADVERBS = {1: "truly really very quite genuinely".split(), -1: "truly really very quite painfully".split()}
FEELINGS = {1: "loved enjoyed adored admired".split(), -1: "hated disliked regretted resented".split()}
RECOMMEND = {1: ("would recommend", "would happily recommend"), -1: ("would not recommend", "would never recommend")}
AUDIENCES = "everyone families anyone adults kids".split()
ROLES = "lead actor actress villain hero supporting cast".split()
OPENINGS = (
    "I watched {title} last night.",
    "{title} is a {neutral} {genre}.",
    "I saw this {genre} with {audience}.",
    "This {genre} runs long.",
    "My friends picked {title} for movie night.",
    "The new {genre} from this director opened this week.",
    "{title} tells the story of a {noun}.",
)
OFF_TOPIC = (
    "My cousin likes pizza.",
    "The weather was cold outside.",
    "I need to buy new shoes.",
    "Traffic on the road was heavy.",
    "The parking lot was full.",
)
MAX_SENTENCES = 6


@dataclass(frozen=True)
class Review:
    title: str
    text: str
    sentiment: float
    low_quality: bool
    split: str  # "train" or "eval"

    @property
    def document(self) -> str:
        return f"{self.title}: {self.text}"

    def prompt(self, n_words: int) -> str:
        return f"{self.title}: " + " ".join(self.text.split()[:n_words])

    def completion(self, n_words: int) -> str:
        """The rest of the review after `prompt(n_words)`, with its leading space, as a policy writes it."""
        return " " + " ".join(self.text.split()[n_words:])


def _polar(rng: random.Random, sentiment: float) -> int:
    """+1 or -1, positive with probability (1 + sentiment) / 2."""
    return 1 if rng.random() < (1 + sentiment) / 2 else -1


def _adjective(rng: random.Random, polarity: int) -> str:
    return rng.choice(POSITIVE if polarity > 0 else NEGATIVE)


def _sentence(rng: random.Random, title: str, sentiment: float) -> str:
    p = _polar(rng, sentiment)
    adj, aspect = _adjective(rng, p), rng.choice(ASPECTS)
    templates = (
        lambda: f"The {aspect} is {adj}.",
        lambda: f"The {aspect} was {rng.choice(ADVERBS[p])} {adj}.",
        lambda: f"I found the {aspect} {adj} and the {rng.choice(ASPECTS)} {_adjective(rng, _polar(rng, sentiment))}.",
        lambda: f"{title} is a {adj} {rng.choice(GENRES)}.",
        lambda: f"I {rng.choice(FEELINGS[p])} this film.",
        lambda: f"I {rng.choice(RECOMMEND[p])} it to {rng.choice(AUDIENCES)}.",
        lambda: f"The {rng.choice(ROLES)} gives a {adj} performance.",
        lambda: f"Overall, a {adj} {rng.choice(GENRES)}.",
        lambda: f"It is {rng.choice(ADVERBS[p])} {adj} to watch.",
    )
    return rng.choice(templates)()


def _opening(rng: random.Random, title: str) -> str:
    return rng.choice(OPENINGS).format(
        title=title,
        neutral=rng.choice(NEUTRAL),
        genre=rng.choice(GENRES),
        audience=rng.choice(AUDIENCES),
        noun=rng.choice(TITLE_NOUNS).lower(),
    )


def _degrade(rng: random.Random, sentences: list[str]) -> list[str]:
    """Make a low-quality review: repeated sentences, stuttered words or off-topic rambling."""
    flaw = rng.choice(("repeat", "stutter", "ramble"))
    if flaw == "repeat":
        i = rng.randrange(len(sentences))
        return sentences[: i + 1] + [sentences[i]] * rng.randint(1, 3) + sentences[i + 1 :]
    if flaw == "stutter":
        i = rng.randrange(len(sentences))
        words = sentences[i].split()
        j = rng.randrange(len(words))
        sentences[i] = " ".join(words[: j + 1] + [words[j]] * rng.randint(2, 4) + words[j + 1 :])
        return sentences
    return sentences + rng.sample(OFF_TOPIC, k=rng.randint(2, 3))


def titles(rng: random.Random) -> list[str]:
    names = [f"The {a} {n}" for a in TITLE_ADJECTIVES for n in TITLE_NOUNS]
    rng.shuffle(names)
    return names


def generate_reviews(n_reviews: int, eval_fraction: float, low_quality_fraction: float, seed: int) -> list[Review]:
    """The world's corpus, identical for the same arguments on every machine."""
    rng = random.Random(seed)
    films = titles(rng)
    n_eval_films = max(1, int(len(films) * eval_fraction))
    eval_films, train_films = set(films[:n_eval_films]), films
    reviews = []
    for _ in range(n_reviews):
        title = rng.choice(train_films)
        sentiment = rng.uniform(-1, 1)
        sentences = [_opening(rng, title)] + [
            _sentence(rng, title, sentiment) for _ in range(rng.randint(2, MAX_SENTENCES - 1))
        ]
        low_quality = rng.random() < low_quality_fraction
        if low_quality:
            sentences = _degrade(rng, sentences)
        split = "eval" if title in eval_films else "train"
        reviews.append(Review(title, " ".join(sentences), round(sentiment, 4), low_quality, split))
    return reviews


def lexicon() -> frozenset[str]:
    """Every word the world uses: the fluency term of the gold scorer checks against it."""
    words = set()
    for group in (TITLE_ADJECTIVES, TITLE_NOUNS, GENRES, ASPECTS, POSITIVE, NEGATIVE, NEUTRAL, AUDIENCES, ROLES):
        words.update(w.lower() for w in group)
    for group in (*ADVERBS.values(), *FEELINGS.values()):
        words.update(group)
    for text in (*OPENINGS, *OFF_TOPIC, *(r for pair in RECOMMEND.values() for r in pair)):
        words.update(normalise_words(text.replace("{", " ").replace("}", " ")))
    words.update("the a is was i and it this to of found gives performance overall watch film with".split())
    return frozenset(words)


def normalise_words(text: str) -> list[str]:
    return [w.strip(".,!?;:'\"()").lower() for w in text.split() if w.strip(".,!?;:'\"()")]
