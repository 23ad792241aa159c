"""OpenAI-compatible chat server over the continuous-batching Scheduler.

    python -m serve.app --checkpoint DIR [--nanochat] --tokenizer-dir DIR --port 8000 --slots 8

`GET /` is a small chat page (serve/static/index.html) that streams from the same API.
docs/serving.md describes the endpoints, what of OpenAI's request is honoured, the safety
filter, and how the server behaves under failure (health, shutdown, disconnects).

Upstream's own server was streaming-only and not OpenAI-shaped; this keeps its request
limits and its hold-back of half-decoded UTF-8, and speaks `/v1/chat/completions` so stock
clients (the `openai` package, curl) work unchanged. Every field is range-checked here, at
the edge, and anything this server does not implement is answered with a 400 that names it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat_jax.engine import TOP_LOGPROBS
from nanochat_jax.scheduler import SEED_MAX, SEED_MIN, Engine, QueueFull, Request, Scheduler, SchedulerDead

log = logging.getLogger("nanochat.serve")
safety_log = logging.getLogger("nanochat.safety")  # decisions: request id and category, never the text
STATIC = Path(__file__).parent / "static"
TRUNCATE_HEADER = "X-Nanochat-Truncate"  # request header: drop the oldest turns to fit (the page sends it)
TRUNCATED_HEADER = "X-Truncated-Messages"  # response header: how many messages were dropped


@dataclass(frozen=True)
class Limits:
    """Upstream chat_web.py's request limits, plus the wait-queue back-off."""

    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_top_k: int = 200
    default_max_tokens: int = 512
    retry_after_s: int = 1


# OpenAI request fields this server knows but does not implement: a 400 naming them, never ignored.
UNSUPPORTED = {
    "tools": "tool calling is not supported", "tool_choice": "tool calling is not supported",
    "parallel_tool_calls": "tool calling is not supported", "functions": "function calling is not supported",
    "function_call": "function calling is not supported", "audio": "audio output is not supported",
    "modalities": "only text output is supported", "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported", "reasoning_effort": "this is not a reasoning model",
    "metadata": "stored completions are not supported", "store": "stored completions are not supported",
    "service_tier": "service tiers are not supported", "verbosity": "verbosity is not supported",
    "prompt_cache_key": "prompt caching keys are not supported", "safety_identifier": "not supported",
}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message; `developer` is OpenAI's newer name for `system`. `name` is accepted and unused."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


