"""The OpenAI engine: answers through any server that speaks the OpenAI chat-completions
protocol (llamafile, llama.cpp's ``llama-server``, LM Studio, vLLM, Ollama's ``/v1``,
``python -m llama_cpp.server``), via the official ``openai`` client.

What this module adds to the client:

- A pre-flight (``GET /models``): the server answers as an OpenAI-compatible one and
  lists the model. ``model=None`` takes the only model listed; a server listing several
  is asked to name one (the error lists them). Several servers answer with whatever model
  they loaded whatever name a request gives, so a misspelt name would otherwise go
  unnoticed.
- Pictures are sent as ``data:`` URIs of the prepared bytes: the same bytes every turn, so
  a server that caches by content (llama-server) recognises them.
- ``schema=`` is sent as ``response_format`` ``{"type": "json_schema", ...}``; a server
  that refuses that form (llama-cpp-python's own server knows only ``json_object`` with
  a ``schema``) is asked once more in its form, which is then kept for the engine.
- ``logprobs=N`` is sent as ``logprobs: true, top_logprobs: N``; the tokens' entries
  the server streams become ``reply.logprobs`` (None when it sends none).
- A forced tool (``ask(..., tool=...)``) is sent as the one tool, named by
  ``tool_choice``; the arguments the server streams in ``tool_calls`` are the answer's
  text, which the core checks against the tool's parameters.
- ``top_k`` and ``repeat_penalty``, which the protocol lacks, are sent as extra body
  fields under those names (llama-server, llamafile, llama-cpp-python and LM Studio read
  them; servers that do not know them ignore them). ``extra_body`` adds more fields to
  every request (``{"cache_prompt": True}``, ``{"min_p": 0.05}``...); the turn's options
  win where both name a field.
- ``timeout`` bounds the whole turn, from the request to the last piece, not each read:
  the answer is read in a worker thread while the turn waits at most until its deadline.
  The same wait notices ``cancel()`` at once, even before the first piece.
- :class:`~llava_local.types.Stats` come from what the server reports: ``usage``
  (``prompt_tokens_details.cached_tokens`` where given) and llama-server's ``timings``.
  Token counts and timings the server does not report are None, never guessed;
  ``first_token_s`` and ``total_s`` are measured here.
- Every low-level error becomes a :mod:`llava_local.errors` type in one function,
  :func:`_translate`.

The protocol's shapes and translations (the request, options, chunks, figures, model
list) are :mod:`llava_local.protocols.openai`'s, which ``serve`` answers with too; the
check-once life cycle is :class:`~.remote.RemoteEngine`'s, shared with the Ollama engine.

The API key comes from ``api_key=``, else ``OPENAI_API_KEY``; a server without keys gets
a placeholder. It lives only inside the client: never in the engine's config (so never
in ``chat.config`` or a saved conversation) and never in a message.
"""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Generator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pydantic

from ..control import STATUS_READING_PROMPT
from ..errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ContextOverflowError,
    InvalidRequestError,
    LlavaLocalError,
    MissingDependencyError,
    ModelNotFoundError,
    NotAVisionModelError,
    ResponseError,
)
from ..protocols import openai as wire
from ..protocols.ollama import same_model
from ..types import TokenLogprob
from .base import Finish, Turn
from .remote import DEFAULT_READ_TIMEOUT, RemoteEngine
from .spec import Capabilities, EngineConfig, EngineSpec, setting

if TYPE_CHECKING:
    from openai import Stream
    from openai.types.chat import ChatCompletionChunk

__all__ = ["OpenAIBackend", "OpenAIConfig", "resolve_base_url"]

