"""KV states kept across conversations, saved conversations and processes (issue 18).

Behaviour, not timings: a restored prefix answers as reading from scratch does, a
state that is not exactly ours (another model, a truncated file, a flipped byte, a
full folder, two writers) is never used, and ``cached_tokens`` shows the restore.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from click.testing import CliRunner

from llava_local import VisionChat
from llava_local.backends import Turn
from llava_local.backends.llama_cpp import LlamaCppBackend
from llava_local.backends.llama_cpp import kv_cache as kv
from llava_local.demo import demo_paths
from llava_local.persist import ColdResumeWarning, state_path
from llava_local.types import Message, Options, Reply

from ...known import known
from ...option_args import OptionArgs
from ...paths import DIGIT, SHAPE

GREEDY: OptionArgs = {"temperature": 0, "max_tokens": 24}


def engine(**settings: Any) -> LlamaCppBackend:
    """The demo model in a new engine (the demo loads in a fraction of a second)."""
    model, mmproj = demo_paths()
    return LlamaCppBackend(model, mmproj, **settings)


def states(directory: Path) -> list[Path]:
    return sorted(directory.rglob(f"*{kv.SUFFIX}"))


def alone(*turns: tuple[str, Path | None]) -> list[Reply]:
    """The answers of one conversation on an engine of its own with no kept states."""
    with VisionChat(engine(kv_cache_mb=0)) as chat:
        return [chat.ask(q, image=image, **GREEDY) for q, image in turns]


def test_taking_turns_restores_each_conversation_and_answers_as_alone() -> None:
    """Two conversations alternating on one engine each get their own state back: every
    follow-up reads only its new tokens, and every answer is the one it gets alone."""
    a_turns = [("What digit is this?", DIGIT), ("Is it a 7?", None), ("What digit is it?", None)]
    b_turns = [("What shape is this?", SHAPE), ("What colour is it?", None), ("Shape?", None)]
    shared = engine()
    a, b = VisionChat(shared), VisionChat(shared)
    got_a, got_b = [], []
    for (qa, ia), (qb, ib) in zip(a_turns, b_turns, strict=True):
        got_a.append(a.ask(qa, image=ia, **GREEDY))
        got_b.append(b.ask(qb, image=ib, **GREEDY))
    shared.close()
    want_a, want_b = alone(*a_turns), alone(*b_turns)
    assert [r.text for r in got_a] == [r.text for r in want_a]
    assert [r.text for r in got_b] == [r.text for r in want_b]
    for got, want in zip(got_a[1:] + got_b[1:], want_a[1:] + want_b[1:], strict=True):
        assert got.stats.prompt_tokens == want.stats.prompt_tokens  # only the new tokens
        assert got.stats.cached_tokens == want.stats.cached_tokens
        assert got.stats.images_encoded == 0


def test_without_kept_states_taking_turns_reads_everything_again() -> None:
    """With the prefix cache off, each switch reads the other conversation's picture
    and turns again (what the cache saves)."""

    def switch(shared: LlamaCppBackend) -> Reply:
        a, b = VisionChat(shared), VisionChat(shared)
        a.ask("What digit is this?", image=DIGIT, **GREEDY)
        b.ask("What shape is this?", image=SHAPE, **GREEDY)
        again = a.ask("Is it a 7?", **GREEDY)
        shared.close()
        return again

    off, on = switch(engine(kv_cache_mb=0)), switch(engine())
    assert off.text == on.text
    picture = 16  # the demo's image tokens
    assert known(off.stats.prompt_tokens) > known(on.stats.prompt_tokens) + picture


def test_restored_state_gives_the_logits_of_reading_from_scratch() -> None:
    """After a restore, the next token's logits equal those of a fresh engine that
    read the whole prompt (several pictures, several turns)."""
    from llava_local.images import prepare

    digit, shape = (prepare(p, max_side=64) for p in (DIGIT, SHAPE))
    first = [Message(role="user", content="What are these?", images=(digit, shape))]
    history = [*first, Message(role="assistant", content="This digit is 7.")]
    question = Message(role="user", content="And the second one?")
    other = [Message(role="user", content="What shape is this?", images=(shape,))]

    warm = engine()
    warm.next_token_logits(Turn(first, Options()))
    warm.next_token_logits(Turn(other, Options()))  # the first state is kept, then replaced
    logits = warm.next_token_logits(Turn([*history, question], Options()))
    assert warm.kv_cache is not None
    assert warm.kv_cache.memory is not None
    assert len(warm.kv_cache.memory) >= 1
    cold = engine(kv_cache_mb=0)
    expected = cold.next_token_logits(Turn([*history, question], Options()))
    warm.close()
    cold.close()
    assert int(np.argmax(logits)) == int(np.argmax(expected))
    # the two read the prompt in different batches, so float sums differ in order: up to
    # 1.2e-3 on the demo's logits (whose largest are about 16)
    np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=2e-3)


def test_a_new_engine_restores_from_the_disk_folder(tmp_path: Path) -> None:
    """An engine that reads a picture leaves its state in kv_cache_dir; a later engine
    (another process, here with no memory tier) restores it instead of reading it."""
    first = engine(kv_cache_dir=tmp_path)
    with VisionChat(first) as chat:
        cold = chat.ask("What digit is this?", image=DIGIT, **GREEDY)
    assert len(states(tmp_path)) == 1
    with VisionChat(engine(kv_cache_dir=tmp_path, kv_cache_mb=0)) as chat:
        warm = chat.ask("What digit is this?", image=DIGIT, **GREEDY)
    assert warm.text == cold.text == "This digit is 7."
    assert warm.stats.images_encoded == 0
    assert warm.stats.cached_tokens == known(cold.stats.prompt_tokens) - 1
    assert warm.stats.prompt_tokens == 1


def _broken_folder(tmp_path: Path, damage: str) -> Path:
    """A kv_cache_dir holding the digit question's state, damaged as ``damage`` says."""
    with VisionChat(engine(kv_cache_dir=tmp_path)) as chat:
        chat.ask("What digit is this?", image=DIGIT, **GREEDY)
    (path,) = states(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":
        data[len(data) * 2 // 3] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "flipped header byte":
        data[20] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "foreign":
        path.write_bytes(b"not a KV state at all" * 1000)
    elif damage == "empty":
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "damage", ["truncated", "flipped byte", "flipped header byte", "foreign", "empty"]
)
def test_a_damaged_state_file_is_read_again_never_restored(tmp_path: Path, damage: str) -> None:
    """A torn, truncated, altered or foreign state file is ignored (and removed): the
    turn reads the picture and gives the correct answer; closing writes it whole again."""
    path = _broken_folder(tmp_path, damage)
    second = engine(kv_cache_dir=tmp_path, kv_cache_mb=0)
    with VisionChat(second) as chat:
        reply = chat.ask("What digit is this?", image=DIGIT, **GREEDY)
        assert not path.exists()
    assert reply.text == "This digit is 7."
    assert reply.stats.images_encoded == 1
    assert kv.read_state(path, second.identity) is not None


def test_a_state_from_another_model_is_never_restored(tmp_path: Path) -> None:
    """A model file with the same header and other weights has another identity: the
    demo's states, even moved into its folder, are not used for it."""
    model, mmproj = demo_paths()
    other = tmp_path / "other.gguf"
    shutil.copyfile(model, other)
    data = bytearray(other.read_bytes())
    for i in range(len(data) - 4096, len(data) - 64, 97):  # weights near the end
        data[i] ^= 0x01
    other.write_bytes(bytes(data))
    folder = tmp_path / "kv"
    with VisionChat(engine(kv_cache_dir=folder)) as chat:
        chat.ask("What digit is this?", image=DIGIT, **GREEDY)
    (state,) = states(folder)
    changed = LlamaCppBackend(other, mmproj, kv_cache_dir=folder, kv_cache_mb=0)
    assert changed.identity["model"] != kv.file_fingerprint(model)
    assert changed.kv_cache is not None
    assert changed.kv_cache.disk is not None
    changed.kv_cache.disk.directory.mkdir(parents=True)
    shutil.copyfile(state, changed.kv_cache.disk.directory / state.name)  # moved by hand
    with VisionChat(changed) as chat:
        reply = chat.ask("What digit is this?", image=DIGIT, **GREEDY)
    with VisionChat(LlamaCppBackend(other, mmproj, kv_cache_mb=0)) as chat:
        expected = chat.ask("What digit is this?", image=DIGIT, **GREEDY)
    assert reply.stats.images_encoded == 1
    assert reply.stats.cached_tokens == expected.stats.cached_tokens == 0
    assert reply.text == expected.text


def test_a_full_folder_drops_its_least_recently_used_states(tmp_path: Path) -> None:
    """The folder stays within kv_cache_dir_gb: a new state pushes out the oldest one,
    and every answer is still right."""
    with VisionChat(engine(kv_cache_dir=tmp_path)) as chat:
        chat.ask("What digit is this?", image=DIGIT, **GREEDY)
    (digit_state,) = states(tmp_path)
    budget = digit_state.stat().st_size * 1.5
    with VisionChat(engine(kv_cache_dir=tmp_path, kv_cache_dir_gb=budget / 2**30)) as chat:
        reply = chat.ask("What shape is this?", image=SHAPE, **GREEDY)
    assert reply.text == "It is a triangle."
    (kept,) = states(tmp_path)
    assert kept != digit_state
    assert kept.stat().st_size <= budget


_CHILD = """
import resource, signal, sys
from llava_local import VisionChat
from llava_local.backends.llama_cpp import LlamaCppBackend
from llava_local.demo import demo_paths
if sys.argv[2] == "no room":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
model, mmproj = demo_paths()
with VisionChat(LlamaCppBackend(model, mmproj, kv_cache_dir=sys.argv[1])) as chat:
    print(chat.ask("What digit is this?", image=sys.argv[3], temperature=0, max_tokens=24).text)
"""


def _child(folder: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(folder), mode, str(DIGIT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_folder_with_no_room_still_answers(tmp_path: Path) -> None:
    """A state that cannot be written (the file system refuses it) is not kept, leaves
    no partial file, and the answer is unaffected."""
    child = _child(tmp_path, "no room")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.strip() == "This digit is 7."
    assert states(tmp_path) == []
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_two_processes_writing_one_state_leave_a_whole_one(tmp_path: Path) -> None:
    """Two processes keeping the same state in one folder at once leave one whole
    state, which a third engine restores with the right answer."""
    children = [_child(tmp_path, "shared") for _ in range(2)]
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        assert out.strip() == "This digit is 7."
    assert len(states(tmp_path)) == 1
    assert [p for p in tmp_path.rglob("*.tmp")] == []
    with VisionChat(engine(kv_cache_dir=tmp_path, kv_cache_mb=0)) as chat:
        reply = chat.ask("What digit is this?", image=DIGIT, **GREEDY)
    assert reply.text == "This digit is 7."
    assert reply.stats.images_encoded == 0


_WRITER = """
import ctypes, sys
from pathlib import Path
from llava_local.backends.llama_cpp import kv_cache as kv
fill, path = int(sys.argv[1]), Path(sys.argv[2])
data = (ctypes.c_uint8 * 3_000_000)(*([fill] * 3_000_000))
state = kv.KVState(tuple(range(100)), data)
for _ in range(25):
    kv.write_state(path, {"who": "test"}, state)
"""


def test_concurrent_writers_never_show_a_reader_half_a_file(tmp_path: Path) -> None:
    """While two processes replace the same state file over and over, every read sees
    one whole state or the other, never a mix."""
    path = tmp_path / f"one{kv.SUFFIX}"
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(fill), str(path)]) for fill in (1, 2)
    ]
    seen: set[int] = set()
    while any(w.poll() is None for w in writers):
        state = kv.read_state(path, {"who": "test"})
        if state is None:
            assert not path.exists() or not seen  # only before the first write lands
            continue
        values = set(bytes(state.data[:1000]) + bytes(state.data[-1000:]))
        assert len(values) == 1
        seen |= values
    assert all(w.wait() == 0 for w in writers)
    final = kv.read_state(path, {"who": "test"})
    assert final is not None
    assert len(final.data) == 3_000_000
    assert list(tmp_path.glob("*.tmp")) == []


