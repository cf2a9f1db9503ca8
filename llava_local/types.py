"""The data that crosses the public API: options, pictures, messages, replies.

All are pydantic models. Input models are strict (``extra="forbid"``: a misspelt
option fails loudly); output models are plain records.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "user", "assistant"]
DoneReason = Literal["stop", "length"]


class Options(BaseModel):
    """Generation options, the same names for every engine.

    ``None`` means "the engine's default". Each backend maps the names to its own
    (``max_tokens`` is Ollama's ``num_predict``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    #: Report each answer token's log-probability with this many most likely
    #: alternatives (0: the chosen token's alone) in ``reply.logprobs``; None: none.
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    def overlay(self, other: Options) -> Options:
        """These options with every field that ``other`` sets replaced."""
        return self.model_copy(update=other.model_dump(exclude_none=True))


class PreparedImage(BaseModel):
    """A picture after preparation: upright, RGB, bounded in size, encoded once.

    ``sha256`` is the hash of ``data``; engines use it to recognise a picture they
    have already seen. ``changes`` says what preparation did to it, in words.
    """

    model_config = ConfigDict(frozen=True)

    data: bytes = Field(repr=False)
    mime: Literal["image/png", "image/jpeg"]
    width: int
    height: int
    sha256: str
    source: str
    changes: tuple[str, ...] = ()

    def b64(self) -> str:
        """The encoded picture as base64 text, as the Ollama protocol wants it."""
        return base64.b64encode(self.data).decode("ascii")


class Message(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(frozen=True)

    role: Role
    content: str
    images: tuple[PreparedImage, ...] = ()


class Stats(BaseModel):
    """Token counts and timings of one turn, the same fields for every engine.

    Named as Ollama names them, converted to seconds. ``prompt_tokens`` counts the
    prompt tokens the engine evaluated for this turn; ``cached_tokens`` those it did
    not have to: reused from the previous turn, or restored from a kept KV state
    (another conversation's, a saved conversation's, or one on disk).
    A figure the engine cannot know is None, never a guess: a server behind the openai
    engine may report no token counts (llama-cpp-python's, while streaming) or no
    timings; ``image_encode_s`` is None where the engine cannot tell. ``dropped_turns``
    counts old turns left out to make room (``on_overflow="drop_oldest"``).
    """

    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    cached_tokens: int | None = None
    images_encoded: int | None = None
    load_s: float = 0.0
    prompt_s: float | None = 0.0
    decode_s: float | None = 0.0
    total_s: float = 0.0
    first_token_s: float | None = None
    image_encode_s: float | None = None
    dropped_turns: int = 0

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Completion tokens per second of decoding, when there was any."""
        if not self.decode_s or not self.completion_tokens or self.decode_s <= 0:
            return None
        return self.completion_tokens / self.decode_s


class Tool(BaseModel):
    """A function the model can be made to call: its name, what it does, and the JSON
    schema of its arguments (an object). A model not trained for tools cannot choose
    one; a turn that forces it (``ask(..., tool=...)``, ``tool_choice`` on the HTTP
    routes) gets its arguments written by the grammar to ``parameters``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolCall(BaseModel):
    """A call the model wrote: the function's name and its arguments, checked against
    its parameters (a pydantic object when the tool was a pydantic model), and as
    written (``arguments_json``, what OpenAI's protocol sends)."""

    id: str
    name: str
    arguments: Any = None
    arguments_json: str = ""


class TokenLogprob(BaseModel):
    """One answer token and its log-probability under the model's raw distribution at
    that step (the log-softmax of its logits, before temperature, top-k/p or a
    grammar), with the most likely alternatives there (``top_logprobs``, most likely
    first). ``bytes`` are the token's own bytes: a character may span two tokens."""

    token: str
    logprob: float
    bytes: tuple[int, ...] = ()
    top_logprobs: tuple[TokenLogprob, ...] = ()


class Reply(BaseModel):
    """A finished answer. ``str(reply)`` is its text."""

    text: str
    model: str
    backend: str
    done_reason: DoneReason | None = None
    stats: Stats = Field(default_factory=Stats)
    #: With a schema: the answer checked against it; None when it was cut by
    #: ``max_tokens`` (``done_reason == "length"``) before its JSON ended.
    parsed: Any = None
    #: With a forced tool: the call the model wrote (its ``arguments`` are ``parsed``).
    tool_calls: tuple[ToolCall, ...] = ()
    #: With ``logprobs=N``: each answer token's log-probability (see
    #: :class:`TokenLogprob`); None when not asked for or the engine cannot say.
    logprobs: tuple[TokenLogprob, ...] | None = None

    def __str__(self) -> str:
        return self.text
