"""KV-state files are authenticated and checked before llama.cpp reads them (issue 25,
finding 4).

A KV state is the model's memory of a conversation: restoring one makes the model answer
as if it had read what the state's keys name. Each attack is a real file, handed to
``VisionChat.load`` (the ``.kv`` beside a saved conversation) or planted in the folder
of a real ``llava-local serve --kv-cache DIR`` subprocess on 127.0.0.1 (started once for
the module), and each checks what the model answers afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from llava_local import VisionChat
from llava_local.backends.llama_cpp import kv_cache as kv
from llava_local.persist import ColdResumeWarning, state_path

from ..paths import DIGIT, SHAPE
from ..serve_process import Server, start, stop
from ..serve_process import ask as ask_about
from .files_fixtures import (
    digit_three,
    forged,
    raw_state_file,
    state_parts,
    unpack_keys,
    with_position,
)

pytestmark = pytest.mark.llama

QUESTION = "What digit is this?"
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 24}


def saved_about(picture: Path, path: Path) -> Path:
    """A conversation about ``picture`` saved at ``path`` (with its .kv), as a user saves one."""
    with VisionChat.llama_cpp(**GREEDY) as chat:
        chat.ask(QUESTION, image=picture)
        chat.save(path)
    assert state_path(path).is_file()
    return path


def load_and_follow_up(path: Path) -> tuple[str, int, list[str]]:
    """Load ``path``, ask a follow-up: the answer, the pictures it encoded, the warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with VisionChat.load(path) as chat:
            reply = chat.ask("What digit is it?")
    said = [str(w.message) for w in caught if issubclass(w.category, ColdResumeWarning)]
    return reply.text, reply.stats.images_encoded or 0, said


def test_a_three_stored_under_the_keys_of_a_seven_is_never_restored(tmp_path: Path) -> None:
    """The state of a conversation about a 3, put beside a conversation about a 7 with
    the 7's keys and a recomputed checksum, loads cold with a ColdResumeWarning: the
    model reads the 7 again and says 7 (before: "This digit is 3.", silently)."""
    three = saved_about(digit_three(tmp_path), tmp_path / "three.json")
    seven = saved_about(DIGIT, tmp_path / "seven.json")
    kv_seven = state_path(seven)
    kv_seven.write_bytes(forged(state_path(three).read_bytes(), kv_seven.read_bytes()))
    answer, encoded, said = load_and_follow_up(seven)
    assert answer == "This digit is 7."
    assert encoded == 1
    assert any("was not written with this user's key" in s for s in said), said


def test_a_state_written_with_another_users_key_loads_cold(tmp_path: Path) -> None:
    """A conversation saved by another user (another key) and copied here loads cold,
    with a ColdResumeWarning, and answers right; this user's own saves load warm."""
    other = tmp_path / "other-user"
    code = (
        "import sys; from llava_local import VisionChat\n"
        "with VisionChat.llama_cpp(temperature=0, max_tokens=24) as chat:\n"
        "    chat.ask('What digit is this?', image=sys.argv[2]); chat.save(sys.argv[1])\n"
    )
    env = {**os.environ, "LLAVA_LOCAL_STATE_DIR": str(other / "state")}
    path = tmp_path / "theirs.json"
    subprocess.run([sys.executable, "-c", code, str(path), str(DIGIT)], env=env, check=True)
    answer, encoded, said = load_and_follow_up(path)
    assert (answer, encoded) == ("This digit is 7.", 1)
    assert said
    mine = saved_about(DIGIT, tmp_path / "mine.json")
    answer, encoded, said = load_and_follow_up(mine)
    assert (answer, encoded, said) == ("This digit is 7.", 0, [])


def test_a_token_id_outside_the_vocabulary_loads_cold_not_an_exception(tmp_path: Path) -> None:
    """A state whose keys name token 10^12 (written with this user's own writer) loads
    cold with a ColdResumeWarning; before, load raised OverflowError."""
    path = saved_about(DIGIT, tmp_path / "talk.json")
    header, _, state, _ = state_parts(state_path(path).read_bytes())
    keys = list(unpack_keys(header["keys"]))
    keys[-1] = 10**12
    kv.write_state(state_path(path), header["identity"], kv.KVState(tuple(keys), state))
    answer, encoded, said = load_and_follow_up(path)
    assert (answer, encoded) == ("This digit is 7.", 1)
    assert said


