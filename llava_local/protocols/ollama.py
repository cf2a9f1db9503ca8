"""The Ollama protocol (``/api/...``): its shapes, and their translation to ours.

The Ollama engine (``backends/ollama.py``, through the official ``ollama`` client)
sends :func:`options_to_wire` and reads answers, listings and ``show`` with these
shapes; ``serve`` (``apps/serve/ollama_api.py``) reads :class:`ChatRequest` and writes
the rest. Names follow Ollama's ``api/types.go``; the facts gathered about the daemon
are in the project notes (``ollama-api.md``).

- Options: ours are Ollama's but for ``max_tokens`` (``num_predict``). The runner's own
  (``num_ctx``, ``num_thread``...) are not turn options: the engine sends them from its
  settings, the server leaves them to its own.
- Figures: ``prompt_eval_count`` is the prompt tokens evaluated for the turn (what our
  ``Stats.prompt_tokens`` counts; Ollama has no field for the reused ones); durations
  are nanoseconds.
- Names: ``llava`` is ``llava:latest``, in any case.
- Log-probabilities: ``logprobs: true`` with ``top_logprobs: N`` is our
  ``logprobs=N`` option; the answer's ``logprobs`` list one entry per token (a
  streamed answer sends them all with its last line).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import Field

from .. import types as our_types
from ..tools import forced_tool
from ..types import DoneReason, Options, Stats, Tool
from .shapes import Count, Shape, ToolDef

__all__ = [
    "OPTION_NAMES",
    "VERSION",
    "VISION_FAMILIES",
    "ChatRequest",
    "ChatResponse",
    "ErrorBody",
    "GenerateRequest",
    "GenerateResponse",
    "Logprob",
    "Message",
    "Metrics",
    "ModelDetails",
    "ModelEntry",
    "RunningModel",
    "RunningModels",
    "Show",
    "Tags",
    "ToolCall",
    "ToolCallFunction",
    "Version",
    "done_reason",
    "full_name",
    "is_vision",
    "logprobs_option",
    "options_from_wire",
    "options_to_wire",
    "same_model",
    "schema_of",
    "short_name",
]

#: The Ollama version ``serve`` says it speaks (clients check it).
VERSION = "0.6.0"
#: Our option names -> Ollama's.
OPTION_NAMES: Mapping[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_tokens": "num_predict",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repeat_penalty",
}
_OURS = {theirs: ours for ours, theirs in OPTION_NAMES.items()}
#: Families that meant "has an image encoder" before Ollama reported capabilities.
VISION_FAMILIES = frozenset({"clip", "mllama"})


# --- translations --------------------------------------------------------------------


def options_to_wire(options: Options) -> dict[str, Any]:
    """Our options as Ollama's ``options`` (those set; ``stop`` as a list)."""
    wire = {}
    for ours, theirs in OPTION_NAMES.items():
        value = getattr(options, ours)
        if value is not None:
            wire[theirs] = list(value) if isinstance(value, tuple) else value
    return wire


