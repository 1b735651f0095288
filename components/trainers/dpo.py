"""Direct preference optimisation: DPO, IPO and cDPO against a frozen reference policy.

DPO (Rafailov et al. 2023) trains the policy on preference pairs directly, without a reward model:
the implicit reward of a completion is r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)), and the loss is
the Bradley-Terry loss on the chosen-minus-rejected reward. IPO (Azar et al. 2023) regresses the
log-ratio difference onto 1 / (2 beta) instead; cDPO (Mitchell 2023) smooths the labels.

A pair's chosen and rejected completions are scored in one forward pass. With prefix sharing
(`DPOConfig.prefix_sharing`, Wang and Hegde 2024) each pair is one row [prompt | chosen |
rejected] whose attention mask keeps the responses apart (components/models/packing.py): the
prompt is computed once, not twice; with `DPOConfig.padding_free` as well, all the batch's pairs
are one row without padding. Without prefix sharing the batch is 2B rows, [chosen; rejected], in
lm's Rollout layout (prompt left-padded, completion + EOS right-padded). All give the same log-probs.
A completion's log-prob is the sum over its tokens, the EOS included: the policy is also trained
on where to stop.

The reference log-probs are either computed once before training and cached in the checkpoint
folder (a resumed run reads them back), or on every step under no_grad. With LoRA (peft) the
reference is the policy with its adapter disabled, so one copy of the weights is in memory; with
full fine-tuning it is a frozen copy of the initial policy. Dropout is switched off in the policy,
as TRL does, so that at the first step the policy and the reference agree exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from components.models import lm, lora, packing
from components.sections import DPOConfig
from components.data.rows import read_training_file
from components.data.records import PreferencePair
from components.models.training import MetricsLogger, make_accelerator, no_logging, save_on_main, train_loop, unwrap

if TYPE_CHECKING:
    from components.config import PipelineConfig

REF_CACHE = "ref_logprobs.safetensors"


def dpo_loss(
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses of the DPO family, and the implicit rewards of both completions.

    With the log-ratios  c = log pi(y_w|x) - log pi_ref(y_w|x),  r = log pi(y_l|x) - log pi_ref(y_l|x)
    (sequence log-probs, summed over completion tokens) and h = c - r:

        sigmoid (DPO, Rafailov et al. 2023, eq. 7):  L = -log sigmoid(beta * h)
        cdpo (Mitchell 2023, "A note on DPO with noisy preferences"), eps = label_smoothing:
                                                     L = -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)
        ipo (Azar et al. 2023, eq. 17), tau = beta:  L = (h - 1 / (2 tau))^2

    IPO given the completions' token counts (`chosen_lengths`, `rejected_lengths`, EOS included)
    divides each log-ratio by its count, h = c / |y_w| - r / |y_l|, as TRL 1.16's "ipo" does (its
    comment says the IPO authors confirmed this form, which keeps the squared loss from growing with
    the completion length); without them it is eq. 17 as written, on sequence log-ratios.
    Rewards (Rafailov et al. 2023, section 5) are beta * c and beta * r for all three losses,
    detached: they are reported, not optimised.
    """
    chosen_logratios = chosen_logprobs - ref_chosen_logprobs
    rejected_logratios = rejected_logprobs - ref_rejected_logprobs
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "cdpo":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if chosen_lengths is not None and rejected_lengths is not None:
            h = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


class PairTokens(NamedTuple):
    prompt: list[int]
    chosen: list[int]  # EOS appended
    rejected: list[int]