#: Sent as the key to servers that need none (the client refuses to start without one).
NO_KEY = "no-key"
#: How often a turn waiting for the server looks at its stop flag and its deadline.
_POLL_S = 0.05
#: What servers say when a turn does not fit: (pattern, group of "needed", of "available").
_OVERFLOW_PATTERNS = (
    # OpenAI, vLLM, llama-cpp-python's server for text prompts
    (re.compile(r"maximum context length is (\d+) tokens.*?(\d+) tokens", re.S), 2, 1),
    # llama-cpp-python (Llama.create_completion)
    (re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)"), 1, 2),
    # llama-cpp-python's LLaVA chat handlers
    (re.compile(r"Prompt exceeds n_ctx: (\d+) > (\d+)"), 1, 2),
)
#: Words of a context-length rejection that gives no numbers (llama-server, LM Studio).
_OVERFLOW_WORDS = re.compile(
    r"context_length_exceeded|exceed_context_size|exceeds the available context size"
    r"|context length of only|context (?:window|length|size) (?:is )?exceeded",
    re.I,
)
#: What servers say when the loaded model has no image encoder.
_NO_VISION_WORDS = re.compile(
    r"image input is not supported|does not support image|not a multimodal model"
    r"|vision is not supported|no mmproj",
    re.I,
)
_END = object()  # the worker's last item: the stream ended


def resolve_base_url(base_url: str | None = None) -> str:
    """The server's API root: ``base_url``, else ``OPENAI_BASE_URL``.

    ``host:port`` gets ``http://``; an address without a path gets ``/v1`` (where every
    OpenAI-compatible server has its routes), so ``http://127.0.0.1:8080`` and
    ``http://127.0.0.1:8080/v1`` mean the same server.
    """
    raw = (base_url if base_url is not None else os.environ.get("OPENAI_BASE_URL", "")).strip()
    if not raw:
        raise InvalidRequestError(
            "the openai engine needs the server's address: base_url='http://127.0.0.1:8080/v1' "
            "(or OPENAI_BASE_URL)"
        )
    url = raw if "://" in raw else f"http://{raw}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InvalidRequestError(
            f"base_url={raw!r} is not an http:// or https:// address of a server"
        )
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError:
        raise InvalidRequestError(f"base_url={raw!r} has a bad port") from None
    path = parts.path.rstrip("/") or "/v1"
    return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc, path, parts.query, ""))


class OpenAIConfig(EngineConfig):
    """Settings of the OpenAI engine. The API key is not one of them: it is handed to the
    engine as it opens (``api_key=`` or ``OPENAI_API_KEY``) and never recorded."""

    base_url: str | None = setting(
        None,
        help="the server's address (default: OPENAI_BASE_URL; its key: OPENAI_API_KEY)",
        flag="--host",
    )
    timeout: float | None = setting(None, help="Seconds a turn may take", flag="--timeout", gt=0)
    connect_timeout: float = pydantic.Field(default=3.0, gt=0)
    #: The client's retries of refused connections, timeouts, 429 and 5xx, before any piece.
    max_retries: int = pydantic.Field(default=2, ge=0)
    #: Fields added to every request body, for a server's own settings.
    extra_body: dict[str, Any] = pydantic.Field(default_factory=dict)

    @classmethod
    def runtime_names(cls) -> frozenset[str]:
        # A secret: handed to the engine as it opens, never part of the JSON description.
        return frozenset({"api_key"})


