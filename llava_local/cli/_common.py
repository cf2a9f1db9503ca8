"""What every command shares: engine options, opening a chat, clean error exits.

Errors from the library are printed as one line saying what to do, with exit
status 1; a usage mistake exits with 2 (click's convention) and Ctrl-C with 130.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console

from ..chat import VisionChat
from ..errors import LlavaLocalError

F = TypeVar("F", bound=Callable[..., Any])
err_console = Console(stderr=True, highlight=False)


def engine_options(func: F) -> F:
    """The options that choose and configure an engine, shared by every command."""
    decorators = [
        click.option(
            "--backend",
            type=click.Choice(["auto", "ollama", "llama_cpp"]),
            default="auto",
            show_default=True,
            help="Engine: the Ollama daemon, llama.cpp in-process, or the first that works.",
        ),
        click.option("--model", "-m", help="Ollama model name, or path of a GGUF model."),
        click.option("--mmproj", help="Path of the GGUF projector (llama.cpp engine)."),
        click.option("--host", help="Ollama address (default: OLLAMA_HOST or 127.0.0.1:11434)."),
        click.option("--timeout", type=float, help="Seconds a turn may take (Ollama engine)."),
        click.option("--n-ctx", type=int, help="Context window in tokens (llama.cpp engine)."),
        click.option("--threads", type=int, help="CPU threads (llama.cpp engine)."),
        click.option("--chat-format", help="Prompt format (llama.cpp engine), e.g. vicuna."),
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
    """A :class:`VisionChat` from the command-line engine options (unset ones left out)."""
    engine: dict[str, Any] = {
        "mmproj": mmproj,
        "host": host,
        "timeout": timeout,
        "n_ctx": n_ctx,
        "n_threads": threads,
        "chat_format": chat_format,
    }
    kwargs = {k: v for k, v in {**engine, **options}.items() if v is not None}
    return VisionChat(backend, model, **kwargs)


def run_safely(action: Callable[[], None]) -> None:
    """Run a command body, turning library errors and Ctrl-C into clean exits."""
    try:
        action()
    except LlavaLocalError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
