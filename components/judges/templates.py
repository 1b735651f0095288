"""Judge templates and the parsing of their verdicts.

A template is the chat request a judge gets: an optional system message and a user message with
placeholders `{instruction}`, `{output_a}`, `{output_b}` (pairwise), `{output}` (pointwise) and
`{principle}` (the RLAIF constitution). Built in:

- `alpaca_eval`: AlpacaEval's ranking prompt (Li et al. 2023), answered with one letter, A or B;
- `mt_bench`: MT-Bench's pairwise prompt (Zheng et al. 2023): an explanation, then "[[A]]", "[[B]]",
  or "[[C]]" for a tie;
- `mt_bench_single`: MT-Bench's single-answer grading, "Rating: [[N]]" on a 1-10 scale (pointwise);
- `constitution`: Constitutional AI's multiple-choice feedback prompt (Bai et al. 2022), one principle,
  the letter first and a one-sentence rationale after it.

A template file holds only the user message; it is pointwise when it has `{output}` and no
`{output_a}`. Its verdict is the answer's first standalone `A` or `B`, or `tie`.

When the server returns `top_logprobs`, the verdict is read at the token that carries the letter
(or the grade) found in the text: the more probable of A and B there (the expected grade over the
digit tokens, for a pointwise grade), which is how AlpacaEval 2 reads GPT-4's preference. A
one-token answer (`judge.max_tokens=1`) that is neither letter nor grade ("The", "###": a small
judge starting a sentence) is read the same way from its token's alternatives, when A or B (a digit)
is among them: the forced choice between the letters; otherwise it is unparsable.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

PLACEHOLDER = re.compile(r"\{(instruction|output_a|output_b|output|principle)\}")
MT_BENCH_VERDICT = re.compile(r"\[\[(A|B|C)\]\]")
STANDALONE = re.compile(r"(?<![\w'])(A|B|[Tt][Ii][Ee])(?![\w'])")
GRADE = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]|(?<![\w.])(10|[1-9])(?![\w.])")
VERDICTS = ("A", "B", "tie")
UNPARSABLE = "unparsable"


@dataclass(frozen=True)
class Template:
    name: str
    kind: str  # "pairwise" or "pointwise"
    user: str
    system: str | None = None
    max_tokens: int = 8

    def messages(self, **fields: str) -> list[dict[str, str]]:
        """The chat request, placeholders filled in one pass (braces inside the texts stay as they are)."""
        user = PLACEHOLDER.sub(lambda m: fields.get(m.group(1), m.group(0)), self.user)
        return ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": user}]

    def text(self) -> str:
        """What identifies the template in the cache key: a changed wording asks again."""
        return f"{self.kind}\x1f{self.system or ''}\x1f{self.user}"


BUILT_IN = {
    "alpaca_eval": Template(
        "alpaca_eval", "pairwise",
        system="You are a helpful assistant, that ranks models by the quality of their answers.",
        user="I want you to create a leaderboard of different large-language models. To do so, I will give you the "
        "instruction given to the models, and the responses of two models. Please rank the models based on which "
        "response would be preferred by humans.\n\n## Instruction\n\n{instruction}\n\n## Model Outputs\n\n"
        "### Output A\n\n{output_a}\n\n### Output B\n\n{output_b}\n\n## Task\n\nWhich output is better? Answer with "
        "the single letter A or B and nothing else.",
        max_tokens=4,
    ),
    "mt_bench": Template(
        "mt_bench", "pairwise",
        system="Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
        "assistants to the user question displayed below. You should choose the assistant that follows the user's "
        "instructions and answers the user's question better. Your evaluation should consider factors such as the "
        "helpfulness, relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your "
        "evaluation by comparing the two responses and provide a short explanation. Avoid any position biases and "
        "ensure that the order in which the responses were presented does not influence your decision. Do not allow "
        "the length of the responses to influence your evaluation. Be as objective as possible. After providing your "
        "explanation, output your final verdict by strictly following this format: \"[[A]]\" if assistant A is "
        "better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.",
        user="[User Question]\n{instruction}\n\n[The Start of Assistant A's Answer]\n{output_a}\n[The End of Assistant "
        "A's Answer]\n\n[The Start of Assistant B's Answer]\n{output_b}\n[The End of Assistant B's Answer]",
        max_tokens=512,
    ),
    "mt_bench_single": Template(
        "mt_bench_single", "pointwise",
        system="You are a helpful assistant.",
        user="[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an "
        "AI assistant to the user question displayed below. Your evaluation should consider factors such as the "
        "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
        "evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, "
        "you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for "
        "example: \"Rating: [[5]]\".\n\n[Question]\n{instruction}\n\n[The Start of Assistant's Answer]\n{output}\n"
        "[The End of Assistant's Answer]",
        max_tokens=256,
    ),
    "constitution": Template(
        "constitution", "pairwise",
        user="Consider the following conversation between a human and an assistant:\n\n{instruction}\n\n{principle}\n\n"
        "Options:\n(A) {output_a}\n(B) {output_b}\n\nAnswer with the letter of the better option, A or B, then give "
        "your reason in one sentence.",
        max_tokens=48,
    ),
}


def load(name_or_file: str) -> Template:
    """A built-in template by name, or a template file (its text is the user message)."""
    if name_or_file in BUILT_IN:
        return BUILT_IN[name_or_file]
    path = Path(name_or_file).expanduser()
    if not path.is_file():
        raise ValueError(f"judge template {name_or_file!r}: neither a built-in ({', '.join(BUILT_IN)}) nor a file")
    text = path.read_text()
    names = set(PLACEHOLDER.findall(text))
    if {"output_a", "output_b"} <= names:
        kind, max_tokens = "pairwise", 48
    elif "output" in names:
        kind, max_tokens = "pointwise", 256
    else:
        raise ValueError(f"{path}: a judge template needs {{output_a}} and {{output_b}}, or {{output}}")
    return Template(path.name, kind, text, max_tokens=max_tokens)


def _token_at(logprobs: list[dict] | None, text: str, offset: int) -> dict | None:
    """The logprob entry of the token covering character `offset` of `text`, when the tokens spell it."""
    if not logprobs or "".join(entry["token"] for entry in logprobs) != text:
        return None
    start = 0
    for entry in logprobs:
        end = start + len(entry["token"])
        if start <= offset < end:
            return entry
        start = end
    return None


def _mass(entry: dict, wanted: str) -> float:
    return sum(math.exp(alt["logprob"]) for alt in entry.get("top_logprobs") or [] if alt["token"].strip() == wanted)


def parse_pairwise(text: str, logprobs: list[dict] | None = None) -> tuple[str, float | None]:
    """(verdict, P(A) among A and B or None): the verdict is A, B, tie or unparsable; MT-Bench's
    [[A]]/[[B]]/[[C]] first, else the first standalone A, B or tie."""
    match = MT_BENCH_VERDICT.search(text)
    if match:
        letter, offset = match.group(1), match.start(1)
    else:
        match = STANDALONE.search(text)
        if not match:
            return _forced_choice(text, logprobs)
        letter, offset = match.group(1), match.start(1)
    if letter == "C" or letter.lower() == "tie":
        return "tie", None
    entry = _token_at(logprobs, text, offset)
    if entry is not None and entry["token"].strip() == letter:
        p_a, p_b = _mass(entry, "A"), _mass(entry, "B")
        if p_a + p_b > 0:
            share = p_a / (p_a + p_b)
            return ("A" if share > 0.5 else "B" if share < 0.5 else "tie"), share
    return letter, None


def _one_token(text: str, logprobs: list[dict] | None) -> dict | None:
    """The entry of a one-token answer whose token spells `text`, else None."""
    if logprobs and len(logprobs) == 1 and logprobs[0]["token"] == text:
        return logprobs[0]
    return None


def _forced_choice(text: str, logprobs: list[dict] | None) -> tuple[str, float | None]:
    """A one-token answer with no letter: the more probable of A and B among its alternatives."""
    entry = _one_token(text, logprobs)
    p_a, p_b = (_mass(entry, "A"), _mass(entry, "B")) if entry else (0.0, 0.0)
    if p_a + p_b == 0:
        return UNPARSABLE, None
    share = p_a / (p_a + p_b)
    return ("A" if share > 0.5 else "B" if share < 0.5 else "tie"), share


def _expected_digit(entry: dict) -> float | None:
    digits = [(int(alt["token"].strip()), math.exp(alt["logprob"])) for alt in entry.get("top_logprobs") or []
              if alt["token"].strip() in tuple("123456789")]
    return sum(d * p for d, p in digits) / sum(p for _, p in digits) if digits else None


def parse_grade(text: str, logprobs: list[dict] | None = None) -> float | None:
    """A 1-10 grade: "[[N]]" first, else the first standalone number from 1 to 10; with logprobs
    at a one-digit grade, the expected grade over the digit tokens 1-9 offered there."""
    match = GRADE.search(text)
    if not match:
        entry = _one_token(text, logprobs)  # a one-token answer with no grade: the digits offered there
        return _expected_digit(entry) if entry else None
    group = 1 if match.group(1) is not None else 2
    grade = float(match.group(group))
    if not 1 <= grade <= 10:
        return None
    entry = _token_at(logprobs, text, match.start(group))
    if entry is not None and entry["token"].strip() == match.group(group):
        expected = _expected_digit(entry)
        if expected is not None:
            return expected
    return grade
