"""Saved conversations: identical after a reload, pictures once, atomic, and all-or-nothing."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from llava_local import persist
from llava_local.errors import ConversationFileError, InvalidRequestError, OutputFileError
from llava_local.images import prepare
from llava_local.types import Message, Options, PreparedImage, Role

ROLES: tuple[Role, ...] = ("system", "user", "assistant")


def picture(data: bytes, source: str = "cat.png", **fields: Any) -> PreparedImage:
    """A PreparedImage whose hash is right (the bytes must be a picture of the stated
    format and size, as loading checks)."""
    values: dict[str, Any] = {"mime": "image/png", "width": 4, "height": 3, "changes": ()}
    values.update(fields)
    return PreparedImage(
        data=data, sha256=hashlib.sha256(data).hexdigest(), source=source, **values
    )


def tiny(mime: str = "image/png", width: int = 4, height: int = 3, shade: int = 0) -> bytes:
    """A real picture of that format and size."""
    buf = io.BytesIO()
    kind = "PNG" if mime == "image/png" else "JPEG"
    Image.new("RGB", (width, height), (shade, 90, 160)).save(buf, format=kind)
    return buf.getvalue()


def real_picture(color: tuple[int, int, int] = (200, 30, 30)) -> PreparedImage:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, format="PNG")
    return prepare(buf.getvalue(), max_side=672)


def save(path: Path, history: list[Message], **kwargs: Any) -> Path:
    args: dict[str, Any] = {
        "system": "Be brief.",
        "options": Options(temperature=0.2, stop=("\n\n",), seed=7),
        "backend": "llama_cpp",
        "engine": {"model": "/models/llava-v1.5-7b-Q4_0.gguf"},
    }
    args.update(kwargs)
    return persist.save(path, history=history, **args)


def conversation() -> list[Message]:
    cat, dog = real_picture((200, 30, 30)), real_picture((30, 30, 200))
    return [
        Message(role="user", content="What is this?", images=(cat,)),
        Message(role="assistant", content="A red square."),
        Message(role="user", content="And these two?", images=(cat, dog)),
        Message(role="assistant", content="Red, then blue."),
    ]


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A valid saved conversation on disk."""
    return save(tmp_path / "chat.json", conversation())


def load_error(path: Path) -> str:
    with pytest.raises(ConversationFileError) as info:
        persist.load(path)
    message = str(info.value)
    assert str(path) in message
    assert "nothing was loaded" in message
    return message


def edit(path: Path, change: Any) -> Path:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    return path


# ---------------------------------------------------------------------- round trips


def test_reload_is_identical_including_picture_bytes(saved: Path) -> None:
    """A saved conversation loads back as equal Message objects, picture bytes included."""
    loaded = persist.load(saved)
    assert loaded.history() == conversation()
    assert loaded.history()[2].images[1].data == conversation()[2].images[1].data
    assert loaded.system == "Be brief."
    assert loaded.options == Options(temperature=0.2, stop=("\n\n",), seed=7)
    assert (loaded.backend, loaded.model) == ("llama_cpp", "/models/llava-v1.5-7b-Q4_0.gguf")
    assert loaded.saved_at.tzinfo is not None


def test_picture_used_three_times_is_stored_once(tmp_path: Path) -> None:
    """The same picture in several messages is written once and referred to by its hash."""
    cat = real_picture()
    history = [Message(role="user", content=f"turn {i}", images=(cat,)) for i in range(3)]
    path = save(tmp_path / "chat.json", history)
    raw = path.read_text()
    assert raw.count(cat.b64()) == 1
    document = json.loads(raw)
    assert list(document["pictures"]) == [cat.sha256]
    assert [m["images"] for m in document["messages"]] == [[cat.sha256]] * 3


def test_same_bytes_from_two_sources_keep_their_own_details(tmp_path: Path) -> None:
    """Identical bytes from another file are stored once yet reload with their own source."""
    first = picture(tiny(), source="a.png")
    second = picture(tiny(), source="copy/b.png", changes=("resized",))
    history = [Message(role="user", content="two", images=(first, second))]
    path = save(tmp_path / "chat.json", history)
    document = json.loads(path.read_text())
    assert len(document["pictures"]) == 1
    assert persist.load(path).history() == history


def test_file_layout_is_the_documented_one(saved: Path) -> None:
    """The file has the documented top-level keys, format name and version."""
    document = json.loads(saved.read_text())
    assert set(document) == {
        "format",
        "version",
        "saved_at",
        "backend",
        "engine",
        "system",
        "options",
        "messages",
        "pictures",
    }
    assert (document["format"], document["version"]) == ("llava-local.conversation", 4)
    for key, entry in document["pictures"].items():
        data = base64.b64decode(entry["data"], validate=True)
        assert hashlib.sha256(data).hexdigest() == key
        assert set(entry) == {"mime", "width", "height", "source", "changes", "data"}


