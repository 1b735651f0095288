"""A scripted judge behind a real HTTP server on 127.0.0.1 that misbehaves as production endpoints do.

It answers POST /v1/chat/completions like an OpenAI endpoint. `answer(messages)` gives the reply
text; `fault(key, attempt)` chooses what the `attempt`-th request for one request body (key: a
digest of its messages) gets instead: "429" (with Retry-After), "500", "timeout" (the reply comes
after the client gave up), "truncated" (a 200 whose JSON body is cut), "garbage" (an answer with
no verdict) or None (the answer). It records every request: key, time, fault, Authorization header.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

FAULTS = ("429", "500", "timeout", "truncated", "garbage")
RETRY_AFTER_S = 1


# Templates whose outputs the scripted judges below can find again in a request.
TEMPLATE = "Which answer to the instruction is better?\n{instruction}\n<a>{output_a}</a>\n<b>{output_b}</b>\n"
PRINCIPLED = "{principle}\n{instruction}\n<a>{output_a}</a>\n<b>{output_b}</b>\nAnswer A or B, then why.\n"


def prefer_longer(messages: list[dict]) -> str:
    """A position-consistent judge: the longer output wins (A on equal length), with a reason."""
    text = messages[-1]["content"]
    a, b = re.search(r"<a>(.*)</a>", text, re.S).group(1), re.search(r"<b>(.*)</b>", text, re.S).group(1)
    return "A. It says more." if len(a) >= len(b) else "B. It says more."


def key_of(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


def hashed_fault(key: str, attempt: int) -> str | None:
    """Every request body meets one fault on its first attempt (chosen by its digest), one in
    seven are answered with garbage every time, the others answer on the second attempt."""
    value = int(key[:8], 16)
    if value % 7 == 0:
        return "garbage"
    return FAULTS[value % len(FAULTS)] if attempt == 0 else None


class ScriptedJudge:
    def __init__(self, answer: Callable[[list[dict]], str], fault: Callable[[str, int], str | None] = lambda k, a: None,
                 slow_s: float = 2.0):
        self.answer, self.fault, self.slow_s = answer, fault, slow_s
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = key_of(body["messages"])
                with judge.lock:
                    attempt = sum(r["key"] == key for r in judge.requests)
                    fault = judge.fault(key, attempt)
                    judge.requests.append({"key": key, "time": time.monotonic(), "fault": fault,
                                           "authorization": self.headers.get("Authorization")})
                if fault == "429":
                    return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                                      {"Retry-After": str(RETRY_AFTER_S)})
                if fault == "500":
                    return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
                if fault == "timeout":
                    time.sleep(judge.slow_s)
                text = "I cannot decide between them." if fault == "garbage" else judge.answer(body["messages"])
                reply = {
                    "id": "judge", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                                 "logprobs": None}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105},
                }
                self._send(200, reply, truncate=fault == "truncated")

            def _send(self, status: int, payload: dict, headers: dict | None = None, truncate: bool = False) -> None:
                data = json.dumps(payload).encode()
                data = data[: len(data) // 2] if truncate else data
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "ScriptedJudge":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
