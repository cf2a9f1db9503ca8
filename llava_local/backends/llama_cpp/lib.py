"""llama-cpp-python, imported when the engine opens: its two ctypes modules, llama.cpp's
backend started once, and libmtmd's log kept quiet."""

from __future__ import annotations

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
            llama_cpp.llama_backend_init()
            _state["backend"] = True
    return llama_cpp


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