def test_memory_tier_keeps_what_fits_and_leaves_the_reserve_free() -> None:
    """Kept states are bounded by their budget (oldest out first), and none is kept
    when the machine would be left with less than the reserve."""

    def state(n: int, fill: int) -> kv.KVState:
        return kv.KVState(tuple(range(fill, fill + n)), (ctypes.c_uint8 * 1000)())

    tier = kv.MemoryTier(max_bytes=2500 + 2 * 16 * 10, reserve=0)
    for fill in (0, 100, 200):
        assert tier.put(state(10, fill))
    assert len(tier) == 2
    assert tier.best(range(10)) is None  # the oldest went first
    assert tier.best(range(200, 205)) == (5, tuple(range(200, 210)))
    tier.put(kv.KVState(tuple(range(200, 220)), (ctypes.c_uint8 * 1000)()))
    assert len(tier) == 2  # it extends a kept state, which it replaces
    starved = kv.MemoryTier(max_bytes=10**9, reserve=1 << 60)
    assert not starved.put(state(10, 0))
    assert len(starved) == 0


def test_kv_cache_mb_bounds_the_memory_tier() -> None:
    """kv_cache_mb sets the memory tier's budget; by default it is sized from the
    memory available, and 0 keeps no state at all."""
    small = engine(kv_cache_mb=1.5)
    default = engine()
    off = engine(kv_cache_mb=0)
    try:
        assert small.kv_cache is not None
        assert small.kv_cache.memory is not None
        assert small.kv_cache.memory.max_bytes == int(1.5 * 2**20)
        assert default.kv_cache is not None
        assert default.kv_cache.memory is not None
        assert default.kv_cache.memory.max_bytes > 0
        assert off.kv_cache is None
        assert small.config is not None
        assert small.config.model_dump()["kv_cache_mb"] == 1.5
    finally:
        for e in (small, default, off):
            e.close()


