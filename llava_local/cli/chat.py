"""``llava-local chat [IMAGE]``: a conversation in the terminal, like LLaVA's own CLI.

Answers stream as they are written. Ctrl-C stops the current answer and keeps
the session (the interrupted turn is not kept); Ctrl-D leaves. Lines starting
with ``/`` are commands; ``/help`` lists them. Arrow keys recall earlier lines
where the terminal supports readline.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..chat import VisionChat
from ..errors import LlavaLocalError, NoPictureWarning
from ..images import ImageSource, prepare
from ..types import PreparedImage
from ..wording import count
from ._common import (
    StatusLine,
    engine_options,
    err_console,
    open_chat,
    print_error,
    quiet_option,
    run_safely,
)

NO_PICTURE = (
    "(no picture in this conversation: the model answers from the text alone and may "
    "make one up; /image PATH adds a picture)"
)

HELP = """\
/image PATH   add a picture to the next question (several are fine); it is read
              while you type the question
/reset        start a new conversation
/save FILE    save the conversation, pictures included
/load FILE    continue a saved conversation
/stats        tokens, timings and cache reuse of the last answer
/help         this list
Ctrl-C stops an answer; Ctrl-D leaves."""


class Repl:
    """The read-eval-print loop; input and output are injectable for tests."""

    def __init__(
        self,
        chat: VisionChat,
        *,
        read: Callable[[str], str] = input,
        console: Console | None = None,
        options: dict[str, Any] | None = None,
        status: StatusLine | None = None,
    ) -> None:
        self.chat = chat
        self.status = status or StatusLine(False)
        self.read = read
        self.out = console or Console(highlight=False)
        self.options = options or {}
        self.pending: list[PreparedImage] = []

    def run(self, image: str | None = None) -> None:
        """Loop until end of input (Ctrl-D) or ``/quit``."""
        self.out.print(
            f"[bold]llava-local chat[/] with {self.chat.model} ({self.chat.backend}). "
            "/help for commands, Ctrl-D to leave."
        )
        if image:
            self.command(f"/image {shlex.quote(image)}")
        while True:
            try:
                line = self.read(">>> ").strip()
            except EOFError:
                self.out.print()
                return
            except KeyboardInterrupt:
                self.out.print()
                continue
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) == "quit":
                    return
                continue
            self.answer(line)

    def command(self, line: str) -> str | None:
        """Run one ``/command``; returns "quit" to leave."""
        try:
            name, *args = shlex.split(line)
        except ValueError as exc:
            self.out.print(Text(str(exc), style="red"))
            return None
        arg = " ".join(args)
        try:
            if name in ("/quit", "/exit", "/bye"):
                return "quit"
            if name == "/help":
                self.out.print(HELP, markup=False)
            elif name == "/image" and arg:
                self.add_image(arg)
            elif name == "/reset":
                self.chat.reset()
                self.pending = []
                self.out.print("new conversation")
            elif name == "/save" and arg:
                path = self.chat.save(arg)
                self.out.print(f"saved to {path}", markup=False)
            elif name == "/load" and arg:
                self.load(arg)
            elif name == "/stats":
                self.stats()
            else:
                self.out.print(
                    f"unknown or incomplete command {name!r}; /help lists them", markup=False
                )
        except LlavaLocalError as exc:
            print_error(exc, self.out)
        return None

    def add_image(self, source: ImageSource) -> None:
        """Prepare a picture now, so a bad file is reported before the question, and
        attach it: the engine reads it while the question is typed."""
        picture = prepare(source, max_side=self.chat.max_image_side)
        self.chat.attach(picture)
        self.pending.append(picture)
        note = f" ({'; '.join(picture.changes)})" if picture.changes else ""
        self.out.print(
            f"picture added: {picture.source}, {picture.width}x{picture.height}{note}",
            markup=False,
        )

    def load(self, path: str) -> None:
        """Replace the conversation with a saved one, on the same engine."""
        self.chat.restore(Path(path))
        self.pending = []
        turns = len(self.chat.history) // 2
        self.out.print(f"loaded {count(turns, 'turn')} from {path}", markup=False)

    def answer(self, prompt: str) -> None:
        """Stream one answer; Ctrl-C stops it and the turn is not kept."""
        if not self.pending and not self.chat.has_pictures and not self.chat.allow_text_only:
            err_console.print(Text(NO_PICTURE, style="yellow"))
        try:
            with warnings.catch_warnings():  # said above, in the terminal's words
                warnings.simplefilter("ignore", NoPictureWarning)
                stream = self.chat.stream(prompt, **self.options)  # with what is attached
        except LlavaLocalError as exc:
            print_error(exc, self.out)
            return
        try:
            with stream:
                for piece in stream:
                    self.out.print(piece, end="", markup=False, soft_wrap=True)
            self.pending = []
            self.out.print()
        except KeyboardInterrupt:
            self.status.stop()
            self.out.print("\n[yellow](stopped; this turn was not kept)[/]")
        except LlavaLocalError as exc:
            self.status.stop()
            self.out.print()
            print_error(exc, self.out)

    def stats(self) -> None:
        reply = self.chat.last_reply
        if reply is None:
            self.out.print("no answer yet")
            return
        table = Table(title=f"last answer ({reply.done_reason})", show_header=False)
        for key, value in reply.stats.model_dump().items():
            if value is not None:
                table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
        self.out.print(table)


@click.command()
@click.argument("image", required=False)
@engine_options
@click.option("--system", help="System prompt.")
@click.option("--temperature", type=float, help="Sampling temperature (0 = greedy).")
@click.option("--max-tokens", type=int, help="Longest answer, in tokens.")
@click.option("--text-only", is_flag=True, help="Questions without a picture are fine: no notice.")
@quiet_option
def chat(
    *,
    image: str | None,
    system: str | None,
    temperature: float | None,
    max_tokens: int | None,
    text_only: bool,
    quiet: bool,
    **engine: Any,
) -> None:
    """Talk about pictures in the terminal; IMAGE starts the conversation with a picture."""
    with contextlib.suppress(ImportError):  # arrow keys and history for input()
        import readline  # noqa: F401
    options = {
        k: v
        for k, v in {"temperature": temperature, "max_tokens": max_tokens}.items()
        if v is not None
    }

    status = StatusLine(not quiet)

    def body() -> None:
        with open_chat(
            **engine,
            system=system,
            on_overflow="drop_oldest",
            allow_text_only=text_only,
            on_status=status,
        ) as session:
            status.stop()
            Repl(session, options=options, status=status).run(image)

    run_safely(body)
    sys.exit(0)
