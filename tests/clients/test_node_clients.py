"""The Node ``ollama`` and ``openai`` packages, driven as their READMEs show
(node_clients.mjs), against the real ``serve`` behind the recording proxy. npm installs
them once into a cache folder (registry access only); without ``node`` and ``npm`` on
the machine these tests are skipped, saying so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ..paths import DIGIT
from ..serve_process import ANSWER
from .recorder import Recorder

pytestmark = pytest.mark.llama

#: The packages and the versions the issue's report tried.
PACKAGES = ("ollama@0.6", "openai@6")
SCRIPT = Path(__file__).with_name("node_clients.mjs")


@pytest.fixture(scope="session")
def node_folder() -> Path:
    """A folder with the packages installed by npm (kept between runs) and the script
    beside them (Node resolves an ES module's imports from where the module is)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed: the Node clients cannot be tried")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    folder = cache / "llava-local" / "node-clients" / "-".join(PACKAGES).replace("@", "")
    if (
        not (folder / "node_modules" / "openai").is_dir()
        or not (folder / "node_modules" / "ollama").is_dir()
    ):
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(folder), *PACKAGES],
            check=True,
            capture_output=True,
            timeout=600,
        )
    shutil.copyfile(SCRIPT, folder / SCRIPT.name)
    return folder


def test_node_ollama_and_openai_packages(recorder: Recorder, node_folder: Path) -> None:
    """Both Node packages read the digit: ollama's chat (whole and streamed) and
    generate, openai's chat completions (whole and streamed, with usage)."""
    mark = len(recorder.seen)
    done = subprocess.run(
        ["node", SCRIPT.name, recorder.url, str(DIGIT)],
        cwd=node_folder,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("ollama_chat", "ollama_stream", "ollama_generate", "openai_chat", "openai_stream"):
        assert said[key] == ANSWER, key
    assert said["ollama_eval_count"] > 0
    assert said["openai_completion_tokens"] > 0
    chats = recorder.posts(mark, "/api/chat")
    assert [body.get("stream") for body in chats] == [False, True]
    assert chats[0]["messages"][0]["images"]
    (generate,) = recorder.posts(mark, "/api/generate")
    assert generate["images"]
    completions = recorder.posts(mark, "/v1/chat/completions")
    assert completions[1]["stream_options"] == {"include_usage": True}
