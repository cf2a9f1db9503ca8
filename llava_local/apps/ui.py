"""``llava-local ui``: a local web page to chat about a picture, like the LLaVA Gradio demo.

Upload, paste or take a picture, ask about it and watch the answer stream in; start a
new conversation, switch engine and model, and read the last answer's timings.

Why it is built this way:

* Gradio is an optional extra (``pip install 'llava-local[ui]'``), imported only here
  and only when a page is built.
* The page must work on an offline machine (a Raspberry Pi on a shelf): no analytics,
  no version check, no share link, no run history, the default theme's fonts are served
  by the page itself, and nothing it loads comes from another host.
* Each browser tab gets its own :class:`~llava_local.VisionChat`, opened with the first
  question (an idle tab loads no model) and closed when the tab goes away. The tabs
  share the engine through an engine pool (:mod:`.engines`): one per plan, so choices
  that mean the same files (``auto`` and ``llama_cpp``, no model and ``demo``, a path
  and a catalogue name) are one engine, loaded once and closed when the last tab using
  it goes (or the page stops). Two tabs then cost one model's memory, and taking turns
  restores each conversation's KV state from the engine's prefix cache instead of
  reading its pictures again.
* Who may use the page is :mod:`.ui_access`'s job: a ``Host`` check against DNS
  rebinding on every address, an ``Origin`` check against other web pages' requests,
  and a login required beyond loopback. What an upload may cost, and how long Gradio
  keeps it, is :mod:`.ui_uploads`'s; that the picture box takes nothing but an upload
  (no ``data:`` or remote URL, which Gradio would decode or download first) is
  :mod:`.ui_picture`'s.
* A turn runs in a thread of its own: ``VisionChat`` holds its lock for the whole
  answer, and Gradio would otherwise step the answer from a different worker thread
  each time. One answer is written at a time, across all tabs: on a CPU, two at once
  only make both slower.

This module deliberately has no ``from __future__ import annotations``: Gradio finds the
``gr.Request`` parameter of a handler by resolving its annotations at run time.
"""

import hashlib
import os
import queue
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

from ..backends import engine_names, registry
from ..chat import VisionChat
from ..errors import (
    BackendError,
    LlavaLocalError,
    MissingDependencyError,
    NoPictureWarning,
    TurnCancelledError,
)
from ..stream import ReplyStream
from ..types import Reply
from .engines import EnginePool, split_settings
from .ui_access import Login, check_exposure, launch_options
from .ui_logins import login_throttle
from .ui_uploads import DELETE_CACHE, MAX_PICTURE_MB, upload_limits

if TYPE_CHECKING:
    import gradio as gr

__all__ = ["build_app", "launch"]

_TITLE = "llava-local"
_CSS = """
#llava-status p { margin: 0; }
#llava-stats table { font-size: 0.85em; }
#llava-chat button[aria-label="Share"] { display: none; }  /* would upload to the Hub */
"""
#: Settings of Gradio's ``launch()`` that keep the page local and quiet.
_LAUNCH_OPTIONS: dict[str, Any] = {
    "share": False,
    "quiet": True,
    "show_error": False,
    "footer_links": [],
    "run_history": False,
    "enable_monitoring": False,
    "mcp_server": False,
    "pwa": False,
    "ssr_mode": False,
    "num_workers": 0,  # file workers on ports of their own would skip the Host check
    "css": _CSS,
}
_MESSAGE = dict[str, Any]