class OpenAIBackend(RemoteEngine):
    """A server speaking the OpenAI chat-completions protocol."""

    name = "openai"
    server = "OpenAI"

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        connect_timeout: float = 3.0,
        max_retries: int = 2,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        _import_openai()
        import openai

        #: These settings, as :meth:`VisionChat.from_config` rebuilds them (no key).
        self.config = OpenAIConfig(
            model=model,
            base_url=base_url,
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_retries=max_retries,
            extra_body=dict(extra_body or {}),
        )
        self.base_url = resolve_base_url(base_url)
        self.timeout = timeout
        self._extra_body = dict(extra_body or {})
        read = timeout if timeout is not None else DEFAULT_READ_TIMEOUT
        self._client = openai.OpenAI(
            base_url=self.base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or NO_KEY,
            timeout=openai.Timeout(read, connect=connect_timeout),
            max_retries=max_retries,
        )
        self.client_errors = (openai.OpenAIError,)
        #: The ``response_format`` form this server takes for ``schema=``.
        self._schema_form: wire.SchemaForm = "json_schema"
        if model is None:  # the model's name is needed now (replies carry it)
            self.model = ""
            self.check()
        else:
            self.model = model

    # the pre-flight
    def _check(self) -> None:
        """The server lists the model (``model=None``: takes the only one)."""
        listed = self._models()
        if not self.model:
            if len(listed) != 1:
                have = "no model" if not listed else "several models: " + ", ".join(listed)
                raise ModelNotFoundError(
                    f"the server at {self.base_url} lists {have}; name the one to use with model="
                )
            self.model = listed[0]
        elif not any(same_model(name, self.model) for name in listed):
            raise ModelNotFoundError(
                f"the server at {self.base_url} has no model {self.model!r}; it lists: "
                + (", ".join(listed) or "none")
            )

    def _models(self) -> list[str]:
        """The model names ``GET /models`` lists."""
        import openai

        try:
            response = self._client.models.with_raw_response.list()
            listed = wire.ModelList.model_validate_json(response.http_response.text)
        except openai.NotFoundError:
            raise BackendUnavailableError(
                f"{self.base_url} answers, but has no GET /models as OpenAI-compatible servers "
                "do; check base_url= (it usually ends in /v1)"
            ) from None
        except pydantic.ValidationError:
            raise BackendUnavailableError(
                f"{self.base_url} answers GET /models, but not with an OpenAI-compatible model "
                "list; check base_url= (it usually ends in /v1)"
            ) from None
        return listed.ids()

    # the turn
    def _answer(self, turn: Turn) -> Generator[str | Finish, None, None]:
        started = time.monotonic()
        deadline = None if self.timeout is None else started + self.timeout
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        stop = threading.Event()
        worker = threading.Thread(
            target=self._read, args=(turn, items, stop), name="llava-local openai", daemon=True
        )
        turn.control.report(STATUS_READING_PROMPT)
        worker.start()
        first_token_s: float | None = None
        finish: str | None = None
        usage: wire.Usage | None = None
        timings: wire.Timings | None = None
        logprobs: list[TokenLogprob] | None = None  # as the server gives them
        try:
            for chunk in self._chunks(items, turn, deadline):
                choice = chunk.first_choice()
                if choice is not None and choice.logprobs is not None:
                    logprobs = (logprobs or []) + choice.logprobs.ours()
                if choice is not None:
                    piece = choice.delta.content
                    if turn.tool is not None and choice.delta.tool_calls:  # its arguments
                        piece = "".join(
                            call.function.arguments or "" for call in choice.delta.tool_calls
                        )
                    if piece:
                        if first_token_s is None:
                            first_token_s = time.monotonic() - started
                        yield piece
                    finish = choice.finish_reason or finish
                # usage comes with the last chunk (or one of its own, after it)
                usage = chunk.usage or usage
                timings = chunk.timings or timings
        finally:
            stop.set()  # the worker closes the stream at its next chunk
        if finish is None:
            raise BackendError(
                f"the server at {self.base_url} ended the answer without finishing it "
                "(it failed or dropped the connection mid-answer; its log says why)"
            )
        total_s = time.monotonic() - started
        stats = wire.stats(usage, timings, first_token_s=first_token_s, total_s=total_s)
        asked = turn.options.logprobs is not None and logprobs is not None
        yield Finish(wire.done_reason(finish), stats, tuple(logprobs or ()) if asked else None)

    def _chunks(
        self, items: queue.SimpleQueue[Any], turn: Turn, deadline: float | None
    ) -> Iterator[wire.ChatCompletionChunk]:
        """The worker's chunks as they come, while watching the stop flag and the deadline."""
        while True:
            if turn.control.cancelled:
                turn.control.check()
            wait = _POLL_S
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BackendTimeoutError(
                        f"the server at {self.base_url} did not finish the answer within "
                        f"{self.timeout} s"
                    )
                wait = min(wait, left)
            try:
                item = items.get(timeout=wait)
            except queue.Empty:
                continue
            if item is _END:
                return
            if isinstance(item, LlavaLocalError):
                raise item
            if isinstance(item, BaseException):  # the client's, from the worker
                raise self._translate(item, answering=True) from item
            yield item

    def _read(self, turn: Turn, items: queue.SimpleQueue[Any], stop: threading.Event) -> None:
        """The worker: send the request, put each chunk on ``items``, then ``_END``, or
        the exception that stopped it. Closes the stream when ``stop`` is set."""
        try:
            stream = self._send(turn)
            try:
                for chunk in stream:
                    if stop.is_set():
                        return
                    items.put(wire.ChatCompletionChunk.model_validate(chunk.to_dict()))
            finally:
                stream.close()
            items.put(_END)
        except BaseException as exc:  # handed to the turn's thread, which raises it
            items.put(exc)

    def _send(self, turn: Turn) -> Stream[ChatCompletionChunk]:
        """Open the stream; a server refusing the ``json_schema`` form of ``schema=`` is
        asked once more with ``json_object`` and a ``schema`` (llama-cpp-python's form),
        which is then kept for the engine."""
        import openai

        try:
            return self._create(turn, self._schema_form)
        except openai.APIStatusError as exc:
            if turn.json_schema is None or self._schema_form != "json_schema":
                raise
            if "response_format" not in _error_text(exc) and exc.status_code not in (400, 422):
                raise
        stream = self._create(turn, "json_object")
        self._schema_form = "json_object"
        return stream

    def _create(self, turn: Turn, form: wire.SchemaForm) -> Stream[ChatCompletionChunk]:
        """The request, sent through the client: the model and messages as its arguments,
        the rest as extra fields over ``extra_body`` (the turn's options win)."""
        request = wire.ChatRequest.for_turn(
            self.model, turn.messages, turn.options, turn.json_schema, form, tool=turn.tool
        ).wire()
        model, messages = request.pop("model"), request.pop("messages")
        stream: Stream[ChatCompletionChunk] = self._client.chat.completions.create(
            model=model,
            messages=messages,
            stream=True,
            extra_body={**self._extra_body, **request},
        )
        return stream

    def _translate(self, exc: BaseException, *, answering: bool) -> LlavaLocalError:
        return _translate(exc, self.base_url, self.model, answering=answering)

    def _release(self) -> None:
        self._client.close()