def test_unpaired_surrogates_survive(tmp_path: Path) -> None:
    """Text that is not valid UTF-8 on its own (a lone surrogate) still round-trips."""
    history = [
        Message(role="user", content="file \udc80 name"),
        Message(role="assistant", content="ok"),
    ]
    path = save(tmp_path / "chat.json", history, system="s\ud800")
    loaded = persist.load(path)
    assert loaded.history() == history
    assert loaded.system == "s\ud800"


_text = st.text(st.characters(exclude_categories=()), max_size=40)
_pictures = st.builds(
    lambda mime, width, height, shade, source, changes: picture(
        tiny(mime, width, height, shade),
        source,
        mime=mime,
        width=width,
        height=height,
        changes=changes,
    ),
    mime=st.sampled_from(["image/png", "image/jpeg"]),
    width=st.integers(1, 64),
    height=st.integers(1, 64),
    shade=st.integers(0, 255),
    source=_text,
    changes=st.lists(_text, max_size=3).map(tuple),
)


@st.composite
def histories(draw: st.DrawFn) -> list[Message]:
    pool = draw(st.lists(_pictures, max_size=4))
    messages = []
    for _ in range(draw(st.integers(0, 6))):
        images: tuple[PreparedImage, ...] = ()
        if pool:
            images = tuple(draw(st.lists(st.sampled_from(pool), max_size=3)))
        role = draw(st.sampled_from(ROLES))
        messages.append(Message(role=role, content=draw(_text), images=images))
    return messages


_options = st.builds(
    Options,
    temperature=st.none() | st.floats(0, 2),
    top_k=st.none() | st.integers(0, 100),
    max_tokens=st.none() | st.integers(1, 4096),
    seed=st.none() | st.integers(-(2**31), 2**31),
    stop=st.none() | st.lists(_text, max_size=3).map(tuple),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories(), system=st.none() | _text, options=_options)
def test_any_conversation_round_trips(
    history: list[Message], system: str | None, options: Options
) -> None:
    """Random messages, roles, texts and (repeated) pictures reload equal, each picture once."""
    with tempfile.TemporaryDirectory() as directory:
        path = save(Path(directory) / "c.json", history, system=system, options=options)
        loaded = persist.load(path)
        assert loaded.history() == history
        assert (loaded.system, loaded.options) == (system, options)
        stored = json.loads(path.read_text())["pictures"]
        assert set(stored) == {i.sha256 for m in history for i in m.images}
        assert sorted(os.listdir(directory)) == ["c.json"]


@settings(max_examples=60, deadline=None)
@given(cut=st.floats(0.0, 1.0, exclude_max=True))
def test_every_truncation_is_refused(cut: float) -> None:
    """A file cut short anywhere raises ConversationFileError, never a partial conversation."""
    with tempfile.TemporaryDirectory() as directory:
        path = save(Path(directory) / "c.json", conversation())
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * cut)])
        load_error(path)


# ---------------------------------------------------------------------- atomic writes


def test_save_replaces_the_file_by_rename(saved: Path) -> None:
    """Saving again puts a new file in place (a rename), never rewriting the old one in place."""
    before = saved.stat().st_ino
    save(saved, conversation()[:2])
    assert saved.stat().st_ino != before
    assert len(persist.load(saved).history()) == 2
    assert sorted(p.name for p in saved.parent.iterdir()) == ["chat.json"]


def test_readers_never_see_a_half_written_file(tmp_path: Path) -> None:
    """While one thread saves over and over, another always loads one whole conversation."""
    path = tmp_path / "chat.json"
    small = conversation()[:2]
    large = [*conversation(), Message(role="user", content="x" * 200_000)]
    save(path, small)
    results: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                results.append(len(persist.load(path).history()))
            except BaseException as exc:  # any failure is the bug this test looks for
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(40):
            save(path, large if i % 2 else small)
    finally:
        done.set()
        thread.join()
    assert errors == []
    assert results
    assert set(results) <= {len(small), len(large)}


def test_failed_save_leaves_no_temporary_file(tmp_path: Path) -> None:
    """Saving onto a directory fails with an OutputFileError naming it, and leaves nothing."""
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputFileError, match="taken: it is a folder"):
        save(tmp_path / "taken", conversation())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_bad_picture_is_refused_before_touching_the_old_file(saved: Path) -> None:
    """A picture whose sha256 is not its data's is refused and the old file stays as it was."""
    before = saved.read_bytes()
    liar = PreparedImage(
        data=b"abc", mime="image/png", width=1, height=1, sha256="0" * 64, source="x.png"
    )
    with pytest.raises(InvalidRequestError, match=r"x\.png"):
        save(saved, [Message(role="user", content="hi", images=(liar,))])
    assert saved.read_bytes() == before