def _gradio() -> ModuleType:
    """Gradio, with its telemetry switched off before it is imported."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    try:
        import gradio
    except ImportError as exc:
        raise MissingDependencyError(
            "the web page needs Gradio: pip install 'llava-local[ui]'"
        ) from exc
    return gradio


# -- one tab's conversation ----------------------------------------------------------


NO_PICTURE = "no picture yet: the answer comes from the question alone (add a picture)"


class _Session:
    """One browser tab: its engine settings, its chat (opened on first use, over the
    engine it shares with the tabs that chose the same one), and what the chat window
    shows, which changes only when a turn finishes, like the history."""

    def __init__(self, engine: dict[str, Any], engines: EnginePool | None = None) -> None:
        self.engine = dict(engine)
        self.engines = engines or EnginePool()
        self.chat: VisionChat | None = None
        self.messages: list[_MESSAGE] = []
        self.seen_picture: str | None = None  # sha256 of the picture the model has
        self.attached: str | None = None  # sha256 of the picture attached to the chat
        self.reading: Future[None] | None = None  # its head start (done when read)
        self.lock = threading.Lock()  # held by the turn running now
        self.stop = threading.Event()  # asks the running turn to stop
        self.stream: ReplyStream | None = None  # the running turn, to cancel mid-encoding
        self.closed = False

    def open(self) -> VisionChat:
        """The chat, opened now if needed (call with the lock held)."""
        if self.closed:
            raise BackendError("this page's session has ended; reload the page")
        if self.chat is None:
            self.chat = self.engines.chat_for(self.engine)
        return self.chat

    def cancel_turn(self) -> None:
        """Ask the running turn to stop now, even in the middle of a picture's encoding."""
        self.stop.set()
        stream = self.stream
        if stream is not None:
            stream.cancel()

    def interrupt(self) -> None:
        """Stop the running turn, if any, and wait until it has let go of the chat."""
        self.cancel_turn()
        self.lock.acquire()
        self.lock.release()

    def reset(self) -> None:
        """A new conversation with the same engine."""
        self.interrupt()
        with self.lock:
            if self.chat is not None:
                self.chat.reset()
            self.messages, self.seen_picture, self.attached = [], None, None

    def switch(self, engine: dict[str, Any]) -> VisionChat:
        """Another engine or model: the old chat is closed (and its share of the engine
        given back), the new one opened and checked now, so that a wrong model, path or
        address shows at once. The same engine again is a new conversation on it."""
        self.interrupt()
        with self.lock:
            chosen, _ = split_settings(engine)  # the engine the choice means, not yet open
            old = self.chat if self.chat is not None and self.chat.plan == chosen else None
            if old is None:  # let go first: two models at once may not fit in memory
                self._close_chat()
            self.chat, self.engine, self.messages, self.seen_picture = None, dict(engine), [], None
            self.attached = None
            try:
                chat = self.open()
            finally:
                if old is not None:  # kept the engine open until the new chat had it
                    self.engines.release(old)
            try:
                chat.engine.check()  # a server's engine: it answers, has the model, sees
            except LlavaLocalError:
                self._close_chat()
                raise
            return chat

    def close(self) -> None:
        self.interrupt()
        with self.lock:
            self.closed = True
            self._close_chat()

    def _close_chat(self) -> None:
        chat, self.chat = self.chat, None
        if chat is not None:
            self.engines.release(chat)

    def attach(self, picture: str | None) -> None:
        """A picture just uploaded: the engine starts reading it while the question is
        typed (:meth:`VisionChat.attach`), opening the tab's engine first if needed.
        Skipped while a turn runs: the question then sends the picture itself."""
        sha = _sha256(picture) if picture else None
        if picture is None or sha is None or sha in (self.seen_picture, self.attached):
            return
        if not self.lock.acquire(blocking=False):
            return
        try:
            self.reading = self.open().attach(picture)
            self.attached = sha
        except LlavaLocalError:
            pass  # the question sends the picture and reports what is wrong with it
        finally:
            self.lock.release()

    def new_picture(self, picture: str | None) -> str | None:
        """The picture to send with the next question: None when the model has it."""
        return picture if picture and _sha256(picture) != self.seen_picture else None

    def turn(self, prompt: str, image: str | None) -> Iterator[tuple[str, str]]:
        """``(answer so far, what the turn is doing)``, each time one changes. The engine
        runs in a thread of its own; leaving this iterator early stops it at once."""
        pieces: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.interrupt()
        self.stop = threading.Event()
        threading.Thread(
            target=self._work,
            args=(prompt, image, pieces, self.stop),
            name="llava-local-ui-turn",
            daemon=True,
        ).start()
        text, status, note = "", "", ""
        try:
            while True:
                kind, value = pieces.get()
                if kind == "piece":
                    text += value
                elif kind == "status":
                    status = "" if value == "answering" else value
                elif kind == "note":
                    note = value
                elif kind == "error":
                    raise value
                else:
                    return
                yield text, " · ".join(filter(None, [status, note]))
        finally:
            self.cancel_turn()

    def _work(
        self,
        prompt: str,
        image: str | None,
        pieces: queue.Queue[tuple[str, Any]],
        stop: threading.Event,
    ) -> None:
        """The turn itself, in its own thread; what happens goes into ``pieces``."""
        try:
            with self.lock:
                if stop.is_set():  # stopped before it could start
                    pieces.put(("stopped", None))
                    return
                chat = self.open()
                chat.on_status = lambda status: pieces.put(("status", status))
                if image is None and not chat.has_pictures:
                    pieces.put(("note", NO_PICTURE))
                given = image  # a picture attached on upload is in the chat already
                if self.attached is not None:
                    if image is not None and _sha256(image) == self.attached:
                        given = None
                    else:  # replaced or removed since: not for this question
                        chat.detach()
                        self.attached = None
                with warnings.catch_warnings():  # said on the page instead
                    warnings.simplefilter("ignore", NoPictureWarning)
                    stream = chat.stream(prompt, given)
                self.stream = stream
                with stream:
                    for piece in stream:
                        if stop.is_set():
                            pieces.put(("stopped", None))
                            return
                        pieces.put(("piece", piece))
                reply = stream.reply
                self.messages += [*_user_messages(prompt, image), _text("assistant", reply.text)]
                if image is not None:
                    self.seen_picture = _sha256(image)
                    self.attached = None
            pieces.put(("done", reply))
        except TurnCancelledError:
            pieces.put(("stopped", None))
        except LlavaLocalError as exc:
            pieces.put(("error", exc))
        except Exception as exc:  # a bug must reach the page as text, not kill the turn
            pieces.put(("error", BackendError(f"unexpected failure: {exc!r}")))
        finally:
            self.stream = None

    @property
    def last_reply(self) -> Reply | None:
        return None if self.chat is None else self.chat.last_reply