# --- helpers -------------------------------------------------------------------------


def _import_openai() -> None:
    """Make sure the client is installed, or say which extra brings it."""
    try:
        import openai  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "the openai engine needs the openai package: pip install 'llava-local[openai]'"
        ) from None


def _translate(
    exc: BaseException, url: str, model: str, *, answering: bool = False
) -> LlavaLocalError:
    """The library error for a low-level one: the single place errors are mapped."""
    import openai

    if isinstance(exc, openai.APITimeoutError) or "Timeout" in type(exc).__name__:
        return BackendTimeoutError(f"the server at {url} did not answer in time")
    if isinstance(exc, openai.APIConnectionError):
        if _refused(exc) or not answering:
            return BackendUnavailableError(
                f"no OpenAI-compatible server answers at {url}: start it, or check base_url="
            )
        return BackendError(f"the connection to the server at {url} dropped mid-answer")
    if isinstance(exc, openai.APIError):  # a status, or an error event in the stream
        status: int | None = getattr(exc, "status_code", None)
        text = _error_text(exc)
        overflow = _overflow(text, getattr(exc, "body", None))
        if overflow is not None:
            needed, available = overflow
            sizes = f" ({needed} tokens needed, {available} in the context)" if needed else ""
            return ContextOverflowError(
                f"the conversation does not fit the context window of the server at {url}"
                f"{sizes}: start a new conversation (reset()) or give the server a larger "
                f"context; it said: {text}",
                needed=needed,
                available=available,
            )
        if _NO_VISION_WORDS.search(text):
            return NotAVisionModelError(
                f"the model {model!r} at {url} cannot see pictures (the server says: {text}); "
                "load a vision model with its projector (mmproj) there"
            )
        if status == 404:
            if "model" in text.lower():
                return ModelNotFoundError(f"the server at {url} has no model {model!r}: {text}")
            return BackendUnavailableError(
                f"{url} has no OpenAI chat-completions route (404); check base_url= "
                "(it usually ends in /v1)"
            )
        if status in (401, 403):
            return ResponseError(
                f"the server at {url} refused the request ({status}: {text}); "
                "pass its key with api_key= or set OPENAI_API_KEY",
                status,
            )
        where = "while answering" if status is None else f"with status {status}"
        return ResponseError(f"the server at {url} failed {where}: {text}", status)
    if type(exc).__name__ in ("RemoteProtocolError", "ReadError", "StreamError"):
        return BackendError(f"the connection to the server at {url} dropped mid-answer ({exc})")
    if isinstance(exc, pydantic.ValidationError):  # a chunk that is not the protocol's
        return BackendError(f"the server at {url} sent an answer of an unexpected shape: {exc}")
    if isinstance(exc, ValueError):  # json.JSONDecodeError: a line that is not JSON
        return BackendError(f"the server at {url} sent something that is not JSON: {exc}")
    return BackendError(f"the server at {url} failed: {exc!r}")


