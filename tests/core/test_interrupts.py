"""Stopping a turn at any moment: a real Ctrl-C (SIGINT to a real process) in each phase
of a turn on a twin whose vision tower and language model are slow enough to hit, and
``cancel()`` from another thread. The turn stops inside the phase (the C work is cut
short, not finished), the conversation is as it was, and the engine answers the next turn
as a fresh one would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
from llava_local_dev import gguf_writer
from PIL import Image

from llava_local import TurnCancelledError, VisionChat
from llava_local.control import STATUS_ENCODING

from ..cli.test_cli_chat import Terminal
from ..gguf_fixtures import png_bytes
from ..paths import ROOT

PHASES = [
    "preparing pictures",
    "encoding picture",
    "reading picture",
    "reading prompt",
    "answering",
]


@dataclass(frozen=True)
class SlowTwin:
    lm: Path
    mmproj: Path
    big_picture: Path


@pytest.fixture(scope="session")
def slow_twin(tmp_path_factory: pytest.TempPathFactory) -> SlowTwin:
    """A random-weight pair whose phases each take a second or more on 2 cores: a
    ViT-B-sized tower at 336 px (576 picture tokens) and a 1024-wide Q4_0 LM; plus a
    24-megapixel PNG that takes Pillow a second to decode."""
    directory = tmp_path_factory.mktemp("slow_twin")
    text = gguf_writer.TextConfig(n_embd=1024, n_layer=8, n_ff=2816, n_head=16)
    vision = gguf_writer.VisionConfig(
        image_size=336,
        patch_size=14,
        n_embd=768,
        n_ff=3072,
        n_head=12,
        n_layer=13,
        projection_dim=1024,
    )
    lm, mmproj = gguf_writer.write_pair(
        directory, text, vision, lm_dtype="q4_0", vocab=gguf_writer.byte_vocab()
    )
    tile = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    big = directory / "big.png"
    Image.fromarray(np.tile(tile, (20, 20, 1))).save(big, compress_level=1)
    return SlowTwin(lm, mmproj, big)


def _lines(stream: IO[str]) -> Iterator[dict[str, Any]]:
    for line in stream:
        yield json.loads(line)


def test_ctrl_c_stops_every_phase_of_a_turn(slow_twin: SlowTwin) -> None:
    """SIGINT during picture decoding, CLIP encoding, reading the picture, reading the
    prompt and answering stops the turn inside that phase, keeps nothing, and the engine
    then answers as a fresh one does."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.core.interrupt_child",
            str(slow_twin.lm),
            str(slow_twin.mmproj),
            str(slow_twin.big_picture),
            ",".join(PHASES),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = _lines(proc.stdout)
    results: dict[str, dict[str, Any]] = {}
    try:
        for target in PHASES:
            seen: list[str] = []
            for event in lines:
                assert "error" not in event, event
                seen.append(event.get("status", ""))
                # "reading prompt" is also the short text before the picture: wait for
                # the question's, after the picture was read.
                if seen[-1] == target and (target != "reading prompt" or "reading picture" in seen):
                    break
            time.sleep(0.2)  # well inside the phase: each lasts a second or more
            proc.send_signal(signal.SIGINT)
            event = next(e for e in lines if "interrupted" in e)
            assert event["interrupted"] == target
            results[target] = event
        done = next(e for e in lines if "done" in e)
    finally:
        try:
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
    assert proc.returncode == 0
    assert all(r["history"] == 0 for r in results.values())
    # Picture decoding is Python (Pillow): the turn never began.
    assert results["preparing pictures"]["status"] is None
    # The encoding was cut short: fewer graph nodes than a whole encode, nothing cached.
    encoding = results["encoding picture"]
    assert encoding["status"] == "encoding picture"
    assert 0 < encoding["clip_nodes"] < done["full_clip_nodes"]
    assert encoding["cached_pictures"] == 0
    # Reading the picture and the prompt stopped before the prompt's end.
    for phase in ("reading picture", "reading prompt"):
        assert results[phase]["status"] == phase
        assert results[phase]["n_tokens"] < results[phase]["prompt_tokens"]
    assert results["answering"]["status"] == "answering"
    assert results["answering"]["pieces"] < 400
    assert done["done"] == done["cold"]


