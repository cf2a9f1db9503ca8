"""llama-cpp-python, imported when the engine opens: its two ctypes modules, llama.cpp's
backend started once, and libmtmd's log kept quiet."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from ...errors import MissingDependencyError

_state: dict[str, Any] = {"verbose": False, "callback": None, "backend": False}
_lock = threading.Lock()


def import_llama_cpp() -> Any:
    """The ``llama_cpp`` module (with ``llama_cpp.mtmd_cpp``), its backend initialised."""
    try:
        import llama_cpp
        import llama_cpp.mtmd_cpp
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise MissingDependencyError(
            "the llama.cpp engine needs llama-cpp-python: pip install 'llava-local[llama-cpp]' "
            "(see the README for build flags on CPUs with AMX)"
        ) from exc
    with _lock:
        if not _state["backend"]:
            _quiet_null_files()
            llama_cpp.llama_backend_init()
            _state["backend"] = True
    return llama_cpp


def _quiet_null_files() -> None:
    """llama-cpp-python opens ``/dev/null`` twice at import (``llama_cpp._utils``, where
    it sends C's output while loading) and never closes it, so every process that used
    the engine ended with ``ResourceWarning: unclosed file '/dev/null'`` under ``-W``.
    Those files must outlive every model (a model freed at exit still uses them), so
    they are swapped for ones over a descriptor left to the process's end on purpose,
    which Python does not warn about, and the originals are closed."""
    from llama_cpp import _utils

    for name in ("outnull_file", "errnull_file"):
        original = getattr(_utils, name, None)
        raw = getattr(getattr(original, "buffer", None), "raw", None)
        if original is None or not getattr(raw, "closefd", False):
            continue  # another llama-cpp-python, or swapped already
        descriptor = os.open(os.devnull, os.O_WRONLY)
        setattr(_utils, name, open(descriptor, "w", closefd=False))  # noqa: SIM115
        original.close()


def set_verbose(lib: Any, verbose: bool) -> None:
    """llama.cpp's log through llama-cpp-python's logger (errors only unless verbose), and
    libmtmd's, which narrates every turn, on stderr only for errors unless verbose."""
    from llama_cpp import _logger

    _logger.set_verbose(verbose)
    _state["verbose"] = verbose
    if _state["callback"] is None:

        @lib.llama_log_callback  # type: ignore[untyped-decorator]
        def callback(level: int, text: bytes, _user: Any) -> None:
            if _state["verbose"] or level == 3:  # GGML_LOG_LEVEL_ERROR
                sys.stderr.write(text.decode("utf-8", "replace"))

        _state["callback"] = callback  # keep it alive: C holds only the pointer
        lib.mtmd_cpp.mtmd_log_set(callback, None)
        lib.mtmd_cpp.mtmd_helper_log_set(callback, None)