def test_replacing_keeps_the_file_mode(saved: Path) -> None:
    """Saving over an existing file keeps its permission bits."""
    saved.chmod(0o640)
    save(saved, conversation())
    assert stat.S_IMODE(saved.stat().st_mode) == 0o640


# ------------------------------------------------------------------------- damage


def test_not_json(tmp_path: Path) -> None:
    """Bytes that are not JSON are refused as such."""
    path = tmp_path / "c.json"
    path.write_bytes(b"hello, this is not json")
    assert "not JSON" in load_error(path)


def test_not_utf8(tmp_path: Path) -> None:
    """A binary file is refused as not JSON."""
    path = tmp_path / "c.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert "not JSON" in load_error(path)


def test_truncated_file_says_so(saved: Path) -> None:
    """A file that stops half-way is reported as truncated."""
    raw = saved.read_bytes()
    saved.write_bytes(raw[: len(raw) // 2])
    assert "ends too early" in load_error(saved)


def test_other_json_is_not_a_conversation(tmp_path: Path) -> None:
    """JSON of another kind (wrong format field, or a list) is refused by name."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": "something.else", "version": 1}))
    assert "not a llava-local conversation" in load_error(path)
    path.write_text("[1, 2, 3]")
    assert "not a llava-local conversation" in load_error(path)


def test_future_version_asks_for_an_upgrade(saved: Path) -> None:
    """A file from a newer format version is refused with advice to upgrade."""
    edit(saved, lambda d: d.update(version=5, new_field="whatever"))
    message = load_error(saved)
    assert "newer llava-local" in message
    assert "version 5" in message


def test_version_1_files_still_load(saved: Path) -> None:
    """A file from before the projector was recorded loads, with no projector."""
    model = "/models/llava-v1.5-7b-Q4_0.gguf"
    edit(saved, lambda d: (d.update(version=1, model=model), d.pop("engine")))
    loaded = persist.load(saved)
    assert (loaded.version, loaded.engine) == (1, {"model": model})
    assert loaded.history() == conversation()


def test_version_3_files_keep_their_model_and_projector(saved: Path) -> None:
    """A file of version 3 (model and projector beside the engine's settings) loads with
    them as its engine's settings, the one description a version 4 file has."""
    old = {"version": 3, "model": "/m/lm.gguf", "mmproj": "/m/mm.gguf", "engine": {"n_ctx": 900}}
    edit(saved, lambda d: d.update(old))
    loaded = persist.load(saved)
    assert loaded.engine == {"n_ctx": 900, "model": "/m/lm.gguf", "mmproj": "/m/mm.gguf"}
    assert loaded.model == "/m/lm.gguf"
    edit(saved, lambda d: d.update(version=4))  # model beside engine: not version 4
    assert "model" in load_error(saved)


def test_changed_picture_data_is_detected(saved: Path) -> None:
    """A picture whose bytes no longer match its sha256 is refused."""

    def tamper(document: dict[str, Any]) -> None:
        entry = next(iter(document["pictures"].values()))
        data = bytearray(base64.b64decode(entry["data"]))
        data[len(data) // 2] ^= 0x01
        entry["data"] = base64.b64encode(bytes(data)).decode()

    assert "does not match its sha256" in load_error(edit(saved, tamper))


def test_missing_picture_is_detected(saved: Path) -> None:
    """A message that refers to a picture absent from the file is refused."""

    def drop(document: dict[str, Any]) -> None:
        document["pictures"].pop(next(iter(document["pictures"])))

    assert "not in the file" in load_error(edit(saved, drop))


def test_picture_data_must_be_base64(saved: Path) -> None:
    """Picture data that is not base64 is refused."""

    def garble(document: dict[str, Any]) -> None:
        next(iter(document["pictures"].values()))["data"] = "not base64 !!"

    assert "base64" in load_error(edit(saved, garble))


def test_unknown_role_is_refused(saved: Path) -> None:
    """A message with a role the library does not know is refused, naming where."""
    message = load_error(edit(saved, lambda d: d["messages"][1].update(role="robot")))
    assert "messages.1.role" in message


def test_missing_file(tmp_path: Path) -> None:
    """A path with no file raises ConversationFileError too."""
    assert "cannot be read" in load_error(tmp_path / "nothing-here.json")
