"""``python -m llava_local.cli``: the same as the ``llava-local`` command."""

from . import main

main()
