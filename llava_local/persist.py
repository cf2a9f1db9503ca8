"""Save a conversation with its pictures to one JSON file, and read it back whole.

Why a format of our own: a conversation about pictures is only useful with the
pictures, and the same photo is often asked about in several turns, so each picture
is stored once, keyed by the sha256 of its bytes, and messages refer to it by hash.

The file is written atomically (a temporary file in the same directory, flushed and
fsynced, then ``os.replace``), so a crash leaves the old file or the new one, never
half of one. Reading checks everything before returning: a damaged, truncated,
tampered or foreign file raises :class:`~llava_local.errors.ConversationFileError`
and nothing is loaded, never a partial conversation.

Layout (``version`` 4)::

    {"format": "llava-local.conversation", "version": 4, "saved_at": "...",
     "backend": "llama_cpp", "engine": {"model": "...", "mmproj": "...", "n_ctx": 4096},
     "system": null, "options": {...},
     "messages": [{"role": "user", "content": "...", "images": ["<sha256>", ...]}, ...],
     "pictures": {"<sha256>": {"mime": "image/png", "width": 336, "height": 336,
                               "source": "cat.jpg", "changes": [...], "data": "<base64>"}}}

``engine`` is the one description of the engine, the chat's config (``chat.config``'s
``engine``) less what a load never takes from a file: the model's files (the engine
config's ``model_names``), what fits its context (``conversation_names``) and a
server's address. Versions 1 to 3 kept the model and projector beside it as
``"model"`` and ``"mmproj"`` (version 1 had no ``mmproj``, 2 no ``engine``); they are
read into ``engine``.

A message's picture is the hash alone when its details (source, changes, ...) are
the stored ones; when the same bytes came from another source, it is an object with
the hash and the details that differ, so a reload is identical.

Beside the JSON, the in-process engine also writes its KV state (:func:`state_path`,
``talk.json.kv``), so a loaded conversation goes on without reading its pictures and
turns again. That file is an optimisation, not part of the conversation: the JSON alone
loads (cold), and a state made for another model, projector or settings, or not written
with this user's key, is never used (:class:`ColdResumeWarning` says so).

A saved file is data, not orders: it may come from anyone. Its pictures pass the checks
any picture passes (:func:`llava_local.images.check_encoded`) before an engine decodes
them, and of its engine settings only what decides which model answers and what fits
its context is used again (:func:`engine_settings`): never where the conversation and
an API key are sent unless the caller confirms it, and never keys, timeouts, folders,
memory or threads.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from . import images
from .backends import registry
from .backends.spec import EngineConfig
from .errors import (
    ConversationFileError,
    ImageError,
    InvalidRequestError,
    LlavaLocalError,
    OutputFileError,
)
from .types import Message, Options, PreparedImage, Role

FORMAT: Final = "llava-local.conversation"
VERSION: Final = 4

Mime = Literal["image/png", "image/jpeg"]
_HEX = frozenset("0123456789abcdef")


class ColdResumeWarning(LlavaLocalError, UserWarning):
    """A saved conversation's KV state could not be used (another model, projector or
    settings; a damaged file; one not written with this user's key) or written: the
    conversation is read again on its next turn, which on a CPU takes as long as its
    first reading did."""


def state_path(path: str | os.PathLike[str]) -> Path:
    """Where the engine's KV state of the conversation saved at ``path`` goes."""
    target = Path(path).expanduser()
    return target.with_name(target.name + ".kv")


def _newer(version: int) -> str:
    return (
        f"it was written by a newer llava-local (format version {version}; this one reads "
        f"up to {VERSION}): upgrade llava-local to open it"
    )


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and set(value) <= _HEX


class SavedPicture(BaseModel):
    """One picture, stored once: its bytes (base64 in the file) and how it was prepared."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mime: Mime
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    source: str
    changes: tuple[str, ...] = ()
    data: bytes = Field(repr=False)

    @field_validator("data", mode="before")
    @classmethod
    def _from_base64(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return base64.b64decode(value.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError) as exc:
                raise ValueError(f"picture data is not valid base64 ({exc})") from None
        return value

    @field_serializer("data")
    def _to_base64(self, value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")


class PictureUse(BaseModel):
    """A message's reference to a stored picture whose details differ from the stored ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str
    mime: Mime | None = None
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    source: str | None = None
    changes: tuple[str, ...] | None = None


