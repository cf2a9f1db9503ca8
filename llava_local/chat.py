"""``VisionChat``: one conversation about pictures, the same code for every engine.

The conversation, option checking, picture preparation and the reply are handled
here, once; an engine (:mod:`llava_local.backends`) only turns the prepared
conversation into text. A turn is added to the history only when it finishes:
a failed or interrupted turn leaves the conversation exactly as it was.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import BaseModel, ValidationError

from . import fitting, saving, structured
from . import images as _images
from .attach import Attachment
from .backends import Backend, Turn, registry
from .backends.plan import EnginePlan, announce
from .backends.plan import open as open_plan
from .backends.plan import plan as make_plan
from .control import STATUS_PREPARING, TurnControl
from .errors import (
    InvalidRequestError,
    NoPictureWarning,
    problems,
)
from .fitting import OnOverflow
from .stream import ReplyStream
from .tools import ToolSpec, as_tool, forced_tool
from .types import Message, Options, PreparedImage, Reply, Tool

__all__ = ["ReplyStream", "VisionChat"]

_OPTION_NAMES = frozenset(Options.model_fields)
#: What a turn that would not fit the context does (see ``VisionChat.on_overflow``).
_OVERFLOWS = ("error", "drop_oldest", "truncate")
#: How often a turn waiting for another thread's turn looks at its own stop flag.
_WAIT_POLL_S = 0.05


def _options(values: dict[str, Any]) -> Options:
    try:
        return Options(**values)
    except ValidationError as exc:
        raise InvalidRequestError(
            f"invalid generation options ({problems(exc)}); valid options: "
            + ", ".join(sorted(_OPTION_NAMES))
        ) from None


class VisionChat:
    """A conversation with a vision-language model.

    >>> chat = VisionChat.llama_cpp()                      # the bundled demo model
    >>> chat.ask("What digit is this?", image="7.png").text
    'This digit is 7.'
    """

    def __init__(
        self,
        backend: str | Backend | EnginePlan = "auto",
        model: str | None = None,
        *,
        system: str | None = None,
        max_image_side: int | None = None,
        on_overflow: OnOverflow = "error",
        allow_text_only: bool = False,
        on_status: Callable[[str], None] | None = None,
        close_engine: bool = True,
        **kwargs: Any,
    ) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_NAMES}
        self.options = _options(options)
        if max_image_side is not None and max_image_side < 16:
            raise InvalidRequestError("max_image_side must be at least 16 pixels")
        if on_overflow not in _OVERFLOWS:
            raise InvalidRequestError("on_overflow must be 'error', 'drop_oldest' or 'truncate'")
        #: The engine as planned: its spec and settled config (what :attr:`config` and
        #: :meth:`save` describe, and what engine pools key on); None for an engine
        #: built by hand without a config.
        self.plan: EnginePlan | None
        if isinstance(backend, Backend):
            if kwargs or model is not None:
                raise InvalidRequestError("pass engine arguments to the backend, not the chat")
            self._backend, self.plan = backend, _plan_of(backend)
        elif not close_engine:
            raise InvalidRequestError(
                "close_engine=False is for an engine object shared by several chats; "
                "a chat that opens its engine by name closes it"
            )
        else:
            if isinstance(backend, EnginePlan):
                if kwargs or model is not None:
                    raise InvalidRequestError(
                        "a plan holds its engine's settings: give them to plan(), not the chat"
                    )
                chosen = backend
            else:
                chosen = make_plan(backend, model, **kwargs)
            announce(chosen)
            self._backend, self.plan = open_plan(chosen), chosen
        #: Whether :meth:`close` also closes the engine. False for an engine shared by
        #: several chats (the web page's tabs, each its own conversation over one loaded
        #: model and its KV states): closing one conversation must leave the engine to
        #: the others, and whoever opened it closes it when the last one is done.
        self.close_engine = close_engine
        self.max_image_side = max_image_side or self._backend.max_image_side
        self.system = system
        #: What a turn that would not fit the context does: raise ContextOverflowError,
        #: or leave out the oldest turns (the system prompt and pictures still talked
        #: about are kept), or, as Ollama does ("truncate"), also cut the start of the
        #: newest message until the prompt leaves room for an answer (``max_tokens``,
        #: else a quarter of the context). The history itself is never changed.
        self.on_overflow: OnOverflow = on_overflow
        #: Questions with no picture anywhere in the conversation are answered from the
        #: text alone; unless this is True, each such turn issues a NoPictureWarning,
        #: because vision models then tend to describe a picture they never saw.
        self.allow_text_only = allow_text_only
        #: Called with what a turn is doing before its answer starts ("preparing
        #: pictures", "encoding picture", "reading prompt", ...; see control.py), for
        #: a spinner or a status line on slow machines.
        self.on_status = on_status
        self._history: list[Message] = []
        # One turn at a time: held by a ReplyStream from its first piece to its end (by
        # whichever threads read it) and by reset/restore/close. Not re-entrant, so that
        # the thread reading a turn cannot start a second one on the same KV cache;
        # _turn_thread says who holds it, to refuse that with a clear error.
        self._turn = threading.Lock()
        self._turn_thread: threading.Thread | None = None
        self._active: weakref.ref[ReplyStream] | None = None  # the stream holding it
        self._state = threading.Lock()  # history, system, last_reply: read or set together
        self._closed = False
        self.last_reply: Reply | None = None
        # Pictures given with attach() for the next question, until a turn keeps them.
        self._attached: list[Attachment] = []

    @classmethod
    def ollama(
        cls,
        model: str = "llava",
        host: str | None = None,
        timeout: float | None = None,
        pull: bool = False,
        **options: Any,
    ) -> VisionChat:
        """A chat through the Ollama daemon (``ollama serve``)."""
        return cls("ollama", model, host=host, timeout=timeout, pull=pull, **options)

    @classmethod
    def openai(
        cls,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> VisionChat:
        """A chat through a server speaking the OpenAI protocol (llamafile, llama-server,
        LM Studio, vLLM, Ollama's ``/v1``); no model means the only one it lists. The key
        (``api_key`` or ``OPENAI_API_KEY``) is never part of :attr:`config` nor saved."""
        return cls("openai", model, base_url=base_url, api_key=api_key, timeout=timeout, **options)

    @classmethod
    def llama_cpp(
        cls,
        model: str | os.PathLike[str] | None = None,
        mmproj: str | os.PathLike[str] | None = None,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        chat_format: str | None = None,
        **options: Any,
    ) -> VisionChat:
        """A chat with llama.cpp in this process; no model means the bundled demo model."""
        return cls(
            "llama_cpp",
            None if model is None else os.fspath(model),
            mmproj=mmproj,
            n_ctx=n_ctx,
            n_threads=n_threads,
            chat_format=chat_format,
            **options,
        )

    # -- the conversation --------------------------------------------------------

    @property
    def backend(self) -> str:
        """The engine's name: ``"ollama"`` or ``"llama_cpp"``."""
        return self._backend.name

    @property
    def engine(self) -> Backend:
        """The engine object itself, for engine-specific settings."""
        return self._backend

    @property
    def model(self) -> str:
        return self._backend.model

    @property
    def history(self) -> list[Message]:
        """The finished turns, oldest first (a copy: changing it changes nothing)."""
        return list(self._history)

    def reset(self) -> None:
        """Start a new conversation. The system prompt and options stay.

        Waits for a turn another thread is reading; in the thread reading one, finish
        or close that stream first."""
        self._clear(wait=True)

    def _clear(self, *, wait: bool) -> None:
        with self._exclusive("reset the conversation", wait=wait), self._state:
            self._history = []
            self._attached = []
            self.last_reply = None

    def attach(
        self,
        image: _images.ImageSource | None = None,
        *,
        images: Sequence[_images.ImageSource] | None = None,
    ) -> Future[None]:
        """Give the next question's pictures before the question, and return at once.

        They are prepared in the background and, on an engine that keeps its KV cache
        (llama.cpp), encoded and read into the model too, so the next :meth:`ask` or
        :meth:`stream` waits only for what is left and then reads its own words: a
        question typed while the picture is read costs little more than the typing. That
        question takes them as if given with ``image=``, before any picture of its own;
        a turn that fails leaves them attached; :meth:`reset` and :meth:`restore` drop them. Other
        engines (Ollama, OpenAI-compatible servers) get them prepared only. The future
        is done when the head start is (``.result()`` waits; it raises what preparing
        the pictures raised, which the next question raises too).
        """
        if self._closed:
            raise InvalidRequestError("this VisionChat is closed; create a new one")
        sources = ([] if image is None else [image]) + _picture_list(images)
        if not sources:
            raise InvalidRequestError("attach() needs a picture: image= or images=")
        with self._state:
            earlier = list(self._attached)
            history = list(self._history)
        own = [Message(role="system", content=self.system)] if self.system else []

        def read_ahead(prepared: tuple[PreparedImage, ...]) -> threading.Thread | None:
            pictures = tuple(i for a in earlier for i in a.images()) + prepared
            question = Message(role="user", content="", images=pictures)
            return self._backend.prefetch([*own, *history, question])

        attachment = Attachment(sources, max_side=self.max_image_side, read_ahead=read_ahead)
        with self._state:
            self._attached.append(attachment)
        return attachment.done

    def ask(
        self,
        prompt: str,
        image: _images.ImageSource | None = None,
        *,
        images: Sequence[_images.ImageSource] | None = None,
        schema: structured.Schema | None = None,
        tool: ToolSpec | None = None,
        tools: Sequence[ToolSpec] | None = None,
        **options: Any,
    ) -> Reply:
        """Ask about ``image`` (or the pictures already in the conversation) and wait.

        With ``schema``, ``reply.parsed`` is the answer checked against it, and an
        answer that does not fit raises :class:`SchemaError`; an answer cut by
        ``max_tokens`` before its JSON ended is not a misfit: ``reply.done_reason`` is
        ``"length"``, ``reply.parsed`` None and ``reply.text`` the JSON as written.

        With ``tool`` (a :class:`~llava_local.Tool`, a pydantic model class or an
        OpenAI-style function dict), or ``tools`` holding one, the model is made to
        call it: ``reply.tool_calls`` holds the call, its arguments checked against
        the tool's parameters (see :mod:`llava_local.tools`: a model not trained for
        tools cannot choose among several)."""
        request = self._request(
            prompt,
            image=image,
            images=images,
            schema=schema,
            options=options,
            stacklevel=3,
            tool=self._tool(tool, tools),
        )
        with self._open(request) as stream:
            for _ in stream:
                pass
        return stream.reply

    def stream(
        self,
        prompt: str,
        image: _images.ImageSource | None = None,
        *,
        images: Sequence[_images.ImageSource] | None = None,
        schema: structured.Schema | None = None,
        tool: ToolSpec | None = None,
        tools: Sequence[ToolSpec] | None = None,
        **options: Any,
    ) -> ReplyStream:
        """Like :meth:`ask`, but iterate the answer as it is written (a tool call's
        arguments, with ``tool``).

        Pictures and options are checked now, before anything is sent; the turn is
        kept in the history when the iteration ends. The turn starts at the first
        piece; one thread reads one turn of a chat at a time (starting another before
        this one is read to the end or closed raises :class:`InvalidRequestError`).
        """
        request = self._request(
            prompt,
            image=image,
            images=images,
            schema=schema,
            options=options,
            stacklevel=3,
            tool=self._tool(tool, tools),
        )
        return self._open(request)

    def _tool(self, tool: ToolSpec | None, tools: Sequence[ToolSpec] | None) -> Forced | None:
        """The tool a question forces, with the schema its arguments are checked
        against (the pydantic class itself when the tool is one)."""
        if tool is None and not tools:
            return None
        if tool is None:
            given = [as_tool(spec) for spec in tools or []]
            chosen = forced_tool(given, "required", self.model)
            assert chosen is not None
            spec: ToolSpec = (tools or [])[given.index(chosen)]
        else:
            spec = tool
        forced = as_tool(spec)
        is_model = isinstance(spec, type) and issubclass(spec, BaseModel)
        return Forced(forced, spec if is_model else forced.parameters)  # type: ignore[arg-type]

    def answer(
        self,
        messages: Sequence[Message],
        *,
        schema: structured.Schema | None = None,
        control: TurnControl | None = None,
        on_overflow: OnOverflow | None = None,
        **options: Any,
    ) -> ReplyStream:
        """A reply to the last message of ``messages``, a whole conversation given at once,
        as stateless HTTP APIs send it (``llava-local serve`` answers with this).

        The earlier messages stand in for the history and their system messages for the
        system prompt (the chat's own applies when they bring none); the conversation
        must end with a user message. Pictures are :class:`PreparedImage` objects
        (:func:`llava_local.images.prepare`). The chat's history is left as it is and
        the turn is not kept in it; an engine that keeps its KV cache (llama.cpp) still
        reads only what differs from the turn before, so a client that resends the
        conversation with a new question pays for the question alone. Iterate the
        stream as :meth:`stream`'s; ``control`` is the turn's stop flag when the caller
        made it first (to cancel a turn whose pictures are still being prepared);
        ``on_overflow`` replaces the chat's own for this turn (``serve``'s Ollama routes
        answer with ``"truncate"``, as Ollama does).
        """
        if on_overflow is not None and on_overflow not in _OVERFLOWS:
            raise InvalidRequestError("on_overflow must be 'error', 'drop_oldest' or 'truncate'")
        if self._closed:
            raise InvalidRequestError("this VisionChat is closed; create a new one")
        self._refuse_reentry("start another turn")
        given = list(messages)
        if not all(isinstance(m, Message) for m in given):
            raise InvalidRequestError("answer() takes a list of llava_local.Message objects")
        if not given or given[-1].role != "user":
            raise InvalidRequestError("the conversation must end with a user message")
        if not given[-1].content.strip() and not given[-1].images:
            raise InvalidRequestError("the last message has neither text nor a picture")
        side = self.max_image_side
        given = [
            m.model_copy(
                update={"images": tuple(_images.prepare(i, max_side=side) for i in m.images)}
            )
            if m.images
            else m
            for m in given
        ]
        if not self.allow_text_only and not any(m.images for m in given):
            warnings.warn(
                NoPictureWarning(
                    "no picture in this conversation: the model answers from the text "
                    "alone, and may describe a picture it never saw"
                ),
                stacklevel=2,
            )
        opts = self.options.overlay(_options(options))
        json_schema = None if schema is None else structured.json_schema(schema)
        return ReplyStream(
            self,
            given[-1],
            opts,
            schema,
            json_schema,
            control=control or TurnControl(self.on_status),
            earlier=tuple(given[:-1]),
            on_overflow=on_overflow,
        )

    def detach(self) -> None:
        """Drop the pictures attached for the next question (read ahead for nothing)."""
        with self._state:
            self._attached = []

    def _request(
        self,
        prompt: str,
        *,
        image: _images.ImageSource | None,
        images: Sequence[_images.ImageSource] | None,
        schema: structured.Schema | None,
        options: dict[str, Any],
        stacklevel: int,
        tool: Forced | None = None,
    ) -> _Request:
        """Everything about a question that is quick to check (no picture is read yet)."""
        if self._closed:
            raise InvalidRequestError("this VisionChat is closed; create a new one")
        self._refuse_reentry("start another turn")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError("the prompt must be a non-empty string")
        if tool is not None:
            if schema is not None:
                raise InvalidRequestError(
                    "pass schema= or tool=, not both: a tool's arguments follow its parameters"
                )
            schema = tool.schema
        opts = self.options.overlay(_options(options))
        json_schema = None if schema is None else structured.json_schema(schema)
        sources = ([] if image is None else [image]) + _picture_list(images)
        with self._state:
            attached = tuple(self._attached)
        if not (sources or attached) and not self.allow_text_only and not self.has_pictures:
            warnings.warn(
                NoPictureWarning(
                    "no picture in this conversation: the model answers from the text "
                    "alone, and may describe a picture it never saw; pass image=, or "
                    "allow_text_only=True for text-only questions"
                ),
                stacklevel=stacklevel,
            )
        return _Request(
            prompt,
            sources,
            opts,
            schema,
            json_schema,
            TurnControl(self.on_status),
            None if tool is None else tool.tool,
            attached,
        )

    def _open(self, request: _Request) -> ReplyStream:
        """The turn's stream, once its pictures are prepared (read, downloaded, encoded)."""
        if request.sources or request.attached:
            request.control.report(STATUS_PREPARING)
        try:
            given = tuple(i for a in request.attached for i in a.images())
        except BaseException:
            with self._state:  # a picture that cannot be read is not kept for the next
                self._attached = [a for a in self._attached if not a.failed()]
            raise
        prepared = tuple(_images.prepare(s, max_side=self.max_image_side) for s in request.sources)
        message = Message(role="user", content=request.prompt, images=given + prepared)
        return ReplyStream(
            self,
            message,
            request.options,
            request.schema,
            request.json_schema,
            control=request.control,
            tool=request.tool,
        )

    @property
    def has_pictures(self) -> bool:
        """True when a turn of the conversation so far brought a picture."""
        return any(m.images for m in self._history)

    # -- turn bookkeeping (the stream drives the turn; the chat only lends itself) ----

    def _refuse_reentry(self, action: str) -> None:
        if self._turn_thread is threading.current_thread():
            raise InvalidRequestError(
                f"cannot {action}: this thread is still reading a turn of this chat; "
                "finish that stream (read it to the end) or close() it first, e.g. "
                "with `with chat.stream(...) as stream:`"
            )

    def _begin_turn(self, stream: ReplyStream) -> None:
        """Hold the chat for ``stream``'s turn, waiting for another thread's turn."""
        self._refuse_reentry("start another turn")
        while not self._turn.acquire(timeout=_WAIT_POLL_S):
            stream.control.check()  # cancelled while waiting for the chat
        self._turn_thread = threading.current_thread()
        self._active = weakref.ref(stream)
        if self._closed:
            self._end_turn()
            raise InvalidRequestError("this VisionChat is closed; create a new one")

    def _keep_turn(self, message: Message, reply: Reply) -> None:
        """Add a finished turn to the history (called by its stream, still holding it)."""
        with self._state:
            answer = Message(role="assistant", content=reply.text)
            self._history = [*self._history, message, answer]
            self.last_reply = reply
            taken = {i.sha256 for i in message.images}  # the attachments it took are used
            self._attached = [a for a in self._attached if not a.taken_by(taken)]

    def _end_turn(self) -> None:
        """Let go of the chat (a plain lock: any thread that read the turn may)."""
        self._turn_thread = None
        self._active = None
        self._turn.release()

    @contextlib.contextmanager
    def _exclusive(self, action: str, *, wait: bool = True) -> Iterator[None]:
        """Hold the chat between turns (``wait=False``: refuse if a turn is running)."""
        self._refuse_reentry(action)
        if not self._turn.acquire(blocking=wait):
            raise InvalidRequestError(
                f"cannot {action} while a turn of this chat is running; "
                "wait for it to end, or close its stream"
            )
        self._turn_thread = threading.current_thread()
        try:
            yield
        finally:
            self._turn_thread = None
            self._turn.release()

    def _fit(
        self,
        message: Message,
        options: Options,
        json_schema: dict[str, Any] | None,
        control: TurnControl,
        earlier: Sequence[Message] | None = None,
        *,
        on_overflow: OnOverflow | None = None,
    ) -> tuple[Turn, int]:
        """The turn to send, with the oldest turns left out if it would not fit (and,
        with ``"truncate"``, the newest message's start cut); ``earlier`` is a
        conversation given instead of the history (see :meth:`answer`)."""
        own = [Message(role="system", content=self.system)] if self.system else []

        def turn_of(messages: list[Message]) -> Turn:
            return Turn(messages, options, json_schema, control)

        if earlier is None:
            system, history = own, list(self._history)
        else:
            system = [m for m in earlier if m.role == "system"] or own
            history = [m for m in earlier if m.role != "system"]
        overflow = on_overflow or self.on_overflow
        return fitting.fit(
            self._backend, system, history, message, turn_of=turn_of, overflow=overflow
        )

    # -- describing and keeping (saving.py does the work) -------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """This chat as JSON data: its engine with that engine's settings as its plan
        settled them (catalogue models and the demo by name, other files by absolute
        path), the default options and the chat's own settings; not the conversation
        (``save`` keeps that). :meth:`from_config` makes an equivalent chat from it, in
        this process or another."""
        return saving.describe(self)

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> VisionChat:
        """A chat like the one whose :attr:`config` is ``data`` (JSON data is fine)."""
        return cls(**saving.arguments(data))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the conversation, pictures included (each once), atomically as JSON.

        The model is recorded by its catalogue name when it has one (the bundled demo,
        even given by its path, or a pulled entry), so the file also loads where the
        install or the cache lives elsewhere; any other model is recorded by its paths.
        Of the engine's settings only those :meth:`load` uses again are recorded (what
        fits the context, the prompt format, a server's address); never a key, a folder
        or this machine's threads and memory.
        The in-process engine also writes its KV state beside it (``path`` + ``.kv``),
        so :meth:`load` goes on without reading the pictures and turns again.
        """
        return saving.save(self, path)

    def restore(self, path: str | os.PathLike[str]) -> None:
        """Replace this chat's conversation with a saved one; the engine stays.

        The file is read and checked whole first: a damaged file changes nothing.
        """
        saving.restore(self, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        backend: str | None = None,
        model: str | None = None,
        *,
        use_saved_address: bool = False,
        **kwargs: Any,
    ) -> VisionChat:
        """A chat that continues a saved conversation, on the engine, model and projector
        it used unless told otherwise; the saved options apply unless overridden in
        ``kwargs``. The engine's KV state saved beside it is restored when it was made
        with the same model, projector and settings, by this user (else a
        :class:`~llava_local.persist.ColdResumeWarning`
        says the conversation will be read again).

        A saved file is data, not orders: it chooses the model and what fits its
        context, never where the conversation and an API key are sent, nor keys,
        timeouts, folders, threads or memory (give those in ``kwargs``). Its pictures
        pass the checks any picture passes, and one larger than the engine takes is
        shrunk. A server's
        address comes from ``kwargs`` (``host=``, ``base_url=``), else the environment
        or the engine's default; when the file names another, InvalidRequestError says
        both and nothing is contacted. ``use_saved_address=True`` takes the file's
        address: only for a file you trust, since its conversation and your key go there.
        """
        return saving.load(
            cls, path, backend, model, use_saved_address=use_saved_address, kwargs=kwargs
        )

    # -- lifetime ----------------------------------------------------------------

    def close(self) -> None:
        """Free the model (llama.cpp) or the HTTP client (Ollama). Safe to call twice.

        Waits for a turn another thread is reading; a turn this thread left unfinished
        is closed first (it is not kept). With ``close_engine=False`` the chat ends but
        its engine, shared with other chats, stays open."""
        if self._turn_thread is threading.current_thread():
            stream = self._active() if self._active is not None else None
            if stream is not None:
                stream.close()
        with self._exclusive("close the chat"):
            if not self._closed:
                self._closed = True
                if self.close_engine:
                    self._backend.close()

    def __enter__(self) -> VisionChat:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"VisionChat(backend={self.backend!r}, model={self.model!r}, "
            f"turns={len(self._history) // 2})"
        )


