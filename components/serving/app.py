"""The OpenAI-compatible HTTP API of `rlhf serve` (FastAPI): /v1/models, /v1/chat/completions and
/v1/completions, with max_tokens, temperature, top_p, n, stop, logprobs/top_logprobs, seed and
streaming as server-sent events ("data: {chunk}" lines, then "data: [DONE]"), which is what the
official `openai` client reads. Errors have OpenAI's shape, {"error": {"message", "type", "param",
"code"}}: 400 for a bad request, 401 for a missing or wrong key, 404 for an unknown model or route.

Chat requests go through the tokenizer's chat template; a model without one (a plain prompt
model) gets the last user message as its prompt.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from components.serving.engine import Engine, Event, Request


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "server_error" if status >= 500 else "authentication_error" if status == 401 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class Sampling(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None)
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "stop: at most 4 sequences", "stop")
        return [s for s in stops if s]


class Message(BaseModel):
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: the text ones, joined
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)


def create_app(engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="rlhf serve")
    tokenizer = engine.tokenizer

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, error: APIError):
        return _error(error.status, error.message, error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, error: RequestValidationError):
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        return _error(400, f"{param}: {first['msg']}" if param else first["msg"], param)

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, error: HTTPException):
        return _error(error.status_code, str(error.detail))

    @app.middleware("http")
    async def authorise(request: HTTPRequest, call_next):
        if api_key:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given.encode(), api_key.encode()):
                return _error(401, "Incorrect API key provided.", code="invalid_api_key")
        return await call_next(request)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server has '{model_name}'", "model",
                           "model_not_found")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "rlhf"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, connection: HTTPRequest):
        check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            users = [m["content"] for m in messages if m["role"] == "user"]
            if not users:
                raise APIError(400, "messages: a model without a chat template needs a user message", "messages")
            prompt = users[-1]
        top = (body.top_logprobs or 0) if body.logprobs else None
        request = Request(encode(prompt), body.max_completion_tokens or body.max_tokens or engine.context,
                          body.temperature, body.top_p, body.n, body.stops(), top, body.seed)
        return await _respond(engine, body, [request], "chat.completion", model_name, connection)

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest, connection: HTTPRequest):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt: at least one prompt", "prompt")
        requests = [Request(encode(p), body.max_tokens, body.temperature, body.top_p, body.n, body.stops(),
                            body.logprobs, body.seed) for p in prompts]
        return await _respond(engine, body, requests, "text_completion", model_name, connection)

    return app


def _choice_logprobs(entries: list[dict], chat: bool) -> dict:
    """Chat: {"content": [token entries]}; completions: the legacy token, logprob and offset lists."""
    if chat:
        return {"content": entries}
    tokens, offsets, offset = [e["token"] for e in entries], [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{alt["token"]: alt["logprob"] for alt in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


async def _respond(engine: Engine, body: Sampling, requests: list[Request], kind: str, model_name: str,
                   connection: HTTPRequest):
    """Submit the requests (choice index = request * n + choice) and answer whole or streamed; a
    client that disconnects cancels them."""
    for request in requests:  # all checked before any is queued
        try:
            engine.check(request)
        except ValueError as error:
            raise APIError(400, str(error), "prompt" if kind == "text_completion" else "messages",
                           "context_length_exceeded" if request.prompt_ids else None) from None
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    for number, request in enumerate(requests):
        def emit(event: Event, base=number * request.n) -> None:
            event.index += base
            loop.call_soon_threadsafe(events.put_nowait, event)

        engine.submit(request, emit)
    total = sum(r.n for r in requests)
    chat = kind == "chat.completion"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
    usage = {"prompt_tokens": sum(len(r.prompt_ids) for r in requests), "completion_tokens": 0}
    wants_logprobs = requests[0].top_logprobs is not None

    async def finished_events():
        remaining = total
        try:
            while remaining:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await connection.is_disconnected():
                        return
                    continue
                usage["completion_tokens"] += event.completion_tokens
                remaining -= event.finish_reason is not None
                yield event
        finally:  # the client left (or a stream was closed): stop decoding for it
            if remaining:
                for request in requests:
                    request.cancelled.set()

    if body.stream:
        async def chunks():
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            if chat:
                for index in range(total):
                    first = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}
                    yield f"data: {json.dumps({**head, 'object': chunk_kind, 'choices': [first]})}\n\n"
            async for event in finished_events():
                if (event.finish_reason or "").startswith("error"):
                    yield f"data: {json.dumps({'error': {'message': event.finish_reason, 'type': 'server_error'}})}\n\n"
                    return
                if not (event.text or event.finish_reason or (wants_logprobs and event.logprobs)):
                    continue  # text held back while it may start a stop string
                choice = {"index": event.index, "logprobs": _choice_logprobs(event.logprobs, chat) if wants_logprobs else None,
                          "finish_reason": event.finish_reason}
                choice.update({"delta": {"content": event.text}} if chat else {"text": event.text})
                yield f"data: {json.dumps({**head, 'object': chunk_kind, 'choices': [choice]})}\n\n"
            if (body.stream_options or {}).get("include_usage"):
                final_usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
                yield f"data: {json.dumps({**head, 'object': chunk_kind, 'choices': [], 'usage': final_usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    texts, entries, reasons = [""] * total, [[] for _ in range(total)], [None] * total
    async for event in finished_events():
        texts[event.index] += event.text
        entries[event.index] += event.logprobs
        reasons[event.index] = event.finish_reason or reasons[event.index]
    if None in reasons:  # the client disconnected; nobody reads this
        return JSONResponse({}, status_code=499)
    failed = [reason for reason in reasons if reason.startswith("error")]
    if failed:
        raise APIError(500, failed[0])
    choices = []
    for index in range(total):
        logprobs = _choice_logprobs(entries[index], chat) if wants_logprobs else None
        content = {"message": {"role": "assistant", "content": texts[index]}} if chat else {"text": texts[index]}
        choices.append({"index": index, **content, "logprobs": logprobs, "finish_reason": reasons[index]})
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {**head, "object": kind, "choices": choices, "usage": usage}
