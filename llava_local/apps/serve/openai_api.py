"""The OpenAI-compatible routes: ``POST /v1/chat/completions`` (server-sent events with
``"stream": true``) and ``GET /v1/models``.

The request's messages become the chat's (``image_url`` parts as pictures), its
options the chat's options, ``response_format`` a schema; the answer carries
``usage`` (``prompt_tokens_details.cached_tokens``: what the prefix match reused) and
llama-server's ``timings``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from ...types import Reply
from .bodies import Lenient, Request, read_request
from .errors import ApiError
from .pictures import Picture, Wanted, wanted
from .turns import Engine, Turn, note_tokens, respond, streaming


class _ImageUrl(Lenient):
    url: str
    detail: str | None = None


class _Part(Lenient):
    type: str
    text: str | None = None
    image_url: _ImageUrl | str | None = None


class _OpenAIMessage(Lenient):
    role: str
    content: str | list[_Part] | None = None


class _JsonSchema(Lenient):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class _ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None


class _StreamOptions(Lenient):
    include_usage: bool = False


class OpenAIRequest(Lenient):
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


class OpenAIRoutes:
    """``/v1``: the routes of the OpenAI protocol, over the shared engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def models(self) -> dict[str, Any]:
        model = {
            "id": self.engine.name,
            "object": "model",
            "created": int(self.engine.started),
            "owned_by": "llava-local",
        }
        return {"object": "list", "data": [model]}

    async def chat_completions(self, request: Request) -> Any:
        engine = self.engine
        body = await read_request(request, engine.limits, OpenAIRequest)
        engine.check_model(body.model)
        conversation = _conversation(body)
        schema, options = _schema(body), _options(body)
        reply_to = _OpenAIReply(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body)
        return await respond(
            engine,
            request,
            conversation,
            schema,
            options,
            whole=reply_to.whole,
            streamed=reply_to.events if body.stream else None,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def _conversation(body: OpenAIRequest) -> list[Wanted]:
    conversation = []
    for i, message in enumerate(body.messages):
        content = message.content
        if content is None or isinstance(content, str):
            conversation.append(wanted(i, message.role, content or "", []))
            continue
        texts, pictures = [], []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                texts.append(part.text or "")
            elif part.type == "image_url" and part.image_url is not None:
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                pictures.append(Picture(f"{where}.image_url", url))
            else:
                raise ApiError(
                    400,
                    f"{where}: content part type {part.type!r} is not supported "
                    "(text or image_url)",
                    param=where,
                )
        conversation.append(wanted(i, message.role, "\n".join(texts), pictures))
    return conversation


def _schema(body: OpenAIRequest) -> dict[str, Any] | None:
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


def _options(body: OpenAIRequest) -> dict[str, Any]:
    options = {
        "max_tokens": body.max_completion_tokens or body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stop": body.stop,
    }
    return {k: v for k, v in options.items() if v is not None}


@dataclass(frozen=True)
class _OpenAIReply:
    """One chat completion's answer, whole or as server-sent events."""

    ident: str
    created: int
    body: OpenAIRequest

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.ident,
            "object": kind,
            "created": self.created,
            "model": self.body.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def whole(self, reply: Reply) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": reply.text},
            "finish_reason": reply.done_reason or "stop",
            "logprobs": None,
        }
        return {
            **self._envelope("chat.completion", [choice]),
            "usage": _usage(reply),
            "timings": _timings(reply),
        }

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {**self._envelope("chat.completion.chunk", choices), **extra}
        return f"data: {json.dumps(chunk)}\n\n"

    def _delta(self, content: str, *, role: bool = False) -> str:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        delta["content"] = content
        return self._event([{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}])

    async def events(self, turn: Turn, first: str | None) -> AsyncIterator[str]:
        options = self.body.stream_options
        async with streaming(turn):
            yield self._delta(first or "", role=True)
            if first is not None:
                while (piece := await turn.next(watch=False)) is not None:
                    yield self._delta(piece)
            reply = turn.reply
            note_tokens(turn.request, reply)
            done = {"index": 0, "delta": {}, "finish_reason": reply.done_reason or "stop"}
            yield self._event([{**done, "logprobs": None}], timings=_timings(reply))
            if options is not None and options.include_usage:
                yield self._event([], usage=_usage(reply))
            yield "data: [DONE]\n\n"
        if turn.error is not None:
            yield f"data: {json.dumps(turn.error.body('/v1'))}\n\n"


def _usage(reply: Reply) -> dict[str, Any]:
    stats = reply.stats
    cached = stats.cached_tokens or 0
    prompt = (stats.prompt_tokens or 0) + cached  # our engine always counts both
    completion = stats.completion_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _timings(reply: Reply) -> dict[str, Any]:
    """llama-server's ``timings``, which some clients read (ours among them)."""
    stats = reply.stats
    return {
        "cache_n": stats.cached_tokens or 0,
        "prompt_n": stats.prompt_tokens,
        "prompt_ms": (stats.prompt_s or 0.0) * 1000,
        "predicted_n": stats.completion_tokens,
        "predicted_ms": (stats.decode_s or 0.0) * 1000,
    }