class _Sessions:
    """The tabs' sessions, by Gradio's session hash, and the engines they share."""

    def __init__(self, engine: dict[str, Any], engines: EnginePool | None = None) -> None:
        self.engine = engine
        self.engines = engines or EnginePool()
        self._own_pool = engines is None  # then its engines are the page's alone
        self._by_id: dict[str, _Session] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str | None) -> _Session:
        with self._lock:
            key = session_id or ""
            if key not in self._by_id:
                self._by_id[key] = _Session(self.engine, self.engines)
            return self._by_id[key]

    def end(self, session_id: str | None) -> None:
        with self._lock:
            session = self._by_id.pop(session_id or "", None)
        if session is not None:
            session.close()

    def close_all(self) -> None:
        with self._lock:
            sessions, self._by_id = list(self._by_id.values()), {}
        for session in sessions:
            session.close()
        if self._own_pool:
            self.engines.close_all()  # none should be left; a tab still opening one, say


_SESSIONS: "weakref.WeakKeyDictionary[gr.Blocks, _Sessions]" = weakref.WeakKeyDictionary()


# -- the page -------------------------------------------------------------------------


def build_app(
    backend: str = "auto",
    model: str | None = None,
    *,
    engines: EnginePool | None = None,
    **engine: Any,
) -> "gr.Blocks":
    """The page, not yet started: for mounting in another app or launching yourself.

    ``backend``, ``model`` and ``engine`` are :class:`~llava_local.VisionChat`
    arguments (``mmproj=``, ``host=``, ``n_threads=``, ``temperature=`` ...): the
    starting engine of every tab; the page can change backend, model, projector and
    Ollama address per tab. ``engines``: the pool its tabs open engines in (default:
    one of its own; :func:`~.engines.shared_pool` shares them with ``serve`` in the
    same process). The pictures uploaded to it are deleted when it stops (and a week
    after upload). :func:`launch` starts it with the offline settings and the upload
    limits.
    """
    gr: Any = _gradio()
    start = {"backend": backend, "model": model, **engine}
    sessions = _Sessions(start, engines)
    on = _handlers(gr, sessions, start)
    with gr.Blocks(title=_TITLE, analytics_enabled=False, delete_cache=DELETE_CACHE) as app:
        w = _layout(gr, start)
        turn = gr.on(
            [w.question.submit, w.send.click],
            on.respond,
            inputs=[w.question, w.picture],
            outputs=[w.chatbot, w.question, w.stats, w.status],
            show_progress="minimal",
            concurrency_id="engine",
            concurrency_limit=1,
        )
        w.new.click(
            on.new_conversation, outputs=[w.chatbot, w.question, w.stats, w.status], cancels=[turn]
        )
        w.chatbot.clear(on.new_conversation, outputs=[w.chatbot, w.question, w.stats, w.status])
        w.stop.click(on.stop, outputs=[w.chatbot, w.status], cancels=[turn], queue=False)
        gr.on(
            [w.use.click, w.model.submit, w.mmproj.submit, w.host.submit],
            on.use_engine,
            inputs=[w.backend, w.model, w.mmproj, w.host],
            outputs=[w.chatbot, w.stats, w.status],
            cancels=[turn],
            concurrency_id="engine",
        )
        w.picture.upload(on.picture, inputs=[w.picture], queue=False)
        app.unload(on.end)
    _SESSIONS[app] = sessions
    return app  # type: ignore[no-any-return]


