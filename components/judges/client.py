"""Asking a judge: one chat request per judgment, through the official `openai` client, against any
OpenAI-compatible endpoint (GPT-4, or a local model under `rlhf serve`).

What a judge in production meets, and what happens:

- 429, 5xx, timeouts, dropped connections: the `openai` client retries (`judge.max_retries`) with
  exponential backoff and jitter (0.5 s doubling to 8 s, minus up to 25%), waiting what a
  `Retry-After` header asks instead when it asks for at most two minutes;
- a malformed body (truncated JSON) or an answer with no verdict: asked again, at most
  `judge.max_malformed` times, then recorded as unparsable, never dropped;
- an error that retries did not cure (a 4xx, a server that stays down): recorded as unparsable with
  the error and not cached, so a rerun asks again;
- cost: every judgment is cached on disk under a content address (template, judge model, the
  texts shown and their order), so an interrupted or repeated run never pays twice; a token
  budget stops spending (`BudgetExceeded`).

The API key is handed in by the caller and given only to the `openai` client, which sends it as
the bearer token; nothing here logs, stores or hashes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import openai

from components.judges import templates
from components.sections import JudgeConfig


# alternatives asked for at each answer token (OpenAI's maximum): with a one-token answer that is no
# letter, A and B are then nearly always among them (templates.py, the forced choice)
TOP_LOGPROBS = 20


class BudgetExceeded(RuntimeError):
    """The token budget (`judge.budget_tokens`) is spent; judgments made so far are cached."""


@dataclass
class Answer:
    """One judgment: the verdict (A, B, tie or unparsable; a 1-10 grade or None when pointwise), the
    judge's raw answer, what it cost, and whether it came from the cache."""

    verdict: str | float | None
    raw: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    p_a: float | None = None  # P(A) among A and B at the answer token, when logprobs came back
    error: str | None = None
    cached: bool = False


@dataclass
class Stats:
    calls: int = 0  # HTTP requests sent, retries included (a cached judgment sends none)
    judgments: int = 0  # judgments asked of the endpoint (cache misses)
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    unparsable: int = 0  # judgments recorded as unparsable (malformed answers or errors)
    failed: int = 0  # of those, errors that retries did not cure
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, int]:
        counts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "lock"}
        counts["retries"] = max(0, self.calls - self.judgments)
        return counts


def cache_folder(cfg: JudgeConfig) -> Path:
    root = cfg.cache_dir or Path(os.environ.get("RLHF_CACHE_DIR") or "~/.cache/rlhf-pipeline") / "judgments"
    return Path(root).expanduser()


class JudgeClient:
    """Judgments from the endpoint `cfg.base_url` with `template` (default: `cfg.template`)."""

    def __init__(self, cfg: JudgeConfig, api_key: str | None, template: templates.Template | None = None):
        if not cfg.base_url:
            raise ValueError("no judge configured: set judge.base_url (and judge.model)")
        self.cfg, self.template = cfg, template or templates.load(cfg.template)
        self.stats = Stats()
        self.cache = cache_folder(cfg)
        self.max_tokens = cfg.max_tokens or self.template.max_tokens
        # Counting requests at the transport sees the client's own retries too.
        http = openai.DefaultHttpxClient(event_hooks={"request": [lambda request: self.stats.add(calls=1)]})
        # A keyless local server still needs a non-empty key for the client to start.
        self.client = openai.OpenAI(
            base_url=cfg.base_url, api_key=api_key or "no-key", timeout=cfg.timeout, max_retries=cfg.max_retries,
            http_client=http,
        )

    def key(self, fields: dict[str, str], order: str) -> str:
        # what shapes an answer
        settings = [self.cfg.model, self.cfg.temperature, self.max_tokens, self.cfg.logprobs and TOP_LOGPROBS]
        content = [self.template.text(), *settings, order, sorted(fields.items())]
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()

    def ask(self, fields: dict[str, str], order: str) -> Answer:
        """The judgment of the texts `fields` (placeholders of the template) shown in `order`."""
        key = self.key(fields, order)
        path = self.cache / key[:2] / f"{key}.json"
        if path.is_file():
            self.stats.add(cache_hits=1)
            return Answer(**{**json.loads(path.read_text()), "cached": True})
        if self.cfg.budget_tokens is not None and self.stats.prompt_tokens + self.stats.completion_tokens >= self.cfg.budget_tokens:
            raise BudgetExceeded(f"judge.budget_tokens={self.cfg.budget_tokens} spent; cached judgments are kept")
        self.stats.add(judgments=1)
        answer = self._request(self.template.messages(**fields))
        if answer.verdict in (templates.UNPARSABLE, None):
            self.stats.add(unparsable=1, failed=int(answer.error is not None))
        if answer.error is None:  # errors are not cached: a rerun asks again
            self._store(path, answer)
        return answer

    def _request(self, messages: list[dict]) -> Answer:
        extra = {"logprobs": True, "top_logprobs": TOP_LOGPROBS} if self.cfg.logprobs else {}
        answer = Answer(templates.UNPARSABLE if self.template.kind == "pairwise" else None, "")
        for _ in range(self.cfg.max_malformed + 1):
            try:
                response = self.client.chat.completions.create(
                    model=self.cfg.model, messages=messages, max_tokens=self.max_tokens,
                    temperature=self.cfg.temperature, seed=0, **extra,
                )
            except (openai.APIResponseValidationError, ValueError) as error:  # a body that is not the JSON it claims
                answer.raw = f"malformed response: {type(error).__name__}"
                continue
            except openai.APIError as error:  # retries are spent, or a request the server refuses
                return Answer(answer.verdict, answer.raw, answer.prompt_tokens, answer.completion_tokens,
                              error=f"{type(error).__name__}: {getattr(error, 'message', error)}")
            usage = response.usage
            prompt_tokens, completion_tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
            self.stats.add(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
            answer.prompt_tokens += prompt_tokens
            answer.completion_tokens += completion_tokens
            choice = response.choices[0] if response.choices else None
            answer.raw = (choice.message.content or "") if choice else ""
            content = choice.logprobs.content if choice and choice.logprobs else None
            logprobs = [entry.model_dump() for entry in content] if content else None
            if self.template.kind == "pairwise":
                answer.verdict, answer.p_a = templates.parse_pairwise(answer.raw, logprobs)
                if answer.verdict != templates.UNPARSABLE:
                    break
            else:
                answer.verdict = templates.parse_grade(answer.raw, logprobs)
                if answer.verdict is not None:
                    break
        return answer

    def _store(self, path: Path, answer: Answer) -> None:
        """Written beside and renamed into place: a killed run leaves no half-written judgment."""
        path.parent.mkdir(parents=True, exist_ok=True)
        row = {key: value for key, value in asdict(answer).items() if key != "cached"}
        handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump(row, out)
        os.replace(tmp, path)