def options_from_wire(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Ollama's ``options`` in our names. The runner's own (``num_ctx``,
    ``num_thread``...) are left out, as is a ``num_predict`` below 0 (no limit)."""
    ours = {}
    for theirs, value in (options or {}).items():
        name = _OURS.get(theirs)
        if name is None or value is None:
            continue
        if name == "max_tokens" and isinstance(value, int) and value < 0:
            continue
        ours[name] = value
    return ours


def schema_of(format: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a request's ``format`` asks for (``"json"``: any object)."""
    if not format:
        return None
    if isinstance(format, str):  # "json", the one word Ollama knows
        return {"type": "object"}
    return dict(format)


def done_reason(wire: str | None) -> DoneReason:
    """``length`` when the token limit cut the answer; anything else counts as ``stop``."""
    return "length" if wire == "length" else "stop"


def full_name(name: str) -> str:
    """``name`` as Ollama compares it: lower case, ``:latest`` when it has no tag."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def short_name(name: str) -> str:
    """``name`` without the ``:latest`` Ollama adds."""
    return name.removesuffix(":latest")


def same_model(name: str, other: str) -> bool:
    """Whether two names mean the same model (``llava`` is ``llava:latest``)."""
    return full_name(name) == full_name(other)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# --- chat ----------------------------------------------------------------------------


class ToolCallFunction(Shape):
    name: str = ""
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(Shape):
    """A tool call of an answer: Ollama sends the arguments as an object, whole."""

    function: ToolCallFunction


class Message(Shape):
    """One message; ``images`` are base64 text without a ``data:`` prefix; an answer
    that called a tool carries ``tool_calls``, a ``tool`` message the result of one."""

    role: str
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


class ChatRequest(Shape):
    """``POST /api/chat``: the fields this library reads and sends. ``tool_choice`` is
    not Ollama's: ``serve`` reads it as OpenAI's, the way to force a function on a
    model not trained for tools (see :mod:`llava_local.tools`)."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(default_factory=list)
    stream: bool = True
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | float | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def forced_tool(self, served: str) -> Tool | None:
        """The tool the answer must call (see :func:`llava_local.tools.forced_tool`)."""
        tools = [tool.tool() for tool in self.tools or []]
        return forced_tool(tools, self.tool_choice, served)


class Metrics(Shape):
    """The figures of an answer's last chunk (absent ones read as 0, as Ollama omits
    zeros); durations in nanoseconds."""

    total_duration: Count = None
    load_duration: Count = None
    prompt_eval_count: Count = None
    prompt_eval_duration: Count = None
    eval_count: Count = None
    eval_duration: Count = None

    @classmethod
    def from_stats(cls, stats: Stats) -> Metrics:
        return cls(
            total_duration=_ns(stats.total_s),
            load_duration=_ns(stats.load_s),
            prompt_eval_count=stats.prompt_tokens,
            prompt_eval_duration=_ns(stats.prompt_s),
            eval_count=stats.completion_tokens,
            eval_duration=_ns(stats.decode_s),
        )

    def stats(self, first_token_s: float | None) -> Stats:
        """Our stats (``first_token_s`` measured by the caller; Ollama has no field for
        the reused tokens or the picture's encoding)."""
        return Stats(
            prompt_tokens=self.prompt_eval_count or 0,
            completion_tokens=self.eval_count or 0,
            load_s=_seconds(self.load_duration),
            prompt_s=_seconds(self.prompt_eval_duration),
            decode_s=_seconds(self.eval_duration),
            total_s=_seconds(self.total_duration),
            first_token_s=first_token_s,
            image_encode_s=None,
        )


class TokenLogprob(Shape):
    token: str = ""
    logprob: float = 0.0
    bytes: list[int] | None = None


class Logprob(TokenLogprob):
    """An answer token's log-probability, with the likeliest alternatives there."""

    top_logprobs: list[TokenLogprob] | None = None

    @classmethod
    def of(cls, tokens: Sequence[our_types.TokenLogprob]) -> list[Logprob]:
        return [
            cls(
                token=t.token,
                logprob=t.logprob,
                bytes=list(t.bytes),
                top_logprobs=[
                    TokenLogprob(token=a.token, logprob=a.logprob, bytes=list(a.bytes))
                    for a in t.top_logprobs
                ],
            )
            for t in tokens
        ]

    def ours(self) -> our_types.TokenLogprob:
        return our_types.TokenLogprob(
            token=self.token,
            logprob=self.logprob,
            bytes=tuple(self.bytes or ()),
            top_logprobs=tuple(
                our_types.TokenLogprob(token=a.token, logprob=a.logprob, bytes=tuple(a.bytes or ()))
                for a in self.top_logprobs or []
            ),
        )


def logprobs_option(logprobs: bool | None, top_logprobs: int | None) -> dict[str, Any]:
    """A request's ``logprobs``/``top_logprobs`` as our ``logprobs`` option."""
    return {"logprobs": top_logprobs or 0} if logprobs else {}


class ChatResponse(Metrics):
    """A chunk of a streamed answer, or (``done``) its last one with the figures, or the
    whole answer."""

    model: str | None = ""
    created_at: str | None = Field(default_factory=_now)
    message: Message = Field(default_factory=lambda: Message(role="assistant"))
    done: bool | None = False
    done_reason: str | None = None
    logprobs: list[Logprob] | None = None

    def wire(self) -> dict[str, Any]:
        """As sent: a piece's chunk carries no figures or ``done_reason``."""
        return self.model_dump(exclude_none=True)


# --- generate ------------------------------------------------------------------------


class GenerateRequest(Shape):
    """``POST /api/generate``: one prompt (with its own ``system`` and ``images``)
    answered in the model's chat format. ``suffix`` (fill in the middle), ``template``,
    ``raw`` and a non-empty ``context`` are read so that the server can refuse them by
    name: ``serve`` writes the model's own chat format and keeps no token lists (the
    conversation's prefix is reused from the KV cache instead, as on ``/api/chat``)."""

    model: str = Field(min_length=1)
    prompt: str | None = ""
    suffix: str | None = None
    images: list[str] | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = False
    stream: bool = True
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: str | float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class GenerateResponse(Metrics):
    """A chunk of ``/api/generate``'s streamed answer (``response``: its text), or the
    last one (``done``) with the figures, or the whole answer. Ollama's deprecated
    ``context`` token list is not sent: clients that continue a conversation send it
    to ``/api/chat`` as messages."""

    model: str | None = ""
    created_at: str | None = Field(default_factory=_now)
    response: str = ""
    done: bool | None = False
    done_reason: str | None = None
    logprobs: list[Logprob] | None = None

    def wire(self) -> dict[str, Any]:
        """As sent: a piece's chunk carries no figures or ``done_reason``."""
        return self.model_dump(exclude_none=True)


def _ns(seconds: float | None) -> int:
    return int((seconds or 0.0) * 1e9)


def _seconds(nanoseconds: int | None) -> float:
    return (nanoseconds or 0) / 1e9


# --- models --------------------------------------------------------------------------


class ModelDetails(Shape):
    parent_model: str | None = ""
    format: str | None = ""
    family: str | None = ""
    families: list[str] | None = None
    parameter_size: str | None = ""
    quantization_level: str | None = ""


class ModelEntry(Shape):
    """A model of ``GET /api/tags``."""

    name: str | None = None
    model: str | None = None
    modified_at: datetime | None = None
    size: Count = None
    digest: str | None = None
    details: ModelDetails | None = None


class Tags(Shape):
    """``GET /api/tags``."""

    models: list[ModelEntry] = Field(default_factory=list)


class RunningModel(Shape):
    """A model of ``GET /api/ps``."""

    name: str | None = None
    model: str | None = None
    size: Count = None
    digest: str | None = None
    details: ModelDetails | None = None
    expires_at: datetime | None = None
    size_vram: Count = None
    context_length: Count = None


class RunningModels(Shape):
    """``GET /api/ps``."""

    models: list[RunningModel] = Field(default_factory=list)


class Show(Shape):
    """``POST /api/show``."""

    modelfile: str | None = ""
    parameters: str | None = ""
    template: str | None = ""
    details: ModelDetails | None = None
    model_info: dict[str, Any] | None = None
    capabilities: list[str] | None = None
    modified_at: datetime | None = None


def is_vision(show: Show) -> bool | None:
    """Whether the model sees pictures; None when the daemon does not say. A daemon too
    old to report ``capabilities`` is judged by the model's families (every vision
    model of that era had ``clip`` or ``mllama``)."""
    if show.capabilities is not None:
        return "vision" in show.capabilities
    families = show.details.families if show.details is not None else None
    if not families:
        return None
    return not VISION_FAMILIES.isdisjoint(families)


class Version(Shape):
    """``GET /api/version``: the cheapest question, Ollama's liveness check."""

    version: str | None = None


class ErrorBody(Shape):
    """Every answer other than 200, and a stream's last line when it fails mid-answer."""

    error: str
