"""The library's wheel holds no development tools, and the library never imports ``gguf``.

The development package (``dev/llava_local_dev``: the GGUF writer, the numpy reference,
the libmtmd runner) needs ``gguf``; a runtime install has neither.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

from ..paths import ROOT

_NOT_SOURCE = (".git", ".venv", "build", "dist", "test-artifacts", "*.egg-info", "*cache*")
_IMPORTS_GGUF = re.compile(r"^\s*(import gguf\b|from gguf\b)", re.MULTILINE)


def test_the_wheel_has_no_development_module(tmp_path: Path) -> None:
    """``pip wheel .`` packs the library only: no gguf_writer, no dev package, no gguf import."""
    source = tmp_path / "src"  # a copy: the build writes build/ and egg-info beside it
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    out = tmp_path / "wheels"
    # without build isolation: nothing downloaded, the setuptools dev/ installs builds it
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*command, "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("llava_local-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        sources = {n: archive.read(n).decode() for n in names if n.endswith(".py")}
    assert "llava_local/chat.py" in names  # the library itself is there
    assert not [n for n in names if "gguf_writer" in n or "llava_local_dev" in n]
    assert not [n for n in names if n.startswith(("tests/", "training/", "benchmarks/"))]
    assert not [n for n, text in sources.items() if _IMPORTS_GGUF.search(text)]


def test_a_whole_demo_turn_never_imports_gguf() -> None:
    """Importing every library module and answering on the demo loads neither gguf nor dev."""
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import llava_local
        from llava_local import VisionChat
        for module in pkgutil.walk_packages(llava_local.__path__, "llava_local."):
            if not module.name.endswith("__main__"):  # that one runs the CLI
                importlib.import_module(module.name)
        with VisionChat.llama_cpp(temperature=0) as chat:
            reply = chat.ask("What digit is this?", "examples/digit.png")
        print(reply.text)
        assert "gguf" not in sys.modules, "the library imported gguf"
        assert not [m for m in sys.modules if "gguf_writer" in m], "a GGUF writer in the library"
        assert "llava_local_dev" not in sys.modules, "the library imported the dev package"
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "digit is" in result.stdout
