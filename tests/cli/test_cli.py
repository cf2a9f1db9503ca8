"""The llava-local command line: ask, --json, --version, and errors as clean exits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from llava_local import __version__
from llava_local.cli import main

from ..gguf_fixtures import GgufPair
from ..ollama_server import OllamaServer, Script


def llama_args(pair: GgufPair) -> list[str]:
    return ["--backend", "llama_cpp", "-m", str(pair.lm), "--mmproj", str(pair.mmproj)]


def test_version() -> None:
    """--version prints the package version."""
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_ask_streams_from_the_daemon(ollama_server: OllamaServer, picture: Path) -> None:
    """`ask` prints the streamed answer and sends the picture and prompt."""
    ollama_server.script(Script(pieces=["A ", "red ", "square."]))
    args = ["ask", str(picture), "What is it?", "--backend", "ollama", "--host", ollama_server.url]
    result = CliRunner().invoke(main, [*args, "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "A red square.\n"
    body = ollama_server.requests_to("/api/chat")[0].json
    assert body["messages"][-1]["content"] == "What is it?"
    assert body["messages"][-1]["images"]
    assert body["options"] == {"temperature": 0.0}


def test_ask_json_with_the_in_process_engine(tiny_pair: GgufPair, picture: Path) -> None:
    """--json prints the whole reply with stats, from llama.cpp in this process."""
    args = ["ask", str(picture), "What?", *llama_args(tiny_pair), "--json", "--max-tokens", "3"]
    result = CliRunner().invoke(main, [*args, "--temperature", "0"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["backend"] == "llama_cpp"
    assert data["stats"]["images_encoded"] == 1
    assert data["stats"]["completion_tokens"] <= 3


def test_errors_exit_1_with_one_line(tmp_path: Path, closed_port: int) -> None:
    """A library error prints `error: ...` on stderr and exits 1, without a traceback."""
    missing = tmp_path / "nope.jpg"
    result = CliRunner().invoke(
        main,
        ["ask", str(missing), "Hi", "--backend", "ollama", "--host", f"127.0.0.1:{closed_port}"],
    )
    assert result.exit_code == 1
    assert "error:" in result.stderr
    assert "nope.jpg" in result.stderr
    assert "Traceback" not in result.output


def test_installed_script_runs(tiny_pair: GgufPair, picture: Path) -> None:
    """The installed `llava-local` console script answers in a real subprocess."""
    beside = Path(sys.executable).parent / "llava-local"  # this environment's script first
    exe = str(beside) if beside.exists() else shutil.which("llava-local")
    assert exe, "llava-local is not installed in this environment"
    cmd = [
        exe,
        "ask",
        str(picture),
        "What?",
        *llama_args(tiny_pair),
        "--no-stream",
        "--max-tokens",
        "2",
        "--temperature",
        "0",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "add_text" not in done.stderr  # libmtmd's chatter stays quiet


def test_ui_and_serve_bound_pictures_alike() -> None:
    """`ui` and `serve` take the same --max-picture-mb with the same default, so the
    largest picture means the same on the page and in the API."""
    defaults = {}
    for command in ("ui", "serve"):
        cli = main.commands[command]
        (option,) = [p for p in cli.params if "--max-picture-mb" in getattr(p, "opts", ())]
        defaults[command] = option.default
    assert defaults == {"ui": 20.0, "serve": 20.0}
