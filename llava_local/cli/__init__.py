"""The ``llava-local`` command line, a thin layer over :class:`~llava_local.VisionChat`.

Each command lives in its own module and is registered here.
"""

from __future__ import annotations

import click

from .. import __version__
from .ask import ask
from .bench import bench
from .caption import caption
from .chat import chat
from .doctor import doctor
from .eval import eval_command
from .models import models, pull_command
from .serve import serve
from .ui import ui


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="llava-local")
def main() -> None:
    """Ask vision-language models about pictures, on the CPU, through Ollama or llama.cpp."""


for command in (ask, chat, caption, eval_command, models, pull_command, doctor, bench, ui, serve):
    main.add_command(command)

__all__ = ["main"]
