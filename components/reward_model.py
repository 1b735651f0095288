"""Reward model: a transformer with a scalar head, trained on pairwise preferences.

The backbone starts from the SFT policy (InstructGPT does the same); the head is
`AutoModelForSequenceClassification` with one label, which scores a sequence at its last
non-padding token. Normalisation statistics (mean and std of training rewards) are saved in the
model's config so that PPO can centre the rewards it optimises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from components.lm import Rollout, forward, make_rollout
from components.training import MetricsLogger, no_logging, train_loop


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None):
    """Pairwise Bradley-Terry loss (Christiano et al. 2017; Ouyang et al. 2022, eq. 1).

        L = -mean( log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin) )

    `margin` (Llama 2, Touvron et al. 2023) is 0 when not given.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def load(path, num_labels: int = 1):
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=num_labels, use_safetensors=True)
    return model


def scores(model, batch: Rollout) -> torch.Tensor:
    """r(x, y) for each row: the head's output at the last real token of [prompt | response]."""
    input_ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    attention_mask = torch.cat([batch.prompt_mask, batch.response_mask], dim=1)
    return forward(model, input_ids, attention_mask).logits.squeeze(-1)


def normalised_scores(model, batch: Rollout) -> torch.Tensor:
    return (scores(model, batch) - model.config.reward_mean) / model.config.reward_std


def score_texts(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 64) -> torch.Tensor:
    """Raw rewards of complete responses (an EOS is appended to each)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            p, r = prompts[start : start + batch_size], responses[start : start + batch_size]
            out.append(scores(model, make_rollout(tokenizer, p, r, [True] * len(p))))
    return torch.cat(out) if out else torch.zeros(0)


def _pair_rewards(model, tokenizer, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected rewards from one forward pass over both halves of the batch."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    rewards = scores(model, make_rollout(tokenizer, prompts, responses, [True] * len(prompts)))
    return rewards[: len(pairs)], rewards[len(pairs) :]


def accuracy(model, tokenizer, pairs: list[Pair], batch_size: int = 64) -> float:
    if not pairs:
        return float("nan")
    correct = 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chosen, rejected = _pair_rewards(model, tokenizer, pairs[start : start + batch_size])
            correct += int((chosen > rejected).sum())
    return correct / len(pairs)


def train(
    model, tokenizer, pairs: list[Pair], epochs: int, batch_size: int, lr: float, seed: int,
    log: MetricsLogger = no_logging,
) -> dict:
    """Fit the reward model; stores reward_mean / reward_std of the training responses in its config."""

    def batch_loss(idx: torch.Tensor):
        chosen, rejected = _pair_rewards(model, tokenizer, [pairs[i] for i in idx.tolist()])
        loss = bradley_terry_loss(chosen, rejected)
        return loss, {"accuracy": float((chosen > rejected).float().mean())}

    metrics = train_loop(model, len(pairs), batch_loss, epochs, batch_size, lr, seed, log)
    rewards = score_texts(
        model, tokenizer, [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]
    )
    model.config.reward_mean = float(rewards.mean())
    model.config.reward_std = float(rewards.std().clamp(min=1e-6))
    return metrics
