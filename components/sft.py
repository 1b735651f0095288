"""Causal-LM training: pretraining the base model and SFT on curated demonstrations.

SFT computes the loss on response tokens only (the prompt is masked), as InstructGPT's SFT does;
pretraining is the same with an empty prompt. Demonstrations are curated LIMA-style (Zhou et al.
2023): deduplicated, length-bounded and filtered on quality, not on sentiment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from components import gold
from components.lm import forward
from components.training import MetricsLogger, no_logging, train_loop


@dataclass(frozen=True)
class Demonstration:
    prompt: str
    response: str


def masked_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over the tokens where `loss_mask` is 1.

        L = - (1 / |M|) * sum_{t in M} log p(x_t | x_<t)

    `logits[:, t]` predicts `input_ids[:, t + 1]`; `loss_mask[:, t]` marks whether `input_ids[:, t]`
    is trained on (response and EOS tokens in SFT, every real token in pretraining).
    """
    logits, targets, mask = logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return (nll * mask.reshape(-1)).sum() / mask.sum().clamp(min=1)


def encode(tokenizer, demos: list[Demonstration], max_length: int):
    """Right-padded ids, attention mask and loss mask (response + EOS) for each demonstration."""
    rows, masks = [], []
    for demo in demos:
        prompt = tokenizer(demo.prompt, add_special_tokens=False)["input_ids"] if demo.prompt else []
        response = tokenizer(demo.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt + response)[:max_length])
        masks.append(([0] * len(prompt) + [1] * len(response))[:max_length])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        loss_mask[i, : len(row)] = torch.tensor(mask)
    return input_ids, attention_mask, loss_mask


def train(
    model, tokenizer, demos: list[Demonstration], max_length: int, epochs: int, batch_size: int, lr: float,
    seed: int, log: MetricsLogger = no_logging,
) -> dict:
    input_ids, attention_mask, loss_mask = encode(tokenizer, demos, max_length)

    def batch_loss(idx: torch.Tensor):
        width = int(attention_mask[idx].sum(1).max())  # trim the batch to its longest row
        ids, att, lm = input_ids[idx, :width], attention_mask[idx, :width], loss_mask[idx, :width]
        loss = masked_lm_loss(forward(model, ids, att).logits, ids, lm * att)
        return loss, {"perplexity": float(torch.exp(loss.detach()))}

    return train_loop(model, len(demos), batch_loss, epochs, batch_size, lr, seed, log)


def curate(candidates: list[Demonstration], n: int, min_words: int, max_words: int, min_quality: float):
    """LIMA-style curation: drop duplicates, responses outside the length bounds and low quality.

    Returns (kept, counts of what each filter removed); the first `n` survivors are kept.
    """
    seen: set[str] = set()
    kept: list[Demonstration] = []
    dropped = {"duplicate": 0, "length": 0, "quality": 0}
    for demo in candidates:
        words = len(demo.response.split())
        if demo.response in seen:
            dropped["duplicate"] += 1
        elif not min_words <= words <= max_words:
            dropped["length"] += 1
        elif gold.score(demo.prompt, demo.response).quality < min_quality:
            dropped["quality"] += 1
        else:
            kept.append(demo)
            seen.add(demo.response)
        if len(kept) == n:
            break
    return kept, dropped
