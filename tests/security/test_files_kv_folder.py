"""The KV-state folder is this user's alone (issue 25, finding 5).

``--kv-cache DIR`` / ``kv_cache_dir=`` names a folder the engine writes states to and
prunes. Anyone who can write to it could plant states (read as the model's memory) or
files for the engine to delete; and a pruning that removes whatever looks temporary
deletes other programs' work. Each test uses a real folder and a real engine.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from llava_local import InvalidRequestError, VisionChat
from llava_local.backends.llama_cpp import LlamaCppBackend
from llava_local.cli import main
from llava_local.demo import demo_paths

from ..option_args import OptionArgs
from ..paths import DIGIT, SHAPE

pytestmark = pytest.mark.llama

GREEDY: OptionArgs = {"temperature": 0, "max_tokens": 24}


def engine(folder: Path, **settings: Any) -> LlamaCppBackend:
    model, mmproj = demo_paths()
    return LlamaCppBackend(model, mmproj, kv_cache_dir=folder, kv_cache_mb=0, **settings)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_folder_is_made_for_this_user_only(tmp_path: Path) -> None:
    """A missing folder is created 0700 (and the folder of each model's states in it),
    so other users can neither read the states nor put any there."""
    folder = tmp_path / "cache" / "kv"
    with VisionChat(engine(folder)) as chat:
        chat.ask("What digit is this?", image=DIGIT, **GREEDY)
        directory = chat.engine.kv_cache.disk.directory  # type: ignore[attr-defined]
    assert mode(folder) == 0o700
    assert mode(directory) == 0o700


@pytest.mark.parametrize("bits", [0o777, 0o770, 0o702], ids=["everyone", "group", "others"])
def test_a_folder_others_may_write_to_is_refused(tmp_path: Path, bits: int) -> None:
    """A folder that the group or others may write to is refused when the engine opens,
    naming it and the fix, in Python and on the command line."""
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(bits)
    with pytest.raises(InvalidRequestError, match=f"chmod 700 {folder}"):
        engine(folder)
    args = ["ask", str(DIGIT), "What digit is this?", "--backend", "llama_cpp"]
    result = CliRunner().invoke(main, [*args, "--kv-cache", str(folder)])
    assert result.exit_code != 0
    assert "can be written by other users" in result.output
    assert list(folder.iterdir()) == []


def test_a_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    """A folder that belongs to another user is refused, even one this process could
    write to (as root can)."""
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, os.geteuid() + 4321, -1)
    with pytest.raises(
        InvalidRequestError, match=f"belongs to another user \\(uid {os.geteuid() + 4321}\\)"
    ):
        engine(folder)
    assert list(folder.iterdir()) == []


def test_only_the_caches_own_files_are_ever_removed(tmp_path: Path) -> None:
    """Pruning the folder (old temporary files, states over the size bound) removes
    only names the cache writes: other programs' old ``*.tmp`` files, in the folder or
    in a folder of theirs, and odd files among the states, stay."""
    folder = tmp_path / "kv"
    folder.mkdir(mode=0o700)
    first = engine(folder)
    with VisionChat(first) as chat:
        chat.ask("What digit is this?", image=DIGIT, **GREEDY)
        ours = chat.engine.kv_cache.disk.directory  # type: ignore[attr-defined]
    (state,) = ours.glob("*.kvstate")
    (folder / "otherapp").mkdir()
    keep = [folder / "otherapp" / "important.tmp", folder / "important.tmp", ours / "notes.tmp"]
    stale = ours / f".{state.name}.x1y2z3ab.tmp"  # a writer of ours that died
    old = time.time() - 7200
    for path in [*keep, stale]:
        path.write_text("work")
        os.utime(path, (old, old))
    budget = state.stat().st_size * 1.5 / 2**30  # room for one state: pruning runs
    with VisionChat(engine(folder, kv_cache_dir_gb=budget)) as chat:
        assert chat.ask("What shape is this?", image=SHAPE, **GREEDY).text == "It is a triangle."
    assert all(path.read_text() == "work" for path in keep)
    assert not stale.exists()
    assert not state.exists()  # the older state went to make room
