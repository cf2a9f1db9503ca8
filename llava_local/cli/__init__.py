"""The ``llava-local`` command line, a thin layer over :class:`~llava_local.VisionChat`.

Each command lives in its own module and is registered here.
"""

from __future__ import annotations

import click

from .. import __version__
from .ask import ask
from .caption import caption
from .chat import chat


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="llava-local")
def main() -> None:
    """Ask vision-language models about pictures, on the CPU, through Ollama or llama.cpp."""


main.add_command(ask)
main.add_command(caption)
main.add_command(chat)

__all__ = ["main"]
