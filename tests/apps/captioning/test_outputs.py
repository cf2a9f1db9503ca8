"""The two output formats refuse each other's kind of path, before anything is asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_local import InvalidRequestError, VisionChat
from llava_local.apps.captioning import caption

from ...gguf_fixtures import png_bytes
from ...ollama_server import OllamaServer


def test_each_format_refuses_the_others_kind_of_path(
    ollama_server: OllamaServer, tmp_path: Path
) -> None:
    """A JSON Lines output that is a folder is refused naming the Parquet format, a
    Parquet output that is a file is refused as a file, and the daemon is asked nothing."""
    picture = tmp_path / "p.png"
    picture.write_bytes(png_bytes((40, 40), seed=1))
    folder, file = tmp_path / "folder", tmp_path / "file.jsonl"
    folder.mkdir()
    file.write_text("")
    with VisionChat.ollama(host=ollama_server.url) as chat:
        with pytest.raises(InvalidRequestError, match=r"is a folder.*Parquet"):
            caption(chat, picture, folder, prompt="C.", progress=False)
        with pytest.raises(InvalidRequestError, match="is a file; a Parquet output is a folder"):
            caption(chat, picture, file, prompt="C.", format="parquet", progress=False)
    assert ollama_server.requests_to("/api/chat") == []
    assert list(folder.iterdir()) == []
