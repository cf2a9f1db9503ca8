"""``llava-local serve``: one engine behind HTTP, for programs that speak OpenAI or Ollama.

Routes (FastAPI, served by uvicorn; ``pip install 'llava-local[serve]'``):

* OpenAI-compatible: ``POST /v1/chat/completions`` (server-sent events with
  ``"stream": true``), ``GET /v1/models``;
* Ollama-compatible: ``POST /api/chat`` (NDJSON stream unless ``"stream": false``),
  ``GET /api/tags``, ``POST /api/show``, ``GET /api/version``, ``GET /api/ps``;
* ``GET /health`` (never behind the API key) and ``GET /``.

Why it is built this way:

* Both protocols are stateless: each request resends the whole conversation. Every
  request is answered by :meth:`VisionChat.answer` on ONE shared chat, so the
  llama.cpp engine's token-by-token prefix match (pictures by content hash) makes a
  request that repeats the previous conversation plus a new question read only the
  new question, and a new conversation about the picture it has just read skip the
  picture. ``usage.prompt_tokens_details.cached_tokens`` (OpenAI) and
  ``prompt_eval_count`` (Ollama: the tokens evaluated, as Ollama counts them) say so.
* One turn at a time (an ``asyncio.Lock``, first come first served); requests beyond
  ``queue`` waiting ones are answered 503 with ``Retry-After`` at once.
* A turn runs in a worker thread of its own (:class:`~llava_local.AsyncReplyStream`),
  and pieces are pulled one at a time: a client that goes away (noticed while waiting,
  reading or streaming) cancels its turn, which stops even a picture's encoding, and
  the next request gets the model.
* Pictures come only from the request: data URIs, base64 (Ollama) and http(s) URLs;
  never a path on this machine.
* Errors have each protocol's own shape and status, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import math
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ... import __version__
from ...aio import AsyncReplyStream
from ...chat import VisionChat
from ...errors import (
    ContextOverflowError,
    ImageError,
    InvalidRequestError,
    LlavaLocalError,
    MissingDependencyError,
    SchemaError,
    TurnCancelledError,
)
from ...gguf_header import read_gguf
from ...images import fetch_url, prepare
from ...types import Message, PreparedImage, Reply

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.types import ASGIApp, Receive, Scope, Send
    from starlette.types import Message as AsgiMessage
else:
    try:  # FastAPI reads the routes' annotations at run time, from this module
        from starlette.requests import Request
        from starlette.responses import Response
    except ImportError:  # without the [serve] extra; create_app() says what to install
        Request = Response = None

__all__ = ["Limits", "check_installed", "create_app", "serve"]

log = logging.getLogger("llava_local.serve")

#: Paths answered without the API key: liveness checks from load balancers and Open WebUI.
OPEN_PATHS = frozenset({"/", "/health"})
#: What Ollama version the Ollama routes claim to speak (its clients check it).
OLLAMA_VERSION = "0.6.0"
MB = 2**20


@dataclass(frozen=True)
class Limits:
    """What one request may bring, and how many may wait for the model."""

    max_body_bytes: int = 64 * MB
    max_picture_bytes: int = 20 * MB
    queue: int = 8
    fetch_timeout: float = 15.0
    retry_after_s: int = 2


def check_installed() -> None:
    """Raise :class:`MissingDependencyError` unless the ``[serve]`` extra is installed."""
    _fastapi()


def _fastapi() -> ModuleType:
    try:
        import fastapi
        import uvicorn  # noqa: F401 - checked here so the error names the extra once
    except ImportError as exc:
        raise MissingDependencyError(
            "llava-local serve needs FastAPI and uvicorn: pip install 'llava-local[serve]'"
        ) from exc
    return fastapi


# -- errors in each protocol's shape ---------------------------------------------------


class ApiError(Exception):
    """An answer other than 200, shaped by the protocol of the route that raised it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self, path: str) -> dict[str, Any]:
        if _is_ollama(path):
            return {"error": self.message}
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


class _ClientGone(Exception):
    """The client closed the connection; nothing is left to answer."""