def truncate(tokens: PairTokens, max_length: int) -> PairTokens:
    """Fit prompt + completion into `max_length` tokens for both completions of a pair.

    The prompt loses tokens from its start (the end leads into the completion), but only as many as
    needed and never below half the context; the completions are cut at the end (losing the EOS).
    """
    longest = max(len(tokens.chosen), len(tokens.rejected))
    keep = min(len(tokens.prompt), max(max_length // 2, max_length - longest))
    room = max_length - keep
    return PairTokens(tokens.prompt[len(tokens.prompt) - keep :], tokens.chosen[:room], tokens.rejected[:room])


def encode_pairs(tokenizer, pairs: list[PreferencePair], max_length: int) -> list[PairTokens]:
    """Token ids of each pair, EOS appended to both completions, truncated to `max_length`."""

    def ids(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    eos = tokenizer.eos_token_id
    prompts = ids([p.prompt for p in pairs])
    chosen, rejected = ids([p.chosen for p in pairs]), ids([p.rejected for p in pairs])
    # GPT-2 begins documents with its EOS token: an empty prompt still gives the first token a context
    return [
        truncate(PairTokens(p or [eos], c + [eos], r + [eos]), max_length) for p, c, r in zip(prompts, chosen, rejected)
    ]


def _padded(tokenizer, rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer.pad({"input_ids": rows}, padding=True, padding_side=side, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def collate(tokenizer, pairs: list[PreferencePair], tokens: list[PairTokens]) -> lm.Rollout:
    """The 2B rows [chosen; rejected] in lm's Rollout layout, each prompt repeated on both rows."""
    completions = [t.chosen for t in tokens] + [t.rejected for t in tokens]
    prompt_ids, prompt_mask = _padded(tokenizer, [t.prompt for t in tokens] * 2, "left")
    response_ids, response_mask = _padded(tokenizer, completions, "right")
    return lm.Rollout(
        [p.prompt for p in pairs] * 2,
        prompt_ids,
        prompt_mask,
        response_ids,
        response_mask,
        [p.chosen for p in pairs] + [p.rejected for p in pairs],
        [row[-1] == tokenizer.eos_token_id for row in completions],
    )


def model_input(
    tokenizer, pairs: list[PreferencePair], tokens: list[PairTokens], prefix_sharing: bool, padding_free: bool = False
):
    """What the model scores the pairs on: with `prefix_sharing` one packed row per pair, [prompt |
    chosen | rejected] (packing.pack_pairs), or with `padding_free` as well all pairs in one row,
    else the 2B rows of `collate` (`padding_free` ignored). All list the responses as [chosen;
    rejected] and give the same log-probs."""
    if prefix_sharing:
        return packing.pack_pairs(
            [t.prompt for t in tokens], [t.chosen for t in tokens], [t.rejected for t in tokens],
            tokenizer.pad_token_id, padding_free,
        )
    return collate(tokenizer, pairs, tokens)


def sequence_logprobs(model, batch: lm.Rollout | packing.PackedPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t) over each completion's tokens, and their number."""
    if isinstance(batch, packing.PackedPairs):
        logprobs = packing.response_logprobs(model, batch)
    else:
        logprobs = lm.response_logprobs(model, batch)
    mask = batch.response_mask.to(logprobs.device)
    return (logprobs * mask).sum(1), mask.sum(1)


@torch.no_grad()
def reference_logprobs(policy, ref_model, batch: lm.Rollout | packing.PackedPairs) -> torch.Tensor:
    """log pi_ref(y|x): from `ref_model`, or with LoRA (`ref_model=None`) from the policy with its
    adapter disabled, which is the initial policy."""
    if ref_model is not None:
        return sequence_logprobs(ref_model, batch)[0]
    with unwrap(policy).disable_adapter():
        return sequence_logprobs(policy, batch)[0]


def _fingerprint(tokens: list[PairTokens]) -> str:
    digest = hashlib.sha256()
    for pair in tokens:
        digest.update(json.dumps(pair).encode())
    return digest.hexdigest()


def precompute_ref_logprobs(
    policy, ref_model, tokenizer, pairs: list[PreferencePair], tokens: list[PairTokens], batch_size: int,
    mixed_precision: str = "auto", cache: Path | None = None, prefix_sharing: bool = True, padding_free: bool = False,
) -> torch.Tensor:
    """Reference log-probs of every pair, shape (2, N): chosen, rejected. Computed in fixed batches
    (so a rerun gives the same numbers), under the training autocast (so that the first step's
    policy matches them), and kept in `cache` for a resumed run; a cache made from other token ids
    is recomputed. The main process computes and writes it, the others then read it."""
    accelerator = make_accelerator(mixed_precision)
    fingerprint = _fingerprint(tokens)
    with accelerator.main_process_first():
        if cache is not None and cache.is_file():
            with safe_open(str(cache), "pt") as handle:
                if handle.metadata().get("fingerprint") == fingerprint:
                    return handle.get_tensor("ref_logprobs")
        rows = []
        for start in range(0, len(tokens), batch_size):
            batch = model_input(
                tokenizer, pairs[start : start + batch_size], tokens[start : start + batch_size], prefix_sharing,
                padding_free,
            )
            with accelerator.autocast():
                rows.append(reference_logprobs(policy, ref_model, batch).float().cpu().view(2, -1))
        ref_logprobs = torch.cat(rows, dim=1)
        if cache is not None and accelerator.is_main_process:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(".partial")
            save_file({"ref_logprobs": ref_logprobs}, str(partial), metadata={"fingerprint": fingerprint})
            os.replace(partial, cache)  # a kill mid-write leaves no half-written cache
    return ref_logprobs


class DPOObjective:
    """The DPO-family loss over preference pairs (see `dpo_loss`); one term per pair.

    The reference is `ref_logprobs` (2, N) when precomputed; otherwise it is computed every step by
    `ref_model`, or with `ref_model=None` by the LoRA policy with its adapter disabled.
    """

    def __init__(
        self, tokenizer, pairs: list[PreferencePair], tokens: list[PairTokens], cfg: DPOConfig,
        ref_model=None, ref_logprobs: torch.Tensor | None = None,
    ):
        self.tokenizer, self.pairs, self.tokens, self.cfg = tokenizer, pairs, tokens, cfg
        self.ref_model, self.ref_logprobs = ref_model, ref_logprobs
        self.n_examples = len(pairs)
        self.lengths = [len(t.prompt) + len(t.chosen) + len(t.rejected) for t in tokens]

    def n_terms(self, indices: list[int]) -> int:
        return len(indices)

    def loss(self, model, indices: list[int]):
        # padding_free matters only with prefix_sharing: unshared, the 2B rows are padded as always
        batch = model_input(
            self.tokenizer, [self.pairs[i] for i in indices], [self.tokens[i] for i in indices],
            self.cfg.prefix_sharing, self.cfg.padding_free,
        )
        logprobs, lengths = sequence_logprobs(model, batch)
        if self.ref_logprobs is not None:
            ref_logprobs = self.ref_logprobs[:, indices].reshape(-1).to(logprobs.device)
        else:
            ref_logprobs = reference_logprobs(model, self.ref_model, batch)
        chosen, rejected = logprobs.chunk(2)
        ref_chosen, ref_rejected = ref_logprobs.chunk(2)
        chosen_lengths, rejected_lengths = lengths.chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, self.cfg.beta, self.cfg.loss_type, self.cfg.label_smoothing,
            *((chosen_lengths, rejected_lengths) if self.cfg.ipo_token_mean else ()),
        )
        return losses.sum(), {
            "accuracy": float((chosen_rewards > rejected_rewards).sum()),
            "margin": float((chosen_rewards - rejected_rewards).sum()),
            "chosen_reward": float(chosen_rewards.sum()),
            "rejected_reward": float(rejected_rewards.sum()),
        }


def disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def train(
    policy, tokenizer, pairs: list[PreferencePair], max_length: int, cfg: DPOConfig, seed: int,
    log: MetricsLogger = no_logging, checkpoint_dir=None,
):
    """DPO-train `policy` on `pairs`; returns the trained policy (a plain causal LM: LoRA adapters
    are merged in) and the last epoch's mean metrics (loss, accuracy, margin, rewards)."""
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
    tokens = encode_pairs(tokenizer, pairs, max_length)
    device = make_accelerator(cfg.mixed_precision).device
    disable_dropout(policy)  # before LoRA: lora_dropout stays as configured
    policy.to(device)
    if cfg.lora_r:
        policy, ref_model = lora.add_lora(policy, cfg, seed), None
    else:
        # precomputed: the policy before training is the reference; on the fly: a frozen copy of it
        ref_model = policy if cfg.precompute_ref_logprobs else copy.deepcopy(policy).eval().requires_grad_(False)
    if cfg.precompute_ref_logprobs:
        ref_logprobs = precompute_ref_logprobs(
            policy, ref_model, tokenizer, pairs, tokens, cfg.batch_size // cfg.gradient_accumulation_steps,
            cfg.mixed_precision, checkpoint_dir / REF_CACHE if checkpoint_dir else None, cfg.prefix_sharing,
            cfg.padding_free,
        )
        objective = DPOObjective(tokenizer, pairs, tokens, cfg, ref_logprobs=ref_logprobs)
    else:
        objective = DPOObjective(tokenizer, pairs, tokens, cfg, ref_model=ref_model)
    metrics = train_loop(policy, objective, cfg, seed, log, checkpoint_dir, description=f"dpo ({cfg.loss_type})")
    if cfg.lora_r:
        policy = lora.merged(policy)
    return policy, metrics


def run(cfg: PipelineConfig, model_path: str, data_path: str, out: Path, log: MetricsLogger = no_logging) -> dict:
    """`rlhf train dpo`: the policy at `model_path` trained on the pairs JSONL at `data_path` (fields
    prompt, chosen, rejected, as `rlhf data ingest` writes; ties are left out), saved to `out`.

    Checkpoints go to out/checkpoints, where a killed run resumes from; they are removed once the
    model is saved. Sequences are truncated to base.max_length, or the model's context if shorter.
    """
    out = Path(out)
    rows = read_training_file(data_path, "pairs", cfg.data.max_chars)
    pairs = [pair for pair in rows if not pair.tie]
    policy, tokenizer = lm.load_policy(model_path)  # after the data: a bad file fails before a slow load
    policy, metrics = train(
        policy, tokenizer, pairs, min(cfg.base.max_length, lm.context_length(policy)), cfg.dpo, cfg.seed, log,
        out / "checkpoints",
    )
    save_on_main(out, lambda folder: lm.save_policy(policy, tokenizer, folder))
    return {**metrics, "pairs": len(pairs), "ties_skipped": len(rows) - len(pairs)}
