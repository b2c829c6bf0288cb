"""The HTTP side of `babyllama serve`: OpenAI's API over the continuous batcher, and the chat page.

    GET  /health                 the server's state (no key needed)
    GET  /v1/models              the one model served
    POST /v1/chat/completions    a conversation -> the assistant's reply (streamed as SSE with stream=true)
    POST /v1/completions         a text -> its continuation
    GET  /                       the chat page (page.html)

Every error is OpenAI's error object, {"error": {"message", "type", "param", "code"}}, with the
status OpenAI uses: 400 for a request that is wrong (bad JSON, a bad field, a prompt longer than the
context), 401 for a missing or wrong key, 404 for an unknown model or route, 413 for a body over the
limit, 503 when the queue is full (with Retry-After). No request can stop the server: the handlers
turn every failure into one of these, and a failure inside the batcher ends only the rows it hit.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from babyllama.config import ConfigError
from babyllama.infer.batching import Batcher, QueueFull
from babyllama.infer.generate import TextStreamer
from babyllama.infer.sampling import SamplingConfig
from babyllama.tokenizer.chat import Message

DEFAULT_MAX_TOKENS = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class BodyLimit:
    """Read a POST body up to the limit before the app sees it: over the limit, 413 at once (a chunked
    body has no Content-Length to check first); within it, the app gets the body as it came."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                error = APIError(413, f"the request body is over {self.limit} bytes", code="body_too_large")
                return await error.response()(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # what comes later: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


# --- the requests ---------------------------------------------------------------------------------

class Sampling(BaseModel):
    """The sampling fields both endpoints take (OpenAI's, plus top_k and repetition_penalty)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.1, gt=0, le=10)
    n: int = Field(1, ge=1, le=8)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def sampling(self, index: int) -> SamplingConfig:
        seed = None if self.seed is None else self.seed + index  # n replies: each its own draw
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty, seed=seed)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]


# --- the app ----------------------------------------------------------------------------------------

@dataclass
class Served:
    """What the app serves: the model's name, its tokenizer, the batcher, the settings."""

    name: str
    tokenizer: Any
    batcher: Batcher
    template: Any | None  # the chat template, None when the tokenizer has no chat markers
    api_key: str | None = None
    max_body: int = 1 << 20


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="babyllama", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    app.add_middleware(BodyLimit, limit=served.max_body)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """The key, before a handler runs."""
        if served.api_key and request.url.path.startswith("/v1/") and not _key_ok(request, served.api_key):
            return APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                            code="invalid_api_key").response()
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return APIError(400, "the body is not valid JSON", code="invalid_json").response()
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(where) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return APIError(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        return APIError(500, f"internal error: {type(err).__name__}: {err}", type_="server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, **served.batcher.load()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "babyllama"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check_model(served, body.model)
        if served.template is None:
            raise APIError(400, "this model's tokenizer has no chat markers (<|im_start|>/<|im_end|>): use "
                                "/v1/completions", param="messages")
        messages = [Message("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
        prompt = served.template.prompt_ids(messages)
        stops = {served.template.end_id, served.tokenizer.eos_id}
        return await _generate(served, request, body, [prompt], stops, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(served, body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(texts) != 1:
            raise APIError(400, "prompt: one text per request", param="prompt")
        prompt = [served.tokenizer.eos_id] + served.tokenizer.encode(texts[0])  # a new document, as pretraining saw
        return await _generate(served, request, body, [prompt], {served.tokenizer.eos_id}, chat=False)

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request):
        if served.api_key and not hmac.compare_digest(request.query_params.get("key", ""), served.api_key):
            return HTMLResponse("<p>This server needs its API key: open <code>/?key=YOUR_KEY</code>.</p>", 401)
        return HTMLResponse(resources.files("babyllama.serve").joinpath("page.html").read_text(encoding="utf-8"))

    return app


def _key_ok(request: Request, key: str) -> bool:
    given = request.headers.get("authorization", "")
    return given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip(), key)


def _check_model(served: Served, name: str) -> None:
    if name != served.name:
        raise APIError(404, f"the model {name!r} does not exist; this server has {served.name!r}", param="model",
                       code="model_not_found")


def _budget(served: Served, body: Sampling, prompt: list[int]) -> int:
    context = served.batcher.context
    room = context - len(prompt)
    if room <= 0:
        raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context is {context} tokens",
                       param="messages" if isinstance(body, ChatRequest) else "prompt", code="context_length_exceeded")
    asked = body.max_completion_tokens or body.max_tokens
    if asked is None:
        return min(DEFAULT_MAX_TOKENS, room)
    if asked > room:
        raise APIError(400, f"max_tokens is {asked}, but the prompt ({len(prompt)} tokens) leaves {room} of the "
                            f"{context}-token context", param="max_tokens", code="context_length_exceeded")
    return asked


class _Reply:
    """One of the n replies: its tokens as text, cut at a stop string (held back until it cannot be one)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.streamer, self.stops = TextStreamer(tokenizer), stops
        self.text, self.sent, self.tokens, self.finish = "", 0, 0, None
        self.hold = max((len(s) for s in stops), default=1) - 1

    def add(self, piece: str) -> bool:
        """Append text; True when a stop string has appeared (the text is cut before it)."""
        self.text += piece
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                return True
        return False

    def ready(self, final: bool) -> str:
        """The text not sent yet that can no longer turn into a stop string."""
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        new, self.sent = self.text[self.sent:end], end
        return new


async def _generate(served: Served, request: Request, body: Sampling, prompts: list[list[int]], stop_ids: set,
                    chat: bool):
    prompt = prompts[0]
    budget = _budget(served, body, prompt)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    replies = [_Reply(served.tokenizer, body.stop) for _ in range(body.n)]
    jobs = []
    try:
        for i in range(body.n):
            jobs.append(served.batcher.submit(
                prompt, budget, body.sampling(i), stop_ids,
                on_token=lambda tid, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, "token", tid)),
                on_finish=lambda why, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, "finish", why))))
    except QueueFull as err:
        for job in jobs:
            job.cancel()
        raise APIError(503, f"the server is busy ({err}); retry shortly", type_="server_error",
                       code="server_busy", headers={"Retry-After": "1"}) from None
    except ConfigError as err:
        raise APIError(400, str(err)) from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())

    async def events_until_done():
        """(index, text piece or None, finish reason or None) as the replies grow."""
        open_ = body.n
        while open_:
            i, kind, value = await events.get()
            reply = replies[i]
            if reply.finish is not None:  # cut at a stop string already; its row is being retired
                if kind == "finish":
                    open_ -= 1
                continue
            if kind == "token":
                reply.tokens += 1
                if reply.add(reply.streamer.push(value)):
                    reply.finish = "stop"
                    jobs[i].cancel()
                    yield i, reply.ready(True), "stop"
                else:
                    yield i, reply.ready(False), None
                continue
            open_ -= 1
            if value.startswith("error"):
                raise APIError(500, f"generation failed ({value})", type_="server_error")
            stopped = reply.add(reply.streamer.flush())
            reply.finish = "stop" if stopped or value == "stop" else "length"
            yield i, reply.ready(True), reply.finish

    usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": sum(r.tokens for r in replies),  # noqa: E731
                     "total_tokens": len(prompt) + sum(r.tokens for r in replies)}
    obj = "chat.completion" if chat else "text_completion"

    if not body.stream:
        try:
            async for _ in events_until_done():
                pass
        finally:
            for job in jobs:
                job.cancel()
        choices = [({"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish}
                    if chat else {"index": i, "text": r.text, "finish_reason": r.finish, "logprobs": None})
                   for i, r in enumerate(replies)]
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": served.name,
                             "choices": choices, "usage": usage()})

    def chunk(i: int, text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
        data = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created, "model": served.name,
                "choices": [choice]}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def sse():
        try:
            if chat:
                for i in range(body.n):
                    yield chunk(i, None, None, first=True)
            async for i, text, finish in events_until_done():
                if text or finish:
                    yield chunk(i, text, finish)
            if (body.stream_options or {}).get("include_usage"):
                data = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created,
                        "model": served.name, "choices": [], "usage": usage()}
                yield f"data: {json.dumps(data)}\n\n"
            yield "data: [DONE]\n\n"
        except APIError as err:
            error = {"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}}
            yield f"data: {json.dumps(error)}\n\n"
        finally:  # the client went away (the task is cancelled) or the replies are done: free the rows
            for job in jobs:
                job.cancel()

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
