"""A stop request llama.cpp reads without Python.

llama.cpp asks its abort callback after every node of a graph (about a thousand per
step). A Python callback takes the GIL each time, and with other threads about (serve's
clients, their pictures waiting for CLIP) it waits for it: with four clients, a
picture's 512 positions took 10.4 s instead of 5.5 s on two cores. So the callback is
C's own ``strlen`` over a one-byte string: 1 (stop) or 0 (go on), set from Python when
a stop is asked for. Both values are also valid ``bool`` returns on every ABI.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable
from typing import Any


def _strlen() -> Any:
    if sys.platform == "win32":  # pragma: no cover - not run on this project's CI
        return ctypes.cdll.msvcrt.strlen
    return ctypes.CDLL(None).strlen


class StopFlag:
    """The abort callback and its data for ``llama_set_abort_callback``, and the flag.

    :meth:`arm` names the turns of the computation about to run and :meth:`check`
    (called by whoever learns of a stop) raises the flag when every one of them is
    stopped; :meth:`disarm` lowers it when the computation ends. A lock makes a raise
    meant for one computation never reach the next.
    """

    def __init__(self, callback_type: Any) -> None:
        self._byte = ctypes.create_string_buffer(2)  # b"\0\0": strlen 0, go on
        #: Give both to llama_set_abort_callback (kept alive here: C holds pointers).
        self.callback = ctypes.cast(_strlen(), callback_type)
        self.data = ctypes.cast(self._byte, ctypes.c_void_p)
        self._lock = threading.Lock()
        self._stopped: Callable[[], bool] | None = None

    @property
    def raised(self) -> bool:
        return self._byte.raw[0] != 0

    def arm(self, stopped: Callable[[], bool]) -> None:
        """A computation starts whose turns are all stopped when ``stopped()`` says so."""
        with self._lock:
            self._stopped = stopped
            self._byte[0] = b"\x01" if stopped() else b"\x00"

    def check(self) -> None:
        """Raise the flag if the running computation's turns are all stopped."""
        with self._lock:
            if self._stopped is not None and self._stopped():
                self._byte[0] = b"\x01"

    def disarm(self) -> None:
        with self._lock:
            self._stopped = None
            self._byte[0] = b"\x00"
