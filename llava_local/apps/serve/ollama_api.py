"""The Ollama-compatible routes: ``POST /api/chat`` and ``POST /api/generate`` (an
NDJSON stream unless ``"stream": false``), ``GET /api/tags``, ``POST /api/show``,
``GET /api/version`` and ``GET /api/ps``, so that the ``ollama`` client, Open WebUI
and ``VisionChat.ollama`` work against the server unchanged.

The shapes and translations are :mod:`llava_local.protocols.ollama`'s, the Ollama
engine's too: pictures are base64 text (``images`` of a message), ``options`` are
mapped to the chat's, ``prompt_eval_count`` is the tokens evaluated, as Ollama counts
them. A conversation that outgrows the context is trimmed and answered, as Ollama does
(``on_overflow="truncate"``: the system message, the newest messages and the newest
picture are kept, and the newest message's start is cut if it alone is too long);
the OpenAI routes answer 400 ``context_length_exceeded`` instead, as OpenAI does.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

from ... import __version__
from ...errors import LlavaLocalError
from ...protocols import ollama as wire
from ...types import Reply
from .bodies import Request, read_json, read_request
from .errors import ApiError, library_error
from .model_info import ModelFacts
from .pictures import Picture, Wanted, wanted
from .turns import Engine, Turn, note_tokens, respond, streaming

#: A line of an answer, in either route's shape.
Chunk = wire.ChatResponse | wire.GenerateResponse


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
        modelfile = f"# served by llava-local {__version__}\nFROM {self.engine.name}\n"
        parameters = ""
        if facts.sampling is not None:  # what a request without sampling options gets
            parameters = facts.sampling.parameters()
            modelfile += f"# sampling: {facts.sampling.described}\n" + "".join(
                f"PARAMETER {name} {value:g}\n" for name, value in facts.sampling.values().items()
            )
        show = wire.Show(
            modelfile=modelfile,
            parameters=parameters,
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
        if not body.messages:  # Ollama's way to load (or unload) a model
            reason = _loading(body.keep_alive)
            return wire.ChatResponse(model=model, done=True, done_reason=reason).wire()
        try:
            tool = body.forced_tool(engine.name)
        except LlavaLocalError as exc:
            raise library_error(exc, "tools") from exc

        def piece(text: str) -> wire.ChatResponse | None:
            if tool is not None:  # Ollama sends a tool call whole, once it is written
                return None
            return wire.ChatResponse(model=model, message=_said(text))

        def final(reply: Reply, streamed: bool) -> list[Chunk]:
            last = wire.ChatResponse(model=model, message=_said(""), **_figures(reply))
            if tool is None:
                last.message = _said("" if streamed else reply.text)
                return [last]
            message = _said(reply.text)  # cut by num_predict: the arguments as written
            if reply.parsed is not None:
                function = wire.ToolCallFunction(name=tool.name, arguments=reply.parsed)
                message = wire.Message(
                    role="assistant", content="", tool_calls=[wire.ToolCall(function=function)]
                )
            if not streamed:
                last.message = message
                return [last]
            return [wire.ChatResponse(model=model, message=message), last]  # as Ollama

        schema = tool.parameters if tool is not None else wire.schema_of(body.format)
        return await self._answer(
            request, body, _conversation(body), schema=schema, piece=piece, final=final
        )

    async def generate(self, request: Request) -> Any:
        """``/api/generate``: one prompt, with its own system prompt and pictures, in
        the model's chat format, on the same engine (and prefix reuse) as the chat."""
        engine = self.engine
        body = await read_request(request, engine.limits, wire.GenerateRequest)
        engine.check_model(body.model)
        _refuse_unsupported(body)
        model = body.model
        if not (body.prompt or "").strip() and not body.images:  # load (or unload) it
            reason = _loading(body.keep_alive)
            return wire.GenerateResponse(model=model, done=True, done_reason=reason).wire()

        def piece(text: str) -> wire.GenerateResponse:
            return wire.GenerateResponse(model=model, response=text)

        def final(reply: Reply, streamed: bool) -> list[Chunk]:
            text = "" if streamed else reply.text
            return [wire.GenerateResponse(model=model, response=text, **_figures(reply))]

        schema = wire.schema_of(body.format)
        return await self._answer(
            request, body, _prompt(body), schema=schema, piece=piece, final=final
        )

    async def _answer(
        self,
        request: Request,
        body: wire.ChatRequest | wire.GenerateRequest,
        conversation: list[Wanted],
        *,
        schema: dict[str, Any] | None,
        piece: Callable[[str], Chunk | None],
        final: Callable[[Reply, bool], list[Chunk]],
    ) -> Any:
        """Answer ``conversation``: one object, or an NDJSON line per piece and a last
        line with the figures (a failure after the status is sent: an error line).
        ``final(reply, streamed)`` gives the closing lines; the whole answer is its last."""
        path = request.url.path

        async def lines(turn: Turn, first: str | None) -> AsyncIterator[str]:
            async with streaming(turn):
                if first is not None:
                    if (chunk := piece(first)) is not None:
                        yield _line(chunk)
                    while (text := await turn.next(watch=False)) is not None:
                        if (chunk := piece(text)) is not None:
                            yield _line(chunk)
                reply = turn.reply
                note_tokens(turn.request, reply)
                for chunk in final(reply, True):
                    yield _line(chunk)
            if turn.error is not None:
                yield json.dumps(turn.error.body(path)) + "\n"

        return await respond(
            self.engine,
            request,
            conversation,
            schema,
            {
                **wire.options_from_wire(body.options),
                **wire.logprobs_option(body.logprobs, body.top_logprobs),
            },
            whole=lambda reply: final(reply, False)[-1].wire(),
            streamed=lines if body.stream else None,
            media_type="application/x-ndjson",
            on_overflow="truncate",  # as Ollama: keep the system and newest messages
        )


