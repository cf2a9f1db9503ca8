"""The OpenAI-compatible routes: ``POST /v1/chat/completions`` (server-sent events with
``"stream": true``), ``GET /v1/models`` and ``GET /v1/models/{id}``.

The shapes and translations are :mod:`llava_local.protocols.openai`'s, the openai
engine's too: the request's messages become the chat's (``image_url`` parts as
pictures), its options the chat's options (``top_k`` and ``repeat_penalty`` too, as
llama-server reads them; ``logprobs``/``top_logprobs`` too), ``response_format`` a
schema; the answer carries ``usage``
(``prompt_tokens_details.cached_tokens``: what the prefix match reused) and
llama-server's ``timings``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ...errors import LlavaLocalError
from ...protocols import openai as wire
from ...tools import call_id
from ...types import Reply, Tool
from .bodies import Request, read_request
from .errors import ApiError, library_error
from .pictures import Picture, Wanted, wanted
from .turns import Engine, Turn, note_tokens, respond, streaming


class OpenAIRoutes:
    """``/v1``: the routes of the OpenAI protocol, over the shared engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _model(self) -> wire.Model:
        engine = self.engine
        return wire.Model(id=engine.name, created=int(engine.started), owned_by="llava-local")

    async def models(self) -> dict[str, Any]:
        return wire.ModelList(data=[self._model()]).model_dump()

    async def model(self, model_id: str) -> dict[str, Any]:
        """``GET /v1/models/{id}``: the served model, or 404 for any other."""
        self.engine.check_model(model_id)
        return self._model().model_dump()

    async def chat_completions(self, request: Request) -> Any:
        engine = self.engine
        body = await read_request(request, engine.limits, wire.ChatRequest)
        engine.check_model(body.model)
        conversation = _conversation(body)
        try:
            tool = body.forced_tool(engine.name)
        except LlavaLocalError as exc:
            raise library_error(exc, "tool_choice") from exc
        try:
            schema = tool.parameters if tool is not None else body.answer_schema()
        except LlavaLocalError as exc:
            raise library_error(exc, "response_format") from exc
        reply_to = _OpenAIReply(
            f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), body, tool, call_id()
        )
        return await respond(
            engine,
            request,
            conversation,
            schema,
            body.options(),
            whole=reply_to.whole,
            streamed=reply_to.events if body.stream else None,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def _conversation(body: wire.ChatRequest) -> list[Wanted]:
    conversation = []
    for i, message in enumerate(body.messages):
        content = message.content
        if message.tool_calls and not content:  # an earlier call: the model wrote its arguments
            calls = [call.function.arguments or "" for call in message.tool_calls]
            conversation.append(wanted(i, message.role, "\n".join(calls), []))
            continue
        if content is None or isinstance(content, str):
            conversation.append(wanted(i, message.role, content or "", []))
            continue
        texts, pictures = [], []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                texts.append(part.text or "")
            elif part.type == "image_url" and part.url is not None:
                pictures.append(Picture(f"{where}.image_url", part.url))
            else:
                raise ApiError(
                    400,
                    f"{where}: content part type {part.type!r} is not supported "
                    "(text or image_url)",
                    param=where,
                )
        conversation.append(wanted(i, message.role, "\n".join(texts), pictures))
    return conversation


@dataclass(frozen=True)
class _OpenAIReply:
    """One chat completion's answer, whole or as server-sent events."""

    ident: str
    created: int
    body: wire.ChatRequest
    tool: Tool | None = None  # the forced function: the answer is its arguments
    call: str = ""  # its call's id

    def _finish_reason(self, reply: Reply) -> str:
        reason = reply.done_reason or "stop"
        return "tool_calls" if self.tool is not None and reason == "stop" else reason

    def whole(self, reply: Reply) -> dict[str, Any]:
        if self.tool is None:
            message = wire.ResponseMessage(content=reply.text)
        else:
            function = wire.FunctionCall(name=self.tool.name, arguments=reply.text)
            call = wire.ToolCall(id=self.call, type="function", function=function)
            message = wire.ResponseMessage(content=None, tool_calls=[call])
        choice = wire.Choice(
            message=message, finish_reason=self._finish_reason(reply), logprobs=_logprobs(reply)
        )
        answer = wire.ChatCompletion(
            id=self.ident,
            created=self.created,
            model=self.body.model,
            choices=[choice],
            usage=wire.Usage.from_stats(reply.stats),
            timings=wire.Timings.from_stats(reply.stats),
        )
        return answer.model_dump()

    def _event(self, choices: list[wire.ChunkChoice], **figures: Any) -> str:
        chunk = wire.ChatCompletionChunk(
            id=self.ident, created=self.created, model=self.body.model, choices=choices, **figures
        )
        return f"data: {json.dumps(chunk.model_dump())}\n\n"

    def _delta(self, content: str, *, role: bool = False) -> str:
        assistant = "assistant" if role else None
        if self.tool is None:
            delta = wire.Delta(role=assistant, content=content)
        else:  # the arguments, piece by piece; the first delta names the function
            function = wire.FunctionCall(name=self.tool.name if role else None, arguments=content)
            call = wire.ToolCall(
                index=0,
                id=self.call if role else None,
                type="function" if role else None,
                function=function,
            )
            delta = wire.Delta(role=assistant, tool_calls=[call])
        return self._event([wire.ChunkChoice(delta=delta)])

    async def events(self, turn: Turn, first: str | None) -> AsyncIterator[str]:
        options = self.body.stream_options
        async with streaming(turn):
            yield self._delta(first or "", role=True)
            if first is not None:
                while (piece := await turn.next(watch=False)) is not None:
                    yield self._delta(piece)
            reply = turn.reply
            note_tokens(turn.request, reply)
            done = wire.ChunkChoice(
                finish_reason=self._finish_reason(reply), logprobs=_logprobs(reply)
            )
            yield self._event([done], timings=wire.Timings.from_stats(reply.stats))
            if options is not None and options.include_usage:
                yield self._event([], usage=wire.Usage.from_stats(reply.stats))
            yield "data: [DONE]\n\n"
        if turn.error is not None:
            yield f"data: {json.dumps(turn.error.body('/v1'))}\n\n"


def _logprobs(reply: Reply) -> wire.Logprobs | None:
    """The answer's log-probabilities, when asked for (a stream sends them last)."""
    return None if reply.logprobs is None else wire.Logprobs.of(reply.logprobs)