# -- through the server ---------------------------------------------------------------


@dataclass
class Served:
    server: Server
    folder: Path
    shape: str = ""  # the shape picture's sha256 in the keys

    @property
    def url(self) -> str:
        return self.server.url

    def peak_rss_mib(self) -> float:
        """The server's peak resident memory so far (VmHWM)."""
        status = Path(f"/proc/{self.server.process.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")

    def states(self) -> list[Path]:
        return sorted(self.folder.rglob(f"*{kv.SUFFIX}"), key=lambda p: p.stat().st_mtime_ns)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``llava-local serve --kv-cache DIR --kv-cache-mb 0`` on the demo: kept states
    live only in the folder, so each restore reads a file."""
    base = tmp_path_factory.mktemp("served")
    folder = base / "kv"
    args = ["--backend", "llama_cpp", "--kv-cache", str(folder), "--kv-cache-mb", "0"]
    running = start(base / "server.log", *args)
    served = Served(running, folder)
    answer(served, SHAPE, "What shape is this?")  # the only picture in the folder yet
    (served.shape,) = set.union(*map(pictures_in, settled(served)))
    yield served
    stop(running)


def ask(served: Served, picture: Path, question: str = QUESTION) -> httpx.Response:
    """One OpenAI-style request about ``picture`` (sent as a data URI)."""
    body = {"model": "demo", "messages": ask_about(picture, question), **GREEDY}
    return httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=120)


def answer(served: Served, picture: Path, question: str = QUESTION) -> str:
    response = ask(served, picture, question)
    assert response.status_code == 200, (response.text, served.server.log_text())
    return str(response.json()["choices"][0]["message"]["content"])


def pictures_in(path: Path) -> set[str]:
    """The sha256 of each picture a KV-state file's keys name."""
    header = state_parts(path.read_bytes())[0]
    return {item[0] for item in header["keys"] if isinstance(item, list)}


def settled(served: Served) -> list[Path]:
    """The folder's states once the server's background writer has stopped changing
    them (it writes a state after a turn's first token, and as a slot is reused)."""
    seen: object = None
    for _ in range(120):
        now = [(p, p.stat().st_size) for p in served.states() if p.exists()]
        if now == seen:
            return [p for p, _ in now]
        seen = now
        time.sleep(0.5)
    raise AssertionError(f"the states in {served.folder} kept changing")


def kept_after(served: Served, picture: Path, question: str) -> Path:
    """Ask about ``picture``, then about the shape, so that the server keeps the first
    conversation's whole state in its folder; that file (the one not about the shape)."""
    before = set(settled(served))
    assert answer(served, picture, question)
    answer(served, SHAPE, "What shape is this?")  # the live state is kept as it is replaced
    new = [p for p in settled(served) if p not in before and served.shape not in pictures_in(p)]
    assert new, f"no new state about {picture.name} in {served.folder}"
    return max(new, key=lambda p: len(unpack_keys(state_parts(p.read_bytes())[0]["keys"])))


def test_the_server_never_restores_a_forged_state(served: Served, tmp_path: Path) -> None:
    """In the server's --kv-cache folder, a 3's state planted under the 7's keys with
    a recomputed checksum is not restored: the 7 is read again and named right (before,
    every later request about that 7 answered "This digit is 3.")."""
    three = digit_three(tmp_path)
    state_of_three = kept_after(served, three, QUESTION)
    state_of_seven = kept_after(served, DIGIT, QUESTION)
    state_of_seven.write_bytes(forged(state_of_three.read_bytes(), state_of_seven.read_bytes()))
    assert answer(served, DIGIT) == "This digit is 7."
    assert answer(served, DIGIT) == "This digit is 7."


