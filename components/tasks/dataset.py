"""The `dataset` task: prompts, references and demonstrations from local files or Hugging Face ids.

Sources (`task.prompts`, required; `task.eval_prompts` and `task.demonstrations`, optional) are
read by components/data/sources.read_rows: .jsonl, .json, .parquet, .csv (gzip too) or a hub
id (split `task.hf_split`). `task.fields` renames source fields first (e.g. {question: prompt}).
Each row is one of these shapes, `task.format` naming it or `auto` deciding per row from its fields:

- hh (a row with `chosen` and `rejected`): a preference row, either two HH-RLHF transcripts or
  two chat message lists equal up to the final assistant turn (an optional message-list
  `prompt` is their shared beginning), or a plain `prompt` with two replies. Prompt: the shared
  conversation before the final assistant turn; response: the chosen reply.
- messages (a row with `messages`): a conversation, a message list ([{"role", "content"}], roles
  system, user, assistant) or an HH transcript. A final assistant turn is the response, the
  turns before it the prompt; without one, the whole conversation is the prompt.
- plain (otherwise): `prompt` (text, an HH transcript or a message list), optional `response`.

Every shape may carry `split` ("train" or "eval") and `reference` (a text); without a reference
the row's response, if any, is the reference. Empty optional cells count as absent.

Held-out prompts: those of `task.eval_prompts` plus the rows marked split=eval; when there are
none, `task.eval_fraction` of the prompts not marked train, drawn by a shuffle seeded with
`seed`. Prompts are distinct as conversations (a text, its HH transcript and its message list are
one prompt): the first occurrence wins, order kept. `task.max_prompts` then keeps a seeded sample
of that many train and eval prompts each. Demonstrations come from `task.demonstrations` (every
row needs a response) or else from the prompt rows that have one; those whose prompt is held out
(before the cap) are dropped.

With `task.chat_template` every prompt is rendered by the base model tokenizer's chat template
and every response and reference is stripped (components/tasks/chat.py); otherwise text stays as
it is and message lists are joined HH-style. Bad rows are quarantined with file, row and field;
more than `data.max_invalid_fraction` of a source's rows bad is a ValueError.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from typing import Any

from components.data.rows import (
    ASSISTANT, HUMAN, check_text, detect_format, parse_conversations, parse_messages, required, split_hh, split_messages,
)
from components.data.sources import DataError, Quarantined, RowError, read_rows
from components.files import write_jsonl
from components.sections import DataConfig
from components.tasks import chat

log = logging.getLogger(__name__)
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Example:
    """One row: its prompt (text, HH transcript or messages), split, reference and response."""

    prompt: chat.Prompt
    split: str | None = None
    reference: str | None = None
    response: str | None = None

    @property
    def conversation(self) -> tuple[tuple[str, str], ...]:
        """The prompt as (role, content) turns: what makes two prompts the same."""
        return tuple((m["role"], m["content"].strip()) for m in chat.to_messages(self.prompt))


def row_format(data: dict[str, Any]) -> str:
    """The shape `format: auto` reads a row as."""
    if {"chosen", "rejected"} <= data.keys():
        return "hh"
    return "messages" if "messages" in data else "plain"


def _optional_text(data: dict[str, Any], field: str, max_chars: int) -> str | None:
    value = data.get(field)
    return None if value is None or value == "" else check_text(field, value, max_chars)


def _prompt(data: dict[str, Any], max_chars: int) -> chat.Prompt:
    value = required(data, "prompt")
    if isinstance(value, list):
        return list(parse_messages("prompt", value, max_chars))
    return check_text("prompt", value, max_chars)


def _preference(data: dict[str, Any], max_chars: int) -> tuple[chat.Prompt, str]:
    if detect_format(data) == "pairs":
        prompt = _prompt(data, max_chars)
        chosen, rejected = (check_text(field, data[field], max_chars) for field in ("chosen", "rejected"))
        if chosen == rejected:
            raise RowError("rejected", "identical to chosen")
        return prompt, chosen
    chosen, rejected = parse_conversations(data, max_chars)
    if isinstance(chosen, str):
        prompt, reply, _ = split_hh(chosen, rejected)
        return prompt, reply
    split_messages(chosen, rejected)  # checks the final turns and the shared conversation
    return list(chosen[:-1]), " " + chosen[-1]["content"]


def _conversation(data: dict[str, Any], max_chars: int) -> tuple[chat.Prompt, str | None]:
    value = required(data, "messages")
    if isinstance(value, str) and value.startswith("["):  # a CSV cell holding a JSON message list
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if isinstance(value, str):
        text = check_text("messages", value, max_chars)
        end = text.rfind(ASSISTANT) + len(ASSISTANT)
        reply = text[end:] if end >= len(ASSISTANT) else ""
        if reply.strip() and HUMAN not in reply:
            return text[:end], reply
        return text, None
    if not isinstance(value, list):
        raise RowError("messages", "wrong type: expected a message list or an HH transcript")
    messages = list(parse_messages("messages", value, max_chars))
    if messages[-1]["role"] != "assistant":
        return messages, None
    if len(messages) < 2:
        raise RowError("messages", "no conversation before the final assistant message")
    return messages[:-1], " " + messages[-1]["content"]


def parse_example(fmt: str, data: dict[str, Any], max_chars: int, need_response: bool = False) -> Example:
    """The Example a row holds (fields already renamed). Raises RowError on the first bad field."""
    fmt = row_format(data) if fmt == "auto" else fmt
    if fmt == "hh":
        prompt, response = _preference(data, max_chars)
    elif fmt == "messages":
        prompt, response = _conversation(data, max_chars)
    else:
        prompt, response = _prompt(data, max_chars), _optional_text(data, "response", max_chars)
    split = data.get("split")
    split = None if split is None or split == "" else split
    if split is not None and split not in SPLITS:
        raise RowError("split", f"expected train or eval, got {split!r}")
    if need_response and response is None:
        field = {"hh": "chosen", "messages": "messages"}.get(fmt, "response")
        raise RowError(field, "a demonstration needs a response (a final assistant turn)")
    return Example(prompt, split, _optional_text(data, "reference", max_chars) or response, response)


class DatasetTask:
    """Prompts, references and demonstrations from files or hub ids (see the module docstring)."""

    gold = None

    def __init__(self, cfg):
        self.cfg = cfg
        self.quarantine: list[Quarantined] = []

    def read(self, setting: str, need_response: bool = False) -> list[Example]:
        """The examples of the source `task.<setting>`; bad rows go to `self.quarantine`."""
        task, data = self.cfg.task, self.cfg.data
        source = getattr(task, setting)
        try:
            items = read_rows(source, DataConfig(fields=task.fields, hf_split=task.hf_split, max_chars=data.max_chars))
        except DataError as error:
            raise ValueError(f"task.{setting}: cannot read {source}: {error}") from None
        examples, bad = [], []
        for item in items:
            if isinstance(item, Quarantined):
                bad.append(item)
                continue
            try:
                examples.append(parse_example(task.format, item.data, data.max_chars, need_response))
            except RowError as error:
                bad.append(item.quarantined(error.field, error.reason))
        if len(bad) > data.max_invalid_fraction * len(items):
            first = "; ".join(entry.message() for entry in bad[:5])
            raise ValueError(
                f"task.{setting}: {len(bad)} of {len(items)} rows of {source} are bad, more than "
                f"data.max_invalid_fraction={data.max_invalid_fraction}: {first}"
            )
        for entry in bad:
            log.warning("quarantined: %s", entry.message())
        self.quarantine += bad
        return examples

    def split(self, examples: list[Example], held_out: list[Example]) -> tuple[list[Example], list[Example]]:
        """Distinct (train, eval) prompts, in order of first occurrence."""
        prompts: dict[tuple, Example] = {}
        for example in examples:
            prompts.setdefault(example.conversation, example)
        evaluation: dict[tuple, Example] = {}
        for example in held_out + [e for e in prompts.values() if e.split == "eval"]:
            evaluation.setdefault(example.conversation, example)
        if not evaluation:
            unmarked = [key for key, example in prompts.items() if example.split is None]
            count = max(1, round(self.cfg.task.eval_fraction * len(unmarked))) if unmarked else 0
            drawn = set(random.Random(self.cfg.seed).sample(unmarked, count))
            evaluation = {key: example for key, example in prompts.items() if key in drawn}
        train = [example for key, example in prompts.items() if key not in evaluation]
        for name, found in (("train", train), ("eval", evaluation)):
            if not found:
                raise ValueError(f"task.prompts: no {name} prompts among the {len(prompts)} distinct prompts")
        return train, list(evaluation.values())

    def cap(self, examples: list[Example]) -> list[Example]:
        """At most `task.max_prompts` of them, a seeded sample in their order."""
        limit = self.cfg.task.max_prompts
        if limit is None or len(examples) <= limit:
            return examples
        kept = set(random.Random(self.cfg.seed).sample(range(len(examples)), limit))
        return [example for i, example in enumerate(examples) if i in kept]

    def build(self, files) -> dict[str, float]:
        task = self.cfg.task
        if not task.prompts:
            raise ValueError("task.prompts is required by the dataset task: a prompts file or Hugging Face dataset id")
        self.quarantine = []
        examples = self.read("prompts")
        train, evaluation = self.split(examples, self.read("eval_prompts") if task.eval_prompts else [])
        held_out = {example.conversation for example in evaluation}
        train, evaluation = self.cap(train), self.cap(evaluation)
        candidates = self.read("demonstrations", need_response=True) if task.demonstrations else examples
        demonstrations = [e for e in candidates if e.response is not None and e.conversation not in held_out]

        render, chat_mode = chat.renderer(self.cfg), task.chat_template
        prompt_rows = []
        for split, chosen in (("train", train), ("eval", evaluation)):
            for example in chosen:
                row = {"prompt": render(example.prompt), "split": split}
                reference = chat.clean_response(example.reference, chat_mode) if example.reference else ""
                prompt_rows.append(row | ({"reference": reference} if reference else {}))
        demonstration_rows = []
        for example in demonstrations:
            response = chat.clean_response(example.response, chat_mode)
            if response:  # an HH reply of one space has nothing left in chat mode
                demonstration_rows.append({"prompt": render(example.prompt), "response": response})
        write_jsonl(files.prompts, prompt_rows)
        write_jsonl(files.demonstrations, demonstration_rows)
        write_jsonl(files.corpus, [{"text": row["prompt"] + row["response"]} for row in demonstration_rows])
        return {
            "train_prompts": float(len(train)),
            "eval_prompts": float(len(evaluation)),
            "demonstrations": float(len(demonstration_rows)),
            "quarantined_rows": float(len(self.quarantine)),
        }
