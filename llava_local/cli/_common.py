"""What every command shares: engine options, opening a chat, clean error exits.

Errors from the library are printed as one line saying what to do, with exit
status 1; a usage mistake exits with 2 (click's convention) and Ctrl-C with 130.

Library messages are worded for Python callers (``mmproj=``, ``reset()``);
:func:`cli_message` is the one place that says them in the command line's terms.
Text from the library is never read as rich markup: ``pip install
'llava-local[ui]'`` must keep its ``[ui]``.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.status import Status
from rich.text import Text

from ..apps.models import pull_engines
from ..backends import engine_names, registry
from ..chat import VisionChat
from ..errors import ContextOverflowError, LlavaLocalError
from ..wording import count

F = TypeVar("F", bound=Callable[..., Any])
#: Messages on stderr: printed as they are (no markup, no line breaks added).
err_console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)

#: Python argument names in library messages, and the flags that set them here.
_FLAGS = {
    "backend": "--backend",
    "model": "--model",
    "mmproj": "--mmproj",
    "n_ctx": "--n-ctx",
    "n_threads": "--threads",
    "parallel": "--parallel",
    "chat_format": "--chat-format",
    "kv_cache_dir": "--kv-cache",
    "kv_cache_mb": "--kv-cache-mb",
    "host": "--host",
    "base_url": "--host",
    "timeout": "--timeout",
    "max_tokens": "--max-tokens",
    "force": "--force",
    "retry_errors": "--retry-errors",
    "task": "--task",
    "vary": "--vary",
    "schema": "--schema",
}
#: ``mmproj='path'``, ``n_ctx=4096``, ``force=True`` or a bare ``mmproj=``, as a word of
#: its own (never inside a path).
_ARGUMENT = re.compile(
    rf"(?<![\w./\\-])({'|'.join(_FLAGS)})=(?:'([^'\s]*)'|(\d+)\b|True\b|(?=[\s,;:)]|$))"
)
#: Advice that has no flag, said the command line's way (the Python way first).
_PHRASES = (
    (re.compile(r", or pass pull=True\b"), ""),  # `ollama pull NAME` is already said
    (re.compile(r"pass its key with api_key= or set OPENAI_API_KEY"), "set OPENAI_API_KEY"),
)


# click 8.5 made ParamType generic, older releases (still allowed) are not.
_ParamType: Any = click.ParamType


class EngineName(_ParamType):  # type: ignore[misc]
    """``--backend``: auto or any registered engine, read from the registry when used,
    so an engine registered by a plugin is accepted like the built-in ones.
    ``pulls_models`` keeps only the engines whose models ``pull`` fetches."""

    name = "engine"

    def __init__(self, *, pulls_models: bool = False) -> None:
        self.pulls_models = pulls_models

    def choices(self) -> list[str]:
        if self.pulls_models:
            return ["auto", *pull_engines()]
        return engine_names()

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return "[" + "|".join(self.choices()) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        names = self.choices()
        key = str(value).strip().replace("-", "_").lower()
        try:
            name = "auto" if key == "auto" else registry.get(key).name
        except LlavaLocalError:
            name = None
        if name not in names:
            raise click.BadParameter(
                f"{value!r} is not one of {', '.join(names)}", ctx=ctx, param=param
            ) from None
        return name


def engine_options(func: F) -> F:
    """The options that choose and configure an engine, shared by every command."""
    decorators = [
        click.option(
            "--backend",
            type=EngineName(),
            default="auto",
            show_default=True,
            help="Engine: the Ollama daemon, llama.cpp in-process, an OpenAI-compatible "
            "server (openai), or the first that works.",
        ),
        click.option(
            "--model", "-m", help="Model name (Ollama, OpenAI server), or path of a GGUF model."
        ),
        click.option("--mmproj", help="Path of the GGUF projector (llama.cpp engine)."),
        click.option(
            "--host",
            help="Ollama address (default: OLLAMA_HOST or 127.0.0.1:11434), or the "
            "OpenAI-compatible server's with --backend openai (its key: OPENAI_API_KEY).",
        ),
        click.option(
            "--timeout", type=float, help="Seconds a turn may take (Ollama, openai engines)."
        ),
        click.option("--n-ctx", type=int, help="Context window in tokens (llama.cpp engine)."),
        click.option("--threads", type=int, help="CPU threads (llama.cpp engine)."),
        click.option("--chat-format", help="Prompt format (llama.cpp engine), e.g. vicuna."),
        click.option(
            "--kv-cache",
            "kv_cache_dir",
            metavar="DIR",
            help="Keep KV states in DIR (llama.cpp engine): a picture read by an earlier "
            "run is restored, not read again.",
        ),
        click.option(
            "--force",
            is_flag=True,
            default=None,
            help="Load the model even when the memory check says it does not fit "
            "(llama.cpp engine); the system may then kill the process.",
        ),
        click.option(
            "--kv-cache-mb",
            "kv_cache_mb",
            type=click.FloatRange(0),
            metavar="MB",
            help="Memory for KV states kept between conversations (llama.cpp engine; "
            "default: half of what is free after loading; 0: none).",
        ),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def open_chat(
    *,
    backend: str,
    model: str | None,
    mmproj: str | None,
    host: str | None,
    timeout: float | None,
    n_ctx: int | None,
    threads: int | None,
    chat_format: str | None,
    **options: Any,
) -> VisionChat:
    """A :class:`VisionChat` from the command-line engine options (unset ones left out).

    An ``on_status`` callable in ``options`` is told "loading model" first.
    """
    on_status = options.get("on_status")
    if on_status is not None:
        on_status("loading model")
    engine: dict[str, Any] = {
        "mmproj": mmproj,
        "host": host,
        "timeout": timeout,
        "n_ctx": n_ctx,
        "n_threads": threads,
        "chat_format": chat_format,
    }
    given = {k: v for k, v in {**engine, **options}.items() if v is not None}
    kwargs = registry.address_settings(backend, given)
    return VisionChat(backend, model, **kwargs)


class StatusLine:
    """What a turn does before its first token ("loading model", "encoding picture"),
    as a spinner on stderr; on a CPU that can take a minute, and silence looks like a
    hang. Off when stderr is not a terminal or with ``--quiet``."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and err_console.is_terminal
        self._status: Status | None = None

    def __call__(self, text: str) -> None:
        """Show ``text`` (a chat's ``on_status``); "answering" ends the line."""
        if not self.enabled:
            return
        if text == "answering":
            self.stop()
        elif self._status is None:
            self._status = err_console.status(Text(f"{text}..."), spinner="dots")
            self._status.start()
        else:
            self._status.update(Text(f"{text}..."))

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def json_option(what: str) -> Callable[[F], F]:
    """``--json``: ``what`` is printed as JSON on stdout, and so is an error, as
    ``{"error": {"type": "ImageError", "message": "..."}}`` with exit status 1 (stdout
    is the one stream a script reads; stderr keeps notices for the person)."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help=f'{what} An error too, as {{"error": {{"type", "message"}}}} (exit status 1).',
    )


def quiet_option(func: F) -> F:
    """``--quiet``: no status line on stderr while the model loads and reads."""
    return click.option(
        "--quiet", "-q", is_flag=True, help="No status line while loading and reading."
    )(func)


def cli_message(exc: LlavaLocalError, *, one_shot: bool = False) -> str:
    """``exc``'s message in the command line's terms: flags instead of Python arguments.

    ``one_shot`` is for commands without a conversation (``ask``): there a turn that
    does not fit the context is the prompt's own length, not earlier turns.
    """
    if isinstance(exc, ContextOverflowError) and exc.needed and exc.available:
        return _overflow(exc, one_shot=one_shot)
    text = str(exc)
    for pattern, replacement in _PHRASES:
        text = pattern.sub(replacement, text)
    if isinstance(exc, ContextOverflowError):  # a server's, without numbers
        text = text.replace(" (reset())", " (/reset)" if _in_chat() else "")

    command = _command()
    options = _option_names(command) if command is not None else set(_FLAGS.values())

    def flag(match: re.Match[str]) -> str:
        value = match.group(2) or match.group(3)
        name = _FLAGS[match.group(1)]
        if name not in options:  # a setting this command has no flag for: its name only
            name = match.group(1)
        return name + (f" {value}" if value else "")

    return _ARGUMENT.sub(flag, text)


def _overflow(exc: ContextOverflowError, *, one_shot: bool) -> str:
    """A turn too long for the context window, with what to do here: the flag that sizes
    the window, and ``/reset`` in ``chat``."""
    needed, available = exc.needed, exc.available
    setting = _FLAGS.get(exc.setting or "")
    suggest = 2 ** math.ceil(math.log2(needed + 256))
    larger = (
        f"raise {setting} above {needed} (e.g. {setting} {suggest})"
        if setting
        else "give the server a larger context"
    )
    alone = "the picture alone needs" if one_shot else "the pictures alone need"
    if exc.pictures >= available:
        return (
            f"{alone} {count(exc.pictures, 'position')} but the context window holds "
            f"{available}: {larger}"
        )
    takes = "the picture takes" if one_shot else "the pictures take"
    pictures = f"; {takes} {exc.pictures}" if exc.pictures else ""
    if one_shot or not _in_chat():
        return (
            f"this question needs {count(needed, 'token')} (prompt, pictures and room to "
            f"answer{pictures}) but the context window holds {available}: shorten the "
            f"prompt, or {larger}"
        )
    return (
        f"this turn needs {count(needed, 'token')} with the conversation before it (room "
        f"to answer included{pictures}) but the context window holds {available}: /reset "
        f"to start a new conversation, ask a shorter question, or start again and {larger}"
    )


def _command() -> click.Command | None:
    """The command running (the one printing), if any."""
    context = click.get_current_context(silent=True)
    return None if context is None else context.command


def _option_names(command: click.Command) -> set[str]:
    """The flags ``command`` takes (``--n-ctx``, ``-m``, ...)."""
    return {name for param in command.params for name in getattr(param, "opts", ())}


def _in_chat() -> bool:
    """Whether the command printing is the ``chat`` REPL (which has ``/reset``)."""
    command = _command()
    return command is not None and command.name == "chat"


def print_error(
    exc: LlavaLocalError, console: Console | None = None, *, one_shot: bool = False
) -> None:
    """Print ``error: MESSAGE`` with the message exactly as :func:`cli_message` says it."""
    line = Text.assemble(("error:", "bold red"), " ", cli_message(exc, one_shot=one_shot))
    (console or err_console).print(line, soft_wrap=True)


def run_safely(
    action: Callable[[], None], *, one_shot: bool = False, as_json: bool = False
) -> None:
    """Run a command body, turning library errors and Ctrl-C into clean exits.

    ``one_shot``: the command asks one question with no conversation before it.
    ``as_json``: the command's ``--json``; an error is then printed as JSON on stdout.
    """
    try:
        action()
    except LlavaLocalError as exc:
        if as_json:
            error = {"type": type(exc).__name__, "message": cli_message(exc, one_shot=one_shot)}
            click.echo(json.dumps({"error": error}, indent=2, ensure_ascii=False))
        else:
            print_error(exc, one_shot=one_shot)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
