"""The generation engine behind `rlhf serve`: requests from many clients decoded together.

One worker thread owns the model. It takes every request waiting (up to `max_batch` rows; a
request with `n` choices is n rows), decodes them as one left-padded batch with the KV cache, one
token per row per step, and hands each row's tokens to its request as they come (streaming). The
loop is ours rather than `model.generate` because the rows of one batch differ in what generate
fixes per batch: temperature, top-p, seed, stop strings, token budget and logprobs.

Per row: greedy at temperature 0, else nucleus sampling (top-p) at the temperature from the row's
own `torch.Generator` (seeded by the request's `seed` plus the choice index, so a seeded request
gives the same answer whatever else is in its batch, up to float rounding of padded batches).
A row stops at an end-of-sequence token ("stop"), at the first occurrence of a stop string (cut
there, "stop"), or after its max_tokens ("length"). Reported logprobs are those of the model's
distribution before temperature and top-p (as OpenAI's), with the `top_logprobs` most likely
tokens.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from components.models import lm


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; 0: the sampled token's only
    seed: int | None = None
    # set when the client has gone (a timeout on its side): the rows stop decoding, so a client's
    # retries do not pile up behind work that nobody will read
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Event:
    """What a choice produced since the last event: new text (held back while it may be the start of
    a stop string), the logprob entries of new tokens, and at the end the finish reason."""

    index: int
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


class _Row:
    def __init__(self, request: Request, index: int, emit: Callable[[Event], None]):
        self.request, self.index, self.emit = request, index, emit
        self.generator = torch.Generator()
        if request.seed is not None:
            self.generator.manual_seed(request.seed + index)
        else:
            self.generator.seed()
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already emitted
        self.done = False

    def pick(self, logits: torch.Tensor) -> int:
        request = self.request
        if request.temperature == 0:
            return int(logits.argmax())
        probs = F.softmax(logits / request.temperature, dim=-1)
        if request.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs >= request.top_p  # mass before a token already enough
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0))
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that could begin a stop string (or end in a partial UTF-8 character)."""
    if text.endswith("\ufffd"):
        return 1
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


def _flush(row: _Row, text: str, end: int) -> str:
    """The row's text from what was sent up to `end`, marked as sent."""
    new = text[row.sent:end] if end > row.sent else ""
    row.sent = max(row.sent, end)
    return new


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 16):
        self.model, self.tokenizer, self.max_batch = model.eval(), tokenizer, max_batch
        self.context = lm.context_length(model)
        eos = model.generation_config.eos_token_id
        self.eos_ids = {i for i in (eos if isinstance(eos, list) else [eos]) + [tokenizer.eos_token_id] if i is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.waiting: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._serve, daemon=True, name="generation")
        self.worker.start()

    def check(self, request: Request) -> None:
        """Raises ValueError when the prompt is empty or leaves no room in the model's context."""
        if not request.prompt_ids:
            raise ValueError("the prompt is empty: no token to continue from")
        if len(request.prompt_ids) >= self.context:
            raise ValueError(f"the prompt has {len(request.prompt_ids)} tokens; this model's context is {self.context}")

    def submit(self, request: Request, emit: Callable[[Event], None]) -> None:
        """Queue `request` (checked first); `emit` is called from the worker thread with each choice's events."""
        self.check(request)
        self.waiting.put([_Row(request, i, emit) for i in range(request.n)])

    def _serve(self) -> None:
        while True:
            rows = self.waiting.get()
            while len(rows) < self.max_batch:
                try:
                    rows += self.waiting.get_nowait()
                except queue.Empty:
                    break
            try:
                self._decode(rows)
            except Exception as error:  # a failed batch must not stop the server: its requests end with the error
                for row in rows:
                    if not row.done:
                        row.emit(Event(row.index, finish_reason=f"error: {error}"))

    @torch.no_grad()
    def _decode(self, rows: list[_Row]) -> None:
        width = max(len(row.request.prompt_ids) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids = row.request.prompt_ids
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        budget = [min(row.request.max_tokens, self.context - len(row.request.prompt_ids)) for row in rows]
        past, step_ids, device = None, input_ids, next(self.model.parameters()).device
        while not all(row.done for row in rows):
            positions = lm.position_ids(mask)[:, -step_ids.shape[1]:]
            out = self.model(input_ids=step_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                             past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1].float().cpu()
            logprobs = F.log_softmax(logits, dim=-1)
            chosen = []
            for i, row in enumerate(rows):
                row.done = row.done or row.request.cancelled.is_set()
                if row.done:
                    chosen.append(self.pad_id)
                    continue
                token = row.pick(logits[i])
                chosen.append(token)
                self._advance(row, token, logprobs[i], budget[i])
            step_ids = torch.tensor(chosen).unsqueeze(1)
            mask = torch.cat([mask, torch.tensor([[0 if row.done else 1] for row in rows])], dim=1)

    def _advance(self, row: _Row, token: int, logprobs: torch.Tensor, budget: int) -> None:
        request = row.request
        entries = []
        if request.top_logprobs is not None:
            entries.append(self._logprob_entry(token, logprobs, request.top_logprobs))
        if token in self.eos_ids:  # counted, but not shown: the text and its tokens end before it
            row.done = True
            text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
            row.emit(Event(row.index, _flush(row, text, len(text)), [], "stop", len(row.ids) + 1))
            return
        row.ids.append(token)
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        cut = min((text.find(stop) for stop in request.stop if stop in text), default=-1)
        if cut >= 0:
            row.done = True
            row.emit(Event(row.index, _flush(row, text, cut), entries, "stop", len(row.ids)))
        elif len(row.ids) >= budget:
            row.done = True
            row.emit(Event(row.index, _flush(row, text, len(text)), entries, "length", len(row.ids)))
        else:
            row.emit(Event(row.index, _flush(row, text, len(text) - _held_back(text, request.stop)), entries))

    def _logprob_entry(self, token: int, logprobs: torch.Tensor, top: int) -> dict:
        def entry(index: int, value: float) -> dict:
            text = self.tokenizer.decode([index])
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        best = logprobs.topk(top) if top else None
        alternatives = [entry(int(i), float(v)) for v, i in zip(*best)] if best is not None else []
        return {**entry(token, float(logprobs[token])), "top_logprobs": alternatives}