def _is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def _library_error(exc: LlavaLocalError, param: str | None = None) -> ApiError:
    """The HTTP answer for an error the chat raised."""
    if isinstance(exc, ContextOverflowError):
        return ApiError(
            400,
            f"the conversation is {exc.needed} tokens with room to answer, and this "
            f"server's context window holds {exc.available}: send a shorter conversation "
            "or fewer pictures, or restart the server with a larger --n-ctx",
            code="context_length_exceeded",
            param="messages",
        )
    if isinstance(exc, ImageError):
        return ApiError(400, str(exc), code="invalid_image", param=param)
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), param=param)
    if isinstance(exc, SchemaError):
        return ApiError(
            500, f"{exc} (the answer was: {exc.text[:200]!r})", kind="server_error", code="schema"
        )
    return ApiError(500, f"the engine failed: {exc}", kind="server_error")


# -- the one engine, one turn at a time --------------------------------------------------


@dataclass
class _Engine:
    """The shared chat, its turn lock and its queue, and what it has done."""

    chat: VisionChat
    name: str
    limits: Limits
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    admitted: int = 0  # requests running or waiting for the model
    busy: bool = False
    stopping: bool = False  # the server is shutting down: no new turns
    served: int = 0
    cancelled: int = 0
    started: float = field(default_factory=time.time)
    streams: set[AsyncReplyStream] = field(default_factory=set)

    def admit(self) -> None:
        self.refuse_if_stopping()
        if self.admitted >= 1 + self.limits.queue:
            raise ApiError(
                503,
                f"the server is busy: one answer is being written and {self.limits.queue} "
                "requests wait for the model; try again shortly",
                kind="server_error",
                code="server_busy",
                headers={"Retry-After": str(self.limits.retry_after_s)},
            )
        self.admitted += 1

    def refuse_if_stopping(self) -> None:
        if self.stopping:
            raise ApiError(
                503, "the server is shutting down", kind="server_error", code="shutting_down"
            )

    def stop(self) -> None:
        """No new turns, and the running ones stop now (safe from a signal handler)."""
        self.stopping = True
        for stream in list(self.streams):
            stream.cancel()

    def names(self) -> set[str]:
        return {self.name, f"{self.name}:latest"}

    def check_model(self, requested: str) -> None:
        if requested not in self.names():
            raise ApiError(
                404,
                f"model '{requested}' not found: this server serves '{self.name}' "
                "(GET /v1/models or /api/tags lists it)",
                code="model_not_found",
                param="model",
            )


