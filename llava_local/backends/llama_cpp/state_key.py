"""This user's key for KV-state files, so that a state loads only if this user wrote it.

A KV state is the model's memory of a conversation: restoring one makes the model
answer as if it had read what the state's keys name. A sha256 beside the state only
catches accidents, since whoever writes the file computes it again. An HMAC-SHA256 with
a key only this user can read means a state file loads warm only if this user's
llava-local wrote it; one from another user or machine, or edited by hand, loads cold.

The key is 32 random bytes in ``kv-state.key``, in ``$LLAVA_LOCAL_STATE_DIR`` if set,
else ``$XDG_STATE_HOME/llava-local``, else ``~/.local/state/llava-local``. It is made on
first use, mode 0600 in a 0700 folder, atomically: written to a temporary file and
linked into place, so two processes starting together end up with the same key. A key
file that another user owns, or that others may read or write, is refused (OSError),
and so is a folder that others may write to (they could swap the key).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import Final

ENV: Final = "LLAVA_LOCAL_STATE_DIR"
NAME: Final = "kv-state.key"
SIZE: Final = 32

_keys: dict[str, bytes] = {}
_lock = threading.Lock()


def key_path() -> Path:
    """Where this user's key is (whether or not it exists yet)."""
    folder = os.environ.get(ENV, "").strip()
    if folder:
        return Path(folder).expanduser() / NAME
    state = os.environ.get("XDG_STATE_HOME", "").strip()
    base = Path(state).expanduser() if state else Path.home() / ".local" / "state"
    return base / "llava-local" / NAME


def user_key() -> bytes:
    """This user's key, made on first use. Raises OSError (PermissionError for a key
    or folder others could read or change) when there is no safe key to use."""
    path = key_path()
    with _lock:
        found = _keys.get(str(path))
        if found is None:
            found = _read(path) if path.exists() else _create(path)
            _keys[str(path)] = found
    return found


def signer(key: bytes) -> hmac.HMAC:
    """An HMAC-SHA256 with ``key``, to be fed the header and the state."""
    return hmac.new(key, digestmod=hashlib.sha256)


def _owned_by_me(st: os.stat_result) -> bool:
    geteuid = getattr(os, "geteuid", None)
    return geteuid is None or st.st_uid == geteuid()


def _read(path: Path) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _owned_by_me(st):
            raise PermissionError(
                f"the KV-state key {path} is not a file of this user; remove it (a new "
                "one is made, and states written with the old one load cold once)"
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise PermissionError(
                f"the KV-state key {path} can be read or changed by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 600 {path}`"
            )
        data = os.read(fd, SIZE + 1)
    finally:
        os.close(fd)
    if len(data) != SIZE:
        raise PermissionError(
            f"the KV-state key {path} is not {SIZE} bytes (damaged); remove it (a new one "
            "is made, and states written with the old one load cold once)"
        )
    return data


def _create(path: Path) -> bytes:
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if not _owned_by_me(st) or stat.S_IMODE(st.st_mode) & 0o022:
        raise PermissionError(
            f"the folder of the KV-state key, {folder}, belongs to another user or others "
            f"may write to it (mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 700 "
            f"{folder}` or set {ENV} to a folder of your own"
        )
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{NAME}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(SIZE))
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another process made it first: use its
            os.link(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return _read(path)