class _Handlers(NamedTuple):
    respond: Callable[..., Iterator[tuple[Any, ...]]]
    new_conversation: Callable[..., tuple[Any, ...]]
    stop: Callable[..., tuple[Any, ...]]
    use_engine: Callable[..., tuple[Any, ...]]
    end: Callable[..., None]
    picture: Callable[..., None]


def _handlers(gr: Any, sessions: _Sessions, start: dict[str, Any]) -> _Handlers:
    """What the page's buttons do. Each handler finds its tab's session from the
    ``gr.Request`` Gradio passes it (found by the annotation, hence closures over
    ``gr``)."""

    def respond(text: str, picture: str | None, request: gr.Request) -> Iterator[tuple[Any, ...]]:
        """One turn: the question shows at once, then the answer as it is written."""
        session = sessions.get(request.session_hash)
        prompt = (text or "").strip()
        if not prompt:
            yield gr.skip(), gr.skip(), gr.skip(), "Type a question about the picture first."
            return
        image = session.new_picture(picture)
        asked = [*session.messages, *_user_messages(prompt, image)]
        yield asked, "", gr.skip(), f"{_engine_line(session)} · answering…"
        try:
            for answer, doing in session.turn(prompt, image):
                # "answering" stays on the line until the turn ends: the page's own cue.
                line = f"{_engine_line(session)} · answering… ({doing})" if doing else gr.skip()
                yield [*asked, _text("assistant", answer)], gr.skip(), gr.skip(), line
        except LlavaLocalError as exc:
            error = f"**Error:** {_escape(str(exc))}"
            yield [*asked, _text("assistant", error)], text, gr.skip(), error
            return
        stats = _stats_markdown(session.last_reply)
        yield list(session.messages), gr.skip(), stats, _engine_line(session)

    def new_conversation(request: gr.Request) -> tuple[Any, ...]:
        session = sessions.get(request.session_hash)
        session.reset()
        return [], "", _stats_markdown(None), f"{_engine_line(session)} · new conversation"

    def stop(request: gr.Request) -> tuple[Any, ...]:
        session = sessions.get(request.session_hash)
        if not session.lock.locked():
            return gr.skip(), gr.skip()
        session.cancel_turn()
        shown = list(session.messages)
        return shown, f"{_engine_line(session)} · stopped; that answer was not kept"

    def use_engine(
        backend: str, model: str, mmproj: str, host: str, request: gr.Request
    ) -> tuple[Any, ...]:
        session = sessions.get(request.session_hash)
        try:
            session.switch(_engine_choice(start, backend, model, mmproj, host))
        except LlavaLocalError as exc:
            return [], _stats_markdown(None), f"**Error:** {_escape(str(exc))}"
        return [], _stats_markdown(None), f"{_engine_line(session)} · ready"

    def end(request: gr.Request) -> None:
        sessions.end(request.session_hash)

    def picture(picture: str | None, request: gr.Request) -> None:
        sessions.get(request.session_hash).attach(picture)

    return _Handlers(respond, new_conversation, stop, use_engine, end, picture)


class _Widgets(NamedTuple):
    picture: Any
    backend: Any
    model: Any
    mmproj: Any
    host: Any
    use: Any
    stats: Any
    chatbot: Any
    question: Any
    send: Any
    new: Any
    stop: Any
    status: Any


