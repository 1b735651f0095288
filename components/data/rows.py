"""One source row into one record: a preference pair, a ranking, a rating or a conversation,
every field checked (components/data/preferences.py lists the formats and the checks)."""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, replace
from typing import Any

from components.data.records import PreferencePair
from components.data.sources import Quarantined, RowError, read_rows, type_name

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}


@dataclass(frozen=True)
class Ranked:
    prompt: str
    responses: tuple[str, ...]
    ranking: tuple[int, ...]  # ranking[i] is the rank of responses[i]; 0 is the best
    annotator: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Rated:
    prompt: str
    response: str
    rating: float  # 1 (worst) to 5 (best)
    annotator: str | None = None
    source: str | None = None


Message = dict[str, str]  # {"role": one of ROLES, "content": text}


@dataclass(frozen=True)
class Conversation:
    chosen: str | tuple[Message, ...]  # HH text or chat messages, ending with the final assistant turn
    rejected: str | tuple[Message, ...]
    margin: float | None = None
    annotator: str | None = None
    source: str | None = None


def detect_format(data: dict[str, Any]) -> str | None:
    """The record type a row's fields (after renaming) fit, as `format: auto` decides it."""
    if {"responses", "ranking"} <= data.keys():
        return "ranked"
    if {"response", "rating"} <= data.keys():
        return "ratings"
    if {"chosen", "rejected"} <= data.keys():
        texts = [data.get("prompt"), data["chosen"], data["rejected"]]
        if "messages" in data or any(isinstance(text, list) for text in texts):
            return "hh"
        if "prompt" in data:
            return "pairs"
        if all(isinstance(text, str) and ASSISTANT in text for text in texts[1:]):
            return "hh"
    return None


# ------------------------------------------------------------------------------ row checks


