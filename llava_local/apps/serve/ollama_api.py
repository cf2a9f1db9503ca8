"""The Ollama-compatible routes: ``POST /api/chat`` (an NDJSON stream unless
``"stream": false``), ``GET /api/tags``, ``POST /api/show``, ``GET /api/version`` and
``GET /api/ps``, so that the ``ollama`` client, Open WebUI and ``VisionChat.ollama``
work against the server unchanged.

Pictures are base64 text (``images`` of a message); ``options`` are mapped to the
chat's; ``prompt_eval_count`` is the tokens evaluated, as Ollama counts them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import Field

from ... import __version__
from ...types import Reply
from .bodies import Lenient, Request, read_json, read_request
from .errors import ApiError
from .model_info import ModelFacts
from .pictures import Picture, Wanted, wanted
from .turns import Engine, Turn, note_tokens, respond, streaming

#: What Ollama version the Ollama routes claim to speak (its clients check it).
OLLAMA_VERSION = "0.6.0"

#: Ollama's option names and ours.
_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "num_predict": "max_tokens",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repeat_penalty",
}


class _OllamaMessage(Lenient):
    role: str
    content: str | None = ""
    images: list[str] | None = None


class OllamaRequest(Lenient):
    """``POST /api/chat``: what this server reads of it."""

    model: str = Field(min_length=1)
    messages: list[_OllamaMessage] = Field(default_factory=list)
    stream: bool = True
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: dict[str, Any] | None = None


class OllamaRoutes:
    """``/api``: the routes of the Ollama protocol, over the shared engine."""

    def __init__(self, engine: Engine, facts: ModelFacts) -> None:
        self.engine = engine
        self.facts = facts

    async def version(self) -> dict[str, Any]:
        return {"version": OLLAMA_VERSION}

    def _model(self) -> dict[str, Any]:
        name = self.engine.name
        tagged = name if ":" in name else f"{name}:latest"
        return {
            "name": tagged,
            "model": tagged,
            "modified_at": self.facts.modified_at,
            "size": self.facts.size,
            "digest": self.facts.digest,
            "details": self.facts.details(),
        }

    async def tags(self) -> dict[str, Any]:
        return {"models": [self._model()]}

    async def ps(self) -> dict[str, Any]:
        entry = self._model()
        del entry["modified_at"]
        entry.update({"expires_at": "2318-08-08T08:08:08Z", "size_vram": 0})
        if self.facts.context_length:
            entry["context_length"] = self.facts.context_length
        return {"models": [entry]}

    async def show(self, request: Request) -> dict[str, Any]:
        data = await read_json(request, self.engine.limits)
        requested = data.get("model") or data.get("name")
        if not isinstance(requested, str):
            raise ApiError(400, 'missing model name: send {"model": "..."}')
        self.engine.check_model(requested)
        facts = self.facts
        info: dict[str, Any] = {"general.architecture": facts.family}
        if facts.context_length:
            info[f"{facts.family}.context_length"] = facts.context_length
        return {
            "modelfile": f"# served by llava-local {__version__}\nFROM {self.engine.name}\n",
            "parameters": "",
            "template": "",
            "details": facts.details(),
            "model_info": info,
            "capabilities": ["completion", "vision"],
            "modified_at": facts.modified_at,
        }

    async def chat(self, request: Request) -> Any:
        engine = self.engine
        body = await read_request(request, engine.limits, OllamaRequest)
        engine.check_model(body.model)
        if not body.messages:  # Ollama's way to load a model: it is loaded
            return _chunk(body.model, "", done_reason="load", done=True)
        model = body.model

        async def lines(turn: Turn, first: str | None) -> AsyncIterator[str]:
            async with streaming(turn):
                if first is not None:
                    yield json.dumps(_chunk(model, first, done=False)) + "\n"
                    while (piece := await turn.next(watch=False)) is not None:
                        yield json.dumps(_chunk(model, piece, done=False)) + "\n"
                reply = turn.reply
                note_tokens(turn.request, reply)
                yield json.dumps(_final(model, reply, "")) + "\n"
            if turn.error is not None:
                yield json.dumps({"error": turn.error.message}) + "\n"

        return await respond(
            engine,
            request,
            _conversation(body),
            _schema(body),
            _options(body),
            whole=lambda reply: _final(model, reply, reply.text),
            streamed=lines if body.stream else None,
            media_type="application/x-ndjson",
        )


def _conversation(body: OllamaRequest) -> list[Wanted]:
    return [
        wanted(
            i,
            message.role,
            message.content or "",
            [
                Picture(f"messages[{i}].images[{j}]", image, base64_only=True)
                for j, image in enumerate(message.images or [])
            ],
        )
        for i, message in enumerate(body.messages)
    ]


def _options(body: OllamaRequest) -> dict[str, Any]:
    options = {}
    for theirs, value in (body.options or {}).items():
        ours = _OPTIONS.get(theirs)
        if ours is None or value is None:
            continue  # num_ctx, num_thread...: the server's own settings decide
        if ours == "max_tokens" and isinstance(value, int) and value < 0:
            continue  # -1 and -2: no limit
        options[ours] = value
    return options


def _schema(body: OllamaRequest) -> dict[str, Any] | None:
    if not body.format:
        return None
    return {"type": "object"} if body.format == "json" else body.format


def _chunk(model: str, content: str, **fields: Any) -> dict[str, Any]:
    """One line of an answer (``done`` among ``fields``), or the whole answer."""
    return {
        "model": model,
        "created_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        "message": {"role": "assistant", "content": content},
        **fields,
    }


def _final(model: str, reply: Reply, content: str) -> dict[str, Any]:
    stats = reply.stats
    return _chunk(
        model,
        content,
        done_reason=reply.done_reason or "stop",
        done=True,
        total_duration=_ns(stats.total_s),
        load_duration=_ns(stats.load_s),
        prompt_eval_count=stats.prompt_tokens,
        prompt_eval_duration=_ns(stats.prompt_s),
        eval_count=stats.completion_tokens,
        eval_duration=_ns(stats.decode_s),
    )


def _ns(seconds: float | None) -> int:
    return int((seconds or 0.0) * 1e9)