def test_saved_conversation_resumes_warm(tmp_path: Path) -> None:
    """save() writes the KV state beside the JSON; load() restores it, so the first
    follow-up reads only its own tokens and answers as a cold load does (which says
    that its state file is missing)."""
    path = tmp_path / "talk.json"
    with VisionChat.llama_cpp(**GREEDY) as chat:
        chat.ask("What digit is this?", image=DIGIT)
        before = chat.ask("Is it a 7?")
        chat.save(path)
    assert state_path(path).is_file()
    alone_dir = tmp_path / "alone"
    alone_dir.mkdir()
    shutil.copyfile(path, alone_dir / "talk.json")  # the JSON copied alone loads cold
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with VisionChat.load(path) as warm_chat:
            warm = warm_chat.ask("What digit is it?")
    with (
        pytest.warns(ColdResumeWarning, match=r"talk\.json\.kv is missing"),
        VisionChat.load(alone_dir / "talk.json") as cold_chat,
    ):
        cold = cold_chat.ask("What digit is it?")
    assert warm.text == cold.text
    assert warm.stats.images_encoded == 0
    assert cold.stats.images_encoded == 1
    assert cold.stats.cached_tokens == 0
    assert warm.stats.cached_tokens is not None
    assert warm.stats.cached_tokens >= (before.stats.cached_tokens or 0) + known(
        before.stats.prompt_tokens
    )
    assert known(warm.stats.prompt_tokens) + warm.stats.cached_tokens == known(
        cold.stats.prompt_tokens
    )


