"""`llava-local chat` in a real pseudo-terminal: typing, commands, Ctrl-C, Ctrl-D."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..gguf_fixtures import GgufPair, png_bytes
from ..ollama_server import OllamaServer, Script


def _take_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A child process on a pseudo-terminal, read and typed into like a person would."""

    def __init__(self, args: list[str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        env = {**os.environ, "COLUMNS": "200", "LINES": "50"}  # pytest may narrow them
        self.proc = subprocess.Popen(
            args,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,  # the pty becomes its controlling terminal: Ctrl-C is SIGINT
            preexec_fn=_take_terminal,  # noqa: PLW1509 - one ioctl, takes no locks
        )
        os.close(slave)
        self.screen = ""

    def expect(self, pattern: str, timeout: float = 60.0) -> str:
        """Read until ``pattern`` (a regex) appears in what was printed since the last match."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.screen)):
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and not self._ready(0)):
                raise AssertionError(f"{pattern!r} never appeared; screen:\n{self.screen}")
            if self._ready(min(left, 0.5)):
                try:
                    self.screen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:
                    break
        assert match is not None
        seen, self.screen = self.screen[: match.end()], self.screen[match.end() :]
        return seen

    def _ready(self, timeout: float) -> bool:
        return bool(select.select([self.master], [], [], timeout)[0])

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def drain(self, seconds: float = 0.0) -> None:
        """Read what the child prints for ``seconds``, as a terminal does: a pty nobody
        reads fills up and blocks the child's next write (a progress bar's refresh)."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if self._ready(max(0.0, left)):
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # the child is gone
                    return
                if not data:
                    return
                self.screen += data.decode(errors="replace")
            elif left <= 0:
                return

    def close(self) -> int:
        """Wait for the child to exit, still reading its output, and return its status."""
        deadline = time.monotonic() + 30
        try:
            while self.proc.poll() is None and time.monotonic() < deadline:
                self.drain(0.1)
            return self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            os.close(self.master)


@pytest.fixture
def terminal(tiny_pair: GgufPair, tmp_path: Path) -> Iterator[Terminal]:
    """The chat command on the tiny pair, in a terminal; killed if a test left it running."""
    picture = tmp_path / "pic.png"
    picture.write_bytes(png_bytes(seed=50))
    args = [
        sys.executable,
        "-m",
        "llava_local.cli",
        "chat",
        str(picture),
        "--backend",
        "llama_cpp",
        "-m",
        str(tiny_pair.lm),
        "--mmproj",
        str(tiny_pair.mmproj),
        "--temperature",
        "0",
        "--max-tokens",
        "8",
    ]
    term = Terminal(args)
    yield term
    if term.proc.poll() is None:
        term.proc.kill()
        term.close()


def test_a_session_answers_and_leaves_on_ctrl_d(terminal: Terminal, tmp_path: Path) -> None:
    """The picture given on the command line is used (read while the question is typed:
    the question encodes no picture and finds its positions read), commands work, Ctrl-D
    leaves with 0."""
    terminal.expect(r"picture added: .*pic\.png, 56x56")
    terminal.expect(">>> ")
    terminal.type("What is it?\n")
    terminal.expect(">>> ")
    terminal.type("/stats\n")
    terminal.expect(r"cached_tokens\s*│?\s*[1-9]")
    terminal.expect(r"images_encoded\s*│?\s*0")
    terminal.type("/help\n")
    terminal.expect(r"/image PATH")
    terminal.type("/image /no/such/file.png\n")
    terminal.expect(r"error:.*file\.png")
    saved = tmp_path / "session.json"
    terminal.type(f"/save {saved}\n")
    terminal.expect("saved to")
    terminal.type("/reset\n")
    terminal.expect("new conversation")
    terminal.type(f"/load {saved}\n")
    terminal.expect("loaded 1 turn from")
    terminal.expect(">>> ")
    terminal.type("\x04")
    assert terminal.close() == 0


def test_ctrl_c_stops_an_answer_and_the_session_goes_on(
    ollama_server: OllamaServer, tmp_path: Path
) -> None:
    """Ctrl-C during a long answer stops it (the daemon sees the hang-up), the session goes on."""
    ollama_server.script(Script(pieces=["word "] * 400, piece_delay_s=0.05), Script(pieces=["Ok."]))
    term = Terminal(
        [
            sys.executable,
            "-m",
            "llava_local.cli",
            "chat",
            "--backend",
            "ollama",
            "--host",
            ollama_server.url,
        ]
    )
    try:
        term.expect(">>> ")
        term.type("Tell me everything.\n")
        term.expect(r"(word ){5}")  # the answer is being written
        term.type("\x03")
        term.expect(r"stopped; this turn was not kept")
        assert ollama_server.client_gone.wait(10)
        term.type("/stats\n")
        term.expect("no answer yet")
        term.expect(">>> ")
        term.type("Short one?\n")
        term.expect("Ok.")
        term.expect(">>> ")
        term.type("\x04")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    second = ollama_server.requests_to("/api/chat")[-1].json
    assert [m["content"] for m in second["messages"]] == ["Short one?"]
