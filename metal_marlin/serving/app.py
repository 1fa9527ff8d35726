"""The HTTP layer: OpenAI's ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` (with
server-sent-event streaming), ``/health`` and ``/metrics``, over an ``Engine``.

Everything is validated here before it reaches the engine; every error is an OpenAI error object.
The engine's thread hands outputs over to the request's asyncio queue with ``call_soon_threadsafe``; a
request whose client goes away is cancelled, and the engine frees its blocks at the next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation import SamplingParams
from .engine import Engine, GenerationRequest, QueueFullError, RequestOutput
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
    error_body,
    new_id,
    now,
    usage,
)

DEFAULT_MAX_TOKENS = {"chat": 512, "completion": 16}  # OpenAI's completions default is 16
DISCONNECT_POLL_SECONDS = 0.5


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


class AuthenticateAndCount:
    """ASGI middleware: with an API key, ``/v1/`` requests need ``Authorization: Bearer KEY`` (else 401);
    every response is counted by status code."""

    def __init__(self, app, api_key: str | None, metrics) -> None:
        self.app, self.metrics = app, metrics
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = "500"

        async def send_and_record(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if (self.expected is not None and scope["path"].startswith("/v1/")
                    and not secrets.compare_digest(given, self.expected)):
                body = error_body("incorrect or missing API key: send 'Authorization: Bearer KEY'",
                                  code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send_and_record)
                return
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(status=status).inc()


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI application; its lifespan starts and stops the engine's thread."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="metal-marlin", lifespan=lifespan)
    metrics = engine.metrics

    app.add_middleware(AuthenticateAndCount, api_key=api_key, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body, status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return JSONResponse(error_body(str(err.detail), code=str(err.status_code)), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        return JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "metal-marlin"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatCompletionRequest, max_body_bytes)
        _check_common(body, model_name)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as err:  # the template rejects the conversation (e.g. roles it does not know)
            raise APIError(400, f"the chat template cannot format these messages: {err}", param="messages") from err
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _generate(request, engine, body, list(ids), max_tokens, "chat", model_name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest, max_body_bytes)
        _check_common(body, model_name)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompt = body.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids = engine.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        vocab = engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return await _generate(request, engine, body, ids, body.max_tokens, "completion", model_name)

    return app


async def _parse(request: Request, model: type[OpenAIRequest], max_body_bytes: int) -> OpenAIRequest:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise APIError(413, f"the request body exceeds {max_body_bytes} bytes", code="request_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_body_bytes:
            raise APIError(413, f"the request body exceeds {max_body_bytes} bytes", code="request_too_large")
    try:
        json.loads(raw)
    except ValueError as err:
        raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from err
    try:
        return model.model_validate_json(bytes(raw))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])  # includes union members, e.g. "prompt.str"
        param = str(first["loc"][0]) if first["loc"] else None
        raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=param,
                       code="invalid_value") from err


def _check_common(body: OpenAIRequest, model_name: str) -> None:
    if body.model != model_name:
        raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    if body.n != 1:
        raise APIError(400, f"n must be 1 (one choice per request), got {body.n}", param="n")
    if body.presence_penalty or body.frequency_penalty:
        raise APIError(400, "presence_penalty and frequency_penalty are not supported (use 0)",
                       param="presence_penalty" if body.presence_penalty else "frequency_penalty")


def _engine_request(engine: Engine, body: OpenAIRequest, ids: list[int], max_tokens: int | None,
                    kind: str) -> GenerationRequest:
    context = engine.max_model_len
    if len(ids) >= context:
        raise APIError(400, f"this model's maximum context length is {context} tokens; the prompt has {len(ids)}",
                       param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS[kind], context - len(ids))
    elif max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens",
                       code="invalid_value")
    elif len(ids) + max_tokens > context:
        raise APIError(400, f"this model's maximum context length is {context} tokens; the request has "
                            f"{len(ids)} prompt tokens and max_tokens {max_tokens}", param="max_tokens",
                       code="context_length_exceeded")
    request = GenerationRequest(tuple(ids), max_tokens, SamplingParams(temperature=body.temperature,
                                                                       top_p=body.top_p, seed=body.seed),
                                body.stop_strings())
    try:
        engine.check(request)
    except ValueError as err:
        raise APIError(400, str(err), param="max_tokens", code="context_length_exceeded") from err
    return request


async def _generate(request: Request, engine: Engine, body: OpenAIRequest, ids: list[int], max_tokens: int | None,
                    kind: str, model_name: str):
    engine_request = _engine_request(engine, body, ids, max_tokens, kind)
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
    try:
        request_id = engine.submit(engine_request, lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
    except QueueFullError as err:
        raise APIError(429, f"{err}; retry later", "rate_limit_error", code="queue_full") from err
    response_id = new_id("chatcmpl" if kind == "chat" else "cmpl")
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(engine, request_id, outputs, kind, response_id, model_name, include_usage),
                                 media_type="text/event-stream")
    text, last = await _collect(request, engine, request_id, outputs)
    if last is None:
        return Response(status_code=499)  # the client went away
    if last.finish_reason == "error":
        raise APIError(500, f"generation failed: {last.error}", "server_error")
    if last.finish_reason == "cancelled":
        raise APIError(503, "the server is shutting down", "server_error")
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": last.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
        obj = "text_completion"
    return {"id": response_id, "object": obj, "created": now(), "model": model_name, "choices": [choice],
            "usage": usage(last.prompt_tokens, last.completion_tokens)}


async def _collect(request: Request, engine: Engine, request_id: int, outputs: asyncio.Queue
                   ) -> tuple[str, RequestOutput | None]:
    """The whole text and the last output; (.., None) if the client disconnected (request cancelled)."""
    pieces = []
    finished = False
    try:
        while True:
            try:
                out = await asyncio.wait_for(outputs.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                if await request.is_disconnected():
                    return "".join(pieces), None
                continue
            pieces.append(out.text)
            if out.finish_reason is not None:
                finished = True
                return "".join(pieces), out
    finally:
        if not finished:
            engine.cancel(request_id)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream(engine: Engine, request_id: int, outputs: asyncio.Queue, kind: str, response_id: str,
                  model_name: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, then ``data: [DONE]``. Leaving early (the client
    disconnected) cancels the request."""
    created = now()
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        body = {"id": response_id, "object": obj, "created": created, "model": model_name, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return body

    finished = False
    try:
        if kind == "chat":
            yield _sse(chunk(None, None, role=True))
        while True:
            out: RequestOutput = await outputs.get()
            if out.finish_reason is None:
                if out.text:
                    yield _sse(chunk(out.text, None))
                continue
            finished = True
            if out.finish_reason in ("error", "cancelled"):
                message = f"generation failed: {out.error}" if out.error else "the server is shutting down"
                yield _sse(error_body(message, "server_error"))
                return
            if out.text:
                yield _sse(chunk(out.text, None))
            yield _sse(chunk(None, out.finish_reason))
            if include_usage:
                yield _sse({"id": response_id, "object": obj, "created": created, "model": model_name,
                            "choices": [], "usage": usage(out.prompt_tokens, out.completion_tokens)})
            yield "data: [DONE]\n\n"
            return
    finally:
        if not finished:
            engine.cancel(request_id)