def request_model(context: int, slots: int, limits: Limits):
    """The request schema with this server's limits in it (so the OpenAPI document states them)."""

    class ChatRequest(BaseModel):
        model_config = ConfigDict(extra="allow")  # unknown fields get a 400 naming them (check_extras)
        model: str | None = None
        messages: list[Message] = Field(min_length=1, max_length=limits.max_messages)
        max_tokens: int | None = Field(None, ge=1, le=context)
        max_completion_tokens: int | None = Field(None, ge=1, le=context)
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        top_k: int = Field(0, ge=0, le=limits.max_top_k, description="nanochat extension: 0 = off")
        n: int = Field(1, ge=1, le=slots)
        seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="all 64 bits are used")
        stop: Annotated[str, Field(min_length=1)] | Annotated[
            list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
        logit_bias: dict[str, float] | None = Field(None, description="token id -> bias in [-100, 100]")
        presence_penalty: float = Field(0.0, ge=-2, le=2)
        frequency_penalty: float = Field(0.0, ge=-2, le=2)
        response_format: ResponseFormat | None = Field(None, description='only {"type": "text"}')
        user: str | None = Field(None, description="accepted and logged with safety decisions")

    return ChatRequest


MODERATION_MAX_CHARS, MODERATION_MAX_TEXTS = 32000, 32
ModerationText = Annotated[str, Field(max_length=MODERATION_MAX_CHARS)]


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: ModerationText | Annotated[list[ModerationText], Field(min_length=1, max_length=MODERATION_MAX_TEXTS)]
    model: str | None = None


# ---- response schemas (for the OpenAPI document; the handlers build plain dicts) ----

class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ChoiceMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: ChoiceMessage
    finish_reason: Literal["stop", "length", "content_filter"]
    logprobs: dict | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


class Health(BaseModel):
    status: Literal["ok"]
    slots: int
    busy_slots: int
    queued: int
    api_key_required: bool
    safety: bool


def _err_responses(*codes):
    words = {400: "invalid request (the error names the parameter)", 401: "missing or wrong API key",
             404: "unknown model", 429: "queue full; retry after Retry-After seconds",
             503: "the decode loop is not running (the process is exiting)"}
    return {c: {"model": ErrorResponse, "description": words[c]} for c in codes}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def _error(status, message, param=None, code=None, type="invalid_request_error", headers=None):
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _dead(sched) -> JSONResponse:
    return _error(503, f"server unavailable: {sched.failure or 'shutting down'}", code="engine_unavailable",
                  type="server_error")


def _param(loc) -> str | None:
    """A pydantic error location as OpenAI's dotted param, without union-branch tags like 'str'."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and ("[" in p or p in (
        "str", "int", "float", "bool", "list", "dict", "none", "function-after", "constrained-str")))]
    return ".".join(parts) or None


def create_app(engine_or_scheduler: Engine | Scheduler, model_name: str, api_key: str | None = None,
               limits: Limits = Limits(), safety=None, truncate: bool = False) -> FastAPI:
    """An app serving one model. An Engine gets a default Scheduler; pass a Scheduler to size it.

    safety: a nanochat_jax.safety.Policy (None: no filter). truncate: drop the oldest turns of
    every over-long conversation (a request can also ask with the X-Nanochat-Truncate header).
    """
    sched = engine_or_scheduler if isinstance(engine_or_scheduler, Scheduler) else Scheduler(engine_or_scheduler)
    tok, context = sched.engine.tokenizer, sched.max_len
    ChatRequest = request_model(context, sched.slots, limits)
    app = FastAPI(title="nanochat-jax", version="1.0",
                  description="OpenAI-compatible chat completions and moderations for a nanochat model. "
                              "Errors are OpenAI-shaped JSON; invalid requests get 400 (never 422).")
    app.state.scheduler, app.state.safety = sched, safety
    app.openapi = lambda: _openapi(app)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e.status, e.message, e.param, e.code, e.type, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, e: RequestValidationError):
        errs = e.errors()
        if errs and errs[0]["type"] == "json_invalid":
            why = errs[0].get("ctx", {}).get("error", "decode error")
            return _error(400, f"request body is not valid JSON ({why})", code="invalid_json")
        err = max(errs, key=lambda x: len(x["loc"]))  # a union's deepest branch says most
        param = _param(err["loc"])
        if param is None:  # the body as a whole: not an object, empty, or not sent as JSON
            ctype = request.headers.get("content-type", "")
            msg = ("request body must be a JSON object" if "json" in ctype
                   else f"Content-Type must be application/json (got {ctype or 'none'})")
            return _error(400, msg, code="invalid_body")
        return _error(400, f"{param}: {err['msg']}", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):  # 404, 405, ... in the same shape
        return _error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):  # a bug: still JSON, and logged
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(e).__name__}", type="server_error")

    @app.middleware("http")
    async def _gate(request: HTTPRequest, call_next):
        path = request.url.path
        if path.startswith("/v1") and not sched.alive:
            return _dead(sched)
        if api_key and path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health", response_model=Health, responses=_err_responses(503))
    async def health():
        """200 while the decode loop runs; 503 once it has died or the server is shutting down."""
        if not sched.alive:
            return _dead(sched)
        return {"status": "ok", "slots": sched.slots, "busy_slots": sched.busy_slots(), "queued": sched.queued(),
                "api_key_required": bool(api_key), "safety": safety is not None}

    model_entry = {"id": model_name, "object": "model", "created": 0, "owned_by": "nanochat"}

    @app.get("/v1/models", response_model=ModelList, responses=_err_responses(401, 503))
    async def models():
        return {"object": "list", "data": [model_entry]}

    @app.get("/v1/models/{model_id}", response_model=Model, responses=_err_responses(401, 404, 503))
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"model {model_id!r} does not exist (this server has {model_name!r})", "model",
                           "model_not_found")
        return model_entry

    @app.post("/v1/moderations", response_model=ModerationResponse, responses=_err_responses(400, 401, 503))
    async def moderations(body: ModerationRequest):
        """OpenAI's moderation shape over this server's safety policy (400 when it runs without one)."""
        if safety is None:
            raise APIError(400, "the safety filter is off on this server (--safety off)", "input",
                           "moderation_unavailable")
        texts = [body.input] if isinstance(body.input, str) else body.input
        names = [c.name for c in safety.categories]
        results = []
        for t in texts:
            found = safety.categories_in(t)
            cats = {n: n in found for n in names} | {n: True for n in found if n not in names}
            results.append({"flagged": bool(found), "categories": cats,
                            "category_scores": {n: float(v) for n, v in cats.items()}})
        mid = f"modr-{uuid.uuid4().hex}"
        for t, r in zip(texts, results):
            if r["flagged"]:
                flagged = ",".join(k for k, v in r["categories"].items() if v)
                safety_log.info("safety: %s moderation flagged %s", mid, flagged)
        return {"id": mid, "model": f"{model_name}-safety-policy", "results": results}

    chat_responses = _err_responses(400, 401, 429, 503)
    chat_responses[200] = {"description": "a chat.completion, or with stream=true a text/event-stream of "
                                          "chat.completion.chunk events ending in `data: [DONE]`",
                           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
                                       "text/event-stream": {"schema": {"type": "string"}}}}

    async def chat(body, http: HTTPRequest):
        check_extras(body)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        want_truncate = truncate or http.headers.get(TRUNCATE_HEADER, "").lower() in ("1", "true", "auto")
        prompt, max_tokens, stop, dropped = _prepare(body, tok, context, limits, want_truncate)
        headers = {TRUNCATED_HEADER: str(dropped)} if dropped else {}
        if safety is not None:
            hit = safety.check("\n".join(m.text() for m in body.messages if m.role != "assistant"))
            if hit is not None:
                safety_log.info("safety: %s input flagged %s%s", cid, hit.category,
                                f" user={body.user}" if body.user else "")
                return _refusal(body, hit.refusal, cid, created, model_name, len(prompt), headers)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        guard = None
        if safety is not None:
            def guard():
                g = safety.output_guard()
                g.on_match = lambda cat: safety_log.info("safety: %s output flagged %s", cid, cat)
                return g
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        req = Request(prompt, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), max_tokens, n=body.n,
                      temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed, stop=stop,
                      logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0, logit_bias=bias,
                      presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                      output_guard=guard)
        try:
            sched.submit(req)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry later", code="queue_full", type="server_overloaded",
                           headers={"Retry-After": str(limits.retry_after_s)}) from None
        except SchedulerDead:
            return _dead(sched)
        except ValueError as e:  # the scheduler's own range checks (the schema should have caught it)
            raise APIError(400, str(e), code="invalid_value") from None
        usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": req.completion_tokens,  # noqa: E731
                         "total_tokens": len(prompt) + req.completion_tokens}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(sched, req, events, cid, created, model_name, include_usage, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        texts, reasons, lps = [""] * body.n, [None] * body.n, [[] for _ in range(body.n)]
        watcher = asyncio.create_task(_wait_disconnect(http))
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():  # the client went away: free the slots now, not when the answer ends
                    getter.cancel()
                    sched.cancel(req)
                    return JSONResponse({}, status_code=499)
                if (ev := getter.result()) is None:
                    break
                texts[ev.index] += ev.text
                reasons[ev.index] = ev.finish_reason or reasons[ev.index]
                if ev.logprobs:
                    lps[ev.index] += ev.logprobs
        finally:
            watcher.cancel()
            sched.cancel(req)  # a no-op once finished; frees the slots if the client went away
        if req.error:
            if not sched.alive:
                return _dead(sched)
            raise APIError(500, f"generation failed: {req.error}", type="server_error")
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                    "logprobs": _logprobs_json(lp, tok) if body.logprobs else None}
                   for i, (t, r, lp) in enumerate(zip(texts, reasons, lps))]
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                             "choices": choices, "usage": usage()}, headers=headers)

    chat.__annotations__["body"] = ChatRequest  # a class made here: a string annotation would not resolve
    app.post("/v1/chat/completions", response_model=ChatCompletion, responses=chat_responses)(chat)
    return app


def check_extras(body) -> None:
    """A 400 naming any field we do not implement (OpenAI's own, or unknown)."""
    for name, value in (body.model_extra or {}).items():
        why = UNSUPPORTED.get(name)
        if name == "store" and value in (False, None):
            continue
        raise APIError(400, f"{name}: {why}" if why else f"unrecognized request argument: {name}", name,
                       "unsupported_parameter")
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, f"response_format: type {body.response_format.type!r} is not supported (only 'text')",
                       "response_format", "unsupported_parameter")
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")


def truncate_messages(messages: list[dict], fits) -> tuple[list[dict], int]:
    """Drop the oldest turns until fits(messages): system/developer messages and the last
    message stay; user+assistant turns go oldest first. Returns (messages, dropped count).
    The page (index.html) and the CLI use this same rule."""
    msgs, dropped = list(messages), 0
    while not fits(msgs):
        first = next((i for i, m in enumerate(msgs[:-1]) if m["role"] not in ("system", "developer")), None)
        if first is None:
            break
        # a user turn goes with the assistant reply after it, so the roles keep alternating
        k = 2 if first + 1 < len(msgs) - 1 and msgs[first + 1]["role"] == "assistant" else 1
        del msgs[first:first + k]
        dropped += k
    return msgs, dropped


def _prepare(body, tok, context: int, limits: Limits, truncate: bool):
    """Request limits and the prompt: (prompt ids, max_tokens, stop strings, messages dropped), or an APIError."""
    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    for i, m in enumerate(msgs):
        if not m["content"] or len(m["content"]) > limits.max_message_chars:
            raise APIError(400, f"messages[{i}].content must be 1 to {limits.max_message_chars} characters",
                           f"messages.{i}.content")
    if sum(len(m["content"]) for m in msgs) > limits.max_total_chars:
        raise APIError(400, f"messages: more than {limits.max_total_chars} characters in total", "messages")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or not all(stop):
        raise APIError(400, "stop: up to 4 non-empty strings", "stop")
    for k, v in (body.logit_bias or {}).items():
        if not (k.isascii() and k.isdecimal() and int(k) < tok.vocab_size) or not -100 <= v <= 100:
            raise APIError(400, f"logit_bias: keys must be token ids in [0, {tok.vocab_size}) and values in "
                                f"[-100, 100] (got {k!r}: {v!r})", "logit_bias")
    asked = body.max_completion_tokens or body.max_tokens

    def render(ms):
        try:
            return tok.render_for_completion({"messages": _merge_system(ms)})
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None

    prompt, dropped = render(msgs), 0
    if len(prompt) >= context and truncate:
        room = min(asked or limits.default_max_tokens, context // 4)
        cache = {}

        def fits(ms):
            cache["prompt"] = render(ms)
            return len(cache["prompt"]) + room <= context

        msgs, dropped = truncate_messages(msgs, fits)
        prompt = cache.get("prompt", prompt)
    if len(prompt) >= context:
        raise APIError(400, f"prompt of {len(prompt)} tokens fills the {context}-token context"
                            + ("" if truncate else f" (send {TRUNCATE_HEADER}: 1 to drop the oldest turns)"),
                       "messages", "context_length_exceeded")
    return prompt, min(asked or limits.default_max_tokens, context - len(prompt)), tuple(stop), dropped


def _merge_system(msgs):
    """The chat template takes one leading system message: several (system + developer) are joined."""
    sys_msgs = [m for m in msgs if m["role"] == "system"]
    if len(sys_msgs) <= 1:
        return msgs
    if msgs[0]["role"] != "system" or any(m["role"] == "system" for m in msgs[len(sys_msgs):]):
        return msgs  # a system message after the conversation started: let the template reject it
    return [{"role": "system", "content": "\n\n".join(m["content"] for m in sys_msgs)}] + msgs[len(sys_msgs):]


def _logprobs_json(entries, tok) -> dict:
    """OpenAI's choice.logprobs: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}."""
    def item(t, lp):
        s = tok.decode([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {"content": [item(t, lp) | {"top_logprobs": [item(a, b) for a, b in top]} for t, lp, top in entries],
            "refusal": None}


def _refusal(body, text, cid, created, model_name, prompt_tokens, headers):
    """The answer to a flagged input: the policy's refusal, finish_reason content_filter, no model call."""
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}
    if not body.stream:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "content_filter",
                    "logprobs": None} for i in range(body.n)]
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                             "choices": choices, "usage": usage}, headers=headers)

    def chunk(choices, **extra):
        return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                      "model": model_name, "choices": choices, **extra}, ensure_ascii=False) + "\n\n"

    async def gen():
        for i in range(body.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": text}, "finish_reason": None}])
            yield chunk([{"index": i, "delta": {}, "finish_reason": "content_filter"}])
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})