class SavedMessage(BaseModel):
    """One turn; pictures by hash (or by :class:`PictureUse`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str
    images: tuple[str | PictureUse, ...] = ()


class SavedConversation(BaseModel):
    """A whole saved conversation, checked on construction: every picture is present
    and matches its hash, so :meth:`history` cannot fail half-way."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["llava-local.conversation"] = FORMAT
    version: int = VERSION
    saved_at: datetime
    backend: str
    #: The engine's settings that a load uses (the model's files, n_ctx, ...) and a
    #: server's address, as its config records them; never a key or a live object.
    engine: dict[str, Any] = Field(default_factory=dict)
    system: str | None = None
    options: Options = Field(default_factory=Options)
    messages: list[SavedMessage] = Field(default_factory=list)
    pictures: dict[str, SavedPicture] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _model_into_engine(cls, data: Any) -> Any:
        """Versions 1 to 3 kept the model and projector beside ``engine``."""
        if not isinstance(data, dict) or not ({"model", "mmproj"} & set(data)):
            return data
        version = data.get("version", VERSION)
        if isinstance(version, int) and version >= 4:
            return data  # refused as an unknown field, as any other
        rest = {k: v for k, v in data.items() if k not in ("model", "mmproj")}
        engine = dict(rest.get("engine") or {})
        for name in ("model", "mmproj"):
            if data.get(name) is not None:
                engine.setdefault(name, data[name])
        return {**rest, "engine": engine}

    @property
    def model(self) -> str | None:
        """The model the conversation used, as its engine's config named it."""
        model = self.engine.get("model")
        return model if isinstance(model, str) else None

    @field_validator("version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value > VERSION:
            raise ValueError(_newer(value))
        if value < 1:
            raise ValueError(f"format version {value} does not exist")
        return value

    @model_validator(mode="after")
    def _complete(self) -> SavedConversation:
        for key, picture in self.pictures.items():
            if not _is_sha256(key):
                raise ValueError(f"picture key {key[:80]!r} is not a sha256 hex digest")
            if hashlib.sha256(picture.data).hexdigest() != key:
                raise ValueError(
                    f"picture {key[:12]}… ({picture.source}) does not match its sha256: "
                    "its data was changed or damaged"
                )

        for i, message in enumerate(self.messages):
            for ref in message.images:
                key = ref if isinstance(ref, str) else ref.sha256
                if key not in self.pictures:
                    raise ValueError(f"message {i} refers to picture {key[:12]}…, not in the file")
        return self

    def history(self) -> list[Message]:
        """The conversation as :class:`~llava_local.types.Message` objects, pictures included."""
        return [
            Message(
                role=m.role,
                content=m.content,
                images=tuple(self._image(ref) for ref in m.images),
            )
            for m in self.messages
        ]

    def _image(self, ref: str | PictureUse) -> PreparedImage:
        key = ref if isinstance(ref, str) else ref.sha256
        stored = self.pictures[key]
        fields: dict[str, Any] = stored.model_dump(exclude={"data"})
        if isinstance(ref, PictureUse):
            fields.update(ref.model_dump(exclude={"sha256"}, exclude_none=True))
        return PreparedImage(data=stored.data, sha256=key, **fields)


def _picture_fields(image: PreparedImage | SavedPicture) -> dict[str, Any]:
    return {
        "mime": image.mime,
        "width": image.width,
        "height": image.height,
        "source": image.source,
        "changes": tuple(image.changes),
    }


def to_document(
    *,
    history: Sequence[Message],
    system: str | None,
    options: Options,
    backend: str,
    engine: dict[str, Any] | None = None,
    saved_at: datetime | None = None,
) -> SavedConversation:
    """The conversation as a :class:`SavedConversation`, each picture stored once."""
    pictures: dict[str, SavedPicture] = {}
    messages: list[SavedMessage] = []
    for message in history:
        refs: list[str | PictureUse] = []
        for image in message.images:
            key = hashlib.sha256(image.data).hexdigest()
            if image.sha256 != key:
                raise InvalidRequestError(
                    f"picture {image.source}: its sha256 field is not the hash of its data; "
                    "prepare pictures with llava_local.images.prepare"
                )
            fields = _picture_fields(image)
            if key not in pictures:
                pictures[key] = SavedPicture(data=image.data, **fields)
            stored = _picture_fields(pictures[key])
            diff = {k: v for k, v in fields.items() if stored[k] != v}
            refs.append(PictureUse(sha256=key, **diff) if diff else key)
        messages.append(
            SavedMessage(role=message.role, content=message.content, images=tuple(refs))
        )
    return SavedConversation(
        saved_at=saved_at or datetime.now(timezone.utc),
        backend=backend,
        engine=engine or {},
        system=system,
        options=options,
        messages=messages,
        pictures=pictures,
    )


def save(
    path: str | os.PathLike[str],
    *,
    history: Sequence[Message],
    system: str | None,
    options: Options,
    backend: str,
    engine: dict[str, Any] | None = None,
) -> Path:
    """Write the conversation to ``path`` atomically and return the path. ``engine`` is
    the engine's settings a load uses (:func:`recorded`), the model among them.

    An existing file is replaced only once the new one is complete on disk. Missing
    folders are created, as ``caption --out`` does. A file system error (no
    permission, a folder in the way, a full disk) raises :class:`OutputFileError`
    naming the path; the old file, if any, is left untouched.
    """
    target = Path(path).expanduser()
    document = to_document(
        history=history,
        system=system,
        options=options,
        backend=backend,
        engine=engine,
    )
    data = document.model_dump(mode="json")
    try:
        raw = json.dumps(data, indent=1, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # unpaired surrogates (e.g. from file names): escape them
        raw = json.dumps(data, indent=1).encode("ascii")
    try:
        if target.is_dir():
            raise IsADirectoryError(errno.EISDIR, "it is a folder", str(target))
        _make_folder(target.parent)
    except OSError as exc:
        raise OutputFileError(
            f"cannot save the conversation to {target}: {exc.strerror or exc}; choose a "
            "file path you can write to"
        ) from exc
    try:
        _atomic_write(target, raw)
    except OSError as exc:
        raise OutputFileError(
            f"cannot save the conversation to {target}: cannot write a file in "
            f"{target.parent} ({exc.strerror or exc}); choose a file path you can write to"
        ) from exc
    return target


def _make_folder(folder: Path) -> None:
    """Create ``folder`` and its missing parents, or raise an OSError whose ``strerror``
    says which part of the path is in the way and why (the bare "No such file or
    directory" of a folder that cannot be made, under /proc for one, reads as if
    missing folders were not created)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        missing = folder
        while not missing.parent.exists() and missing.parent != missing:
            missing = missing.parent
        parent = missing.parent
        if parent.exists() and not parent.is_dir():
            why = f"{parent} is not a folder"
        elif missing.exists() and not missing.is_dir():
            why = f"{missing} is not a folder"
        else:
            why = f"{missing} does not exist and cannot be created ({exc.strerror or exc})"
        raise OSError(exc.errno, why, str(folder)) from exc


def _atomic_write(target: Path, data: bytes) -> None:
    """Temporary file beside ``target``, flush, fsync, ``os.replace``, fsync the directory."""
    directory = target.parent
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError):  # keep the mode of the file being replaced
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable where the OS allows (not on Windows)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | os.PathLike[str]) -> SavedConversation:
    """Read a conversation saved by :func:`save`, checked whole before it is returned.

    Raises :class:`~llava_local.errors.ConversationFileError` when the file cannot be
    read, is not JSON, is not a llava-local conversation, comes from a newer version,
    or has a picture that is missing or does not match its hash.
    """
    source = Path(path).expanduser()
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise _error(source, f"it cannot be read ({exc.strerror or exc})") from exc
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        reason = "it is not JSON"
        text = raw.strip()
        if text.startswith(b"{") and not text.endswith(b"}"):
            reason = "it is not complete JSON: it ends too early (truncated, or written half-way)"
        raise _error(source, f"{reason}: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise _error(source, f"it is not a llava-local conversation (format {found!r})")
    version = document.get("version")
    if isinstance(version, int) and version > VERSION:
        raise _error(source, _newer(version))
    try:
        saved = SavedConversation.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()[:5]
        )
        more = len(exc.errors()) - 5
        if more > 0:
            problems += f"; and {more} more"
        raise _error(source, problems) from exc
    for key, picture in saved.pictures.items():
        try:  # as any picture is checked, before an engine's own decoder sees its bytes
            images.check_encoded(
                picture.data,
                f"{key[:12]}… ({picture.source[:80]})",
                mime=picture.mime,
                width=picture.width,
                height=picture.height,
            )
        except ImageError as exc:
            raise _error(source, str(exc)) from exc
    return saved


def recorded(config: EngineConfig, model: str | None = None) -> dict[str, Any]:
    """What a saved file records of an engine's settings (its ``engine``): those a load
    uses again (the model's files, what fits the context) and a server's address, which
    a load only compares. ``model`` names the model when the config left it to the
    engine (an OpenAI-compatible server's only model)."""
    spec = registry.engine_of(config)
    names = config.model_names() | config.conversation_names()
    keep = names | ({spec.address} if spec.address else set())
    settings = config.model_dump(mode="json", exclude_defaults=True, include=set(keep))
    settings = {k: v for k, v in settings.items() if v is not None}
    named = config.model if config.model is not None else model
    return {**({"model": named} if named is not None else {}), **settings}


def engine_settings(
    saved: SavedConversation,
    path: Path,
    given: Mapping[str, Any],
    *,
    use_saved_address: bool = False,
) -> dict[str, Any]:
    """The engine settings a conversation loaded from ``path`` takes from its file, for
    its own engine: the model's files, unless ``given`` names a model (the engine
    config's :meth:`~llava_local.backends.spec.EngineConfig.model_names`), and what
    fits its context (its ``conversation_names``).

    A remote engine's address is the caller's: ``given`` (``host=``, ``base_url=``),
    else the environment or the engine's default. The file's address is used only when
    it is that same address or ``use_saved_address`` confirms it; when it names another,
    InvalidRequestError says both, before anything is contacted.
    """
    try:
        spec = registry.get(saved.backend)
    except InvalidRequestError:
        return {}  # not an engine this install knows: nothing of its settings applies
    allowed = spec.config.conversation_names()
    if given.get("model") is None:
        allowed |= spec.config.model_names()
    settings = {k: v for k, v in saved.engine.items() if k in allowed and k not in given}
    address = spec.address
    if address is None or address in given or not isinstance(saved.engine.get(address), str):
        return settings
    saved_address = str(saved.engine[address])
    if use_saved_address:
        return {**settings, address: saved_address}
    wanted, used = _address(spec, saved_address), _address(spec, None)
    if wanted is not None and wanted == used:
        return settings
    where = f"at {used}" if used else "with no address (none is given or set in the environment)"
    raise InvalidRequestError(
        f"{path} was saved with the {spec.name} engine at {saved_address}, and loading it "
        f"now would open the {spec.name} engine {where}. A saved file never chooses where "
        f"a conversation (and an API key) is sent: pass {address}={saved_address!r} to "
        f"continue there, or {address}= another server; use_saved_address=True takes the "
        "file's address only if you trust the file"
    )


def _address(spec: registry.EngineSpec, value: str | None) -> str | None:
    """The address ``value`` means for engine ``spec`` (None: none or not an address)."""
    if spec.resolve_address is None:
        return value
    try:
        return spec.resolve_address(value)
    except InvalidRequestError:
        return None


def _error(path: Path, reason: str) -> ConversationFileError:
    return ConversationFileError(
        f"cannot load the conversation {path}: {reason}; nothing was loaded"
    )
