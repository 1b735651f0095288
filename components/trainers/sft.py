"""Causal-LM training: pretraining the base model and SFT on curated demonstrations.

SFT computes the loss on response tokens only (the prompt is masked), as InstructGPT's SFT does;
pretraining is the same with an empty prompt. Demonstrations are curated LIMA-style (Zhou et al.
2023): deduplicated, length-bounded and filtered on quality, not on sentiment.

A demonstration is plain `prompt + response + EOS`, or a user turn and an assistant turn rendered
by a chat template. With packing, demonstrations share rows of `max_length` tokens with no
padding; attention stays within each one, so the loss is the loss without packing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import bisect
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from components.models import lm
from components.sections import TrainerConfig
from components.data.rows import read_training_file
from components.models.lm import forward
from components.models.training import MetricsLogger, no_logging, save_on_main, train_loop, unwrap

if TYPE_CHECKING:
    from components.config import PipelineConfig


@dataclass(frozen=True)
class Demonstration:
    prompt: str
    response: str
    quality: float | None = None  # a task's quality score, when it has one (curation filters on it)


def masked_lm_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy over the tokens where `loss_mask` is 1.

        L = - (1 / |M|) * sum_{t in M} log p(x_t | x_<t)

    `logits[:, t]` predicts `input_ids[:, t + 1]`; `loss_mask[:, t]` marks whether `input_ids[:, t]`
    is trained on (response and EOS tokens in SFT, every real token in pretraining). With
    `reduction="sum"` the 1 / |M| is left out: the training loop divides by the tokens of the
    whole optimizer step, so micro-batches and processes weigh every token equally.
    """
    logits, targets, mask = logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    total = (nll * mask.reshape(-1)).sum()
    return total if reduction == "sum" else total / mask.sum().clamp(min=1)


def render(tokenizer, demo: Demonstration, chat_template: str | None) -> tuple[str, str]:
    """The prompt text and the response text that follows it.

    With a chat template ('tokenizer' for the tokenizer's own), the prompt is the user turn
    rendered with the generation prompt, i.e. what the policy is given at sampling time, and the
    response is the rest of the rendered conversation.
    """
    if chat_template is None:
        return demo.prompt, demo.response
    template = None if chat_template == "tokenizer" else chat_template
    user = {"role": "user", "content": demo.prompt}
    prompt = tokenizer.apply_chat_template([user], chat_template=template, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [user, {"role": "assistant", "content": demo.response}], chat_template=template, tokenize=False
    )
    if not full.startswith(prompt):
        name = "the tokenizer's chat template" if template is None else f"chat template {template!r}"
        raise ValueError(
            f"{name}: the user turn rendered with add_generation_prompt=True ({prompt!r}) is not a prefix of the "
            f"conversation rendered with the assistant turn ({full!r}), so the response cannot be told from the prompt"
        )
    return prompt, full[len(prompt) :]


