"""What every command shares: engine options, opening a chat, clean error exits.

Errors from the library are printed as one line saying what to do, with exit
status 1; a usage mistake exits with 2 (click's convention) and Ctrl-C with 130.

Library messages are worded for Python callers (``mmproj=``, ``reset()``);
:func:`cli_message` is the one place that says them in the command line's terms.
Text from the library is never read as rich markup: ``pip install
'llava-local[ui]'`` must keep its ``[ui]``.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.status import Status
from rich.text import Text

from ..apps.models import pull_engines
from ..backends import EnginePlan, engine_names, plan, registry
from ..backends.spec import EngineSpec, Flag
from ..chat import VisionChat
from ..errors import ContextOverflowError, LlavaLocalError
from ..wording import count

F = TypeVar("F", bound=Callable[..., Any])
#: Messages on stderr: printed as they are (no markup, no line breaks added).
err_console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)

#: Python argument names in library messages that are not engine settings, and the
#: flags that set them here (the engines' own come from their configs: :func:`flags`).
_COMMAND_FLAGS = {
    "backend": "--backend",
    "model": "--model",
    "parallel": "--parallel",
    "max_tokens": "--max-tokens",
    "retry_errors": "--retry-errors",
    "task": "--task",
    "vary": "--vary",
    "schema": "--schema",
    "auth": "--auth",
    "no_auth": "--no-auth",
}
#: Advice that has no flag, said the command line's way (the Python way first).
_PHRASES = (
    (re.compile(r", or pass pull=True\b"), ""),  # `ollama pull NAME` is already said
    (re.compile(r"pass its key with api_key= or set OPENAI_API_KEY"), "set OPENAI_API_KEY"),
    (re.compile(r"\btemperature=None\b"), "--temperature default"),  # eval's samples
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


@dataclass(frozen=True)
class EngineFlag:
    """One command line option for engine settings: the engines' flags (their configs'
    :func:`~llava_local.backends.spec.setting` fields) merged by option, so ``--timeout``
    serves the Ollama and openai engines and ``--host`` fills each engine's address."""

    option: str
    #: The keyword the command receives: the setting's name (``n_threads`` for
    #: ``--threads``), or ``host`` for engines' addresses (see ``address_settings``).
    param: str
    #: Each setting it fills, by engine.
    settings: tuple[tuple[str, str], ...]
    help: str
    type: str
    metavar: str | None
    minimum: float | None

    def click_option(self) -> Callable[[F], F]:
        kinds: dict[str, Any] = {"int": int, "float": float, "str": str}
        extra: dict[str, Any] = {"metavar": self.metavar} if self.metavar else {}
        if self.type == "bool":
            extra.update(is_flag=True, default=None)
        elif self.minimum is not None and self.type == "int":
            extra["type"] = click.IntRange(min=int(self.minimum))
        elif self.minimum is not None and self.type == "float":
            extra["type"] = click.FloatRange(min=self.minimum)
        else:
            extra["type"] = kinds[self.type]
        return click.option(self.option, self.param, help=self.help, **extra)


@functools.cache
def flags() -> tuple[EngineFlag, ...]:
    """The engines' command line options, read from the registered engines' configs
    (plugins' too). An option two engines use for different settings is one option only
    when both are their server's address (``host``); otherwise the first engine keeps it."""
    by_option: dict[str, list[tuple[EngineSpec, Flag]]] = {}
    for spec in registry.specs():
        for flag in spec.config.flags():
            by_option.setdefault(flag.option, []).append((spec, flag))
    found = []
    for option, given in by_option.items():
        first = given[0][1]
        if all(flag.setting == spec.address for spec, flag in given) and len(given) > 1:
            param = "host"
        else:
            param = first.setting
            given = [(s, f) for s, f in given if f.setting == first.setting]  # noqa: PLW2901
        users = [(s, f) for s, f in given if f.type == first.type]
        texts: dict[str, list[str]] = {}
        for spec, flag in users:
            texts.setdefault(flag.help, []).append(spec.name)
        if len(texts) == 1:
            names = next(iter(texts.values()))
            engines = "engine" if len(names) == 1 else "engines"
            text = f"{first.help} ({', '.join(names)} {engines})."
        else:
            text = "; ".join(f"{', '.join(names)}: {help}" for help, names in texts.items()) + "."
        found.append(
            EngineFlag(
                option=option,
                param=param,
                settings=tuple((spec.name, flag.setting) for spec, flag in users),
                help=text,
                type=first.type,
                metavar=first.metavar,
                minimum=first.minimum,
            )
        )
    return tuple(found)


def flag_names() -> dict[str, str]:
    """Every Python argument name library messages use, and the flag that sets it here."""
    names = dict(_COMMAND_FLAGS)
    for flag in flags():
        for _, setting in flag.settings:
            names.setdefault(setting, flag.option)
    return names


@functools.cache
def _argument() -> re.Pattern[str]:
    """``mmproj='path'``, ``n_ctx=4096``, ``force=True`` or a bare ``mmproj=``, as a word
    of its own (never inside a path)."""
    names = "|".join(map(re.escape, flag_names()))
    return re.compile(rf"(?<![\w./\\-])({names})=(?:'([^'\s]*)'|(\d+)\b|True\b|(?=[\s,;:)]|$))")


def engine_options(func: F) -> F:
    """The options that choose and configure an engine, shared by every command:
    ``--backend``, ``--model``, then each engine's own flags (:func:`flags`)."""
    decorators = [
        click.option(
            "--backend",
            type=EngineName(),
            default="auto",
            show_default=True,
            help="Engine: the Ollama daemon, llama.cpp in-process, an OpenAI-compatible "
            "server (openai), another installed engine, or the first that works.",
        ),
        click.option(
            "--model", "-m", help="Model name (Ollama, OpenAI server), or path of a GGUF model."
        ),
        *(flag.click_option() for flag in flags()),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def engine_plan(backend: str, model: str | None, **engine: Any) -> EnginePlan:
    """The plan for the command line's engine options (unset ones left out; ``--host``
    as the chosen engine's address setting)."""
    given = {k: v for k, v in engine.items() if v is not None}
    return plan(backend, model, **registry.address_settings(backend, given))


def open_chat(*, backend: str, model: str | None, **options: Any) -> VisionChat:
    """A :class:`VisionChat` from the command-line engine options and the chat's own
    (system prompt, generation options; unset ones left out).

    An ``on_status`` callable in ``options`` is told "loading model" first.
    """
    on_status = options.get("on_status")
    if on_status is not None:
        on_status("loading model")
    params = {flag.param for flag in flags()}
    engine = {k: options.pop(k) for k in list(options) if k in params}
    chat = {k: v for k, v in options.items() if v is not None}
    return VisionChat(engine_plan(backend, model, **engine), **chat)


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
    names = flag_names()
    options = _option_names(command) if command is not None else set(names.values())

    def flag(match: re.Match[str]) -> str:
        value = match.group(2) or match.group(3)
        name = names[match.group(1)]
        if name not in options:  # a setting this command has no flag for: its name only
            name = match.group(1)
        return name + (f" {value}" if value else "")

    return _argument().sub(flag, text)


def _overflow(exc: ContextOverflowError, *, one_shot: bool) -> str:
    """A turn too long for the context window, with what to do here: the flag that sizes
    the window, and ``/reset`` in ``chat``."""
    needed, available = exc.needed, exc.available
    setting = flag_names().get(exc.setting or "")
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
