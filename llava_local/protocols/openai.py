"""The OpenAI chat-completions protocol (``/v1/...``): its shapes, and their translation
to ours.

The openai engine (``backends/openai.py``, through the official ``openai`` client)
builds its requests with :meth:`ChatRequest.for_turn` and reads chunks, model lists and
figures with these shapes; ``serve`` (``apps/serve/openai_api.py``) reads
:class:`ChatRequest` and writes the rest.

- Options: ``temperature``, ``top_p``, ``max_tokens`` (as local servers spell it;
  ``max_completion_tokens`` is read too), ``seed`` and ``stop`` are the protocol's;
  ``top_k`` and ``repeat_penalty``, which it lacks, travel as extra fields under those
  names (llama-server, llamafile, llama-cpp-python and LM Studio read them).
- Figures: ``usage.prompt_tokens`` counts the whole prompt, ours only what was read:
  the rest is ``prompt_tokens_details.cached_tokens``. llama-server's ``timings`` say
  more (tokens read, reused and written, and their milliseconds) and win where given.
  What a server does not report stays None, never guessed.
- ``schema=`` is a ``response_format`` of type ``json_schema``; llama-cpp-python's
  server knows only ``json_object`` with a ``schema``, read too.
- Log-probabilities: ``logprobs: true`` with ``top_logprobs: N`` is our
  ``logprobs=N`` option; a choice's ``logprobs.content`` has one entry per answer
  token (a streamed answer sends them all with its last chunk).
- Tools: a forced function (``tool_choice`` naming it, or ``"required"`` with one
  tool) is answered as ``tool_calls`` (``finish_reason: "tool_calls"``); see
  :mod:`llava_local.tools` for what a model that was not trained for tools does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from .. import types as ours
from ..errors import InvalidRequestError
from ..tools import forced_tool
from ..types import DoneReason, Message, Options, Stats, Tool
from .shapes import Count, Number, Shape, ToolDef

__all__ = [
    "EXTRA_OPTIONS",
    "STANDARD_OPTIONS",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "ChatRequest",
    "Choice",
    "ChunkChoice",
    "ContentPart",
    "Delta",
    "ErrorBody",
    "ErrorDetail",
    "FunctionCall",
    "ImageUrl",
    "Logprobs",
    "Model",
    "ModelList",
    "ResponseFormat",
    "SchemaForm",
    "Timings",
    "ToolCall",
    "Usage",
    "done_reason",
    "stats",
]

#: Our option names the protocol has ...
STANDARD_OPTIONS = ("temperature", "top_p", "max_tokens", "seed", "stop")
#: ... and the ones it lacks, sent as extra fields that llama.cpp-based servers read.
EXTRA_OPTIONS = ("top_k", "repeat_penalty")
#: The two ways servers take a JSON schema for the answer.
SchemaForm = Literal["json_schema", "json_object"]


def done_reason(finish_reason: str | None) -> DoneReason:
    """``length`` when the token limit cut the answer; anything else counts as ``stop``."""
    return "length" if finish_reason == "length" else "stop"


# --- requests ------------------------------------------------------------------------


class ImageUrl(Shape):
    url: str
    detail: str | None = None


class ContentPart(Shape):
    """A part of a message's content: ``text``, or ``image_url`` (a URL or a data URI)."""

    type: str
    text: str | None = None
    image_url: ImageUrl | str | None = None

    @property
    def url(self) -> str | None:
        """The picture's address, in either of the shapes clients send it."""
        if isinstance(self.image_url, ImageUrl):
            return self.image_url.url
        return self.image_url


class FunctionCall(Shape):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _unsent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if value is not None}


class ToolCall(Shape):
    """A tool call of an answer (``index`` in a streamed delta), or of an earlier
    assistant message a client sends back."""

    index: int | None = None
    id: str | None = None
    type: str | None = None
    function: FunctionCall = Field(default_factory=FunctionCall)

    @model_serializer(mode="wrap")
    def _unsent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if value is not None}


class ChatMessage(Shape):
    role: str
    content: str | list[ContentPart] | None = None
    #: An earlier answer that was a tool call (sent back by the client).
    tool_calls: list[ToolCall] | None = None
    #: A ``tool`` message: the result of that call.
    tool_call_id: str | None = None

    @classmethod
    def from_message(cls, message: Message) -> ChatMessage:
        """Our message: pictures as ``data:`` URIs of the prepared bytes (the same
        bytes every turn, so a server that caches by content recognises them), then
        the text."""
        if not message.images:
            return cls(role=message.role, content=message.content)
        parts = [
            ContentPart(
                type="image_url", image_url=ImageUrl(url=f"data:{image.mime};base64,{image.b64()}")
            )
            for image in message.images
        ]
        parts.append(ContentPart(type="text", text=message.content))
        return cls(role=message.role, content=parts)