def test_a_conversation_copied_without_its_kv_file_says_it_will_read_again(
    tmp_path: Path,
) -> None:
    """A conversation saved with its .kv and copied without it (issue 31, item 5) loads
    with a ColdResumeWarning that says the state file is missing and the pictures will
    be read again, which the first follow-up then does."""
    saved = tmp_path / "talk.json"
    with VisionChat.llama_cpp(**GREEDY) as chat:
        chat.ask("What digit is this?", image=DIGIT)
        chat.save(saved)
    assert state_path(saved).is_file()
    copy = tmp_path / "elsewhere" / "talk.json"
    copy.parent.mkdir()
    shutil.copyfile(saved, copy)
    with pytest.warns(ColdResumeWarning) as said:
        chat = VisionChat.load(copy)
    (message,) = [str(w.message) for w in said]
    assert "talk.json.kv is missing" in message
    assert "reads the conversation's pictures and turns again" in message
    with chat:
        reply = chat.ask("What digit is it?")
    assert reply.text == "This digit is 7."
    assert reply.stats.images_encoded == 1


def test_a_state_saved_with_other_settings_loads_cold_and_says_so(tmp_path: Path) -> None:
    """Loading with other engine settings (or a damaged state file) never restores the
    state: a ColdResumeWarning says the conversation is read again, and the answer is
    right."""
    path = tmp_path / "talk.json"
    with VisionChat.llama_cpp(**GREEDY) as chat:
        chat.ask("What digit is this?", image=DIGIT)
        chat.save(path)
    with pytest.warns(ColdResumeWarning, match="another model, projector or engine settings"):
        chat = VisionChat.load(path, n_ctx=512)
    with chat:
        reply = chat.ask("What digit is this?", image=DIGIT)
    assert reply.text == "This digit is 7."
    assert reply.stats.cached_tokens == 0
    kv_file = state_path(path)
    kv_file.write_bytes(kv_file.read_bytes()[:-10])
    with pytest.warns(ColdResumeWarning):
        chat = VisionChat.load(path)
    with chat:
        assert chat.ask("What digit is this?", image=DIGIT).stats.images_encoded == 1


