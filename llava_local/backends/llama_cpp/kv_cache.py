"""A prefix cache of KV states: a picture read once is not read again.

Reading a picture's 576 tokens into a 7B model is most of a turn on a CPU (about
17 s on 2 cores, a minute on a Raspberry Pi). The engine's live KV cache already
spares a follow-up in the same conversation; this module keeps copies of KV states
(``llama_state_seq_get_data``) so that another conversation of the same engine, a
saved conversation loaded again, or a new process can restore the longest prefix it
shares with a state seen before (``llama_state_seq_set_data``) and read only the rest.

A state is its KV bytes plus the *key* of every position it holds: a text token id,
or ``(picture sha256, index)`` for a picture's positions, so prefixes are compared
token by token and pictures by content. States are only ever restored into the same
model: every state carries the engine's :func:`identity` (the model's and the
projector's file fingerprints, the prompt format, the context settings), and a state
with another identity is never used.

Two tiers:

- **memory**: a :class:`~llava_local.lru.ByteLRU` bounded in bytes; each new state
  first checks that the machine keeps the memory preflight's margin free
  (:func:`llava_local.memory.margin`), dropping the oldest states, or itself, rather
  than pushing the machine into swap;
- **disk** (optional): one file per state in ``DIR/<identity digest>/``, bounded in
  bytes, least recently used (file mtime) out first. A file is written to a
  temporary name and renamed into place (``os.replace``), so readers, and other
  processes sharing the directory, see a whole file or none.

A state file is trusted only as far as it proves: each read bounds the header by the
context's size before parsing it, the number of keys before expanding them (a header
claiming 3e8 positions costs nothing), checks token ids against the vocabulary, the
length, and an HMAC-SHA256 of everything with this user's key (:mod:`.state_key`), so a
file this user's llava-local did not write (another user's, one copied from another
machine, one edited by hand) is never restored. A torn, truncated, damaged, foreign or
forged file is ignored (and, in the folder, removed), and any error while reading one
means "not restored", never an exception. The engine checks the state itself too
(:mod:`.kv_payload`) before llama.cpp reads it.

The folder is this user's alone: created 0700, refused if another user owns it or
others may write to it (they could plant states or make us delete files), and only
names this module writes (``<32 hex>/<40 hex>.kvstate`` and their temporary files) are
ever removed from it.

File layout (version 2; version 1 had a plain sha256, and loads cold)::

    b"LLKVSTAT" | header length, u64 little-endian | header (JSON) | state | HMAC-SHA256
    header: {"version": 2, "identity": {...}, "keys": [...], "state_bytes": N}

``keys`` writes a text token as an int and a picture's positions as ``[sha256, n]``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import hmac
import json
import os
import queue
import re
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ... import host
from ...errors import InvalidRequestError
from ...lru import ByteLRU
from . import state_key

#: One KV position: a text token id, or (picture hash, index within the picture).
Key = int | tuple[str, int]

MAGIC: Final = b"LLKVSTAT"
VERSION: Final = 2
SUFFIX: Final = ".kvstate"
_LENGTH = struct.Struct("<Q")
_DIGEST = 32  # HMAC-SHA256
#: Header bytes besides the keys (the identity's dozen fields), and at most per key:
#: a picture position alone in its run, ``["<64 hex>",1],``, is the longest.
_HEADER_BASE = 16 << 10
_HEADER_PER_KEY = 80
#: The names this module writes in the folder, the only ones it ever removes.
_FOLDER_NAME = re.compile(r"[0-9a-f]{32}")
_STATE_NAME = re.compile(r"[0-9a-f]{40}" + re.escape(SUFFIX))
_TMP_NAME = re.compile(r"\.[0-9a-f]{40}" + re.escape(SUFFIX) + r"\.[A-Za-z0-9_]+\.tmp")
#: Temporary files older than this were left by a writer that died.
_STALE_TMP_S = 3600
#: Fingerprint of a model file: its size, its start (the GGUF header and the first
#: tensors), samples spread over it and its end; enough to tell two files with the
#: same header apart (random-weight twins, two fine-tunes) without reading gigabytes.
_HEAD = 4 << 20
_TAIL = 1 << 20
_SAMPLES = 16
_SAMPLE = 64 << 10


@dataclass(frozen=True)
class KVState:
    """A sequence's KV state and the key of each position it holds."""

    keys: tuple[Key, ...]
    data: Any  # a ctypes c_uint8 array: handed to llama.cpp without a copy

    @property
    def nbytes(self) -> int:
        return len(self.data) + 16 * len(self.keys)