class JsonSchema(Shape):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Shape):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None
    #: llama-cpp-python's form: ``{"type": "json_object", "schema": {...}}``.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")

    @classmethod
    def for_schema(cls, schema: dict[str, Any], form: SchemaForm) -> ResponseFormat:
        if form == "json_object":
            return cls(type="json_object", schema=schema)
        return cls(type="json_schema", json_schema=JsonSchema(name="reply", schema=schema))

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must fit (``json_object``: any object; ``text``:
        none). A ``json_schema`` without its schema is an :class:`InvalidRequestError`."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return self.schema_ or {"type": "object"}
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise InvalidRequestError(
                "response_format json_schema needs json_schema.schema (a JSON schema object)"
            )
        return self.json_schema.schema_


class StreamOptions(Shape):
    include_usage: bool = False


class ChatRequest(Shape):
    """``POST /v1/chat/completions``: the fields this library reads and sends, with
    OpenAI's bounds where a server reads them."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    response_format: ResponseFormat | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @classmethod
    def for_turn(
        cls,
        model: str,
        messages: Sequence[Message],
        options: Options,
        schema: dict[str, Any] | None = None,
        form: SchemaForm = "json_schema",
        *,
        tool: Tool | None = None,
    ) -> ChatRequest:
        """What the engine sends for a turn: streamed, usage asked for; a forced
        ``tool`` as the one tool, named by ``tool_choice`` (instead of a
        ``response_format``). Our options are checked already, by their own bounds (a
        local server may take a temperature over OpenAI's 2), so they are not checked
        again."""
        values = options.model_dump(include=set(STANDARD_OPTIONS + EXTRA_OPTIONS))
        if values["stop"] is not None:
            values["stop"] = list(values["stop"])
        if options.logprobs is not None:
            values.update(logprobs=True, top_logprobs=options.logprobs)
        fmt = None
        if schema is not None and tool is None:
            fmt = ResponseFormat.for_schema(schema, form)
        return cls.model_construct(
            model=model,
            messages=[ChatMessage.from_message(message) for message in messages],
            stream=True,
            stream_options=StreamOptions(include_usage=True),
            response_format=fmt,
            tools=None if tool is None else [ToolDef.of(tool)],
            tool_choice=None
            if tool is None
            else {"type": "function", "function": {"name": tool.name}},
            **values,
        )

    def forced_tool(self, served: str) -> Tool | None:
        """The tool the answer must call (see :func:`llava_local.tools.forced_tool`)."""
        tools = [tool.tool() for tool in self.tools or []]
        return forced_tool(tools, self.tool_choice, served)

    def options(self) -> dict[str, Any]:
        """The request's options in our names (those given)."""
        given = {
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
            "top_k": self.top_k,
            "repeat_penalty": self.repeat_penalty,
            "logprobs": (self.top_logprobs or 0) if self.logprobs else None,
        }
        return {name: value for name, value in given.items() if value is not None}

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON schema ``response_format`` asks for, if any."""
        return None if self.response_format is None else self.response_format.answer_schema()

    def wire(self) -> dict[str, Any]:
        """As sent: the fields set, by their protocol names."""
        return self.model_dump(exclude_none=True, by_alias=True)


# --- figures -------------------------------------------------------------------------


class TokenDetails(Shape):
    cached_tokens: Count = None


class Usage(Shape):
    prompt_tokens: Count = None
    completion_tokens: Count = None
    total_tokens: Count = None
    prompt_tokens_details: TokenDetails | None = None

    @classmethod
    def from_stats(cls, stats: Stats) -> Usage:
        cached = stats.cached_tokens or 0
        prompt = (stats.prompt_tokens or 0) + cached
        completion = stats.completion_tokens or 0
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=TokenDetails(cached_tokens=cached),
        )


class Timings(Shape):
    """llama-server's ``timings``, which some clients read (the openai engine among them)."""

    cache_n: Count = None
    prompt_n: Count = None
    prompt_ms: Number = None
    predicted_n: Count = None
    predicted_ms: Number = None

    @classmethod
    def from_stats(cls, stats: Stats) -> Timings:
        return cls(
            cache_n=stats.cached_tokens or 0,
            prompt_n=stats.prompt_tokens,
            prompt_ms=(stats.prompt_s or 0.0) * 1000,
            predicted_n=stats.completion_tokens,
            predicted_ms=(stats.decode_s or 0.0) * 1000,
        )


def stats(
    usage: Usage | None,
    timings: Timings | None,
    *,
    first_token_s: float | None,
    total_s: float,
) -> Stats:
    """Our stats from what the server reported: ``timings`` first, else ``usage``
    (``first_token_s`` and ``total_s`` measured by the caller)."""
    details = usage.prompt_tokens_details if usage is not None else None
    cached = details.cached_tokens if details is not None else None
    prompt = usage.prompt_tokens if usage is not None else None
    if prompt is not None and cached is not None:
        prompt -= cached
    completion = usage.completion_tokens if usage is not None else None
    prompt_ms = decode_ms = None
    if timings is not None:
        given = timings.model_fields_set
        prompt = timings.prompt_n if "prompt_n" in given else prompt
        cached = timings.cache_n if "cache_n" in given else cached
        completion = timings.predicted_n if "predicted_n" in given else completion
        prompt_ms, decode_ms = timings.prompt_ms, timings.predicted_ms
    return Stats(
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        prompt_s=None if prompt_ms is None else prompt_ms / 1000,
        decode_s=None if decode_ms is None else decode_ms / 1000,
        total_s=total_s,
        first_token_s=first_token_s,
    )


# --- answers -------------------------------------------------------------------------


class _Answer(Shape):
    """An answer's envelope: ``usage`` and ``timings`` are sent only when known."""

    id: str = ""
    object: str = ""
    created: int = 0
    model: str = ""
    system_fingerprint: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None

    @model_serializer(mode="wrap")
    def _unsent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in ("usage", "timings"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class ResponseMessage(Shape):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _unsent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class TopLogprob(Shape):
    token: str = ""
    logprob: float = 0.0
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Logprobs(Shape):
    """A choice's ``logprobs``: one entry per answer token."""

    content: list[TokenLogprob] | None = None

    @classmethod
    def of(cls, tokens: Sequence[ours.TokenLogprob]) -> Logprobs:
        return cls(
            content=[
                TokenLogprob(
                    token=t.token,
                    logprob=t.logprob,
                    bytes=list(t.bytes),
                    top_logprobs=[
                        TopLogprob(token=a.token, logprob=a.logprob, bytes=list(a.bytes))
                        for a in t.top_logprobs
                    ],
                )
                for t in tokens
            ]
        )

    def ours(self) -> list[ours.TokenLogprob]:
        return [
            ours.TokenLogprob(
                token=t.token,
                logprob=t.logprob,
                bytes=tuple(t.bytes or ()),
                top_logprobs=tuple(
                    ours.TokenLogprob(token=a.token, logprob=a.logprob, bytes=tuple(a.bytes or ()))
                    for a in t.top_logprobs
                ),
            )
            for t in self.content or []
        ]


class _Choice(Shape):
    index: int = 0
    finish_reason: str | None = None
    logprobs: Logprobs | None = None


class Choice(_Choice):
    message: ResponseMessage = Field(default_factory=ResponseMessage)


class ChatCompletion(_Answer):
    """A whole answer (``"stream": false``)."""

    object: str = "chat.completion"
    choices: list[Choice] = Field(default_factory=list)


class Delta(Shape):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _unsent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if value is not None}


class ChunkChoice(_Choice):
    delta: Delta = Field(default_factory=Delta)


class ChatCompletionChunk(_Answer):
    """One server-sent event of a streamed answer."""

    object: str = "chat.completion.chunk"
    choices: list[ChunkChoice] = Field(default_factory=list)

    def first_choice(self) -> ChunkChoice | None:
        """The choice this library asks for (``n`` is 1)."""
        return next((choice for choice in self.choices if choice.index == 0), None)


# --- models and errors ---------------------------------------------------------------


class Model(Shape):
    id: str | None = None
    object: str = "model"
    created: int | None = None
    owned_by: str | None = None


class ModelList(Shape):
    """``GET /v1/models``."""

    object: str = "list"
    data: list[Model]

    def ids(self) -> list[str]:
        return [model.id for model in self.data if model.id]


class ErrorDetail(Shape):
    message: str = ""
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class ErrorBody(Shape):
    """Every answer other than 200, and a stream's last event when it fails mid-answer."""

    error: ErrorDetail
