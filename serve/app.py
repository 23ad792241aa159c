"""OpenAI-compatible chat server (jax-anchors §5.3) over the continuous-batching Scheduler.

    python -m serve.app --checkpoint DIR [--nanochat] --tokenizer-dir DIR --port 8000 --slots 8

`GET /` is a small chat page (serve/static/index.html) that streams from the same API.

Upstream's own server (spec §8.7) was streaming-only and not OpenAI-shaped; this keeps its
request limits and its hold-back of half-decoded UTF-8, and speaks `/v1/chat/completions`
so stock clients (the `openai` package, curl) work unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat_jax.engine import Engine
from serve.scheduler import QueueFull, Request, Scheduler

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class Limits:
    """Upstream chat_web.py's request limits, plus the wait-queue back-off."""

    max_messages: int = 500
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_top_k: int = 200
    default_max_tokens: int = 512
    retry_after_s: int = 1


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[Message]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=8)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def _error(status, message, param=None, code=None, type="invalid_request_error", headers=None):
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine_or_scheduler: Engine | Scheduler, model_name: str, api_key: str | None = None,
               limits: Limits = Limits()) -> FastAPI:
    """An app serving one model. An Engine gets a default Scheduler; pass a Scheduler to size it."""
    sched = engine_or_scheduler if isinstance(engine_or_scheduler, Scheduler) else Scheduler(engine_or_scheduler)
    tok, context = sched.engine.tokenizer, sched.max_len
    app = FastAPI(title="nanochat-jax")
    app.state.scheduler = sched

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e.status, e.message, e.param, e.code, e.type, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, e: RequestValidationError):
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            return _error(400, f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})",
                          code="invalid_json")
        param = ".".join(str(p) for p in err["loc"] if p != "body") or None
        if param is None:  # the body as a whole: not an object, empty, or not sent as JSON
            ctype = request.headers.get("content-type", "")
            msg = ("request body must be a JSON object" if "json" in ctype
                   else f"Content-Type must be application/json (got {ctype or 'none'})")
            return _error(400, msg, code="invalid_body")
        return _error(400, f"{param}: {err['msg']}", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):  # 404, 405, ... in the same shape
        return _error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.middleware("http")
    async def _auth(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "slots": sched.slots, "busy_slots": sched.busy_slots(), "queued": sched.queued(),
                "api_key_required": bool(api_key)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        prompt, max_tokens, stop = _prepare(body, tok, context, limits, sched.slots)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        req = Request(prompt, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), max_tokens, n=body.n,
                      temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed, stop=stop)
        try:
            sched.submit(req)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry later", code="queue_full", type="server_overloaded",
                           headers={"Retry-After": str(limits.retry_after_s)}) from None
        except ValueError as e:
            raise APIError(400, str(e), "messages", "context_length_exceeded") from None
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": req.completion_tokens,  # noqa: E731
                         "total_tokens": len(prompt) + req.completion_tokens}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(sched, req, events, cid, created, model_name, include_usage, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, reasons = [""] * body.n, [None] * body.n
        try:
            while (ev := await events.get()) is not None:
                texts[ev.index] += ev.text
                reasons[ev.index] = ev.finish_reason or reasons[ev.index]
        finally:
            sched.cancel(req)  # a no-op once finished; frees the slots if the client went away
        if req.error:
            raise APIError(500, f"generation failed: {req.error}", type="server_error")
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage()}

    return app


def _prepare(body: ChatRequest, tok, context: int, limits: Limits, slots: int):
    """Request limits and the prompt: (prompt ids, max_tokens, stop strings), or an APIError."""
    msgs = body.messages
    if not 1 <= len(msgs) <= limits.max_messages:
        raise APIError(400, f"messages: need 1 to {limits.max_messages} messages, got {len(msgs)}", "messages")
    for i, m in enumerate(msgs):
        if not m.content or len(m.content) > limits.max_message_chars:
            raise APIError(400, f"messages[{i}].content must be 1 to {limits.max_message_chars} characters",
                           f"messages.{i}.content")
    if sum(len(m.content) for m in msgs) > limits.max_total_chars:
        raise APIError(400, f"messages: more than {limits.max_total_chars} characters in total", "messages")
    if body.top_k > limits.max_top_k:
        raise APIError(400, f"top_k must be 0 (off) to {limits.max_top_k}", "top_k")
    if body.n > slots:
        raise APIError(400, f"n must be at most {slots} on this server", "n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or not all(stop):
        raise APIError(400, "stop: up to 4 non-empty strings", "stop")
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > context:
        raise APIError(400, f"max_tokens {asked} exceeds the {context}-token context", "max_tokens")
    try:
        prompt = tok.render_for_completion({"messages": [m.model_dump() for m in msgs]})
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None
    if len(prompt) >= context:
        raise APIError(400, f"prompt of {len(prompt)} tokens fills the {context}-token context", "messages",
                       "context_length_exceeded")
    return prompt, min(asked or limits.default_max_tokens, context - len(prompt)), tuple(stop)


async def _sse(sched, req, events, cid, created, model_name, include_usage, usage):
    """chat.completion.chunk events; the finally frees the slots when the client disconnects."""
    def chunk(choices, **extra):
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(req.n)])
        while (ev := await events.get()) is not None:
            delta = {"content": ev.text} if ev.text else {}
            yield chunk([{"index": ev.index, "delta": delta, "finish_reason": ev.finish_reason}])
        if req.error:
            yield f"data: {json.dumps({'error': {'message': req.error, 'type': 'server_error'}})}\n\n"
        elif include_usage:
            yield chunk([], usage=usage())
        yield "data: [DONE]\n\n"
    finally:
        sched.cancel(req)


def load_engine(checkpoint: str, nanochat: bool, tokenizer_dir: str, dtype=None, step: int | None = None) -> Engine:
    """Params from a nanochat .pt directory, or from our Orbax checkpoint / run dir (latest or given step)."""
    from nanochat_jax.tokenizer import Tokenizer

    if nanochat:
        from nanochat_jax.convert import load_nanochat_checkpoint
        params, config, _ = load_nanochat_checkpoint(checkpoint, step=step, dtype=dtype)
    else:
        from nanochat_jax.checkpoint import load_params
        params, config, _ = load_params(checkpoint, step)
    return Engine(params, config, Tokenizer.load(tokenizer_dir), dtype=dtype)


def main(argv=None):
    import uvicorn

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
    ap.add_argument("--steps-per-call", type=int, default=4, help="decode steps per device call (1: one per token)")
    ap.add_argument("--no-warmup", action="store_true", help="skip compiling every shape before serving")
    args = ap.parse_args(argv)
    engine = load_engine(args.checkpoint, args.nanochat, args.tokenizer_dir, args.dtype)
    sched = Scheduler(engine, slots=args.slots, max_queue=args.max_queue, steps_per_call=args.steps_per_call)
    try:
        if not args.no_warmup:
            print("warming up (compiling prefill buckets and the decode step)...", file=sys.stderr, flush=True)
            print(f"warm-up took {sched.warmup():.1f} s", file=sys.stderr, flush=True)
        uvicorn.run(create_app(sched, args.model_name, args.api_key), host=args.host, port=args.port)
    finally:
        sched.close()


if __name__ == "__main__":
    main()