async def _wait_disconnect(http: HTTPRequest):
    """Returns when the client disconnects (the body is already read, so receive() waits for that)."""
    while True:
        msg = await http.receive()
        if msg["type"] == "http.disconnect":
            return


async def _sse(sched, req, events, cid, created, model_name, include_usage, usage):
    """chat.completion.chunk events; the finally frees the slots when the client disconnects."""
    tok = sched.engine.tokenizer

    def chunk(choices, **extra):
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(req.n)])
        while (ev := await events.get()) is not None:
            delta = {"content": ev.text} if ev.text else {}
            c = {"index": ev.index, "delta": delta, "finish_reason": ev.finish_reason}
            if req.logprobs:
                c["logprobs"] = _logprobs_json(ev.logprobs or [], tok)
            yield chunk([c])
        if req.error:
            yield f"data: {json.dumps({'error': {'message': req.error, 'type': 'server_error'}})}\n\n"
        elif include_usage:
            yield chunk([], usage=usage())
        yield "data: [DONE]\n\n"
    finally:
        sched.cancel(req)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, corrected to what the server sends: 400 (not 422) for invalid input."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path in doc.get("paths", {}).values():
        for op in path.values():
            op.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        doc.get("components", {}).get("schemas", {}).pop(name, None)
    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    app.openapi_schema = doc
    return doc