def _layout(gr: Any, start: dict[str, Any]) -> _Widgets:
    """The page: picture, engine and timings on the left, the conversation on the right."""
    from .ui_picture import Picture  # subclasses gr.Image: imported once Gradio is

    gr.Markdown("## llava-local\nAsk a vision-language model about a picture, on this computer.")
    with gr.Row():
        with gr.Column(scale=2, min_width=280):
            picture = Picture(
                label="Picture: upload, paste or take one",
                type="filepath",
                image_mode=None,  # the file as uploaded: images.prepare() does the rest
                sources=["upload", "clipboard", "webcam"],
                elem_id="llava-picture",
                height=300,
                buttons=["fullscreen"],
            )
            with gr.Accordion("Engine and model", open=False, elem_id="llava-engine"):
                backend = gr.Dropdown(
                    engine_names(), value=start["backend"], label="Engine", elem_id="llava-backend"
                )
                model = gr.Textbox(
                    value=str(start["model"] or ""),
                    label="Model: Ollama name or GGUF path (empty: the default)",
                    elem_id="llava-model",
                )
                mmproj = gr.Textbox(
                    value=str(start.get("mmproj") or ""),
                    label="Projector GGUF path (llama.cpp)",
                    elem_id="llava-mmproj",
                )
                host = gr.Textbox(
                    value=str(start.get("host") or ""),
                    label="Ollama address (empty: OLLAMA_HOST or 127.0.0.1:11434)",
                    elem_id="llava-host",
                )
                use = gr.Button("Use this engine", elem_id="llava-use-engine")
            stats = gr.Markdown(_stats_markdown(None), elem_id="llava-stats")
        with gr.Column(scale=3, min_width=320):
            chatbot = gr.Chatbot(
                label="Conversation",
                elem_id="llava-chat",
                height=440,
                buttons=["copy"],
                feedback_options=None,
                placeholder="Add a picture, then ask about it.",
            )
            with gr.Row():
                question = gr.Textbox(
                    placeholder="Ask about the picture, then press Enter",
                    show_label=False,
                    scale=5,
                    elem_id="llava-question",
                    autofocus=True,
                )
                send = gr.Button("Send", variant="primary", scale=1, elem_id="llava-send")
            with gr.Row():
                new = gr.Button("New conversation", elem_id="llava-new")
                stop = gr.Button("Stop", elem_id="llava-stop")
            status = gr.Markdown(
                f"{_describe(start)} · starts with the first question", elem_id="llava-status"
            )
    return _Widgets(
        picture,
        backend,
        model,
        mmproj,
        host,
        use,
        stats,
        chatbot,
        question,
        send,
        new,
        stop,
        status,
    )


def launch(
    bind: str = "127.0.0.1",
    port: int = 7860,
    *,
    on_ready: Callable[[str], None] | None = None,
    auth: Login | None = None,
    allow_hosts: Sequence[str] = (),
    no_auth: bool = False,
    max_picture_mb: float = MAX_PICTURE_MB,
    **engine: Any,
) -> None:
    """Serve the page on ``bind:port`` until Ctrl-C or SIGTERM; ``engine`` as for
    :func:`build_app`.

    ``bind`` is the web server's address (``host=`` stays the Ollama address, as
    everywhere in llava-local); the default serves this computer only. ``auth``, a
    ``(user, password)`` pair, puts the page behind Gradio's login; beyond loopback it
    is required unless ``no_auth`` is True (anyone who can reach the machine may then
    use the page and all it can do: see :mod:`.ui_access`). The page answers requests
    naming it ``localhost`` or an address of this machine (its names too beyond
    loopback) in their ``Host`` header, and ``allow_hosts`` (``*.example.com``, ``*``);
    others get 403. An upload over ``max_picture_mb`` is refused (413) before it is
    stored (see :mod:`.ui_uploads`). ``on_ready`` gets the page's address once it is
    served (default: print it). Every tab's engine is closed on the way out.
    """
    check_exposure(bind, auth, no_auth=no_auth)
    app = build_app(**engine)
    options = launch_options(bind, allow_hosts, auth)  # the Host check and the login
    limits = upload_limits(max_picture_mb)
    options["app_kwargs"]["middleware"].append(limits.middleware)  # after the Host check
    if auth is not None:  # a few wrong passwords per address and minute
        options["app_kwargs"]["middleware"].append(login_throttle())
    gr = _gradio()
    stopping = _stop_on_sigterm()
    try:
        app.launch(
            server_name=bind,
            server_port=port,
            prevent_thread_lock=True,
            theme=gr.themes.Default(),  # its fonts ship with Gradio: nothing from Google
            max_file_size=limits.max_file_size,
            **_LAUNCH_OPTIONS,
            **options,
        )
        url = f"http://{'127.0.0.1' if bind in ('0.0.0.0', '') else bind}:{port}/"
        if on_ready is None:
            print(f"llava-local ui: open {url} (Ctrl-C stops it)", flush=True)
        else:
            on_ready(url)
        while app.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
        close_sessions(app)
        stopping()


