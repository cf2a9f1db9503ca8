"""An engine from another installed package: found by its entry point and usable
everywhere an engine is, with no file of ours changed.

``tests/backends/mirror_engine`` is a package of its own (a ``pyproject.toml`` and one
module) announcing the engine ``mirror`` under the entry-point group
``llava_local.engines``. A module fixture installs it with pip into a temporary folder
(``--target``: nothing goes into the development environment), and every check runs
llava-local in a fresh process with that folder on ``PYTHONPATH``, as a user's
installed plugin would be found: through :class:`VisionChat`, the command line's
``--backend`` (with the plugin's own ``--shout`` flag), the web page and ``serve``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .. import serve_process
from ..paths import DIGIT, ROOT

PLUGIN = ROOT / "tests" / "backends" / "mirror_engine"


def _tree(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its modification time, to see nothing changed."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.py")}


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a process that has the mirror engine installed: the package
    built and installed by pip (from a copy, so no build files land in the repository)
    into a folder on ``PYTHONPATH``."""
    work = tmp_path_factory.mktemp("mirror_plugin")
    source, target = work / "source", work / "site"
    shutil.copytree(PLUGIN, source)
    ours = _tree(ROOT / "llava_local")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--target", str(target), str(source)),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert _tree(ROOT / "llava_local") == ours  # the install touched no file of ours
    (points,) = target.glob("llava_local_mirror_engine-*.dist-info/entry_points.txt")
    assert "[llava_local.engines]" in points.read_text()
    path = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in the repository with ``env``; fails with its stderr."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_the_plugin_engine_answers_through_vision_chat(plugin_env: dict[str, str]) -> None:
    """VisionChat("mirror", shout=True) opens the plugin's engine with its own setting,
    sends it the prepared picture, and describes it in its config like a built-in one."""
    script = (
        "import json\n"
        "from llava_local import VisionChat\n"
        "with VisionChat('mirror', shout=True) as chat:\n"
        "    print(chat.ask('what is it?', image='examples/digit.png').text)\n"
        "    print(json.dumps(chat.config['engine']))\n"
    )
    answer, config = run(plugin_env, "-c", script).stdout.splitlines()
    assert answer == "WHAT IS IT? [1 picture(s)]"
    assert config == '{"shout": true}'


def test_the_plugin_engine_is_a_command_line_choice_with_its_own_flags(
    plugin_env: dict[str, str],
) -> None:
    """`--backend mirror` is accepted and listed, and the engine's own setting is a flag
    of the command line, read from its config (`--shout`, with its help)."""
    help_text = run(plugin_env, "-m", "llava_local.cli", "ask", "--help").stdout
    assert "mirror" in help_text
    assert "--shout" in help_text
    assert "Answer in capitals (mirror engine)." in " ".join(help_text.split())
    asked = run(
        plugin_env,
        "-m",
        "llava_local.cli",
        "ask",
        str(DIGIT),
        "say it",
        "--backend",
        "mirror",
        "--shout",
        "--no-stream",
    )
    assert asked.stdout.strip() == "SAY IT [1 picture(s)]"


def test_the_plugin_engine_is_on_the_web_page(plugin_env: dict[str, str]) -> None:
    """The page lists the plugin's engine, a tab choosing it answers through it, and the
    page's engine pool opens it once for two tabs."""
    script = (
        "from llava_local.apps.ui import _Sessions, build_app\n"
        "from llava_local.backends import engine_names\n"
        "print('mirror' in engine_names())\n"
        "app = build_app(backend='mirror')\n"
        "sessions = _Sessions({'backend': 'mirror', 'model': None})\n"
        "a, b = sessions.get('a'), sessions.get('b')\n"
        "*_, (text, _) = a.turn('hello', 'examples/digit.png')\n"
        "*_, (other, _) = b.turn('again', None)\n"
        "print(text)\n"
        "print(other)\n"
        "print(a.chat.engine is b.chat.engine, len(sessions.engines.open_engines()))\n"
        "sessions.close_all()\n"
    )
    listed, text, other, shared = run(plugin_env, "-c", script).stdout.splitlines()
    assert listed == "True"
    assert text == "hello [1 picture(s)]"
    assert other == "again [0 picture(s)]"
    assert shared == "True 1"


@pytest.fixture
def mirror_server(plugin_env: dict[str, str], tmp_path: Path) -> Iterator[serve_process.Server]:
    server = serve_process.start(
        tmp_path / "serve.log", "--backend", "mirror", "--shout", env=plugin_env
    )
    try:
        yield server
    finally:
        serve_process.stop(server)


def test_the_plugin_engine_is_served(mirror_server: serve_process.Server) -> None:
    """`serve --backend mirror --shout` answers OpenAI's and Ollama's chat routes with the
    plugin's engine and lists its model."""
    url = mirror_server.url
    body = {"model": "mirror-1", "messages": serve_process.ask(DIGIT, "what?")}
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    assert answer["choices"][0]["message"]["content"] == "WHAT? [1 picture(s)]"
    listed = httpx.get(f"{url}/v1/models", timeout=60).json()
    assert [m["id"] for m in listed["data"]] == ["mirror-1"]
    ollama = {"model": "mirror-1", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
    reply = httpx.post(f"{url}/api/chat", json=ollama, timeout=60).json()
    assert reply["message"]["content"] == "HI [0 picture(s)]"