def warm_up(sched: Scheduler, app: FastAPI, api_key: str | None = None) -> float:
    """Everything a first request needs, done before serving: the scheduler's compiles and
    end-to-end requests (Scheduler.warmup), then one plain and one streamed chat request
    through the app itself (routing, validation, the safety filter, JSON and SSE encoding)
    as in-process ASGI calls. Returns the seconds taken."""
    t0 = time.perf_counter()
    sched.warmup()
    headers = [(b"content-type", b"application/json")]
    if api_key:
        headers.append((b"authorization", f"Bearer {api_key}".encode()))
    for stream in (False, True):
        body = json.dumps({"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 2, "stream": stream,
                           "logprobs": True, "top_logprobs": 1}).encode()
        status = asyncio.run(_asgi_post(app, "/v1/chat/completions", body, headers))
        if status != 200:
            raise RuntimeError(f"warm-up request answered {status}")
    return time.perf_counter() - t0


async def _asgi_post(app, path: str, body: bytes, headers: list) -> int:
    """One POST through the ASGI app, no socket; returns the status code."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"warm-up"), *headers], "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    sent, status, done = False, [0], asyncio.Event()

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()  # the client stays until the response is complete
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            status[0] = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await app(scope, receive, send)
    return status[0]


def serve(sched: Scheduler, app: FastAPI, host: str, port: int, drain_s: float = 5.0,
          exit_delay_s: float = 1.0) -> int:
    """Run uvicorn until SIGTERM/SIGINT or the decode loop dies; returns the exit code.

    On a signal, uvicorn stops accepting connections and lets requests in flight finish for
    up to drain_s seconds, then cancels them; the scheduler is closed either way. A dead
    decode loop stops the server with exit code 1, so a supervisor restarts it; for
    exit_delay_s before that, /health and every request answer 503 (load balancers see it)."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=drain_s,
                                           log_level="info"))
    died = []

    def on_death(reason):
        died.append(reason)
        threading.Timer(exit_delay_s, lambda: setattr(server, "should_exit", True)).start()

    sched.on_death(on_death)
    # uvicorn handles SIGTERM/SIGINT while it runs and re-raises them after its shutdown;
    # these no-op handlers receive that re-raise, so the scheduler is closed and the exit
    # code is ours (0 after a drain, 1 after a dead loop) rather than death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        sched.close(timeout=drain_s)
    code = 0
    if died:
        print(f"error: {died[0]}; exiting", file=sys.stderr, flush=True)
        code = 1
    if sched._thread.is_alive():  # stuck in a long device call or compile: do not wait for it
        print("decode loop still busy in a device call; exiting without waiting for it", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        os._exit(code)  # interpreter shutdown under a running XLA call aborts the process
    return code


def engine_from_args(ap: argparse.ArgumentParser, args, slots: int | None = None) -> Engine:
    """The Engine the server's and the CLI's flags ask for; a bad --mesh exits 2 before anything
    loads, a checkpoint that cannot be loaded exits 1 with one line (not a traceback)."""
    from nanochat_jax import serving_mesh
    from nanochat_jax.checkpoint import load_engine

    mesh = None
    if args.mesh:
        try:
            mesh = serving_mesh.serving_mesh(args.mesh)
            if slots is not None:
                serving_mesh.check_slots(mesh, slots)
        except ValueError as e:
            ap.exit(2, f"error: --mesh: {e}\n")
    try:
        return load_engine(args.checkpoint, args.nanochat, args.tokenizer_dir, args.dtype, mesh=mesh,
                           quantize=args.quantize)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        ap.exit(1, f"error: could not load the model: {msg}\n")


def main(argv=None):
    from nanochat_jax import safety as safety_mod

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="Orbax checkpoint dir (or nanochat .pt dir with --nanochat)")
    ap.add_argument("--nanochat", action="store_true", help="--checkpoint holds nanochat model_*.pt files")
    ap.add_argument("--tokenizer-dir", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=32)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model-name", default="nanochat")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--quantize", default=None, metavar="int8", help="weight-only int8 matmul kernels (off by default)")
    ap.add_argument("--steps-per-call", type=int, default=4, help="decode steps per device call (1: one per token)")
    ap.add_argument("--prefix-cache-mb", type=int, default=256,
                    help="keep prefilled prompts up to this many MiB so a chat's next turn prefills only "
                         "the new tokens (0: off)")
    ap.add_argument("--no-warmup", action="store_true", help="skip compiling every shape before serving")
    ap.add_argument("--safety", default="default", metavar="off|default|PATH",
                    help="safety filter: off, the packaged default policy, or a policy JSON file")
    ap.add_argument("--safety-classifier", default=None, metavar="MODULE:FUNCTION",
                    help="also flag text this callable (text -> category name or None) flags")
    ap.add_argument("--truncate", action="store_true",
                    help="drop the oldest turns of over-long conversations instead of answering 400")
    ap.add_argument("--drain-seconds", type=float, default=5.0,
                    help="on SIGTERM, let requests in flight finish for this long, then cancel them")
    ap.add_argument("--mesh", default=None, metavar="SPEC",
                    help="serve over devices: model=N tensor parallel, data=N slot replicas, or both (docs/serving.md)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for flag, value, lo in (("--slots", args.slots, 1), ("--max-queue", args.max_queue, 0),
                            ("--steps-per-call", args.steps_per_call, 1),
                            ("--prefix-cache-mb", args.prefix_cache_mb, 0)):
        if value < lo:
            ap.error(f"{flag} must be at least {lo}")
    try:
        policy = safety_mod.load_policy(args.safety, args.safety_classifier)
    except safety_mod.PolicyError as e:
        ap.exit(2, f"error: {e}\n")
    engine = engine_from_args(ap, args, slots=args.slots)
    sched = Scheduler(engine, slots=args.slots, max_queue=args.max_queue, steps_per_call=args.steps_per_call,
                      prefix_cache_bytes=args.prefix_cache_mb << 20)
    app = create_app(sched, args.model_name, args.api_key, safety=policy, truncate=args.truncate)
    if not args.no_warmup:
        print("warming up (compiling prefill buckets and the decode step)...", file=sys.stderr, flush=True)
        print(f"warm-up took {warm_up(sched, app, args.api_key):.1f} s", file=sys.stderr, flush=True)
    sys.exit(serve(sched, app, args.host, args.port, args.drain_seconds))


if __name__ == "__main__":
    main()
