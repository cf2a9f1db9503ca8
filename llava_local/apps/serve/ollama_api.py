"""The Ollama-compatible routes: ``POST /api/chat`` (an NDJSON stream unless
``"stream": false``), ``GET /api/tags``, ``POST /api/show``, ``GET /api/version`` and
``GET /api/ps``, so that the ``ollama`` client, Open WebUI and ``VisionChat.ollama``
work against the server unchanged.

The shapes and translations are :mod:`llava_local.protocols.ollama`'s, the Ollama
engine's too: pictures are base64 text (``images`` of a message), ``options`` are
mapped to the chat's, ``prompt_eval_count`` is the tokens evaluated, as Ollama counts
them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from ... import __version__
from ...protocols import ollama as wire
from ...types import Reply
from .bodies import Request, read_json, read_request
from .errors import ApiError
from .model_info import ModelFacts
from .pictures import Picture, Wanted, wanted
from .turns import Engine, Turn, note_tokens, respond, streaming


class OllamaRoutes:
    """``/api``: the routes of the Ollama protocol, over the shared engine."""

    def __init__(self, engine: Engine, facts: ModelFacts) -> None:
        self.engine = engine
        self.facts = facts

    async def version(self) -> dict[str, Any]:
        return wire.Version(version=wire.VERSION).model_dump()

    def _entry(self) -> wire.ModelEntry:
        tagged = wire.full_name(self.engine.name)
        facts = self.facts
        return wire.ModelEntry(
            name=tagged,
            model=tagged,
            modified_at=facts.modified_at,
            size=facts.size,
            digest=facts.digest,
            details=facts.details(),
        )

    async def tags(self) -> dict[str, Any]:
        return wire.Tags(models=[self._entry()]).model_dump(mode="json")

    async def ps(self) -> dict[str, Any]:
        running = wire.RunningModel(
            **self._entry().model_dump(exclude={"modified_at"}),
            expires_at=datetime(2318, 8, 8, 8, 8, 8, tzinfo=timezone.utc),  # never unloaded
            size_vram=0,
            context_length=self.facts.context_length,
        )
        return wire.RunningModels(models=[running]).model_dump(mode="json", exclude_none=True)

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
        show = wire.Show(
            modelfile=f"# served by llava-local {__version__}\nFROM {self.engine.name}\n",
            details=facts.details(),
            model_info=info,
            capabilities=["completion", "vision"],
            modified_at=facts.modified_at,
        )
        return show.model_dump(mode="json")

    async def chat(self, request: Request) -> Any:
        engine = self.engine
        body = await read_request(request, engine.limits, wire.ChatRequest)
        engine.check_model(body.model)
        model = body.model
        if not body.messages:  # Ollama's way to load a model: it is loaded
            return wire.ChatResponse(model=model, done=True, done_reason="load").wire()

        async def lines(turn: Turn, first: str | None) -> AsyncIterator[str]:
            async with streaming(turn):
                if first is not None:
                    yield _line(wire.ChatResponse(model=model, message=_said(first)))
                    while (piece := await turn.next(watch=False)) is not None:
                        yield _line(wire.ChatResponse(model=model, message=_said(piece)))
                reply = turn.reply
                note_tokens(turn.request, reply)
                yield _line(_final(model, reply, ""))
            if turn.error is not None:
                yield json.dumps(turn.error.body("/api/chat")) + "\n"

        return await respond(
            engine,
            request,
            _conversation(body),
            wire.schema_of(body.format),
            wire.options_from_wire(body.options),
            whole=lambda reply: _final(model, reply, reply.text).wire(),
            streamed=lines if body.stream else None,
            media_type="application/x-ndjson",
        )


def _conversation(body: wire.ChatRequest) -> list[Wanted]:
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


def _said(content: str) -> wire.Message:
    return wire.Message(role="assistant", content=content)


def _final(model: str, reply: Reply, content: str) -> wire.ChatResponse:
    """The last line of an answer, or the whole answer: with its figures."""
    return wire.ChatResponse(
        model=model,
        message=_said(content),
        done=True,
        done_reason=reply.done_reason or "stop",
        **wire.Metrics.from_stats(reply.stats).model_dump(),
    )


def _line(chunk: wire.ChatResponse) -> str:
    return json.dumps(chunk.wire()) + "\n"
