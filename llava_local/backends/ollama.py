"""The Ollama engine: answers through a running ``ollama serve``, via the official client.

Why a module around a client that already exists: by default that client waits
forever, raises httpx, json and builtin exceptions, and lets a text-only model
receive pictures it silently ignores. This engine adds a pre-flight check (daemon,
model, vision), finite timeouts, bounded retries of refused connections, one
function that turns every low-level error into a :mod:`llava_local.errors` type,
and the same :class:`~llava_local.types.Stats` as the in-process engine.

Choices worth knowing:

- The HTTP layer can be injected. ``transport=`` takes an ``httpx`` transport
  (``httpx.HTTPTransport(proxy=..., retries=...)``, ``httpx.MockTransport(handler)``
  in tests); the engine's client uses it for every request and closes it with the
  engine. ``client=`` takes a ready ``ollama.Client``, used as it is (its own address,
  headers, timeouts and retries) and left open: the caller owns it.
- Retries are the transport's own: the default one is
  ``httpx.HTTPTransport(retries=CONNECT_RETRIES)``. httpcore retries only while it
  opens the connection (refused, unreachable, or not accepted within
  ``connect_timeout``), before any byte of the request is sent, so a request the
  daemon may have seen is never repeated. It honours ``HTTP_PROXY`` / ``NO_PROXY``
  and friends as httpx's default does.

- Extra keyword arguments are Ollama ``options`` sent with every turn
  (``num_thread=4``, ``num_gpu=0``, ``mirostat=2``...). A name Ollama does not know
  raises :class:`InvalidRequestError`, because the daemon would silently ignore it.
  The turn's :class:`~llava_local.types.Options` win over these where both are set.
- ``timeout`` bounds each turn: every read from the daemon, and the whole answer
  (checked between pieces). ``timeout=None`` still bounds every read, at 600 s.
- A daemon too old to report ``capabilities`` is judged by the model's families:
  ``clip`` or ``mllama`` means vision (every vision model of that era had one). If
  it reports no families either, the model is let through.
- ``logprobs=N`` is sent as Ollama's ``logprobs``/``top_logprobs`` and what the daemon
  sends back becomes ``reply.logprobs`` (None from a daemon that sends none). A forced
  tool (``ask(..., tool=...)``) is sent as its parameter schema in ``format``: Ollama
  has no ``tool_choice``, and its ``tools`` let the model choose (or are refused for a
  model not trained for them).

The protocol's shapes and translations (option names, the answer's figures, model
listings, names) are :mod:`llava_local.protocols.ollama`'s, which ``serve`` answers
with too; the check-once life cycle is :class:`~.remote.RemoteEngine`'s, shared with
the openai engine.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any, cast

import httpx
import ollama
import pydantic

from ..errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    InvalidRequestError,
    LlavaLocalError,
    ModelNotFoundError,
    NotAVisionModelError,
    ResponseError,
)
from ..progress import DownloadProgress
from ..protocols import ollama as wire
from ..types import Message, TokenLogprob
from .base import Finish, Turn
from .remote import DEFAULT_READ_TIMEOUT, RemoteEngine
from .spec import Capabilities, EngineConfig, EngineSpec, setting

__all__ = [
    "OllamaBackend",
    "OllamaConfig",
    "daemon_version",
    "find_vision_model",
    "is_vision",
    "listed_models",
    "pull_model",
    "resolve_host",
]

DEFAULT_HOST = "http://127.0.0.1:11434"
#: Extra attempts to open a connection the daemon refused (nothing was sent yet); httpcore
#: pauses 0 s, then 0.5 s, between them.
CONNECT_RETRIES = 2
#: Option names the daemon understands: the client's list plus newer ones.
OLLAMA_OPTIONS = frozenset(ollama.Options.model_fields) | {"min_p"}
#: Everything the client and its transport may raise; translated by :func:`_translate`.
_LOW_LEVEL: tuple[type[BaseException], ...] = (
    ollama.ResponseError,
    ollama.RequestError,
    httpx.HTTPError,
    httpx.InvalidURL,
    httpx.StreamError,
    json.JSONDecodeError,
    pydantic.ValidationError,
    OSError,
)

_Stream = Generator[ollama.ChatResponse, None, None]


def resolve_host(host: str | None = None) -> str:
    """The daemon's URL: ``host``, else ``OLLAMA_HOST``, else ``http://127.0.0.1:11434``.

    Accepts the forms Ollama accepts: ``host``, ``host:port``, ``:port``,
    ``http://host:port``, ``https://host`` (an explicit scheme defaults to port 80/443).
    """
    raw = (host if host is not None else os.environ.get("OLLAMA_HOST", "")).strip()
    if not raw:
        return DEFAULT_HOST
    scheme, separator, rest = raw.partition("://")
    scheme = scheme.lower() if separator else "http"
    if scheme not in ("http", "https"):
        raise InvalidRequestError(f"Ollama host {raw!r}: only http:// and https:// are possible")
    default_port = {"http": 80, "https": 443}[scheme] if separator else 11434
    parts = urllib.parse.urlsplit(f"{scheme}://{rest if separator else raw}")
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise InvalidRequestError(f"Ollama host {raw!r} has a bad port") from exc
    name = parts.hostname or "127.0.0.1"
    if ":" in name:
        name = f"[{name}]"
    path = parts.path.strip("/")
    return f"{scheme}://{name}:{port}" + (f"/{path}" if path else "")


def find_vision_model(
    host: str | None = None,
    *,
    timeout: float = 1.0,
    preferred: str | None = None,
    required: bool = False,
) -> str | None:
    """A vision model the daemon has, for ``backend="auto"``; None if no daemon answers
    within ``timeout`` or it has no vision model. ``preferred`` wins when it qualifies.

    ``required`` is for a daemon the caller named: one that does not answer, or does
    not answer as Ollama, raises the engine's error (naming the address) instead.
    """
    try:
        url = resolve_host(host)
        # Only a daemon the caller named is worth waiting for while it starts.
        transport = _transport(url, retries=CONNECT_RETRIES if required else 0)
        with ollama.Client(host=url, timeout=httpx.Timeout(timeout), transport=transport) as client:
            if required:
                _ping(client, url)
            for entry, vision in listed_models(client, preferred=preferred):
                if vision is True and entry.model:
                    if preferred and wire.same_model(entry.model, preferred):
                        return preferred
                    return wire.short_name(entry.model)
    except LlavaLocalError:
        if required:
            raise
        return None
    except _LOW_LEVEL as exc:
        if required:
            raise _translate(exc, url, preferred or "llava") from exc
        return None
    return None


def pull_model(
    model: str,
    *,
    host: str | None = None,
    on_update: Callable[[ollama.ProgressResponse], None] | None = None,
    connect_timeout: float = 3.0,
) -> None:
    """``ollama pull MODEL`` through the daemon; ``on_update`` sees each progress line
    (status, blob digest, bytes done and total), e.g. to draw bars
    (:class:`llava_local.progress.DownloadProgress`).

    Raises :class:`ModelNotFoundError` when the registry has no such model,
    :class:`BackendUnavailableError` when no daemon answers, and :class:`BackendError`
    when the pull fails part-way (the daemon keeps what it has; pulling again resumes).
    """
    if not model.strip():
        raise InvalidRequestError("the Ollama model name is empty")
    url = resolve_host(host)
    timeouts = httpx.Timeout(DEFAULT_READ_TIMEOUT, connect=connect_timeout)
    try:
        with ollama.Client(host=url, timeout=timeouts, transport=_transport(url)) as client:
            _pull(client, url, model, on_update)
    except LlavaLocalError:
        raise
    except _LOW_LEVEL as exc:
        raise _translate(exc, url, model) from exc


class OllamaBackend(RemoteEngine):
    """Talks to a running Ollama daemon; see the module doc for the choices it makes.

    ``transport`` (an ``httpx.BaseTransport``) or ``client`` (a ready ``ollama.Client``,
    which brings its own address, so no ``host``) replace the HTTP layer the engine
    would build itself.
    """

    name = "ollama"
    server = "Ollama"
    client_errors = _LOW_LEVEL
    default_max_image_side = 1344

    def __init__(
        self,
        model: str = "llava",
        *,
        host: str | None = None,
        timeout: float | None = None,
        pull: bool = False,
        keep_alive: str | float | None = None,
        connect_timeout: float = 3.0,
        num_ctx: int | None = None,
        transport: httpx.BaseTransport | None = None,
        client: ollama.Client | None = None,
        **engine_options: Any,
    ) -> None:
        if not model.strip():
            raise InvalidRequestError("the Ollama model name is empty")
        if (timeout is not None and timeout <= 0) or connect_timeout <= 0:
            raise InvalidRequestError("timeouts must be positive numbers of seconds")
        if client is not None and (transport is not None or host is not None):
            given = "transport=" if transport is not None else "host="
            raise InvalidRequestError(
                f"a ready Ollama client= brings its own address and transport: drop {given}"
            )
        if transport is not None and not isinstance(transport, httpx.BaseTransport):
            raise InvalidRequestError(
                f"transport= must be an httpx.BaseTransport (such as httpx.HTTPTransport), "
                f"not {type(transport).__name__}"
            )
        if client is not None and not isinstance(client, ollama.Client):
            raise InvalidRequestError(
                f"client= must be an ollama.Client, not {type(client).__name__}"
            )
        self.model = model
        self.timeout = timeout
        self.pull = pull
        self.keep_alive = keep_alive
        self._options = _engine_options(engine_options, num_ctx)
        #: These settings, as :meth:`VisionChat.from_config` rebuilds them.
        self.config = OllamaConfig(
            model=model,
            host=host,
            timeout=timeout,
            pull=pull,
            keep_alive=keep_alive,
            connect_timeout=connect_timeout,
            num_ctx=num_ctx,
            options=dict(engine_options),
        )
        read = timeout if timeout is not None else DEFAULT_READ_TIMEOUT
        self._timeouts = httpx.Timeout(read, connect=connect_timeout)
        self._owns_client = client is None
        if client is None:
            self.host = resolve_host(host)
            client = ollama.Client(
                host=self.host, timeout=self._timeouts, transport=transport or _transport(self.host)
            )
        else:
            self.host = str(_http(client).base_url).rstrip("/")
        self._client = client

    # the pre-flight
    def _check(self) -> None:
        _ping(self._client, self.host)
        show = self._show()
        if wire.is_vision(show) is False:
            caps = ", ".join(show.capabilities or []) or "none"
            raise NotAVisionModelError(
                f"Ollama model {self.model!r} cannot see pictures (its capabilities: {caps}); "
                "Ollama would silently ignore them. Use a vision model, e.g. `ollama pull llava`."
            )

    def _show(self) -> wire.Show:
        """``show`` of the model, pulling it first if it is missing and ``pull`` is set."""
        try:
            return _show(self._client, self.model)
        except ollama.ResponseError as exc:
            if exc.status_code != 404 or not self.pull:
                raise
        with DownloadProgress(self.model) as bars:
            _pull(self._client, self.host, self.model, bars)
        return _show(self._client, self.model)

    # the turn
    def _answer(self, turn: Turn) -> Generator[str | Finish, None, None]:
        started = time.monotonic()
        deadline = None if self.timeout is None else started + self.timeout
        stream, first = self._open(turn)
        first_token_s: float | None = None
        logprobs: list[TokenLogprob] | None = None  # as the daemon sends them
        try:
            for raw in stream if first is None else itertools.chain([first], stream):
                chunk = wire.ChatResponse.model_validate(raw, from_attributes=True)
                piece = chunk.message.content or ""
                if chunk.logprobs is not None:
                    logprobs = (logprobs or []) + [t.ours() for t in chunk.logprobs]
                if chunk.done:
                    if piece:  # a final chunk may carry text (a parser's held-back tail)
                        if first_token_s is None:
                            first_token_s = time.monotonic() - started
                        yield piece
                    stats = chunk.stats(first_token_s)
                    asked = turn.options.logprobs is not None and logprobs is not None
                    kept = tuple(logprobs or ()) if asked else None
                    yield Finish(wire.done_reason(chunk.done_reason), stats, kept)
                    return
                if deadline is not None and time.monotonic() > deadline:
                    raise BackendTimeoutError(
                        f"Ollama at {self.host} did not finish the answer within {self.timeout} s"
                    )
                if piece:
                    if first_token_s is None:
                        first_token_s = time.monotonic() - started
                    yield piece
        finally:
            stream.close()
        raise BackendError(f"Ollama at {self.host} ended the answer without its final message")

    def _open(self, turn: Turn) -> tuple[_Stream, ollama.ChatResponse | None]:
        """Send the request and wait for the first chunk (where connection errors surface)."""
        options = {**self._options, **wire.options_to_wire(turn.options)}
        top = turn.options.logprobs  # sent only when asked: older ollama clients lack them
        extra: dict[str, Any] = {} if top is None else {"logprobs": True, "top_logprobs": top}
        stream = cast(
            _Stream,
            self._client.chat(
                model=self.model,
                messages=[_client_message(message) for message in turn.messages],
                stream=True,
                format=turn.json_schema,
                options=options or None,
                keep_alive=self.keep_alive,
                **extra,
            ),
        )
        try:
            return stream, next(stream, None)
        except BaseException:
            stream.close()
            raise

    def _translate(self, exc: BaseException, *, answering: bool) -> LlavaLocalError:
        return _translate(exc, self.host, self.model, answering=answering)

    def _release(self) -> None:
        """Close the HTTP connections (not those of a ``client=`` the caller gave)."""
        if self._owns_client:
            self._client.close()  # type: ignore[no-untyped-call]  # unannotated in ollama


# --- helpers -------------------------------------------------------------------------


def _translate(
    exc: BaseException, host: str, model: str, *, answering: bool = False
) -> LlavaLocalError:
    """The library error for a low-level one: the single place errors are mapped."""
    if isinstance(exc, ollama.ResponseError):
        if exc.status_code == 404:
            return ModelNotFoundError(
                f"Ollama at {host} has no model {model!r} ({exc.error}): "
                f"run `ollama pull {model}`, or pass pull=True"
            )
        status = None if exc.status_code < 0 else exc.status_code
        where = "while answering" if status is None else f"with status {status}"
        hint = ""
        if "invalid JSON schema in format" in exc.error:  # llama.cpp's converter refused it
            hint = (
                "; Ollama cannot turn this schema= into a grammar (a pattern must start "
                "with ^ and end with $): simplify the schema"
            )
        return ResponseError(f"Ollama at {host} failed {where}: {exc.error}{hint}", status)
    if isinstance(exc, httpx.TimeoutException):
        if isinstance(exc, httpx.ConnectTimeout):
            return BackendTimeoutError(
                f"Ollama at {host} did not accept the connection in time; check OLLAMA_HOST"
            )
        return BackendTimeoutError(f"Ollama at {host} did not answer in time ({exc})")
    if isinstance(exc, httpx.ConnectError | ConnectionRefusedError) or type(exc) is ConnectionError:
        return BackendUnavailableError(
            f"no Ollama daemon answers at {host}: start it with `ollama serve` "
            "(or set OLLAMA_HOST to where it runs)"
        )
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError | OSError):
        when = "mid-answer" if answering else "during the check"
        return BackendUnavailableError(f"the connection to Ollama at {host} dropped {when} ({exc})")
    if isinstance(exc, httpx.TransportError | httpx.InvalidURL):
        return BackendUnavailableError(f"cannot talk to Ollama at {host}: {exc}")
    if isinstance(exc, json.JSONDecodeError):
        line = exc.doc[:80]
        return BackendError(f"Ollama at {host} sent a line that is not JSON ({exc.msg}): {line!r}")
    if isinstance(exc, pydantic.ValidationError):
        return BackendError(f"Ollama at {host} sent an answer of an unexpected shape: {exc}")
    if isinstance(exc, ollama.RequestError):
        return InvalidRequestError(exc.error)
    return BackendError(f"Ollama at {host} failed: {exc}")


def _transport(url: str, *, retries: int = CONNECT_RETRIES) -> httpx.HTTPTransport:
    """The engine's own transport: connection retries (see the module doc), and the
    proxy the environment names for ``url``, as httpx does without a transport."""
    return httpx.HTTPTransport(retries=retries, proxy=_environment_proxy(url))


def _environment_proxy(url: str) -> str | None:
    """``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` for ``url``, unless ``NO_PROXY``
    exempts it. (httpx reads them itself only when it builds the transport.)"""
    proxies = urllib.request.getproxies_environment()
    parts = urllib.parse.urlsplit(url)
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.netloc):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _http(client: ollama.Client) -> httpx.Client:
    """The ``httpx.Client`` inside an ``ollama.Client`` (``BaseClient._client`` in every
    release this package allows): the one way to send a request the ollama client has no
    method for, through the same transport, headers and timeouts."""
    http: httpx.Client = client._client
    return http


def daemon_version(http: httpx.Client) -> tuple[str | None, int]:
    """``GET /api/version``, the cheapest question, and the one probe of a daemon (the
    engine's check, ``auto``, ``models`` and ``doctor`` all ask it): the version Ollama
    reports, or None when something else answers; and the HTTP status."""
    response = http.get("/api/version")
    if response.status_code != 200:
        return None, response.status_code
    try:
        return wire.Version.model_validate_json(response.content).version, 200
    except pydantic.ValidationError:  # not JSON, or not Ollama's shape
        return None, 200


def _ping(client: ollama.Client, host: str) -> None:
    """Make sure it is Ollama answering at ``host``."""
    version, status = daemon_version(_http(client))
    if version is None:
        raise BackendUnavailableError(
            f"{host} answers, but not as Ollama does (GET /api/version: {status}); "
            "check OLLAMA_HOST"
        )


def _pull(
    client: ollama.Client,
    host: str,
    model: str,
    on_update: Callable[[ollama.ProgressResponse], None] | None,
) -> None:
    """Stream one pull. An error before any blob arrives means the registry has no such
    model; one after it means the download itself failed."""
    started = False
    try:
        for update in client.pull(model, stream=True):
            started = started or bool(update.digest)
            if on_update is not None:
                on_update(update)
    except ollama.ResponseError as exc:
        if started:
            raise BackendError(
                f"Ollama at {host} failed while pulling {model!r}: {exc.error}; "
                "run the pull again to resume it"
            ) from exc
        raise ModelNotFoundError(
            f"Ollama at {host} has no model {model!r} and could not pull it: {exc.error}"
        ) from exc


def _engine_options(extra: Mapping[str, Any], num_ctx: int | None) -> dict[str, Any]:
    unknown = sorted(set(extra) - OLLAMA_OPTIONS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], OLLAMA_OPTIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidRequestError(
            f"Ollama has no option {unknown[0]!r}{hint}; known: {', '.join(sorted(OLLAMA_OPTIONS))}"
        )
    options = {name: value for name, value in extra.items() if value is not None}
    if num_ctx is not None:
        options["num_ctx"] = num_ctx
    return options


def _client_message(message: Message) -> dict[str, Any]:
    """A message for the client, which base64-encodes the picture bytes itself."""
    wired: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.images:
        wired["images"] = [image.data for image in message.images]
    return wired


def _show(client: ollama.Client, model: str) -> wire.Show:
    return wire.Show.model_validate(client.show(model), from_attributes=True)


def is_vision(show: wire.Show | ollama.ShowResponse) -> bool | None:
    """Whether the model sees pictures; None when the daemon does not say."""
    return wire.is_vision(wire.Show.model_validate(show, from_attributes=True))


def listed_models(
    client: ollama.Client, *, preferred: str | None = None
) -> Iterator[tuple[wire.ModelEntry, bool | None]]:
    """The daemon's models (``preferred`` first, if listed), each with whether it sees
    pictures (None: the daemon does not say, or its ``show`` failed); one ``show`` a
    model, asked as the caller iterates."""
    tags = wire.Tags.model_validate(client.list(), from_attributes=True)
    entries = [entry for entry in tags.models if entry.model]
    if preferred:
        entries.sort(key=lambda entry: not wire.same_model(entry.model or "", preferred))
    for entry in entries:
        try:
            vision = wire.is_vision(_show(client, entry.model or ""))
        except (ollama.ResponseError, pydantic.ValidationError):
            vision = None
        yield entry, vision


class OllamaConfig(EngineConfig):
    """Settings of the Ollama engine; Ollama's own runner options (``num_thread``,
    ``num_gpu``, ...) go into ``options`` and may also be given by name."""

    model: str | None = "llava"
    host: str | None = setting(
        None,
        help="the daemon's address (default: OLLAMA_HOST or 127.0.0.1:11434)",
        flag="--host",
    )
    timeout: float | None = setting(None, help="Seconds a turn may take", flag="--timeout")
    pull: bool = False
    keep_alive: str | float | None = None
    connect_timeout: float = 3.0
    num_ctx: int | None = None
    options: dict[str, Any] = pydantic.Field(default_factory=dict)

    @classmethod
    def setting_names(cls) -> list[str]:
        return [*cls.model_fields, *sorted(OLLAMA_OPTIONS - set(cls.model_fields))]

    @classmethod
    def runtime_names(cls) -> frozenset[str]:
        # The HTTP layer a caller brings (see OllamaBackend): objects of this process,
        # handed to the engine as it opens and never part of the JSON description.
        return frozenset({"transport", "client"})

    @classmethod
    def conversation_names(cls) -> frozenset[str]:
        return frozenset({"num_ctx"})

    @pydantic.model_validator(mode="before")
    @classmethod
    def _runner_options(cls, data: Any) -> Any:
        """Ollama's runner options given by name join ``options``."""
        if not isinstance(data, dict):
            return data
        named = {k: data[k] for k in data if k in OLLAMA_OPTIONS and k not in cls.model_fields}
        if not named:
            return data
        rest = {k: v for k, v in data.items() if k not in named}
        return {**rest, "options": {**dict(rest.get("options") or {}), **named}}


def open_engine(config: OllamaConfig, **runtime: Any) -> OllamaBackend:
    """The Ollama engine for ``config`` (``runtime``: an injected transport or client)."""
    settings = config.model_dump(exclude={"model", "options"})
    return OllamaBackend(config.model or "llava", **settings, **runtime, **config.options)


#: The engine as the registry lists it (:data:`..registry.BUILTINS`).
SPEC = EngineSpec(
    name="ollama",
    config=OllamaConfig,
    open=open_engine,
    capabilities=Capabilities(pulls_models=True),
    description="the Ollama daemon (ollama serve)",
    address="host",
    resolve_address=resolve_host,
)