def _plan_of(engine: Backend) -> EnginePlan | None:
    """The plan of an engine opened elsewhere, from its own config (None: it has none,
    or no registered engine takes it)."""
    if engine.config is None:
        return None
    try:
        spec = registry.engine_of(engine.config)
    except InvalidRequestError:
        return None
    return EnginePlan(spec, engine.config)


def _picture_list(images: Any) -> list[_images.ImageSource]:
    """``images=`` as a list; a single picture there is refused, as it would otherwise
    be read item by item (a path character by character)."""
    if images is None:
        return []
    single = (str, bytes, bytearray, memoryview, os.PathLike, dict)
    if (
        isinstance(images, single)
        or hasattr(images, "read")
        or hasattr(images, "shape")
        or (type(images).__module__.startswith("PIL."))
    ):
        raise InvalidRequestError(
            f"images= takes a list of pictures, not one {type(images).__name__}; "
            "for one picture pass image=..., or images=[...]"
        )
    try:
        return list(images)
    except TypeError:
        raise InvalidRequestError(
            f"images= takes a list of pictures, not {type(images).__name__}"
        ) from None


@dataclass(frozen=True)
class _Request:
    """A checked question whose pictures are not prepared yet (see ``VisionChat._open``)."""

    prompt: str
    sources: list[_images.ImageSource]
    options: Options
    schema: structured.Schema | None
    json_schema: dict[str, Any] | None
    control: TurnControl
    tool: Tool | None = None
    attached: tuple[Attachment, ...] = ()


@dataclass(frozen=True)
class Forced:
    """A tool a question forces, and the schema its arguments are checked against."""

    tool: Tool
    schema: structured.Schema
