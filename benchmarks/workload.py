"""The workload both sides of every benchmark get: one small GPT-2, its tokenizer and the same data.

Everything is rebuilt from `Sizes` and the seed in each measuring process, identically: the
world's reviews, a byte-level BPE tokenizer trained on them, prompt/response demonstrations
(a review's opening words and its rest) and preference pairs (the rest of a clean review chosen
over the rest of a low-quality one, after the clean review's prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GPT2ForSequenceClassification

from components import world
from components.models import lm
from components.sections import BaseModelConfig, SamplingConfig
from components.data.records import PreferencePair
from components.trainers.sft import Demonstration

SEED = 0
PROMPT_WORDS = 3


BASE, SAMPLING = BaseModelConfig(), SamplingConfig()


@dataclass(frozen=True)
class Sizes:
    """Model, batch and step counts. The model and the rollout are the pipeline's defaults; the
    step counts keep `make bench` near 10 minutes on 2 cores."""

    n_layer: int = BASE.n_layer
    n_head: int = BASE.n_head
    n_embd: int = BASE.n_embd
    vocab_size: int = BASE.vocab_size
    max_length: int = BASE.max_length
    batch_size: int = 16
    warmup_steps: int = 3  # optimizer steps run before the clock starts
    timed_steps: int = 12
    lr: float = 1e-4
    rollout_batch: int = SAMPLING.batch_size
    rollout_new_tokens: int = SAMPLING.max_new_tokens
    # torch threads per process (0: torch's default, one per core). One: on a machine shared with
    # other jobs, a multi-threaded operator stalls whenever another process holds one of its cores
    threads: int = 1

    @property
    def steps(self) -> int:
        return self.warmup_steps + self.timed_steps

    @property
    def n_examples(self) -> int:
        """One epoch of exactly `steps` full batches."""
        return self.steps * self.batch_size


def use_threads(sizes: Sizes) -> None:
    if sizes.threads:
        torch.set_num_threads(sizes.threads)


@dataclass
class Workload:
    sizes: Sizes
    tokenizer: object
    demonstrations: list[Demonstration]
    pairs: list[PreferencePair]
    prompts: list[str]


def build(sizes: Sizes) -> Workload:
    n = sizes.n_examples
    reviews = world.generate_reviews(max(3000, 4 * n), 0.1, 0.3, SEED)
    tokenizer = lm.train_tokenizer([r.document for r in reviews], sizes.vocab_size)
    clean = [r for r in reviews if not r.low_quality]
    flawed = [r for r in reviews if r.low_quality]
    demos = [Demonstration(r.prompt(PROMPT_WORDS), r.completion(PROMPT_WORDS)) for r in clean[:n]]
    pairs = [
        PreferencePair(good.prompt(PROMPT_WORDS), good.completion(PROMPT_WORDS), bad.completion(PROMPT_WORDS))
        for good, bad in zip(clean[:n], flawed[:n])
    ]
    if len(pairs) < n:
        raise ValueError(f"the world holds {len(pairs)} pairs, {n} needed")
    prompts = [r.prompt(PROMPT_WORDS) for r in reviews[: sizes.rollout_batch]]
    return Workload(sizes, tokenizer, demos, pairs, prompts)


def causal_lm(work: Workload):
    """The GPT-2 both sides train, with the same initial weights."""
    torch.manual_seed(SEED)
    s = work.sizes
    return lm.build_model(work.tokenizer, s.n_layer, s.n_head, s.n_embd, s.max_length)


def reward_model(work: Workload):
    """The same backbone with a scalar head (the shape `reward_model.load` gives)."""
    config = causal_lm(work).config
    config.num_labels = 1
    torch.manual_seed(SEED)
    return GPT2ForSequenceClassification(config)