def _conversation(body: wire.ChatRequest) -> list[Wanted]:
    return [
        wanted(
            i,
            message.role,
            message.content or _arguments(message),
            [
                Picture(f"messages[{i}].images[{j}]", image, base64_only=True)
                for j, image in enumerate(message.images or [])
            ],
        )
        for i, message in enumerate(body.messages)
    ]


def _arguments(message: wire.Message) -> str:
    """An earlier answer that was a tool call, as the model wrote it: its arguments."""
    return "\n".join(json.dumps(call.function.arguments) for call in message.tool_calls or [])


def _said(content: str) -> wire.Message:
    return wire.Message(role="assistant", content=content)


def _prompt(body: wire.GenerateRequest) -> list[Wanted]:
    """``/api/generate``'s request as a conversation: its system prompt, then the prompt
    with its pictures."""
    system = [wanted(0, "system", body.system, [])] if body.system else []
    images = body.images or []
    pictures = [Picture(f"images[{j}]", image, base64_only=True) for j, image in enumerate(images)]
    return [*system, wanted(len(system), "user", body.prompt or "", pictures)]


def _refuse_unsupported(body: wire.GenerateRequest) -> None:
    """400, by name, for what ``/api/generate`` has and this server does not do."""
    if body.suffix:
        raise ApiError(
            400,
            f"{body.model} does not support insert: the model was not trained to fill in "
            "between a prompt and a suffix; send the prompt alone",
            param="suffix",
        )
    if body.raw:
        raise ApiError(
            400,
            "raw prompts are not supported: this server writes the model's own chat format "
            "(with its picture markers); send the prompt without raw",
            param="raw",
        )
    if body.template:
        raise ApiError(
            400,
            "template is not supported: this server writes the model's own chat format; "
            "send the request without template",
            param="template",
        )
    if body.context:
        raise ApiError(
            400,
            "context (the token list of an earlier answer) is not supported: this server "
            "sends none back; send the earlier turns as messages to /api/chat, whose "
            "prefix reuse reads only what is new",
            param="context",
        )


def _loading(keep_alive: str | float | None) -> str:
    """What an empty request answers: ``unload`` for ``keep_alive`` 0 (the server keeps
    its one model loaded all the same: other clients use it), else ``load``."""
    zero = re.fullmatch(r"0+(\.0*)?(ns|us|µs|ms|s|m|h)?", str(keep_alive).strip())
    return "unload" if keep_alive is not None and zero else "load"


def _figures(reply: Reply) -> dict[str, Any]:
    """The last line's fields: done, why, the figures, and the log-probabilities when
    asked for (a stream sends them all here)."""
    return {
        "done": True,
        "done_reason": reply.done_reason or "stop",
        "logprobs": None if reply.logprobs is None else wire.Logprob.of(reply.logprobs),
        **wire.Metrics.from_stats(reply.stats).model_dump(),
    }


def _line(chunk: Chunk) -> str:
    return json.dumps(chunk.wire()) + "\n"