def _stop_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM (``systemctl stop``, ``kill``) stop the page as Ctrl-C does, so the
    engines are closed; returns what puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def close_sessions(app: "gr.Blocks") -> None:
    """Close every tab's chat and every engine of a page made by :func:`build_app`."""
    sessions = _SESSIONS.pop(app, None)
    if sessions is not None:
        sessions.close_all()


# -- helpers --------------------------------------------------------------------------


def _engine_choice(
    start: dict[str, Any], backend: str, model: str, mmproj: str, host: str
) -> dict[str, Any]:
    """The VisionChat arguments for the page's fields: the starting settings with the
    fields on top, less what the chosen engine would refuse."""
    fields = {
        "backend": backend or "auto",
        "model": model.strip() or None,
        "mmproj": mmproj.strip() or None,
        "host": host.strip() or None,
    }
    chosen = str(fields["backend"])
    given = {
        key: value
        for key, value in {**start, **fields}.items()
        if key in ("backend", "model") or value is not None
    }
    if chosen == "auto":
        return given
    given = registry.address_settings(chosen, given)
    takes = _settings_of(chosen)
    others = {s for other in registry.names() if other != chosen for s in _settings_of(other)}
    return {key: value for key, value in given.items() if key in takes or key not in others}


def _settings_of(engine: str) -> set[str]:
    config = registry.get(engine).config
    return {*config.setting_names(), *config.runtime_names()}


def _describe(engine: dict[str, Any]) -> str:
    """The engine as chosen, before it is opened."""
    model = engine.get("model") or "default model"
    return f"Engine: **{engine.get('backend') or 'auto'}** · {_escape(str(model))}"


def _engine_line(session: _Session) -> str:
    """The engine in use (once opened, ``auto`` shows what it chose)."""
    chat = session.chat
    if chat is None:
        return _describe(session.engine)
    return f"Engine: **{chat.backend}** · {_escape(chat.model)}"


def _stats_markdown(reply: Reply | None) -> str:
    """The last answer's token counts and timings, as a small table."""
    if reply is None:
        return "**Last answer:** none yet"
    s = reply.stats
    rate = s.decode_tokens_per_s
    cells = {
        "prompt tokens": _or_dash(s.prompt_tokens),
        "cached tokens": _or_dash(s.cached_tokens),
        "pictures encoded": _or_dash(s.images_encoded),
        "answer tokens": _or_dash(s.completion_tokens),
        "first token": _seconds(s.first_token_s),
        "total": _seconds(s.total_s),
        "decode": "-" if rate is None else f"{rate:.1f} tok/s",
    }
    if s.image_encode_s is not None:
        cells["picture encode"] = _seconds(s.image_encode_s)
    rows = "\n".join(f"| {name} | {value} |" for name, value in cells.items())
    return f"| Last answer | |\n|---|---:|\n{rows}"


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _text(role: str, content: str) -> _MESSAGE:
    return {"role": role, "content": content}


def _user_messages(prompt: str, image: str | None) -> list[_MESSAGE]:
    """The user's turn as the chat window shows it: the picture (when new), the text."""
    shown = [{"role": "user", "content": {"path": image}}] if image else []
    return [*shown, _text("user", prompt)]


def _escape(text: str) -> str:
    """Text shown as Markdown as written (paths have ``_`` and ``*``); a command in
    backquotes, as the library's errors write them, still shows as code."""
    for char in "\\*_[]<>#|":
        text = text.replace(char, "\\" + char)
    return text


def _sha256(path: str) -> str | None:
    """The picture's content hash, so a picture already sent is not sent again."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None