@dataclass(frozen=True)
class Limits:
    """What a state read from a file may hold, checked before anything is allocated:
    the engine's context (positions), vocabulary (token ids) and state size."""

    max_keys: int = 1 << 20
    n_vocab: int = 1 << 31
    max_state_bytes: int = 1 << 40

    @property
    def max_header(self) -> int:
        return _HEADER_BASE + _HEADER_PER_KEY * self.max_keys


#: The bounds of a state read without an engine to say more (a million positions).
NO_LIMITS: Final = Limits()


def common_prefix(a: Sequence[Key], b: Sequence[Key]) -> int:
    """How many leading keys ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# -- identity -------------------------------------------------------------------

_fingerprints: dict[tuple[str, int, int, int], str] = {}
_fingerprint_lock = threading.Lock()


def file_fingerprint(path: Path) -> str:
    """A content fingerprint of a (large) model file, remembered per file version."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    with _fingerprint_lock:
        found = _fingerprints.get(memo)
    if found is not None:
        return found
    digest = hashlib.sha256(str(st.st_size).encode())
    with path.open("rb") as f:
        digest.update(f.read(_HEAD))
        if st.st_size > _HEAD + _TAIL:
            step = (st.st_size - _HEAD - _TAIL) // (_SAMPLES + 1)
            for i in range(1, _SAMPLES + 1):
                f.seek(_HEAD + i * step)
                digest.update(f.read(_SAMPLE))
        f.seek(max(0, st.st_size - _TAIL))
        digest.update(f.read(_TAIL))
    value = digest.hexdigest()
    with _fingerprint_lock:
        _fingerprints[memo] = value
    return value


def identity(
    model: Path, mmproj: Path, *, settings: Mapping[str, Any], llama_cpp_version: str
) -> dict[str, str]:
    """What a state is only valid for: the two files by content, the prompt format
    and the context settings (as text, so it compares the same after JSON)."""
    return {
        "format": f"llava-local kv {VERSION}",
        "llama_cpp_python": llama_cpp_version,
        "model": file_fingerprint(model),
        "mmproj": file_fingerprint(mmproj),
        **{name: str(value) for name, value in sorted(settings.items())},
    }


def identity_digest(ident: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(ident), sort_keys=True).encode()).hexdigest()


# -- the file format --------------------------------------------------------------


def _pack_keys(keys: Sequence[Key]) -> list[Any]:
    out: list[Any] = []
    for key in keys:
        if isinstance(key, int):
            out.append(key)
        elif key[1] == 0 or not out or not isinstance(out[-1], list) or out[-1][0] != key[0]:
            out.append([key[0], 1])
        else:
            out[-1][1] += 1
    return out


def _unpack_keys(packed: Any, limits: Limits) -> tuple[Key, ...]:
    """The keys a header lists, refused (ValueError) if they are more than the context
    holds or name a token outside the vocabulary: counted before they are expanded."""
    if not isinstance(packed, list):
        raise ValueError("keys is not a list")
    total = 0
    for item in packed:
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < limits.n_vocab:
                raise ValueError(f"token id {item:.40} is outside the vocabulary")
            total += 1
        elif (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and len(item[0]) <= 128
            and isinstance(item[1], int)
            and not isinstance(item[1], bool)
            and item[1] > 0
        ):
            total += item[1]
        else:
            raise ValueError(f"bad key {item!r:.40}")
        if total > limits.max_keys:
            raise ValueError(f"more than {limits.max_keys} positions")
    keys: list[Key] = []
    for item in packed:
        if isinstance(item, int):
            keys.append(item)
        else:
            keys.extend((item[0], i) for i in range(item[1]))
    return tuple(keys)


def _header(ident: Mapping[str, str], state: KVState) -> bytes:
    return json.dumps(
        {
            "version": VERSION,
            "identity": dict(ident),
            "keys": _pack_keys(state.keys),
            "state_bytes": len(state.data),
        },
        separators=(",", ":"),
    ).encode()


