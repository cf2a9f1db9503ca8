"""Which picture files a folder, a glob pattern or a list of paths names.

Shared by the caption job, the labelled-picture sets and anything else that walks
a user's pictures: one rule for extensions (:data:`~llava_local.images.PICTURE_EXTENSIONS`,
any case), hidden files and typos.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import InvalidRequestError
from .images import PICTURE_EXTENSIONS

__all__ = ["find_pictures"]

_GLOB_CHARS = frozenset("*?[")


def find_pictures(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, recursive: bool = False
) -> list[Path]:
    """The pictures ``inputs`` names, sorted by path, each once.

    A directory gives its files with a picture extension (any case), skipping hidden
    ones such as macOS ``._IMG.jpg`` crumbs; ``recursive`` descends into subdirectories.
    A glob pattern (``**`` allowed) gives the matching files with a picture extension.
    A file is taken as given, whatever its name. A path that does not exist and is not
    a pattern is an :class:`InvalidRequestError` (a typo should not caption nothing).
    """
    items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    found: dict[str, Path] = {}
    for item in items:
        for path in _expand(os.fspath(item), recursive):
            found.setdefault(os.path.normpath(path), path)
    return sorted(found.values(), key=str)


def _expand(text: str, recursive: bool) -> list[Path]:
    path = Path(text).expanduser()
    if path.is_dir():
        return _scan(path, recursive)
    if path.is_file():
        return [path]
    if _GLOB_CHARS & set(text):
        matches = glob.glob(os.path.expanduser(text), recursive=True)
        return [Path(m) for m in matches if os.path.isfile(m) and _is_picture(m)]
    raise InvalidRequestError(f"no such file or directory: {text}")


def _scan(folder: Path, recursive: bool) -> list[Path]:
    if not recursive:
        return [p for p in folder.iterdir() if _visible(p.name) and p.is_file() and _is_picture(p)]
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if _visible(d)]
        found += [Path(root, f) for f in files if _visible(f) and _is_picture(f)]
    return found


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _is_picture(name: str | Path) -> bool:
    return Path(name).suffix[1:].lower() in PICTURE_EXTENSIONS
