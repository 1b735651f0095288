"""Reward model: a transformer with a scalar head, trained on preferences.

The backbone is any `AutoModelForSequenceClassification` with one label: our GPT-2 SFT policy
(InstructGPT starts the reward model from the SFT model too), scored at the last non-padding
token, or a pretrained encoder such as MiniLM, scored at [CLS]. `encode` lays out [prompt |
response] for each (see there). Objectives, chosen by `RewardConfig.loss`:

- bradley_terry: independent pairs, optionally with each pair's margin (Llama 2); on a causal
  backbone a pair's shared prefix is computed once (prefix sharing, see `_pair_rewards`);
- ranking: the examples are prompts; all of a prompt's labelled pairs are in the same batch, each
  prompt weighing the same, and each of its completions is scored once (InstructGPT);
- plackett_luce: the likelihood of each prompt's whole ranking.

Preference data holds pairs; `rankings` groups them by prompt and recovers each prompt's ranking
by Copeland score. Normalisation statistics (mean and std of the training rewards) are saved in
the model's config so that PPO can centre the rewards it optimises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from components.sections import RewardConfig
from components.data.records import PreferencePair
from components.data.rows import read_training_file
from components.models import lm, packing
from components.models.lm import PAD, Rollout, forward, make_rollout
from components.models.training import MetricsLogger, no_logging, save_on_main, train_loop, unwrap

if TYPE_CHECKING:
    from components.config import PipelineConfig


@dataclass(frozen=True)
class Ranking:
    """One prompt's distinct completions, its labelled pairs over them (completions[chosen[i]] was
    preferred to completions[rejected[i]]) and the ranks their Copeland scores give (0 the best;
    equal scores share a rank)."""

    prompt: str
    completions: tuple[str, ...]
    ranks: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]


# ------------------------------------------------------------------------------------ losses


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None):
    """Pairwise Bradley-Terry loss (Christiano et al. 2017; Ouyang et al. 2022, eq. 1).

        L = -mean( log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin) )

    `margin` (Llama 2, Touvron et al. 2023) is 0 when not given.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def ranking_loss(rewards: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """InstructGPT's reward-model loss for one prompt (Ouyang et al. 2022, eq. 1).

        L = -1 / |P| * sum_{(w, l) in P} log sigmoid(r_w - r_l)

    over the prompt's labelled pairs P: completion `chosen[i]` preferred to `rejected[i]`, indices
    into `rewards` (K,). A labeller's ranking of K gives all C(K, 2) pairs. The prompt's pairs count
    as one batch element, which InstructGPT found to overfit less than shuffling the correlated
    pairs into separate examples, and a completion is scored once for all of its K - 1 pairs.
    """
    return bradley_terry_loss(rewards[chosen], rewards[rejected])


def plackett_luce_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of one prompt's ranking under the Plackett-Luce model (Plackett
    1975; Luce 1959), as in the DPO paper's appendix A.3 (Rafailov et al. 2023).

        L = -sum_k [ r_(k) - logsumexp_{j >= k} r_(j) ]

    where r_(k) is the reward of the completion ranked k-th (ties in `ranks` keep the given
    order). For K = 2 this is the Bradley-Terry loss of the pair.
    """
    ordered = rewards[torch.argsort(ranks, stable=True)]
    tail_logsumexp = torch.logcumsumexp(ordered.flip(0), dim=0).flip(0)
    return -(ordered - tail_logsumexp).sum()


def rankings(pairs: list[PreferencePair]) -> list[Ranking]:
    """Each prompt's pairs over its distinct completions, and the ranking their Copeland scores
    give (Copeland 1951): wins minus losses over the prompt's pairs, higher ranked better.

    Pairs written from a ranking (all K(K-1)/2 of them) give that ranking back; K sampled
    completions with noisy labels can form cycles, whose members tie. A prompt whose completions
    all tie carries no ordering and is left out. Prompts and completions keep their order of
    first appearance.
    """
    groups: dict[str, tuple[dict[str, int], list[int], list[int]]] = {}
    for pair in pairs:
        index, chosen, rejected = groups.setdefault(pair.prompt, ({}, [], []))
        chosen.append(index.setdefault(pair.chosen, len(index)))
        rejected.append(index.setdefault(pair.rejected, len(index)))
    out = []
    for prompt, (index, chosen, rejected) in groups.items():
        score = [0] * len(index)
        for winner, loser in zip(chosen, rejected):
            score[winner] += 1
            score[loser] -= 1
        levels = sorted(set(score), reverse=True)
        if len(levels) > 1:
            ranks = tuple(levels.index(s) for s in score)
            out.append(Ranking(prompt, tuple(index), ranks, tuple(chosen), tuple(rejected)))
    return out


# ----------------------------------------------------------------------------------- scoring


def load(path, num_labels: int = 1):
    """A sequence-classification model from a local folder: a saved reward model, a causal LM
    (our SFT policy) or an encoder (MiniLM); the head is new unless the folder has one."""
    return AutoModelForSequenceClassification.from_pretrained(
        lm.model_folder(path), num_labels=num_labels, use_safetensors=True
    )


def load_with_tokenizer(path, max_length: int | None = None) -> tuple:
    """A reward model and its tokenizer from a folder (or hub id, online). A causal backbone gets
    a pad token distinct from EOS and left padding, as `lm.load_policy` gives the policy. Rows
    are cut to `max_length` tokens (keeping their end) when it is below the backbone's context."""
    model, tokenizer = load(path), AutoTokenizer.from_pretrained(lm.model_folder(path))
    if max_length:
        tokenizer.model_max_length = min(tokenizer.model_max_length, max_length)
    if not _is_encoder(tokenizer):
        tokenizer.padding_side = "left"
        tokenizer.model_max_length = min(lm.context_length(model), max_length or lm.context_length(model))
        if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
            tokenizer.add_special_tokens({"pad_token": PAD})
            model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _is_encoder(tokenizer) -> bool:
    # BERT-style tokenizers frame a sequence as [CLS] ... [SEP], and their models score [CLS];
    # causal LMs score the last real token instead.
    return tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def encode(tokenizer, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of each [prompt | response], laid out for the backbone.

    Causal LM: the rollout layout (prompt left-padded, response right-padded, EOS appended), the
    same tokens PPO's rollouts are scored on. Encoder: [CLS] prompt [SEP] response [SEP],
    right-padded. In both, a row longer than `tokenizer.model_max_length` loses its beginning,
    because two replies to a long conversation (HH-RLHF) differ only in the final turn.
    """
    if not _is_encoder(tokenizer):
        rollout = make_rollout(tokenizer, prompts, responses, [True] * len(prompts))
        keep = tokenizer.model_max_length  # the context: longer rows lose the start of their prompt
        return (
            torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)[:, -keep:],
            torch.cat([rollout.prompt_mask, rollout.response_mask], dim=1)[:, -keep:],
        )
    cls, sep, keep = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.model_max_length - 2
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    rows = [[cls] + (p + [sep] + r)[-keep:] + [sep] for p, r in zip(prompt_ids, response_ids)]
    return _right_pad(rows, tokenizer.pad_token_id)


def rewards_of(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """r(x, y) of each encoded row: the scalar head's output, in float32."""
    return forward(model, input_ids, attention_mask).logits.squeeze(-1).float()


def scores(model, batch: Rollout) -> torch.Tensor:
    """r(x, y) for each row of a rollout (causal backbone): the head at the last real token."""
    input_ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    attention_mask = torch.cat([batch.prompt_mask, batch.response_mask], dim=1)
    return rewards_of(model, input_ids, attention_mask)


def normalised_scores(model, batch: Rollout) -> torch.Tensor:
    return (scores(model, batch) - model.config.reward_mean) / model.config.reward_std


def score_texts(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 64) -> torch.Tensor:
    """Raw rewards of complete responses, in their order; scored in batches of texts of similar
    length, so that a batch is padded to little more than its own texts."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    out = []
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            out.append(rewards_of(model, *encode(tokenizer, [prompts[i] for i in chunk], [responses[i] for i in chunk])))
    if not out:
        return torch.zeros(0)
    scores = torch.cat(out)  # scores[k] is the reward of text order[k]
    return scores[torch.argsort(torch.tensor(order, device=scores.device))]


def _pair_rewards(
    model, tokenizer, pairs: list[PreferencePair], prefix_sharing: bool = True, padding_free: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected rewards from one forward pass.

    Without `prefix_sharing` (or for an encoder, whose [CLS] sees the whole row) over 2B rows, one
    per response, as `encode` lays them out. With it, over the same tokens packed one pair per
    row: the longest common prefix of the pair's two encoded rows (the prompt, or what is left of
    it after truncation, and any first tokens the responses share), then the rest of each
    (packing.pack_pairs), the head read at the last chosen and the last rejected token; with
    `padding_free` as well, all pairs in one row without padding.
    """
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    input_ids, attention_mask = encode(tokenizer, prompts, responses)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
    # a response longer than the context leaves rows empty (`encode` cuts the batch's first
    # columns): such a batch is scored unshared, as it always was
    if prefix_sharing and not _is_encoder(tokenizer) and all(rows):
        prefixes, chosen, rejected = zip(
            *(packing.split_common_prefix(c, r) for c, r in zip(rows[: len(pairs)], rows[len(pairs) :]))
        )
        batch = packing.pack_pairs(list(prefixes), list(chosen), list(rejected), tokenizer.pad_token_id, padding_free)
        hidden = packing.hidden_states(model, batch)
        last = hidden[batch.pair_rows.to(hidden.device), batch.last.to(hidden.device)]
        # `score`: the head of transformers' causal sequence-classification models, as `rewards_of` reads it
        rewards = unwrap(model).score(last).squeeze(-1).float()
    else:
        rewards = rewards_of(model, input_ids, attention_mask)
    return rewards[: len(pairs)], rewards[len(pairs) :]


def accuracy(model, tokenizer, pairs: list[PreferencePair], batch_size: int = 64) -> float:
    """Share of pairs whose chosen response gets the higher reward."""
    if not pairs:
        return float("nan")
    correct = 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chosen, rejected = _pair_rewards(model, tokenizer, pairs[start : start + batch_size])
            correct += int((chosen > rejected).sum())
    return correct / len(pairs)


# -------------------------------------------------------------------------------- objectives


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


class PairwiseObjective:
    """Bradley-Terry loss over preference pairs; reports the share of correctly ordered pairs."""

    def __init__(
        self, tokenizer, pairs: list[PreferencePair], use_margin: bool = False, prefix_sharing: bool = True,
        padding_free: bool = False,
    ):
        self.tokenizer, self.pairs, self.use_margin, self.n_examples = tokenizer, pairs, use_margin, len(pairs)
        self.prefix_sharing, self.padding_free = prefix_sharing, padding_free

    @cached_property
    def lengths(self) -> list[int]:
        """Tokens of each pair's prompt and both responses (tokenised only for length-grouped batches)."""
        parts = ([getattr(p, part) for p in self.pairs] for part in ("prompt", "chosen", "rejected"))
        return [sum(counts) for counts in zip(*(token_counts(self.tokenizer, texts) for texts in parts))]

    def n_terms(self, indices: list[int]) -> int:
        return len(indices)

    def loss(self, model, indices: list[int]):
        pairs = [self.pairs[i] for i in indices]
        chosen, rejected = _pair_rewards(model, self.tokenizer, pairs, self.prefix_sharing, self.padding_free)
        margin = torch.tensor([p.margin or 0.0 for p in pairs], device=chosen.device) if self.use_margin else None
        loss = bradley_terry_loss(chosen, rejected, margin) * len(indices)
        return loss, {"accuracy": float((chosen > rejected).sum())}


class RankingObjective:
    """A per-prompt loss, `ranking_loss` over the prompt's labelled pairs or `plackett_luce_loss`
    of its ranking, all of a prompt's completions in one forward pass, each once; reports, per
    prompt, the share of its labelled pairs that the rewards order the same way."""

    def __init__(
        self, tokenizer, rankings: list[Ranking], plackett_luce: bool = False, prefix_sharing: bool = True,
        padding_free: bool = False,
    ):
        self.tokenizer, self.rankings, self.plackett_luce = tokenizer, rankings, plackett_luce
        self.prefix_sharing, self.padding_free, self.n_examples = prefix_sharing, padding_free, len(rankings)

    @cached_property
    def lengths(self) -> list[int]:
        """Tokens of each prompt and its completions (tokenised only for length-grouped batches)."""
        prompts = token_counts(self.tokenizer, [r.prompt for r in self.rankings])
        completions = iter(token_counts(self.tokenizer, [c for r in self.rankings for c in r.completions]))
        return [p + sum(next(completions) for _ in r.completions) for p, r in zip(prompts, self.rankings)]

    def n_terms(self, indices: list[int]) -> int:
        return len(indices)

    def loss(self, model, indices: list[int]):
        batch = [self.rankings[i] for i in indices]
        if all(len(r.completions) == 2 for r in batch):  # pairs (ingested sets): prefix sharing pays
            pairs = [PreferencePair(r.prompt, *r.completions) for r in batch]
            first, second = _pair_rewards(model, self.tokenizer, pairs, self.prefix_sharing, self.padding_free)
            rewards = torch.stack([first, second], dim=1).flatten()
        else:
            prompts = [r.prompt for r in batch for _ in r.completions]
            responses = [c for r in batch for c in r.completions]
            rewards = rewards_of(model, *encode(self.tokenizer, prompts, responses))
        loss, correct = rewards.new_zeros(()), 0.0
        for ranking, r in zip(batch, rewards.split([len(b.completions) for b in batch])):
            chosen, rejected = (torch.tensor(i, device=r.device) for i in (ranking.chosen, ranking.rejected))
            if self.plackett_luce:
                loss = loss + plackett_luce_loss(r, torch.tensor(ranking.ranks, device=r.device))
            else:
                loss = loss + ranking_loss(r, chosen, rejected)
            correct += float((r[chosen] > r[rejected]).float().mean())
        return loss, {"accuracy": correct}


def train(
    model, tokenizer, pairs: list[PreferencePair], cfg: RewardConfig, seed: int, log: MetricsLogger = no_logging,
    checkpoint_dir=None,
) -> dict:
    """Fit the reward model with `cfg.loss` (`cfg.use_margin` applies to bradley_terry, the pairwise
    loss); stores reward_mean / reward_std of the distinct training responses in its config."""
    if cfg.loss == "bradley_terry":
        # padding_free matters only with prefix_sharing: unshared, the 2B rows are padded as always
        objective = PairwiseObjective(tokenizer, pairs, cfg.use_margin, cfg.prefix_sharing, cfg.padding_free)
    else:
        objective = RankingObjective(
            tokenizer, rankings(pairs), cfg.loss == "plackett_luce", cfg.prefix_sharing, cfg.padding_free
        )
    metrics = train_loop(model, objective, cfg, seed, log, checkpoint_dir, "reward")
    # each response once: of K completions per prompt, each is in K - 1 pairs
    texts = list(dict.fromkeys((p.prompt, response) for p in pairs for response in (p.chosen, p.rejected)))
    rewards = score_texts(model, tokenizer, [prompt for prompt, _ in texts], [response for _, response in texts])
    model.config.reward_mean = float(rewards.mean())
    model.config.reward_std = float(rewards.std().clamp(min=1e-6))
    return metrics


def run(cfg: PipelineConfig, model_path: str, data_path: str, out: Path, log: MetricsLogger = no_logging) -> dict:
    """`rlhf train reward`: a reward model on the backbone at `model_path` (a causal LM or any
    sequence-classification model) trained on the pairs JSONL at `data_path` (prompt, chosen,
    rejected, optionally margin; ties left out) with the `reward` section, a seeded
    `reward.eval_fraction` held out for accuracy; saved with its tokenizer to `out`."""
    pairs = [pair for pair in read_training_file(data_path, "pairs", cfg.data.max_chars) if not pair.tie]
    random.Random(cfg.seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * cfg.reward.eval_fraction))
    model, tokenizer = load_with_tokenizer(model_path)
    metrics = train(model, tokenizer, pairs[n_eval:], cfg.reward, cfg.seed, log, Path(out) / "checkpoints")
    metrics["eval_accuracy"] = accuracy(model, tokenizer, pairs[:n_eval])

    def save(folder: Path) -> None:
        model.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))

    save_on_main(Path(out), save)
    return {**metrics, "train_pairs": len(pairs) - n_eval, "eval_pairs": n_eval}