class _Turn:
    """One request's answer: admitted to the queue, then holding the model until closed.

    Pieces are pulled one at a time from the turn's worker thread; while this side waits
    (for the model or for a piece), a client that hangs up cancels the turn."""

    def __init__(self, engine: _Engine, request: Request) -> None:
        self.engine = engine
        self.request = request
        self.stream: AsyncReplyStream | None = None
        self.finished = False
        self.error: ApiError | None = None  # one that came after the status was sent
        self._locked = False
        self._admitted = False
        self._closed = False

    def admit(self) -> None:
        """Take a place in the queue, or be refused (503) at once."""
        self.engine.admit()
        self._admitted = True

    async def start(
        self, messages: list[Message], schema: dict[str, Any] | None, options: dict[str, Any]
    ) -> None:
        """Wait for the model, then open the turn (its first piece is not read yet)."""
        engine = self.engine
        acquiring = asyncio.ensure_future(engine.lock.acquire())
        try:
            await self._watched(acquiring)
        finally:
            self._locked = acquiring.done() and not acquiring.cancelled()
        engine.refuse_if_stopping()
        engine.busy = True
        try:
            stream = engine.chat.answer(messages, schema=schema, **options)
        except LlavaLocalError as exc:
            raise _library_error(exc) from exc
        self.stream = AsyncReplyStream(stream)
        engine.streams.add(self.stream)

    async def next(self, *, watch: bool = True) -> str | None:
        """The next piece, or None at the end (then :attr:`reply` is ready)."""
        assert self.stream is not None
        try:
            reading = asyncio.ensure_future(_anext(self.stream))
            piece = await (self._watched(reading) if watch else reading)
        except TurnCancelledError:
            raise _ClientGone from None
        except LlavaLocalError as exc:
            raise _library_error(exc) from exc
        if piece is None:
            self.finished = True
        return piece

    @property
    def reply(self) -> Reply:
        assert self.stream is not None
        return self.stream.reply

    async def _watched(self, task: asyncio.Future[Any]) -> Any:
        """``task``'s result, unless the client hangs up first: then it is cancelled
        (with the turn: AsyncReplyStream waits until the worker let go of the chat)."""
        watcher = asyncio.ensure_future(_disconnected(self.request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone = watcher.done() and not watcher.cancelled()
            watcher.cancel()
            if not task.done():
                if self.stream is not None:
                    self.stream.cancel()  # a piece being read stops at once
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if gone:
            raise _ClientGone
        return task.result()

    async def close(self) -> None:
        """Let go of the model, stopping the turn first if it is still running."""
        if self._closed:
            return
        self._closed = True
        engine = self.engine
        try:
            if self.stream is not None:
                engine.streams.discard(self.stream)
                await self.stream.aclose()
        finally:
            if self.finished:
                engine.served += 1
            elif self.stream is not None:
                engine.cancelled += 1
            if self._locked:
                engine.busy = False
                engine.lock.release()
            if self._admitted:
                engine.admitted -= 1


async def _anext(stream: AsyncReplyStream) -> str | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (the body is read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- reading requests -------------------------------------------------------------------


async def _read_json(request: Request, limits: Limits) -> dict[str, Any]:
    """The request's JSON object, refusing bodies over the limit before reading them."""
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(
            400, f"the request body is not valid JSON ({exc}); send a JSON object"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    return data


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is {size} bytes, more than this server's limit of {limit} "
        "(--max-body-mb); send smaller pictures",
        code="request_too_large",
    )


def _validated(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise ApiError(400, f"invalid request ({problems})", param=where or None) from None


@dataclass
class _Picture:
    """A picture of a request, still as the client sent it."""

    where: str  # the request field, for error messages
    source: str  # data URI, http(s) URL or base64
    base64_only: bool = False  # Ollama's images: base64 text and nothing else


@dataclass
class _Wanted:
    """One message as the request sent it: its pictures not read yet."""

    role: Literal["system", "user", "assistant"]
    text: str
    pictures: list[_Picture]


def _picture_bytes(picture: _Picture, limits: Limits) -> bytes:
    source = picture.source.strip()
    if picture.base64_only or not source.lower().startswith(("data:", "http://", "https://")):
        if not picture.base64_only:
            raise ImageError(
                _short(source), "pass a data: URI (data:image/png;base64,...) or an http(s) URL"
            )
        data = _b64(source)
        if data is None:
            raise ImageError("<base64 text>", "not valid base64")
    elif source.lower().startswith("data:"):
        header, comma, payload = source.partition(",")
        if not comma:
            raise ImageError("<data URI>", "no comma between the header and the data")
        if header.lower().endswith(";base64"):
            data = _b64(payload)
            if data is None:
                raise ImageError("<data URI>", "the payload is not valid base64")
        else:
            data = urllib.parse.unquote_to_bytes(payload)
    else:
        data = fetch_url(source, max_bytes=limits.max_picture_bytes, timeout=limits.fetch_timeout)
    if len(data) > limits.max_picture_bytes:
        raise ApiError(
            413,
            f"the picture at {picture.where} is {len(data)} bytes, more than this "
            f"server's limit of {limits.max_picture_bytes} (--max-picture-mb)",
            code="picture_too_large",
            param=picture.where,
        )
    if not data:
        raise ImageError("<empty>", "no data (0 bytes)")
    return data


def _b64(text: str) -> bytes | None:
    compact = "".join(text.split())
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _prepare_all(wanted: list[_Wanted], limits: Limits, max_side: int) -> list[Message]:
    """The conversation with its pictures read and prepared (in a worker thread)."""
    messages = []
    for item in wanted:
        prepared: list[PreparedImage] = []
        for picture in item.pictures:
            try:
                prepared.append(prepare(_picture_bytes(picture, limits), max_side=max_side))
            except ImageError as exc:
                raise ApiError(400, str(exc), code="invalid_image", param=picture.where) from exc
        messages.append(Message(role=item.role, content=item.text, images=tuple(prepared)))
    return messages


# -- the OpenAI protocol ---------------------------------------------------------------


class _Lenient(BaseModel):
    """Request parts: fields this server does not use are ignored, as OpenAI's are."""

    model_config = ConfigDict(extra="ignore")


class _ImageUrl(_Lenient):
    url: str
    detail: str | None = None


class _Part(_Lenient):
    type: str
    text: str | None = None
    image_url: _ImageUrl | str | None = None


class _OpenAIMessage(_Lenient):
    role: str
    content: str | list[_Part] | None = None


class _JsonSchema(_Lenient):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class _ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None


class _StreamOptions(_Lenient):
    include_usage: bool = False


class OpenAIRequest(_Lenient):
    """``POST /v1/chat/completions``: what this server reads of it."""

    model: str
    messages: list[_OpenAIMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    response_format: _ResponseFormat | None = None
    n: int | None = Field(default=None, ge=1, le=1)


_ROLES: dict[str, Literal["system", "user", "assistant"]] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}


def _openai_conversation(body: OpenAIRequest) -> list[_Wanted]:
    wanted = []
    for i, message in enumerate(body.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise ApiError(
                400,
                f"messages[{i}]: role {message.role!r} is not supported here "
                "(system, developer, user or assistant)",
                param=f"messages[{i}].role",
            )
        content = message.content
        if content is None or isinstance(content, str):
            wanted.append(_Wanted(role, content or "", []))
            continue
        texts, pictures = [], []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                texts.append(part.text or "")
            elif part.type == "image_url" and part.image_url is not None:
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                if role != "user":
                    raise ApiError(400, f"{where}: only user messages may bring pictures")
                pictures.append(_Picture(f"{where}.image_url", url))
            else:
                raise ApiError(
                    400,
                    f"{where}: content part type {part.type!r} is not supported "
                    "(text or image_url)",
                    param=where,
                )
        wanted.append(_Wanted(role, "\n".join(texts), pictures))
    return wanted


def _openai_schema(body: OpenAIRequest) -> dict[str, Any] | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ApiError(
            400,
            "response_format json_schema needs json_schema.schema (a JSON schema object)",
            param="response_format",
        )
    return fmt.json_schema.schema_


def _openai_options(body: OpenAIRequest) -> dict[str, Any]:
    options = {
        "max_tokens": body.max_completion_tokens or body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stop": body.stop,
    }
    return {k: v for k, v in options.items() if v is not None}


def _usage(reply: Reply) -> dict[str, Any]:
    stats = reply.stats
    cached = stats.cached_tokens or 0
    prompt = stats.prompt_tokens + cached
    return {
        "prompt_tokens": prompt,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": prompt + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _timings(reply: Reply) -> dict[str, Any]:
    """llama-server's ``timings``, which some clients read (ours among them)."""
    stats = reply.stats
    return {
        "cache_n": stats.cached_tokens or 0,
        "prompt_n": stats.prompt_tokens,
        "prompt_ms": stats.prompt_s * 1000,
        "predicted_n": stats.completion_tokens,
        "predicted_ms": stats.decode_s * 1000,
    }


# -- the Ollama protocol ---------------------------------------------------------------


class _OllamaMessage(_Lenient):
    role: str
    content: str | None = ""
    images: list[str] | None = None


class OllamaRequest(_Lenient):
    """``POST /api/chat``: what this server reads of it."""

    model: str = Field(min_length=1)
    messages: list[_OllamaMessage] = Field(default_factory=list)
    stream: bool = True
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: dict[str, Any] | None = None


#: Ollama's option names and ours.
_OLLAMA_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "num_predict": "max_tokens",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repeat_penalty",
}


def _ollama_conversation(body: OllamaRequest) -> list[_Wanted]:
    wanted = []
    for i, message in enumerate(body.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise ApiError(400, f"messages[{i}]: role {message.role!r} is not supported here")
        pictures = [
            _Picture(f"messages[{i}].images[{j}]", image, base64_only=True)
            for j, image in enumerate(message.images or [])
        ]
        if pictures and role != "user":
            raise ApiError(400, f"messages[{i}]: only user messages may bring pictures")
        wanted.append(_Wanted(role, message.content or "", pictures))
    return wanted


def _ollama_options(body: OllamaRequest) -> dict[str, Any]:
    options = {}
    for theirs, value in (body.options or {}).items():
        ours = _OLLAMA_OPTIONS.get(theirs)
        if ours is None or value is None:
            continue  # num_ctx, num_thread...: the server's own settings decide
        if ours == "max_tokens" and isinstance(value, int) and value < 0:
            continue  # -1 and -2: no limit
        options[ours] = value
    return options


def _ollama_schema(body: OllamaRequest) -> dict[str, Any] | None:
    if not body.format:
        return None
    return {"type": "object"} if body.format == "json" else body.format


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float | None) -> int:
    return int((seconds or 0.0) * 1e9)


def _ollama_final(model: str, reply: Reply, content: str) -> dict[str, Any]:
    stats = reply.stats
    return {
        "model": model,
        "created_at": _now(),
        "message": {"role": "assistant", "content": content},
        "done_reason": reply.done_reason or "stop",
        "done": True,
        "total_duration": _ns(stats.total_s),
        "load_duration": _ns(stats.load_s),
        "prompt_eval_count": stats.prompt_tokens,
        "prompt_eval_duration": _ns(stats.prompt_s),
        "eval_count": stats.completion_tokens,
        "eval_duration": _ns(stats.decode_s),
    }


# -- the model as the listing routes describe it ---------------------------------------


@dataclass(frozen=True)
class _ModelFacts:
    size: int
    digest: str
    family: str
    parameter_size: str
    context_length: int | None
    modified_at: str


def _model_facts(chat: VisionChat) -> _ModelFacts:
    engine = chat.engine
    path = getattr(engine, "model_path", None)
    mmproj = getattr(engine, "mmproj_path", None)
    files = [p for p in (path, mmproj) if isinstance(p, Path) and p.is_file()]
    size = sum(p.stat().st_size for p in files)
    family, params, context = "unknown", "", None
    if isinstance(path, Path) and path.is_file():
        with contextlib.suppress(LlavaLocalError):
            header = read_gguf(path)
            family = str(header.meta.get("general.architecture", family))
            count = sum(math.prod(t.shape) for t in header.tensors)
            params = f"{count / 1e9:.1f}B" if count >= 1e8 else f"{count / 1e6:.0f}M"
            context = getattr(engine, "n_ctx", None)
    modified = max((p.stat().st_mtime for p in files), default=time.time())
    stamp = datetime.fromtimestamp(modified, timezone.utc).isoformat().replace("+00:00", "Z")
    names = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    digest = hashlib.sha256(names.encode()).hexdigest()
    return _ModelFacts(size, digest, family, params, context, stamp)


def _details(facts: _ModelFacts) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": facts.family,
        "families": [facts.family, "clip"],
        "parameter_size": facts.parameter_size,
        "quantization_level": "",
    }


# -- the app ---------------------------------------------------------------------------


class _Api:
    """The routes, over one shared engine (made when the app starts, in its event loop)."""

    def __init__(self, chat: VisionChat, name: str, limits: Limits) -> None:
        self.chat = chat
        self.name = name
        self.limits = limits
        self.facts = _model_facts(chat)
        self._engine: _Engine | None = None

    @property
    def engine(self) -> _Engine:
        if self._engine is None:  # the first request, in the server's event loop
            self._engine = _Engine(self.chat, self.name, self.limits)
        return self._engine

    def stop(self) -> None:
        """Refuse new turns and stop the running ones (the server is shutting down)."""
        self.engine.stop()

    # -- errors ------------------------------------------------------------------------

    async def on_api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        request.state.note = f"error: {exc.message[:120]}"
        return _error_response(exc, request.url.path)

    async def on_http_error(self, request: Request, exc: Exception) -> Response:
        status = int(getattr(exc, "status_code", 500))
        if status == 404:
            text = f"no route {request.method} {request.url.path} on this server"
        elif status == 405:
            text = f"{request.url.path} does not take {request.method}"
        else:
            text = str(getattr(exc, "detail", exc))
        return _error_response(ApiError(status, text), request.url.path)

    async def on_bug(self, request: Request, exc: Exception) -> Response:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        error = ApiError(500, f"internal error: {exc!r}", kind="server_error")
        return _error_response(error, request.url.path)

    # -- health and listings ---------------------------------------------------------

    async def root(self) -> Response:
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("llava-local is running")

    async def health(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "status": "ok",
            "model": engine.name,
            "busy": engine.busy,
            "waiting": max(0, engine.admitted - (1 if engine.busy else 0)),
            "served": engine.served,
            "cancelled": engine.cancelled,
        }

    async def openai_models(self) -> dict[str, Any]:
        model = {
            "id": self.name,
            "object": "model",
            "created": int(self.engine.started),
            "owned_by": "llava-local",
        }
        return {"object": "list", "data": [model]}

    async def ollama_version(self) -> dict[str, Any]:
        return {"version": OLLAMA_VERSION}

    def _ollama_model(self) -> dict[str, Any]:
        tagged = self.name if ":" in self.name else f"{self.name}:latest"
        return {
            "name": tagged,
            "model": tagged,
            "modified_at": self.facts.modified_at,
            "size": self.facts.size,
            "digest": self.facts.digest,
            "details": _details(self.facts),
        }

    async def ollama_tags(self) -> dict[str, Any]:
        return {"models": [self._ollama_model()]}

    async def ollama_ps(self) -> dict[str, Any]:
        entry = self._ollama_model()
        del entry["modified_at"]
        entry.update({"expires_at": "2318-08-08T08:08:08Z", "size_vram": 0})
        if self.facts.context_length:
            entry["context_length"] = self.facts.context_length
        return {"models": [entry]}

    async def ollama_show(self, request: Request) -> dict[str, Any]:
        data = await _read_json(request, self.limits)
        requested = data.get("model") or data.get("name")
        if not isinstance(requested, str):
            raise ApiError(400, 'missing model name: send {"model": "..."}')
        self.engine.check_model(requested)
        facts = self.facts
        info: dict[str, Any] = {"general.architecture": facts.family}
        if facts.context_length:
            info[f"{facts.family}.context_length"] = facts.context_length
        return {
            "modelfile": f"# served by llava-local {__version__}\nFROM {self.name}\n",
            "parameters": "",
            "template": "",
            "details": _details(facts),
            "model_info": info,
            "capabilities": ["completion", "vision"],
            "modified_at": facts.modified_at,
        }

    # -- answers ----------------------------------------------------------------------

    async def _begin(
        self,
        request: Request,
        wanted: list[_Wanted],
        schema: dict[str, Any] | None,
        options: dict[str, Any],
    ) -> tuple[_Turn, str | None]:
        """Admit the request, read its pictures, wait for the model, and read the
        answer's first piece before any status is sent: an error that comes before it
        (a prompt too long for the context) gets its own status."""
        turn = _Turn(self.engine, request)
        try:
            turn.admit()  # refused now if full, before any picture is read
            messages = await asyncio.to_thread(
                _prepare_all, wanted, self.limits, self.chat.max_image_side
            )
            await turn.start(messages, schema, options)
            first = await turn.next()
        except BaseException:
            await turn.close()
            raise
        return turn, first

    async def chat_completions(self, request: Request) -> Any:
        from starlette.responses import StreamingResponse

        data = await _read_json(request, self.limits)
        body: OpenAIRequest = _validated(OpenAIRequest, data)
        self.engine.check_model(body.model)
        wanted = _openai_conversation(body)
        if wanted[-1].role != "user":
            raise ApiError(400, "the last message must be the user's", param="messages")
        try:
            schema, options = _openai_schema(body), _openai_options(body)
            turn, first = await self._begin(request, wanted, schema, options)
        except _ClientGone:
            return _gone(request)
        reply_to = _OpenAIReply(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body)
        if body.stream:
            return StreamingResponse(
                reply_to.events(turn, first),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            reply = await _rest(turn, first)
        except _ClientGone:
            return _gone(request)
        _note_tokens(request, reply)
        return reply_to.whole(reply)

    async def ollama_chat(self, request: Request) -> Any:
        from starlette.responses import StreamingResponse

        body: OllamaRequest = _validated(OllamaRequest, await _read_json(request, self.limits))
        self.engine.check_model(body.model)
        if not body.messages:  # Ollama's way to load a model: it is loaded
            return {
                "model": body.model,
                "created_at": _now(),
                "message": {"role": "assistant", "content": ""},
                "done_reason": "load",
                "done": True,
            }
        wanted = _ollama_conversation(body)
        if wanted[-1].role != "user":
            raise ApiError(400, "the last message must be the user's")
        try:
            schema, options = _ollama_schema(body), _ollama_options(body)
            turn, first = await self._begin(request, wanted, schema, options)
        except _ClientGone:
            return _gone(request)
        if body.stream:
            lines = _ollama_lines(turn, first, body.model)
            return StreamingResponse(lines, media_type="application/x-ndjson")
        try:
            reply = await _rest(turn, first)
        except _ClientGone:
            return _gone(request)
        _note_tokens(request, reply)
        return _ollama_final(body.model, reply, reply.text)


async def _rest(turn: _Turn, first: str | None) -> Reply:
    """The whole answer (not streamed); the turn is closed after it."""
    try:
        while first is not None and await turn.next() is not None:
            pass
        return turn.reply
    finally:
        await turn.close()


@dataclass(frozen=True)
class _OpenAIReply:
    """One chat completion's answer, whole or as server-sent events."""

    ident: str
    created: int
    body: OpenAIRequest

    def whole(self, reply: Reply) -> dict[str, Any]:
        return {
            "id": self.ident,
            "object": "chat.completion",
            "created": self.created,
            "model": self.body.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text},
                    "finish_reason": reply.done_reason or "stop",
                    "logprobs": None,
                }
            ],
            "usage": _usage(reply),
            "timings": _timings(reply),
        }

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {
            "id": self.ident,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.body.model,
            "system_fingerprint": None,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(chunk)}\n\n"

    def _delta(self, content: str, *, role: bool = False) -> str:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        delta["content"] = content
        return self._event([{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}])

    async def events(self, turn: _Turn, first: str | None) -> AsyncIterator[str]:
        options = self.body.stream_options
        async with _streaming(turn):
            yield self._delta(first or "", role=True)
            if first is not None:
                while (piece := await turn.next(watch=False)) is not None:
                    yield self._delta(piece)
            reply = turn.reply
            _note_tokens(turn.request, reply)
            done = {"index": 0, "delta": {}, "finish_reason": reply.done_reason or "stop"}
            yield self._event([{**done, "logprobs": None}], timings=_timings(reply))
            if options is not None and options.include_usage:
                yield self._event([], usage=_usage(reply))
            yield "data: [DONE]\n\n"
        if turn.error is not None:
            yield f"data: {json.dumps(turn.error.body('/v1'))}\n\n"


async def _ollama_lines(turn: _Turn, first: str | None, model: str) -> AsyncIterator[str]:
    def line(content: str) -> str:
        chunk = {
            "model": model,
            "created_at": _now(),
            "message": {"role": "assistant", "content": content},
            "done": False,
        }
        return json.dumps(chunk) + "\n"

    async with _streaming(turn):
        if first is not None:
            yield line(first)
            while (piece := await turn.next(watch=False)) is not None:
                yield line(piece)
        reply = turn.reply
        _note_tokens(turn.request, reply)
        yield json.dumps(_ollama_final(model, reply, "")) + "\n"
    if turn.error is not None:
        yield json.dumps({"error": turn.error.message}) + "\n"


def _error_response(exc: ApiError, path: str) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse(exc.body(path), status_code=exc.status, headers=exc.headers)


def create_app(
    chat: VisionChat,
    *,
    name: str | None = None,
    limits: Limits | None = None,
    api_key: str | None = None,
    cors: Sequence[str] = (),
    close_chat: bool = True,
) -> FastAPI:
    """The HTTP app answering with ``chat``'s engine (shared by every request).

    ``name`` is the model name clients use (default: the engine's catalogue name, or
    its file name without ``.gguf``); ``api_key`` a bearer token every route but
    ``/health`` and ``/`` requires; ``cors`` the origins allowed to call it from a
    browser (none by default). The chat is closed when the app shuts down, unless
    ``close_chat`` is False."""
    fastapi = _fastapi()
    from starlette.exceptions import HTTPException

    chat.allow_text_only = True  # a text-only question is the client's choice
    api = _Api(chat, name or _default_name(chat), limits or Limits())

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        api.engine  # noqa: B018 - made here, in the server's event loop
        yield
        api.stop()
        if close_chat:
            await asyncio.to_thread(chat.close)

    app: FastAPI = fastapi.FastAPI(
        title="llava-local",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.api = api
    app.add_exception_handler(ApiError, api.on_api_error)
    app.add_exception_handler(HTTPException, api.on_http_error)
    app.add_exception_handler(Exception, api.on_bug)
    routes: list[tuple[str, Callable[..., Any], str]] = [
        ("/", api.root, "GET"),
        ("/health", api.health, "GET"),
        ("/v1/models", api.openai_models, "GET"),
        ("/v1/chat/completions", api.chat_completions, "POST"),
        ("/api/version", api.ollama_version, "GET"),
        ("/api/tags", api.ollama_tags, "GET"),
        ("/api/ps", api.ollama_ps, "GET"),
        ("/api/show", api.ollama_show, "POST"),
        ("/api/chat", api.ollama_chat, "POST"),
    ]
    for path, endpoint, method in routes:
        app.add_api_route(path, endpoint, methods=[method], response_model=None)
    if cors:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )
    if api_key:
        app.add_middleware(_RequireKey, api_key=api_key)
    app.add_middleware(_LogRequests)
    return app


@contextlib.asynccontextmanager
async def _streaming(turn: _Turn) -> AsyncIterator[None]:
    """A streamed answer's body: an error after the status was sent is kept in
    ``turn.error`` (sent as the protocol's last line), a client that goes away is
    noted, and the model is let go of in every case."""
    try:
        yield
    except ApiError as exc:
        turn.error = exc
        turn.request.state.note = f"error mid-stream: {exc.message[:120]}"
    except _ClientGone:
        stopping = turn.engine.stopping
        turn.request.state.note = "stopped: shutting down" if stopping else "client gone mid-stream"
    except BaseException:  # the connection closed under us (Starlette cancels the body)
        turn.request.state.note = "client gone mid-stream"
        raise
    finally:
        await turn.close()


def _gone(request: Request) -> Any:
    """What is 'sent' to a client that has hung up (nobody reads it; the log does)."""
    from starlette.responses import Response

    request.state.note = "client gone"
    return Response(status_code=499)


def _note_tokens(request: Request, reply: Reply) -> None:
    stats = reply.stats
    request.state.tokens = (
        f"prompt={stats.prompt_tokens} cached={stats.cached_tokens or 0} "
        f"completion={stats.completion_tokens}"
    )


def _default_name(chat: VisionChat) -> str:
    config = chat.engine.config
    model = getattr(config, "model", None)
    if isinstance(model, str) and model and "/" not in model and not model.endswith(".gguf"):
        return model  # the demo, a catalogue name
    return Path(chat.model).name.removesuffix(".gguf")


# -- middleware (plain ASGI, so streamed answers are timed to their end) ------------------


class _LogRequests:
    """One log line per request: method, route, status, tokens, seconds (and a note)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        state = scope.setdefault("state", {})

        async def sending(message: AsgiMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - started
            tokens = state.get("tokens", "-")
            note = state.get("note")
            log.info(
                "%s %s %s %s %.3fs%s",
                scope.get("method", "-"),
                scope.get("path", "-"),
                status or "-",
                tokens,
                seconds,
                f" ({note})" if note else "",
            )


class _RequireKey:
    """``Authorization: Bearer KEY`` on every route but the open ones."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        error = ApiError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
            "with the key the server was started with (--api-key)",
            code="invalid_api_key",
        )
        body = json.dumps(error.body(path)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


# -- running it --------------------------------------------------------------------------


def serve(
    chat: VisionChat,
    bind: str = "127.0.0.1",
    port: int = 8000,
    *,
    name: str | None = None,
    limits: Limits | None = None,
    api_key: str | None = None,
    cors: Sequence[str] = (),
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``chat`` until Ctrl-C (or SIGTERM); the chat is closed on the way out."""
    _fastapi()
    import uvicorn

    app = create_app(chat, name=name, limits=limits, api_key=api_key, cors=cors)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    config = uvicorn.Config(
        app,
        host=bind,
        port=port,
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=3,
    )
    api: _Api = app.state.api

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            api.stop()  # answers being written end now, so the shutdown need not wait
            super().handle_exit(sig, frame)

    server = Server(config)
    if on_ready is not None:
        startup = server.startup

        async def announced(sockets: Any = None) -> None:
            await startup(sockets=sockets)
            if server.started:
                host = f"[{bind}]" if ":" in bind else bind
                on_ready(f"http://{host}:{port}")

        server.startup = announced  # type: ignore[method-assign]
    server.run()
    if not server.started:
        raise OSError(f"cannot serve on {bind}:{port}")