def test_cancel_from_another_thread_stops_a_picture_encoding(slow_twin: SlowTwin) -> None:
    """ReplyStream.cancel() from another thread while CLIP encodes ends the turn with
    TurnCancelledError before the encoding completes; the next turn works."""
    encoding = threading.Event()

    def on_status(status: str) -> None:
        if status == STATUS_ENCODING:
            encoding.set()

    with VisionChat.llama_cpp(slow_twin.lm, mmproj=slow_twin.mmproj, on_status=on_status) as chat:
        stream = chat.stream("What is this?", image=png_bytes(seed=7), max_tokens=4)

        def cancel_when_encoding() -> None:
            if encoding.wait(60):
                time.sleep(0.2)
                stream.cancel()

        canceller = threading.Thread(target=cancel_when_encoding)
        canceller.start()
        with pytest.raises(TurnCancelledError), stream:
            for _ in stream:
                pass
        canceller.join()
        assert stream.status == STATUS_ENCODING
        assert chat.history == []
        assert len(chat.engine.embeddings) == 0  # type: ignore[attr-defined]
        reply = chat.ask("What is this?", image=png_bytes(seed=7), max_tokens=4, temperature=0)
        assert reply.stats.images_encoded == 1
        assert len(chat.history) == 2


def test_ctrl_c_in_the_terminal_stops_ask_while_the_picture_is_encoded(
    slow_twin: SlowTwin, tmp_path: Path
) -> None:
    """`llava-local ask` shows the encoding on the terminal, and Ctrl-C typed there stops
    it: exit 130, "interrupted", no answer."""
    picture = tmp_path / "p.png"
    picture.write_bytes(png_bytes(seed=8))
    term = Terminal(
        [
            sys.executable,
            "-m",
            "llava_local.cli",
            "ask",
            str(picture),
            "What is this?",
            "--backend",
            "llama_cpp",
            "-m",
            str(slow_twin.lm),
            "--mmproj",
            str(slow_twin.mmproj),
            "--max-tokens",
            "50",
        ]
    )
    term.expect("encoding picture")
    time.sleep(0.2)
    term.type("\x03")  # the terminal's own Ctrl-C: SIGINT to the foreground process
    seen = term.expect("interrupted")
    assert term.close() == 130
    assert "reading picture" not in seen


def test_ctrl_c_stops_caption_while_a_picture_is_encoded(
    slow_twin: SlowTwin, tmp_path: Path
) -> None:
    """SIGINT to `llava-local caption` during the second picture's encoding exits 130
    with exactly the first picture's line; a second run finishes the rest."""
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png_bytes(seed=20 + i))
    out = tmp_path / "captions.jsonl"
    args = [
        sys.executable,
        "-m",
        "llava_local.cli",
        "caption",
        str(folder),
        "-p",
        "What is it?",
        "--out",
        str(out),
        "--backend",
        "llama_cpp",
        "-m",
        str(slow_twin.lm),
        "--mmproj",
        str(slow_twin.mmproj),
        "--max-tokens",
        "3",
    ]
    term = Terminal(args)
    while not out.exists() or out.read_text().count("\n") < 1:
        assert term.proc.poll() is None, term.screen
        term.drain(0.05)  # the progress bar's output, read as a terminal would
    term.drain(0.5)  # the second picture's encoding (about two seconds) is under way
    os.kill(term.proc.pid, signal.SIGINT)
    assert term.close() == 130
    assert out.read_text().count("\n") == 1
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in rows) == ["0.png", "1.png", "2.png"]


LOAD_CHILD = """
import sys
from llava_local import VisionChat
chat = VisionChat.llama_cpp(sys.argv[1], mmproj=sys.argv[2], verbose=True)
chat.engine
print("loaded", flush=True)
"""


def test_ctrl_c_while_the_model_loads_is_not_lost(slow_twin: SlowTwin) -> None:
    """SIGINT while llama.cpp loads the files (its log lines prove the load is in C)
    raises KeyboardInterrupt once loading ends, instead of vanishing in a log callback
    and letting the program go on (a 7B model loads for tens of seconds on a Pi)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LOAD_CHILD, str(slow_twin.lm), str(slow_twin.mmproj)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("llama_model_loader:"):  # llama.cpp is reading the model
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert "KeyboardInterrupt" in err
    assert proc.returncode == -signal.SIGINT  # Python's exit for an uncaught Ctrl-C
    assert "loaded" not in out