def test_restore_also_puts_the_state_back(tmp_path: Path) -> None:
    """restore() on a chat whose engine read something else brings the saved state back."""
    path = tmp_path / "talk.json"
    with VisionChat.llama_cpp(kv_cache_mb=0, **GREEDY) as chat:
        chat.ask("What digit is this?", image=DIGIT)
        chat.save(path)
        chat.reset()
        chat.ask("What shape is this?", image=SHAPE)
        chat.restore(path)
        reply = chat.ask("What digit is it?")
    assert reply.stats.images_encoded == 0
    assert reply.stats.cached_tokens
    assert reply.stats.cached_tokens > known(reply.stats.prompt_tokens)


def test_chats_sharing_an_engine_take_turns_from_threads() -> None:
    """Two chats on one engine used from two threads at once each get their own
    answers (the engine serves one turn at a time)."""
    shared = engine()
    results: dict[str, list[str]] = {"digit": [], "shape": []}

    def talk(name: str, question: str, picture: Path) -> None:
        chat = VisionChat(shared)
        for _ in range(3):
            chat.reset()
            results[name].append(chat.ask(question, image=picture, **GREEDY).text)

    threads = [
        threading.Thread(target=talk, args=("digit", "What digit is this?", DIGIT)),
        threading.Thread(target=talk, args=("shape", "What shape is this?", SHAPE)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    shared.close()
    assert results == {"digit": ["This digit is 7."] * 3, "shape": ["It is a triangle."] * 3}


def test_cli_kv_cache_option_keeps_states_in_the_folder(tmp_path: Path) -> None:
    """`--kv-cache DIR` gives the engine a disk tier: a second run restores the first's
    picture."""
    from llava_local.cli import main

    args = ["ask", str(DIGIT), "What digit is this?", "--backend", "llama_cpp", "--json"]
    args += ["--kv-cache", str(tmp_path), "--temperature", "0"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert len(states(tmp_path)) == 1
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert '"images_encoded": 0' in second.output
    assert os.path.getsize(states(tmp_path)[0]) > 0


def test_cli_kv_cache_mb_option_sizes_the_memory_tier() -> None:
    """`--kv-cache-mb` reaches the engine from every command's engine options: 0 keeps
    no state in memory, a number bounds the tier, a negative one is a usage error."""
    import click

    from llava_local.cli._common import engine_options, open_chat

    seen: list[Any] = []

    @click.command()
    @engine_options
    def probe(**options: Any) -> None:
        with open_chat(**options) as chat:
            seen.append(cast(LlamaCppBackend, chat.engine).kv_cache)

    base = ["--backend", "llama_cpp", "--n-ctx", "1024"]
    assert CliRunner().invoke(probe, [*base, "--kv-cache-mb", "0"]).exit_code == 0
    assert seen == [None]
    result = CliRunner().invoke(probe, [*base, "--kv-cache-mb", "64"])
    assert result.exit_code == 0, result.output
    tier = seen[-1].memory
    assert tier is not None
    assert tier.max_bytes == 64 * 2**20
    refused = CliRunner().invoke(probe, [*base, "--kv-cache-mb", "-1"])
    assert refused.exit_code == 2
    assert "--kv-cache-mb" in refused.output


_KILLED_CHILD = """
import os, sys, time
from pathlib import Path
from llava_local import VisionChat
from llava_local.backends.llama_cpp import LlamaCppBackend
from llava_local.demo import demo_paths
folder = Path(sys.argv[1])
chat = VisionChat(LlamaCppBackend(*demo_paths(), kv_cache_dir=folder, kv_cache_mb=0))
chat.ask("What digit is this?", image=sys.argv[2], temperature=0, max_tokens=24)
deadline = time.monotonic() + 60
while not list(folder.rglob("*.kv")) and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)  # a rename is whole: the file is there once its name is
os._exit(0)  # killed, as it were: no close(), no atexit, no finally
"""


def test_a_state_reaches_the_disk_without_close(tmp_path: Path) -> None:
    """A process that read a picture and then ends without closing its chat (killed, or
    a script that never closes) has left its state in the folder, written in the
    background once the first token was out; the next process resumes warm."""
    folder = tmp_path / "kv"
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, str(folder), str(DIGIT)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert states(folder), "no state was written before the process ended"
    with VisionChat(engine(kv_cache_dir=folder, kv_cache_mb=0)) as chat:
        reply = chat.ask("What digit is this?", image=DIGIT, **GREEDY)
    assert reply.stats.images_encoded == 0
    assert known(reply.stats.cached_tokens) > 16
    assert reply.text == alone(("What digit is this?", DIGIT))[0].text
