"""The `world` task: the embedded review world (components/world/) and its gold scorer."""

from __future__ import annotations

from components import world
from components.files import write_jsonl
from components.world import gold


class WorldTask:
    """Prompts are a film title and the first `world.prompt_words` words of a review (10% of the
    films held out); demonstrations are the rest of the training reviews, with their gold quality;
    the corpus is the training reviews."""

    gold = staticmethod(gold.gold_reward)

    def __init__(self, cfg):
        self.settings, self.seed = cfg.world, cfg.seed

    def build(self, files) -> dict[str, float]:
        settings = self.settings
        reviews = world.generate_reviews(settings.n_reviews, settings.eval_fraction, settings.low_quality_fraction, self.seed)
        prompts: dict[str, str] = {}  # prompt -> split, first occurrence wins, order kept
        for review in reviews:
            prompts.setdefault(review.prompt(settings.prompt_words), review.split)
        write_jsonl(files.prompts, [{"prompt": p, "split": s} for p, s in prompts.items()])
        train = [review for review in reviews if review.split == "train"]
        demonstrations = []
        for review in train:
            prompt, response = review.prompt(settings.prompt_words), review.completion(settings.prompt_words)
            demonstrations.append({"prompt": prompt, "response": response, "quality": gold.score(prompt, response).quality})
        write_jsonl(files.demonstrations, demonstrations)
        write_jsonl(files.corpus, [{"text": review.document} for review in train])
        return {
            "reviews": len(reviews),
            "train_prompts": sum(s == "train" for s in prompts.values()),
            "eval_prompts": sum(s == "eval" for s in prompts.values()),
            "low_quality_share": sum(r.low_quality for r in reviews) / len(reviews),
        }
