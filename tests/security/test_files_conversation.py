"""Saved conversations are data, not orders (issue 25, finding 3).

A conversation file may come from anyone (a shared chat, a download). Each test hands
``VisionChat.load`` a real file written the way an attacker would write it, with real
servers on 127.0.0.1 standing for the attacker's address and for the user's own, and
checks what reached each of them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llava_local import ConversationFileError, InvalidRequestError, VisionChat, persist
from llava_local.images import prepare
from llava_local.types import Message, Options

from ..ollama_server import OllamaServer
from ..openai_server import ScriptedServer
from ..paths import DIGIT
from .files_fixtures import grey_png, peak_growth

SECRET = "sk-the-users-own-key"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 24}


def conversation_file(path: Path, backend: str, model: str, engine: dict[str, Any]) -> Path:
    """A conversation about the demo digit, saved as a file that says which engine,
    model and settings (``engine``) to continue on."""
    digit = prepare(DIGIT, max_side=64)
    history = [
        Message(role="user", content="What digit is this?", images=(digit,)),
        Message(role="assistant", content="This digit is 7."),
    ]
    return persist.save(
        path,
        history=history,
        system=None,
        options=Options(),
        backend=backend,
        engine={"model": model, **engine},
    )


@pytest.fixture
def user_openai() -> Iterator[ScriptedServer]:
    """The user's own OpenAI-compatible server."""
    server = ScriptedServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def openai_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """The user's API key in the environment, and no server address there."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return SECRET


def _load_and_ask(path: Path, **kwargs: Any) -> str:
    """Load ``path`` and ask a follow-up; the refusal's text, or "" if it went through."""
    try:
        with VisionChat.load(path, **kwargs) as chat:
            chat.ask("And its colour?")
    except InvalidRequestError as exc:
        return str(exc)
    return ""


def test_a_file_naming_another_server_never_gets_the_key_or_the_conversation(
    scripted_openai: ScriptedServer, openai_key: str, tmp_path: Path
) -> None:
    """A file whose openai engine points at a server only it names is refused at load,
    naming that address and how to confirm it; no request (and so no key) reaches it."""
    attacker = scripted_openai
    path = conversation_file(
        tmp_path / "talk.json", "openai", "scripted-vision", {"base_url": attacker.url}
    )
    refused = _load_and_ask(path)
    leaked = [(r.path, r.headers.get("authorization")) for r in attacker.requests]
    assert leaked == []
    assert attacker.url in refused
    assert f"base_url={attacker.url!r}" in refused
    assert "use_saved_address=True" in refused


