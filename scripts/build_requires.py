"""What a PEP 517 build of a source tree needs, one requirement a line: what pip's
isolated build would install, for a build environment that lasts between runs.

``scripts/install-llama-cpp.sh`` keeps llama-cpp-python's CMake build folder so that a
killed build resumes. scikit-build-core reuses a build folder only while its own install
path is the same as last time (otherwise it clears CMake's cache, "New isolated
environment"), and pip's build isolation makes a new temporary environment each run. So
the script makes one virtualenv for the build, in the build's cache folder, and installs
in it what this prints:

- ``build_requires.py SOURCE``: ``[build-system] requires`` of ``SOURCE/pyproject.toml``
  (PEP 518's default when it names none);
- ``build_requires.py --backend SOURCE``, run with that environment's Python once the
  first list is installed: what the backend's ``get_requires_for_build_wheel`` adds on
  this machine (scikit-build-core asks for ninja, or cmake, when the system has none
  recent enough), as pip would ask it.

Standard library only (``tomllib``, or pip's own ``tomli`` before Python 3.11).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path
from typing import Any

#: PEP 517: a project that names no backend is built by setuptools' legacy backend.
DEFAULT_REQUIRES = ["setuptools>=40.8.0"]
DEFAULT_BACKEND = "setuptools.build_meta:__legacy__"


def build_system(source: Path) -> dict[str, Any]:
    """The ``[build-system]`` table of ``source``'s pyproject.toml (empty without one)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        from pip._vendor import tomli as tomllib
    path = source / "pyproject.toml"
    if not path.exists():
        return {}
    with path.open("rb") as file:
        table = tomllib.load(file).get("build-system", {})
    return table if isinstance(table, dict) else {}


def requires(source: Path) -> list[str]:
    """The requirements the project names for building it."""
    return [str(r) for r in build_system(source).get("requires", DEFAULT_REQUIRES)]


def backend_requires(source: Path) -> list[str]:
    """What the project's backend asks for on top, run from ``source`` as pip runs it."""
    system = build_system(source)
    module_name, _, attribute = str(system.get("build-backend", DEFAULT_BACKEND)).partition(":")
    for folder in reversed(system.get("backend-path", [])):
        sys.path.insert(0, str(source / folder))
    os.chdir(source)
    backend: Any = importlib.import_module(module_name)
    for part in filter(None, attribute.split(".")):
        backend = getattr(backend, part)
    hook = getattr(backend, "get_requires_for_build_wheel", None)
    if hook is None:
        return []
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the list
        return [str(r) for r in hook({})]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the unpacked source tree")
    parser.add_argument("--backend", action="store_true", help="ask the build backend")
    args = parser.parse_args(argv)
    source = args.source.resolve()
    found = backend_requires(source) if args.backend else requires(source)
    for requirement in found:
        print(requirement)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