def tokenize(tokenizer, demo: Demonstration, chat_template: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + EOS, and the loss mask: 1 on the response and the EOS.

    The prompt and the response are tokenised apart, so the prompt's tokens are exactly those the
    policy is conditioned on when sampling. EOS is appended unless the response already ends with
    it (as TRL's `add_eos` does): sampling stops at EOS, so the policy must learn to emit it. The
    first token is never trained on: nothing predicts it, and in a packed row the token before it
    belongs to another demonstration.
    """
    prompt_text, response_text = render(tokenizer, demo, chat_template)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if response[-1:] != [tokenizer.eos_token_id]:
        response.append(tokenizer.eos_token_id)
    mask = [0] * len(prompt) + [1] * len(response)
    mask[0] = 0
    return prompt + response, mask


def pad(rows: list[tuple[list[int], list[int]]], pad_token_id: int):
    """Right-padded ids, attention mask and loss mask of (ids, loss mask) rows."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        loss_mask[i, : len(ids)] = torch.tensor(mask)
    return input_ids, attention_mask, loss_mask


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices whose lengths sum to at most `capacity`: longest example first,
    each into the fullest bin it fits in (best-fit decreasing: at most 11/9 OPT + 6/9 bins)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([])
            room, b = capacity, len(bins) - 1
        else:
            room, b = free.pop(slot)
        bins[b].append(i)
        bisect.insort(free, (room - lengths[i], b))
    return bins


def pack(examples: list[tuple[list[int], list[int]]], max_length: int, pad_token_id: int):
    """Examples concatenated into rows of at most `max_length` tokens (`best_fit_decreasing`):
    `pad`'s tensors and position ids that restart at 0 with each example (0 on the padding)."""
    bins = best_fit_decreasing([len(ids) for ids, _ in examples], max_length)
    rows = [tuple(sum((examples[i][part] for i in b), []) for part in (0, 1)) for b in bins]
    input_ids, attention_mask, loss_mask = pad(rows, pad_token_id)
    position_ids = torch.zeros_like(input_ids)
    for row, b in enumerate(bins):
        positions = torch.cat([torch.arange(len(examples[i][0])) for i in b])
        position_ids[row, : len(positions)] = positions
    return input_ids, attention_mask, loss_mask, position_ids


def packed_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor):
    """The model on packed rows. With no attention mask and no cache, transformers reads the
    examples' boundaries off the restarting position ids and attends block-diagonally
    (masking_utils.find_packed_sequence_indices): no token sees another example."""
    device = next(model.parameters()).device
    return model(input_ids=input_ids.to(device), position_ids=position_ids.to(device), use_cache=False)


def targets_nll(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`masked_lm_loss(logits, input_ids, loss_mask, reduction="sum")` with the LM head run only on
    the hidden states that predict a loss-masked token, a chunk at a time (`lm.head_logprobs`): no
    logits for the prompts and the padding, and no [positions, vocab] float32 tensor at all.

    Padded rows run as `lm.forward` runs them, packed ones (`position_ids`) as `packed_forward`.
    """
    device = next(model.parameters()).device
    if position_ids is None:
        attention_mask = attention_mask.to(device)
        inputs = {"attention_mask": attention_mask, "position_ids": lm.position_ids(attention_mask)}
    else:
        inputs = {"position_ids": position_ids.to(device), "use_cache": False}
    # an empty logits_to_keep: the model's own head computes nothing, ours runs where it is needed
    output = model(
        input_ids=input_ids.to(device), output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long),
        **inputs,
    )
    hidden = output.hidden_states[-1]  # after the final norm: what the head reads
    rows, columns = loss_mask[:, 1:].nonzero(as_tuple=True)  # column t predicts token t + 1
    predicting = hidden[rows.to(device), columns.to(device)]
    head = unwrap(model).get_output_embeddings()
    return -lm.head_logprobs(predicting, head, input_ids[rows, columns + 1]).sum()


class LMObjective:
    """Next-token loss on the loss-masked tokens of each row (see `masked_lm_loss`); rows are
    padded examples, or packed ones when `position_ids` are given (see `pack`). With
    `padding_free` a batch of padded rows runs as one packed row (`one_row`); with
    `head_on_targets` the LM head runs on the loss-masked tokens' predictors only (`targets_nll`)."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        head_on_targets: bool = False,
        padding_free: bool = False,
    ):
        self.input_ids, self.attention_mask, self.loss_mask = input_ids, attention_mask, loss_mask * attention_mask
        self.position_ids, self.head_on_targets, self.padding_free = position_ids, head_on_targets, padding_free
        self.n_examples = len(input_ids)
        self.lengths = attention_mask.sum(1).tolist()  # tokens per row, for length-grouped batches

    def n_terms(self, indices: list[int]) -> int:
        return int(self.loss_mask[indices, 1:].sum())

    def loss(self, model, indices: list[int]):
        width = int(self.attention_mask[indices].sum(1).max())  # trim the batch to its longest row
        ids, att, mask = (t[indices, :width] for t in (self.input_ids, self.attention_mask, self.loss_mask))
        positions = None if self.position_ids is None else self.position_ids[indices, :width]
        if self.padding_free and positions is None:
            ids, att, mask, positions = one_row(ids, att, mask)
        if self.head_on_targets:
            return targets_nll(model, ids, att, mask, positions), {}
        if positions is None:
            logits = forward(model, ids, att).logits
        else:
            logits = packed_forward(model, ids, positions).logits
        return masked_lm_loss(logits, ids.to(logits.device), mask.to(logits.device), reduction="sum"), {}


def one_row(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor):
    """Right-padded rows as one packed row without their padding (a padding-free batch, as
    transformers' DataCollatorWithFlattening makes it): ids, attention mask, loss mask and position
    ids restarting with each row, each (1, real tokens). Each row's first token leaves the loss
    mask, as it is no target in its own row: no row's last token learns to predict the next row."""
    real = attention_mask.bool()
    loss_mask = torch.cat([torch.zeros_like(loss_mask[:, :1]), loss_mask[:, 1:]], dim=1)
    return input_ids[real][None], attention_mask[real][None], loss_mask[real][None], lm.position_ids(attention_mask)[real][None]


def lm_objective(
    tokenizer, demos: list[Demonstration], max_length: int, packing: bool = False, chat_template: str | None = None,
    head_on_targets: bool = False, padding_free: bool = False,
) -> LMObjective:
    """The demonstrations tokenised (`tokenize`), truncated to `max_length`, padded or packed."""
    examples = [tokenize(tokenizer, demo, chat_template) for demo in demos]
    examples = [(ids[:max_length], mask[:max_length]) for ids, mask in examples]
    rows = pack(examples, max_length, tokenizer.pad_token_id) if packing else pad(examples, tokenizer.pad_token_id)
    return LMObjective(*rows, head_on_targets=head_on_targets, padding_free=padding_free)


def train(
    model, tokenizer, demos: list[Demonstration], max_length: int, cfg: TrainerConfig, seed: int,
    log: MetricsLogger = no_logging, checkpoint_dir=None, packing: bool = False, chat_template: str | None = None,
    head_on_targets: bool = False,
) -> dict:
    """Fine-tune on the demonstrations; returns the last epoch's mean loss and perplexity.

    With `packing`, `cfg.batch_size` counts packed rows of `max_length` tokens, not demonstrations.
    With `head_on_targets` the LM head runs only where the loss needs it (`targets_nll`); with
    `cfg.padding_free` each batch runs as one packed row (`one_row`).
    """
    objective = lm_objective(tokenizer, demos, max_length, packing, chat_template, head_on_targets, cfg.padding_free)
    metrics = train_loop(model, objective, cfg, seed, log, checkpoint_dir, description="sft")
    return {**metrics, "perplexity": math.exp(metrics["loss"])}


def run(cfg: PipelineConfig, model_path: str, data_path: str, out: Path, log: MetricsLogger = no_logging) -> dict:
    """`rlhf train sft`: the causal LM at `model_path` fine-tuned on the demonstrations JSONL at
    `data_path` (fields prompt and response) with the `sft` section, saved to `out`. Checkpoints
    go to out/checkpoints, where a killed run resumes from."""
    out = Path(out)
    demos = [Demonstration(*row) for row in read_training_file(data_path, "demonstrations", cfg.data.max_chars)]
    model, tokenizer = lm.load_policy(model_path)  # after the data: a bad file fails before a slow load
    metrics = train(
        model, tokenizer, demos, min(cfg.base.max_length, lm.context_length(model)), cfg.sft, cfg.seed, log,
        out / "checkpoints", packing=cfg.sft.packing, chat_template=cfg.sft.chat_template,
        head_on_targets=cfg.sft.head_on_targets,
    )
    save_on_main(out, lambda folder: lm.save_policy(model, tokenizer, folder))
    return {**metrics, "demonstrations": len(demos)}


def curate(candidates: list[Demonstration], n: int, min_words: int, max_words: int, min_quality: float):
    """LIMA-style curation: drop duplicates, responses outside the length bounds and low quality.

    Responses that differ only in case or whitespace are duplicates. Returns (kept, counts of what
    each filter removed); the first `n` survivors are kept.
    """
    seen: set[str] = set()
    kept: list[Demonstration] = []
    dropped = {"duplicate": 0, "length": 0, "quality": 0}
    for demo in candidates:
        words = demo.response.split()
        key = " ".join(words).lower()
        if key in seen:
            dropped["duplicate"] += 1
        elif not min_words <= len(words) <= max_words:
            dropped["length"] += 1
        elif demo.quality is not None and demo.quality < min_quality:
            dropped["quality"] += 1
        else:
            kept.append(demo)
            seen.add(key)
        if len(kept) == n:
            break
    return kept, dropped