def check_text(field: str, value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise RowError(field, f"wrong type: expected a string, got {type_name(value)}")
    if not value:
        raise RowError(field, "empty string")
    if len(value) > max_chars:
        raise RowError(field, f"text of {len(value):,} characters is longer than max_chars={max_chars:,}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            code = ord(value[error.start])
            what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
            raise RowError(field, f"invalid UTF-8: {what} at character {error.start}") from None
    return value


def required(data: dict[str, Any], field: str) -> Any:
    if field not in data:
        present = ", ".join(repr(key) for key in data) or "none"
        raise RowError(field, f"missing field (fields present: {present})")
    return data[field]


def _text(data: dict[str, Any], field: str, max_chars: int) -> str:
    return check_text(field, required(data, field), max_chars)


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(field, f"wrong type: expected a number, got {type_name(value)}")
    if not math.isfinite(value):
        raise RowError(field, f"{value} is not a finite number")
    return value


def _margin(data: dict[str, Any]) -> float | None:
    if data.get("margin") is None:
        return None
    margin = _number("margin", data["margin"])
    if margin < 0:
        raise RowError("margin", f"{margin} is negative; the margin says how much better chosen is")
    return margin


def parse_messages(field: str, value: list, max_chars: int) -> tuple[Message, ...]:
    if not value:
        raise RowError(field, "empty message list")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(f"{field}[{i}]", f"wrong type: expected a message object, got {type_name(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise RowError(f"{field}[{i}].role", f"expected one of {', '.join(ROLES)}, got {reprlib.repr(role)}")
        content = check_text(f"{field}[{i}].content", message.get("content"), max_chars)
        messages.append({"role": role, "content": content})
    return tuple(messages)


def _conversation(data: dict[str, Any], field: str, max_chars: int) -> str | tuple[Message, ...]:
    value = required(data, field)
    if isinstance(value, list):
        return parse_messages(field, value, max_chars)
    if not isinstance(value, str):
        raise RowError(field, f"wrong type: expected HH text or a message list, got {type_name(value)}")
    return check_text(field, value, max_chars)


def _common_prefix_length(a: str, b: str) -> int:
    # Bisection on slice comparisons, which run in C: a character loop over 4,000-character
    # transcripts would dominate the ingest of HH-RLHF.
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two HH transcripts.

    The prompt runs up to and including the last "\\n\\nAssistant:" marker that both transcripts
    share, so prompt + reply gives back each transcript; a reply may itself contain that marker
    (HH-RLHF has replies that run on), but not a new human turn. Raises RowError otherwise.
    """
    end = chosen.rfind(ASSISTANT, 0, _common_prefix_length(chosen, rejected))
    if end < 0:
        raise RowError("rejected", "shares no conversation with chosen up to an '\\n\\nAssistant:' turn")
    end += len(ASSISTANT)
    for name, reply in (("chosen", chosen[end:]), ("rejected", rejected[end:])):
        if not reply:
            raise RowError(name, "empty final assistant turn")
        if HUMAN in reply:
            raise RowError(name, "differs from the other transcript before the final assistant turn")
    return chosen[:end], chosen[end:], rejected[end:]


def split_messages(chosen: tuple[Message, ...], rejected: tuple[Message, ...]) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two chat conversations, rendered as HH text:
    the prompt is the messages before the final assistant message, then "\\n\\nAssistant:"."""
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise RowError(f"{name}[{len(messages) - 1}].role", "the final message is not the assistant's")
        if len(messages) < 2:
            raise RowError(name, "no conversation before the final assistant message")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("rejected", "differs from chosen before the final assistant message")
    prompt = "".join(f"\n\n{ROLES[m['role']]}: {m['content']}" for m in chosen[:-1]) + ASSISTANT
    return prompt, " " + chosen[-1]["content"], " " + rejected[-1]["content"]


def conversation_pair(conversation: Conversation) -> PreferencePair:
    split = split_hh if isinstance(conversation.chosen, str) else split_messages
    prompt, chosen, rejected = split(conversation.chosen, conversation.rejected)
    return PreferencePair(prompt, chosen, rejected, conversation.margin, False, conversation.annotator, conversation.source)


def parse_conversations(data: dict[str, Any], max_chars: int) -> tuple[Any, Any]:
    chosen, rejected = _conversation(data, "chosen", max_chars), _conversation(data, "rejected", max_chars)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RowError("rejected", "wrong type: chosen and rejected must both be HH text or both message lists")
    if chosen == rejected:
        raise RowError("rejected", "identical to chosen")
    if isinstance(chosen, tuple) and isinstance(data.get("prompt"), list):
        context = parse_messages("prompt", data["prompt"], max_chars)
        chosen, rejected = context + chosen, context + rejected
    return chosen, rejected


def _ranked(data: dict[str, Any], max_chars: int, meta: dict[str, Any]) -> Ranked:
    prompt = _text(data, "prompt", max_chars)
    responses = required(data, "responses")
    if not isinstance(responses, list):
        raise RowError("responses", f"wrong type: expected an array, got {type_name(responses)}")
    responses = tuple(check_text(f"responses[{i}]", text, max_chars) for i, text in enumerate(responses))
    if len(responses) < 2:
        raise RowError("responses", f"{len(responses)} response(s); a ranking needs at least 2")
    if len(set(responses)) < len(responses):
        raise RowError("responses", "two responses are identical")
    ranking = required(data, "ranking")
    if not isinstance(ranking, list) or any(isinstance(r, bool) or not isinstance(r, int) for r in ranking):
        raise RowError("ranking", f"wrong type: expected an array of integers, got {reprlib.repr(ranking)}")
    if sorted(ranking) != list(range(len(responses))):
        raise RowError(
            "ranking", f"{reprlib.repr(ranking)} is not a permutation of range({len(responses)}), one rank per response"
        )
    return Ranked(prompt, responses, tuple(ranking), **meta)


def parse_row(fmt: str, data: dict[str, Any], max_chars: int, source: str | None = None) -> PreferencePair | Ranked | Rated:
    """The record a row holds; a conversation becomes its PreferencePair at once, since splitting it is
    part of checking it. `source` fills a missing source field. Raises RowError on the first
    bad field."""
    meta = {
        "annotator": None if data.get("annotator") is None else check_text("annotator", data["annotator"], max_chars),
        "source": source if data.get("source") is None else check_text("source", data["source"], max_chars),
    }
    if fmt == "pairs":
        prompt, chosen, rejected = (_text(data, name, max_chars) for name in ("prompt", "chosen", "rejected"))
        if chosen == rejected:
            raise RowError("rejected", "identical to chosen")
        return PreferencePair(prompt, chosen, rejected, _margin(data), **meta)
    if fmt == "hh":
        pair = conversation_pair(Conversation(*parse_conversations(data, max_chars), _margin(data), **meta))
        if len(pair.prompt) > max_chars:  # rendered message lists are checked message by message only
            raise RowError("prompt", f"the shared conversation's {len(pair.prompt):,} characters exceed max_chars")
        return pair
    if fmt == "ranked":
        return _ranked(data, max_chars, meta)
    if fmt == "ratings":
        prompt, response = _text(data, "prompt", max_chars), _text(data, "response", max_chars)
        rating = _number("rating", required(data, "rating"))
        if not 1 <= rating <= 5:
            raise RowError("rating", f"{rating} is outside 1-5")
        return Rated(prompt, response, rating, **meta)
    raise ValueError(f"unknown format {fmt!r}")


# --------------------------------------------------------------------------- training files


def _training_record(kind: str, data: dict[str, Any], max_chars: int) -> PreferencePair | tuple[str, str]:
    if kind == "demonstrations":  # an empty prompt is fine (unconditional text), an empty response is not
        prompt = required(data, "prompt")
        if not isinstance(prompt, str):
            raise RowError("prompt", f"wrong type: expected a string, got {type_name(prompt)}")
        return prompt, _text(data, "response", max_chars)
    tie = data.get("tie", False)
    if not isinstance(tie, bool):  # "false" as text would otherwise count as a tie
        raise RowError("tie", f"wrong type: expected true or false, got {type_name(tie)} {reprlib.repr(tie)}")
    return replace(parse_row("pairs", data, max_chars), tie=tie)


def read_training_file(path: str, kind: str, max_chars: int) -> list:
    """What `rlhf train` learns from, every row checked as ingest checks it: demonstrations as
    (prompt, response), pairs as PreferencePairs (ties marked). Any format ingest reads. Raises
    ValueError at the first bad row, naming the file, the row and the field."""
    records = []
    for item in read_rows(path):
        if isinstance(item, Quarantined):
            raise ValueError(item.message())
        try:
            records.append(_training_record(kind, item.data, max_chars))
        except RowError as error:
            raise ValueError(item.quarantined(error.field, error.reason).message()) from None
    return records
