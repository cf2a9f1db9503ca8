"""Saving a conversation from VisionChat and continuing it later, on either engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from llava_local import (
    BackendUnavailableError,
    ConversationFileError,
    InvalidRequestError,
    ModelNotFoundError,
    VisionChat,
    catalog,
)
from llava_local.demo import demo_paths

from ..gguf_fixtures import GgufPair, png_bytes
from ..hub_server import prefill
from ..ollama_server import OllamaServer, Script
from ..option_args import OptionArgs

GREEDY: OptionArgs = {"temperature": 0, "max_tokens": 6}
SMOL = catalog.find("smolvlm-256m")


def test_save_and_load_continue_the_same_conversation(tiny_pair: GgufPair, tmp_path: Path) -> None:
    """A loaded conversation has the same history and answers as the one left running."""
    path = tmp_path / "talk.json"
    picture = png_bytes(seed=60)
    with VisionChat.llama_cpp(tiny_pair.lm, mmproj=tiny_pair.mmproj, system="Be short.") as chat:
        chat.ask("What is it?", image=picture, **GREEDY)
        chat.ask("Again?", **GREEDY)
        assert chat.save(path) == path
        history = chat.history
        expected = chat.ask("And now?", **GREEDY).text
    with VisionChat.load(path, mmproj=tiny_pair.mmproj) as again:
        assert again.history == history
        assert again.system == "Be short."
        assert again.backend == "llama_cpp"
        assert again.ask("And now?", **GREEDY).text == expected


def test_load_finds_the_projector_it_was_saved_with(tiny_pair_q4: GgufPair, tmp_path: Path) -> None:
    """The projector is saved with the conversation: a pair in two folders (no mmproj
    beside the model to find) loads again without naming it."""
    assert tiny_pair_q4.lm.parent != tiny_pair_q4.mmproj.parent
    path = tmp_path / "talk.json"
    with VisionChat.llama_cpp(tiny_pair_q4.lm, mmproj=tiny_pair_q4.mmproj) as chat:
        chat.ask("What is it?", image=png_bytes(seed=62), **GREEDY)
        chat.save(path)
    assert json.loads(path.read_text())["engine"]["mmproj"] == str(tiny_pair_q4.mmproj)
    with VisionChat.load(path) as again:
        assert again.model == tiny_pair_q4.lm.name
        again.ask("More?", **GREEDY)
        assert len(again.history) == 4


def test_load_uses_the_engine_settings_it_was_saved_with(
    ollama_server: OllamaServer, tmp_path: Path
) -> None:
    """The engine settings that decide what fits (the context size) are saved and used
    again by load; the daemon's address is saved too, but used only when the caller
    gives it or confirms the file's (a file does not choose where a conversation goes)."""
    path = tmp_path / "talk.json"
    ollama_server.script(
        Script(pieces=["A", " cat."]), Script(pieces=["Grey."]), Script(pieces=["Small."])
    )
    with VisionChat.ollama("llava", host=ollama_server.url, num_ctx=2048, timeout=30) as chat:
        chat.ask("What is it?", image=png_bytes(seed=64))
        chat.save(path)
    assert json.loads(path.read_text())["engine"] == {
        "model": "llava",
        "host": ollama_server.url,
        "num_ctx": 2048,
    }
    with pytest.raises(InvalidRequestError, match=r"host='http://127\.0\.0\.1:\d+'.*use_saved_"):
        VisionChat.load(path)  # no host given: neither the file's nor, silently, 11434
    with VisionChat.load(path, host=ollama_server.url) as again:
        assert again.config["engine"]["host"] == ollama_server.url
        assert "timeout" not in again.config["engine"]  # this machine's, not the file's
        assert again.ask("Colour?").text == "Grey."
    assert ollama_server.requests_to("/api/chat")[-1].json["options"]["num_ctx"] == 2048
    with VisionChat.load(path, use_saved_address=True) as trusted:
        assert trusted.ask("Size?").text == "Small."
    with (
        pytest.raises(BackendUnavailableError, match=r"127\.0\.0\.1:9"),
        VisionChat.load(path, host="127.0.0.1:9") as elsewhere,
    ):
        elsewhere.ask("Again?")


def test_demo_conversation_is_saved_by_name(tmp_path: Path) -> None:
    """A conversation with the bundled demo names it "demo", not a path inside this
    install, and loads back on it."""
    path = tmp_path / "demo.json"
    with VisionChat.llama_cpp() as chat:
        chat.ask("What shape is this?", image=png_bytes(seed=63), **GREEDY)
        chat.save(path)
    document = json.loads(path.read_text())
    assert document["engine"] == {"model": "demo"}
    with VisionChat.load(path) as again:
        assert again.model == "demo-lm.gguf"
        assert again.history == chat.history
    lm, mmproj = demo_paths()  # the same files given by their paths: still "demo"
    with VisionChat.llama_cpp(lm, mmproj=mmproj) as by_path:
        by_path.save(path)
    document = json.loads(path.read_text())
    assert document["engine"] == {"model": "demo"}


def test_pulled_conversation_is_saved_by_its_catalogue_name(
    tiny_pair: GgufPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pulled catalogue model is recorded by its name, not by Hugging Face cache paths
    (another machine's differ); it loads back on this cache's pair, and where it is not
    pulled, the error says how to pull it."""
    cache = tmp_path / "hf-cache"
    files = {
        str(SMOL.gguf): tiny_pair.lm.read_bytes(),
        str(SMOL.mmproj): tiny_pair.mmproj.read_bytes(),
    }
    prefill(cache, SMOL, files)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    path = tmp_path / "talk.json"
    with VisionChat.llama_cpp(SMOL.name) as chat:
        chat.ask("What is it?", image=png_bytes(seed=64), **GREEDY)
        chat.save(path)
    document = json.loads(path.read_text())
    assert document["engine"]["model"] == SMOL.name
    assert "mmproj" not in document["engine"]
    with VisionChat.load(path) as again:
        assert again.model == Path(str(SMOL.gguf)).name
        assert again.history == chat.history
        again.ask("More?", **GREEDY)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError, match=f"run `llava-local pull {SMOL.name}`"):
        VisionChat.load(path)


def test_restore_replaces_the_conversation_or_nothing(
    ollama_server: OllamaServer, tmp_path: Path
) -> None:
    """restore() loads a saved conversation into a running chat; a damaged file changes nothing."""
    ollama_server.script(Script(pieces=["A cat."]))
    path = tmp_path / "talk.json"
    with VisionChat.ollama(host=ollama_server.url) as chat:
        chat.ask("What?", image=png_bytes(seed=61))
        chat.save(path)
        saved = chat.history
        chat.reset()
        chat.ask("Other?")
        broken = tmp_path / "broken.json"
        broken.write_bytes(path.read_bytes()[:-40])
        before = chat.history
        with pytest.raises(ConversationFileError):
            chat.restore(broken)
        assert chat.history == before
        chat.restore(path)
        assert chat.history == saved
        chat.ask("More?")
    sent = ollama_server.requests_to("/api/chat")[-1].json["messages"]
    assert [m["content"] for m in sent] == ["What?", "A cat.", "More?"]
    assert sent[0]["images"]