def write_state(
    path: Path, ident: Mapping[str, str], state: KVState, *, key: bytes | None = None
) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``),
    signed with ``key`` (this user's, :func:`.state_key.user_key`, by default).

    Raises OSError (a full disk, no permission, no safe key); the old file, if any,
    stays whole.
    """
    header = _header(ident, state)
    mac = state_key.signer(state_key.user_key() if key is None else key)
    mac.update(header)
    mac.update(memoryview(state.data))
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + _LENGTH.pack(len(header)) + header)
            f.write(memoryview(state.data))
            f.write(mac.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def read_header(path: Path, limits: Limits = NO_LIMITS) -> tuple[dict[str, Any], int] | None:
    """The header of a state file and where its state starts, or None if it is not
    one or is larger than ``limits`` allow (nothing past the header is checked here,
    and nothing in it is authenticated yet: :func:`read_state` does that)."""
    try:
        with path.open("rb") as f:
            start = f.read(len(MAGIC) + _LENGTH.size)
            if len(start) != len(MAGIC) + _LENGTH.size or not start.startswith(MAGIC):
                return None
            (length,) = _LENGTH.unpack(start[len(MAGIC) :])
            if length > limits.max_header:
                return None
            raw = f.read(length)
        header = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        return None
    size = header.get("state_bytes")
    if not isinstance(size, int) or not 0 < size <= limits.max_state_bytes:
        return None
    if not isinstance(header.get("identity"), dict):
        return None
    return header, len(start) + length


def read_state(
    path: Path, ident: Mapping[str, str], limits: Limits = NO_LIMITS, *, key: bytes | None = None
) -> KVState | None:
    """The state in ``path`` if it is whole, within ``limits``, made for ``ident`` and
    signed with ``key`` (this user's by default); else None, whatever is wrong with it."""
    try:
        return _read_state(path, ident, limits, key)
    except Exception:  # any fault in a file means "read it again", never a crash
        return None


def _read_state(
    path: Path, ident: Mapping[str, str], limits: Limits, key: bytes | None
) -> KVState | None:
    found = read_header(path, limits)
    if found is None:
        return None
    header, offset = found
    if header["identity"] != dict(ident):
        return None
    size = int(header["state_bytes"])
    keys = _unpack_keys(header.get("keys"), limits)
    mac = state_key.signer(state_key.user_key() if key is None else key)
    with path.open("rb") as f:
        if os.fstat(f.fileno()).st_size != offset + size + _DIGEST:
            return None  # truncated, or something appended: before allocating its size
        mac.update(f.read(offset)[len(MAGIC) + _LENGTH.size :])
        data = (ctypes.c_uint8 * size)()
        if f.readinto(memoryview(data).cast("B")) != size:
            return None
        stored = f.read(_DIGEST)
    mac.update(memoryview(data))
    if not hmac.compare_digest(mac.digest(), stored):
        return None  # damaged, or not written with this user's key
    return KVState(keys, data)


# -- the two tiers ------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A cached state that shares ``shared`` leading positions with a prompt."""

    shared: int
    source: str  # "memory" or "disk"
    load: Callable[[], KVState | None]
    #: Forget it: a state llama.cpp refused, or that made a decode fail, is never offered again.
    drop: Callable[[], None]


class MemoryTier:
    """States in this process, least recently used out first, bounded in bytes and by
    the memory the machine has to spare (``reserve`` bytes are always left free)."""

    def __init__(self, max_bytes: int, reserve: int) -> None:
        self.reserve = reserve
        self._states: ByteLRU[tuple[Key, ...], KVState] = ByteLRU(max_bytes, lambda s: s.nbytes)

    @property
    def max_bytes(self) -> int:
        return self._states.max_bytes

    @property
    def nbytes(self) -> int:
        return self._states.nbytes

    def __len__(self) -> int:
        return len(self._states)

    def put(self, state: KVState) -> bool:
        """Keep ``state``; states it extends (their keys are its prefix) are dropped."""
        for keys, _ in self._states.items():
            if len(keys) <= len(state.keys) and state.keys[: len(keys)] == keys:
                self._states.pop(keys)
        # The state is already in memory (a ctypes buffer); what must stay free is
        # the room for the next one, so keep a state's size plus the reserve free.
        while host.available_bytes() < self.reserve + state.nbytes:
            if self._states.pop_oldest() is None:
                return False
        return self._states.put(state.keys, state)

    def best(self, keys: Sequence[Key]) -> tuple[int, tuple[Key, ...]] | None:
        found: tuple[int, tuple[Key, ...]] | None = None
        for stored, _ in self._states.items():
            n = common_prefix(stored, keys)
            if n and (found is None or n > found[0]):
                found = (n, stored)
        return found

    def get(self, keys: tuple[Key, ...]) -> KVState | None:
        return self._states.get(keys)

    def drop(self, keys: tuple[Key, ...]) -> None:
        self._states.pop(keys)

    def covers(self, keys: Sequence[Key]) -> bool:
        """Whether a kept state already holds all of ``keys``."""
        return any(common_prefix(stored, keys) >= len(keys) for stored, _ in self._states.items())

    def clear(self) -> None:
        self._states.clear()


class DiskTier:
    """States in files under ``directory``, shared by processes, bounded in bytes.

    Opening checks the folder (:func:`private_folder`) and this user's key, raising
    :class:`~llava_local.errors.InvalidRequestError` with what to do."""

    def __init__(
        self,
        directory: Path,
        ident: Mapping[str, str],
        max_bytes: int,
        limits: Limits = NO_LIMITS,
    ) -> None:
        self.root = private_folder(directory)
        try:
            state_key.user_key()
        except OSError as exc:
            raise InvalidRequestError(
                f"the KV-state folder {directory} cannot be used: {exc.strerror or exc}"
            ) from exc
        self.ident = dict(ident)
        self.directory = self.root / identity_digest(ident)[:32]
        self.max_bytes = max_bytes
        self.limits = limits
        # Headers read before, by (name, size, mtime): a lookup reads only new files.
        self._headers: dict[str, tuple[tuple[int, int], tuple[Key, ...]]] = {}
        # Lookups and writes come from the engine's driver and from its background
        # writer (other processes need no lock: files are renamed into place whole).
        self._lock = threading.RLock()

    def path_for(self, keys: Sequence[Key]) -> Path:
        name = hashlib.sha256(json.dumps(_pack_keys(keys)).encode()).hexdigest()[:40]
        return self.directory / f"{name}{SUFFIX}"

    def _entries(self) -> Iterator[tuple[Path, tuple[Key, ...]]]:
        try:
            files = [p for p in self.directory.iterdir() if _STATE_NAME.fullmatch(p.name)]
        except OSError:
            return
        seen = set()
        for path in files:
            try:
                st = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            seen.add(path.name)
            version = (st.st_size, st.st_mtime_ns)
            known = self._headers.get(path.name)
            if known is not None and known[0] == version:
                yield path, known[1]
                continue
            found = read_header(path, self.limits)
            keys: tuple[Key, ...] | None = None
            if found is not None and found[0]["identity"] == self.ident:
                with contextlib.suppress(ValueError):
                    keys = _unpack_keys(found[0].get("keys"), self.limits)
            if keys is None:
                _remove(path)  # damaged, or for another context: it would never be used
                continue
            self._headers[path.name] = (version, keys)
            yield path, keys
        for name in set(self._headers) - seen:
            del self._headers[name]

    def best(self, keys: Sequence[Key]) -> tuple[int, Path] | None:
        found: tuple[int, Path] | None = None
        with self._lock:
            for path, stored in self._entries():
                n = common_prefix(stored, keys)
                if n and (found is None or n > found[0]):
                    found = (n, path)
        return found

    def covers(self, keys: Sequence[Key]) -> bool:
        with self._lock:
            return any(common_prefix(stored, keys) >= len(keys) for _, stored in self._entries())

    def read(self, path: Path) -> KVState | None:
        state = read_state(path, self.ident, self.limits)
        if state is None:
            _remove(path)  # torn, damaged, forged or foreign: read the prefix again
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used
        return state

    def write(self, state: KVState) -> Path | None:
        """Keep ``state`` on disk, then drop the least recently used files over budget.
        A failure (full disk, no permission) only means the state is not kept."""
        if len(state.data) + 4096 > self.max_bytes:
            return None
        path = self.path_for(state.keys)
        with self._lock:
            try:
                with contextlib.suppress(FileExistsError):
                    self.directory.mkdir(mode=0o700)
                self._make_room(len(state.data))
                write_state(path, self.ident, state)
            except OSError:
                return None
            self._make_room(0)
            keys = state.keys
            for older, stored in list(self._entries()):  # states this one extends
                if len(stored) < len(keys) and keys[: len(stored)] == stored:
                    _remove(older)
        return path

    def _make_room(self, incoming: int) -> None:
        """Remove the least recently used states (of every model) until ``incoming``
        more bytes fit the budget; temporary files of writers that died go too. Only
        names this module writes are looked at: anything else in the folder stays."""
        files: list[tuple[float, int, Path]] = []
        now = time.time()
        try:
            children = [c for c in self.root.iterdir() if _FOLDER_NAME.fullmatch(c.name)]
        except OSError:
            return
        for child in children:
            try:
                paths = list(child.iterdir()) if not child.is_symlink() and child.is_dir() else []
            except OSError:
                continue
            for path in paths:
                try:
                    st = path.lstat()
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if _TMP_NAME.fullmatch(path.name):
                    if now - st.st_mtime > _STALE_TMP_S:
                        _remove(path)
                elif _STATE_NAME.fullmatch(path.name):
                    files.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files, key=lambda f: f[0]):
            if total + incoming <= self.max_bytes:
                break
            _remove(path)
            total -= size

    def clear(self) -> None:
        with self._lock:
            for path, _ in list(self._entries()):
                _remove(path)


class BackgroundWriter:
    """Writes states to a :class:`DiskTier` in a thread of its own, so that a turn never
    waits for the disk: a state is on disk soon after its picture was read, even if the
    process is then killed. At most ``pending`` states wait; more are dropped (a kept
    state is only ever a cache)."""

    def __init__(self, disk: DiskTier, pending: int = 2) -> None:
        self.disk = disk
        self._queue: queue.Queue[KVState | None] = queue.Queue(maxsize=pending)
        self._thread = threading.Thread(target=self._run, name="llava-local KV writer", daemon=True)
        self._thread.start()

    def put(self, state: KVState) -> bool:
        """Write ``state`` soon; False when too many wait already (it is dropped)."""
        try:
            self._queue.put_nowait(state)
        except queue.Full:
            return False
        return True

    def join(self) -> None:
        """Wait until every state handed over is written (or failed)."""
        self._queue.join()

    def close(self) -> None:
        """Write what waits, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            state = self._queue.get()
            try:
                if state is None:
                    return
                self.disk.write(state)
            finally:
                self._queue.task_done()


def private_folder(directory: Path) -> Path:
    """``directory``, created 0700 if missing; refused (InvalidRequestError) if another
    user owns it or others may write to it: they could plant states there, or files
    for us to delete."""
    path = Path(directory).expanduser()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot use {path} as the KV-state folder: {exc.strerror or exc}; choose a "
            "folder you can write to"
        ) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidRequestError(f"the KV-state folder {path} is not a folder")
    geteuid = getattr(os, "geteuid", None)
    if geteuid is not None and st.st_uid != geteuid():
        raise InvalidRequestError(
            f"the KV-state folder {path} belongs to another user (uid {st.st_uid}); "
            "KV states are read as the model's memory, so keep them in a folder of your "
            "own, e.g. ~/.cache/llava-local/kv"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise InvalidRequestError(
            f"the KV-state folder {path} can be written by other users (mode {mode:04o}); "
            f"KV states are read as the model's memory, so run `chmod 700 {path}` or "
            "choose a folder of your own"
        )
    return path


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


class PrefixCache:
    """The engine's kept KV states: in memory, and optionally on disk."""

    def __init__(self, memory: MemoryTier | None, disk: DiskTier | None) -> None:
        self.memory = memory
        self.disk = disk

    def best(self, keys: Sequence[Key]) -> Candidate | None:
        """The kept state sharing the longest prefix with ``keys`` (memory first on a tie)."""
        found: Candidate | None = None
        memory, disk = self.memory, self.disk
        if memory is not None and (hit := memory.best(keys)) is not None:
            stored = hit[1]
            found = Candidate(
                hit[0], "memory", lambda: memory.get(stored), lambda: memory.drop(stored)
            )
        on_disk = disk.best(keys) if disk is not None else None
        if (
            disk is not None
            and on_disk is not None
            and (found is None or on_disk[0] > found.shared)
        ):
            path = on_disk[1]
            found = Candidate(on_disk[0], "disk", lambda: disk.read(path), lambda: _remove(path))
        return found

    def wants(self, keys: Sequence[Key]) -> tuple[bool, bool]:
        """Whether (memory, disk) would gain from a state holding ``keys``: no state
        kept there holds all of them yet."""
        memory = self.memory is not None and not self.memory.covers(keys)
        disk = self.disk is not None and not self.disk.covers(keys)
        return memory, disk

    def keep(self, state: KVState, *, memory: bool = True, disk: bool = True) -> None:
        if memory and self.memory is not None:
            self.memory.put(state)
        if disk and self.disk is not None:
            self.disk.write(state)

    def clear(self) -> None:
        """Forget every kept state (files on disk included)."""
        if self.memory is not None:
            self.memory.clear()
        if self.disk is not None:
            self.disk.clear()