def test_a_position_at_int32_max_never_bricks_the_server(served: Served) -> None:
    """A state signed with this user's key whose one cell sits at position INT32_MAX is
    refused before llama.cpp reads it: that request and every later one are answered
    (before, each request failed with llama_decode returned -1 until a restart)."""
    question = "Which digit is it?"
    path = kept_after(served, DIGIT, question)
    header, _, state, _ = state_parts(path.read_bytes())
    bad = with_position(state, 5, 2**31 - 1)
    kv.write_state(path, header["identity"], kv.KVState(unpack_keys(header["keys"]), bad))
    assert answer(served, DIGIT, question) == "This digit is 7."
    assert answer(served, DIGIT) == "This digit is 7."
    assert answer(served, SHAPE, "What shape is this?") == "It is a triangle."


def test_a_header_claiming_3e8_positions_costs_nothing(served: Served) -> None:
    """A 553-byte file in the folder whose keys claim 3e8 positions of a picture is
    dropped without expanding them: the server's peak memory does not grow (before:
    3.6 GiB per request) and the file is gone."""
    question = "What is the digit?"
    genuine = kept_after(served, DIGIT, question)
    header, _, _, _ = state_parts(genuine.read_bytes())
    picture = next(k[0] for k in header["keys"] if isinstance(k, list))
    claim = {**header, "keys": [1, [picture, 300_000_000]], "state_bytes": 8}
    raw_header = json.dumps(claim, separators=(",", ":")).encode()
    bomb = genuine.with_name("f" * 40 + kv.SUFFIX)
    bomb.write_bytes(raw_state_file(raw_header, b"\0" * 8, b"\0" * 32))
    assert bomb.stat().st_size < 1024
    before = served.peak_rss_mib()
    assert answer(served, SHAPE, "What shape is this?") == "It is a triangle."
    assert answer(served, DIGIT, question) == "This digit is 7."
    assert served.peak_rss_mib() - before < 128
    assert not bomb.exists()


# -- this user's key ---------------------------------------------------------------------

_KEY_CHILD = """
import sys, time
from pathlib import Path
from llava_local.backends.llama_cpp import state_key
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.001)
print(state_key.user_key().hex())
"""


def test_two_processes_starting_together_make_one_key(tmp_path: Path) -> None:
    """Two processes that both find no key make it at the same moment and end up with
    the same one, 32 bytes, 0600 in a 0700 folder."""
    folder = tmp_path / "state" / "llava-local"
    go = tmp_path / "go"
    env = {**os.environ, "LLAVA_LOCAL_STATE_DIR": str(folder)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _KEY_CHILD, str(go)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    time.sleep(1.0)  # both are waiting (importing took them most of that)
    go.touch()
    keys = {child.communicate(timeout=60)[0].strip() for child in children}
    assert all(child.returncode == 0 for child in children)
    (key,) = keys
    path = folder / "kv-state.key"
    assert bytes.fromhex(key) == path.read_bytes()
    assert len(key) == 64
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert oct(folder.stat().st_mode & 0o777) == oct(0o700)
    assert sorted(p.name for p in folder.iterdir()) == ["kv-state.key"]


def test_a_key_others_can_read_is_never_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key file that others may read (so they could sign states) is refused: a
    --kv-cache folder will not open, saving keeps no state (ColdResumeWarning says so),
    and a state beside a conversation loads cold."""
    path = saved_about(DIGIT, tmp_path / "talk.json")  # with the session's own key
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    key = folder / "kv-state.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    monkeypatch.setenv("LLAVA_LOCAL_STATE_DIR", str(folder))
    from llava_local.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=f"chmod 600 {key}"):
        VisionChat.llama_cpp(kv_cache_dir=tmp_path / "kv")
    answer, encoded, said = load_and_follow_up(path)
    assert (answer, encoded) == ("This digit is 7.", 1)
    assert said
    with VisionChat.llama_cpp(**GREEDY) as chat:
        chat.ask(QUESTION, image=DIGIT)
        with pytest.warns(ColdResumeWarning, match="can be read or changed by other users"):
            chat.save(tmp_path / "again.json")
    assert not state_path(tmp_path / "again.json").exists()