def test_an_ollama_host_only_the_file_names_is_never_contacted(
    ollama_server: OllamaServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for the Ollama engine's host: the conversation and its picture never
    reach a daemon that only the file names."""
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    attacker = ollama_server
    path = conversation_file(tmp_path / "talk.json", "ollama", "llava", {"host": attacker.url})
    refused = _load_and_ask(path)
    assert attacker.requests == []
    assert f"host={attacker.url!r}" in refused
    assert "use_saved_address=True" in refused


def test_the_callers_server_is_used_and_the_files_only_when_confirmed(
    scripted_openai: ScriptedServer,
    user_openai: ScriptedServer,
    openai_key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With base_url given, the conversation and the key go to the caller's server and
    nothing to the file's; the file's own address, spelled differently, is the same
    server; use_saved_address=True sends it to the file's address."""
    attacker = scripted_openai
    path = conversation_file(
        tmp_path / "talk.json", "openai", "scripted-vision", {"base_url": attacker.url}
    )
    assert _load_and_ask(path, base_url=user_openai.url) == ""
    assert attacker.requests == []
    (chat,) = user_openai.chats()
    first = json.dumps(chat["messages"][0])
    assert "What digit is this?" in first
    assert "data:image/png;base64," in first  # the picture went where the caller said
    assert user_openai.requests[-1].headers["authorization"] == f"Bearer {SECRET}"

    same = conversation_file(
        tmp_path / "same.json",
        "openai",
        "scripted-vision",
        {"base_url": user_openai.url.removeprefix("http://").removesuffix("/v1")},
    )
    monkeypatch.setenv("OPENAI_BASE_URL", user_openai.url)
    assert _load_and_ask(same) == ""
    assert len(user_openai.chats()) == 2
    assert attacker.requests == []

    assert _load_and_ask(path, use_saved_address=True) == ""
    assert len(attacker.chats()) == 1


def test_runtime_settings_in_a_file_are_never_used(tmp_path: Path) -> None:
    """A file's engine section names a KV-state folder holding another program's files
    and this machine's threads and memory settings: none is used (the folder is neither
    written nor pruned); the context size, which decides what fits, is."""
    victim = tmp_path / "victim"
    (victim / "otherapp").mkdir(parents=True)
    planted = [victim / "otherapp" / "important.tmp", victim / "important.tmp"]
    for file in planted:
        file.write_text("another program's work")
        old = time.time() - 7200
        os.utime(file, (old, old))
    engine = {"kv_cache_dir": str(victim), "kv_cache_dir_gb": 1e-6, "n_threads": 1}
    engine |= {"kv_cache_mb": 0, "force": True, "verbose": True, "n_ctx": 1024}
    path = conversation_file(tmp_path / "talk.json", "llama_cpp", "demo", engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persist.ColdResumeWarning)  # saved with no .kv
        chat = VisionChat.load(path, **GREEDY)
    with chat:
        assert chat.config["engine"] == {"model": "demo", "n_ctx": 1024}
        assert chat.ask("Is it a 7?").text
    assert all(file.read_text() == "another program's work" for file in planted)
    assert sorted(p.name for p in victim.rglob("*")) == [
        "important.tmp",
        "important.tmp",
        "otherapp",
    ]


_LOAD_AND_ASK = """
chat = VisionChat.load(sys.argv[1], temperature=0, max_tokens=8)
result["answer"] = chat.ask("What is it?").text
"""


@pytest.mark.parametrize("stated", [(20000, 20000), (64, 64)], ids=["honest", "lying"])
def test_a_decompression_bomb_inside_a_file_is_refused_at_load(
    tmp_path: Path, stated: tuple[int, int]
) -> None:
    """A 388 KB PNG of 20000x20000 pixels stored in a conversation (stating its size, or
    a small one) is refused when the file is loaded, as any picture would be, and costs
    nothing; before, the engine decoded it: 2.4 GiB."""
    bomb = grey_png(20000, 20000)
    assert len(bomb) < 400_000
    path = conversation_file(tmp_path / "talk.json", "llama_cpp", "demo", {})
    document = json.loads(path.read_text())
    (key,) = document["pictures"]
    document["pictures"] = {
        hashlib.sha256(bomb).hexdigest(): {
            "mime": "image/png",
            "width": stated[0],
            "height": stated[1],
            "source": "bomb.png",
            "data": base64.b64encode(bomb).decode(),
        }
    }
    document["messages"][0]["images"] = [hashlib.sha256(bomb).hexdigest()]
    path.write_text(json.dumps(document))
    assert key not in path.read_text()
    measured = peak_growth(_LOAD_AND_ASK, str(path))
    assert measured.get("error", "").startswith("ConversationFileError: "), measured
    assert "bomb.png" in measured["error"]
    assert measured["growth_mib"] < 64
    with VisionChat.llama_cpp() as chat:  # restore (the REPL's /load) refuses it too
        with pytest.raises(ConversationFileError, match=r"bomb\.png"):
            chat.restore(path)
        assert chat.history == []


def test_a_picture_larger_than_the_engine_takes_is_shrunk_at_load(tmp_path: Path) -> None:
    """A file may hold a picture far larger than any the chat would send (within the
    limits): loading shrinks it as preparing any picture does, so the engine never
    decodes it at full size; a picture of the right size comes back byte for byte."""
    big = grey_png(4000, 3000)
    path = conversation_file(tmp_path / "talk.json", "llama_cpp", "demo", {})
    document = json.loads(path.read_text())
    (small,) = document["pictures"]
    key = hashlib.sha256(big).hexdigest()
    document["pictures"][key] = {
        "mime": "image/png",
        "width": 4000,
        "height": 3000,
        "source": "big.png",
        "data": base64.b64encode(big).decode(),
    }
    document["messages"][0]["images"].append(key)
    path.write_text(json.dumps(document))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", persist.ColdResumeWarning)  # saved with no .kv
        chat = VisionChat.load(path, **GREEDY)
    with chat:
        kept, shrunk = chat.history[0].images
        assert kept.sha256 == small
        assert (shrunk.source, max(shrunk.width, shrunk.height)) == ("big.png", chat.max_image_side)
        side = chat.max_image_side
        assert shrunk.changes == (f"shrunk 4000x3000 -> {side}x{round(side * 3 / 4)}",)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", persist.ColdResumeWarning)
            chat.restore(path)
        assert chat.history[0].images[1] == shrunk