def _refused(exc: BaseException) -> bool:
    """Whether the connection was never made (refused, no such host, unreachable), as
    opposed to one that dropped after the request went out."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError | socket.gaierror):
            return True
        if type(seen).__name__ in ("ConnectError", "ConnectTimeout"):  # httpx's and httpcore's
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _error_text(exc: BaseException) -> str:
    """What the server said: the ``error.message`` of its body, else the body, else the
    exception's own words."""
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        error = body.get("error", body)
        if isinstance(error, Mapping):
            parts = [str(error.get(k)) for k in ("message", "detail", "code", "type")]
            text = " ".join(p for p in parts if p and p != "None")
            if text:
                return text
        return json.dumps(body)[:500]
    if isinstance(body, str) and body:
        return body[:500]
    return str(getattr(exc, "message", exc))


def _overflow(text: str, body: Any) -> tuple[int, int] | None:
    """``(tokens needed, tokens available)`` if ``text`` is a context-length rejection
    (0, 0 where the server gives no numbers); None otherwise."""
    for pattern, needed, available in _OVERFLOW_PATTERNS:
        found = pattern.search(text)
        if found:
            return int(found.group(needed)), int(found.group(available))
    if not _OVERFLOW_WORDS.search(text):
        return None
    # llama-server puts the numbers beside its message
    error = _mapping(body.get("error", body)) if isinstance(body, Mapping) else None
    return _count(error, "n_prompt_tokens") or 0, _count(error, "n_ctx") or 0


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) and value else None


def _count(source: Mapping[str, Any] | None, key: str) -> int | None:
    value = _number(source, key)
    return None if value is None else int(value)


def _number(source: Mapping[str, Any] | None, key: str) -> float | None:
    value = source.get(key) if source is not None else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def open_engine(config: OpenAIConfig, api_key: str | None = None) -> OpenAIBackend:
    """The OpenAI engine for ``config`` (``api_key``: given now, never recorded)."""
    return OpenAIBackend(
        config.base_url,
        config.model,
        api_key=api_key,
        timeout=config.timeout,
        connect_timeout=config.connect_timeout,
        max_retries=config.max_retries,
        extra_body=config.extra_body,
    )


#: The engine as the registry lists it (:data:`..registry.BUILTINS`).
SPEC = EngineSpec(
    name="openai",
    config=OpenAIConfig,
    open=open_engine,
    # Whether a follow-up reuses earlier turns is the server's affair (llama-server
    # does, llama-cpp-python's LLaVA handler does not): not promised here.
    capabilities=Capabilities(reuses_turns=False, pulls_models=False),
    aliases=("openai_compatible",),
    address="base_url",
    resolve_address=resolve_base_url,
    description="an OpenAI-compatible server (llamafile, llama-server, LM Studio, vLLM)",
)
