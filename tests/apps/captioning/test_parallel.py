"""Several turns at once in caption (``parallel``): pictures side by side and a picture's
prompts together on one llama.cpp engine with slots (the demo model, greedy), lines that
stay whole, counted and resumable, and Ctrl-C that stops every turn."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from llava_local import InvalidRequestError, Stats, TurnCancelledError, VisionChat
from llava_local.apps.captioning import caption, read_captions
from llava_local.apps.datasets import DIGIT_PROMPT, DIGIT_PROMPTS_HELD_OUT
from llava_local.backends import Backend, Finish, Turn
from llava_local.backends.llama_cpp import LlamaCppBackend
from llava_local.cli.caption import caption as caption_command
from llava_local.demo import demo_paths

from ...gguf_fixtures import png_bytes
from ...ollama_server import OllamaServer, RecordedRequest, Script
from ...option_args import OptionArgs
from .caption_lines import lines, pairs

pytestmark = pytest.mark.llama

GREEDY: OptionArgs = {"temperature": 0, "max_tokens": 12}
PROMPTS = (DIGIT_PROMPT, DIGIT_PROMPTS_HELD_OUT[1], DIGIT_PROMPTS_HELD_OUT[4])
#: What a line says about its picture and answer (not how long it took or what it reused).
SAID = ("path", "sha256", "prompt", "text", "done_reason", "model", "backend", "attempts", "image")


def said(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lines' content, in file and prompt order."""
    kept = [{name: record.get(name) for name in SAID} for record in records]
    return sorted(kept, key=lambda r: (r["path"], r["prompt"]))


def caption_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("llava-local-caption")]


def test_several_pictures_at_once_give_the_lines_of_one_at_a_time(
    slots4: LlamaCppBackend, digits: Path, tmp_path: Path
) -> None:
    """Eight digits asked four at a time give the lines that one at a time gives (the
    same greedy answers, each picture once), and their turns were decoded together."""
    with VisionChat(slots4, close_engine=False) as chat:
        one = caption(
            chat, digits, tmp_path / "one.jsonl", prompt=DIGIT_PROMPT, parallel=1,
            progress=False, **GREEDY,
        )  # fmt: skip
        shared = slots4.steps_shared
        four = caption(
            chat, digits, tmp_path / "four.jsonl", prompt=DIGIT_PROMPT, parallel=4,
            progress=False, **GREEDY,
        )  # fmt: skip
    assert (one.done, four.done, four.failed) == (8, 8, 0)
    assert slots4.steps_shared > shared
    assert said(lines(tmp_path / "four.jsonl")) == said(lines(tmp_path / "one.jsonl"))
    assert caption_threads() == []


def test_a_pictures_prompts_together_read_it_once_and_answer_as_one_at_a_time(
    digits: Path, tmp_path: Path
) -> None:
    """Three prompts about each digit on three slots: each picture is encoded once and
    read by one of its turns (the other two reuse its positions), the turns are decoded
    together, and every answer is the one a one-slot engine gives prompt after prompt."""
    engine = LlamaCppBackend(*demo_paths(), parallel=3, kv_cache_mb=0)
    try:
        with VisionChat(engine, close_engine=False) as chat:
            caption(
                chat, digits, tmp_path / "together.jsonl", prompt=list(PROMPTS), parallel=3,
                progress=False, **GREEDY,
            )  # fmt: skip
        assert engine.steps_shared > 0
    finally:
        engine.close()
    with VisionChat.llama_cpp() as chat:
        caption(
            chat, digits, tmp_path / "alone.jsonl", prompt=list(PROMPTS), progress=False,
            **GREEDY,
        )  # fmt: skip
    together = lines(tmp_path / "together.jsonl")
    assert said(together) == said(lines(tmp_path / "alone.jsonl"))
    for index in range(8):
        turns = [r["stats"] for r in together if r["path"].endswith(f"d{index}.png")]
        assert sorted(s["images_encoded"] for s in turns) == [0, 0, 1]
        reader = next(s for s in turns if s["images_encoded"])
        assert all(s["cached_tokens"] > reader["cached_tokens"] for s in turns if s is not reader)


def test_a_parquet_output_works_on_one_machine(
    slots4: LlamaCppBackend, digits: Path, tmp_path: Path
) -> None:
    """format="parquet" writes part files that read_captions reads back as the JSON Lines
    run's lines; a second run skips every picture; the command line takes --format
    parquet and --parallel without --ray."""
    folder = tmp_path / "captions"
    with VisionChat(slots4, close_engine=False) as chat:
        first = caption(
            chat, digits, folder, prompt=DIGIT_PROMPT, parallel=2, format="parquet",
            progress=False, **GREEDY,
        )  # fmt: skip
        again = caption(
            chat, digits, folder, prompt=DIGIT_PROMPT, parallel=2, format="parquet",
            progress=False, **GREEDY,
        )  # fmt: skip
        caption(chat, digits, tmp_path / "c.jsonl", prompt=DIGIT_PROMPT, progress=False, **GREEDY)
    assert (first.done, again.done, again.skipped) == (8, 0, 8)
    assert list(folder.glob("part-*.parquet"))
    assert said(read_captions(folder)) == said(lines(tmp_path / "c.jsonl"))
    cli = tmp_path / "cli"
    args = [str(digits), "-p", DIGIT_PROMPT, "-o", str(cli), "--format", "parquet"]
    args += ["--backend", "llama_cpp", "--parallel", "2", "--temperature", "0"]
    args += ["--max-tokens", "12", "--no-progress"]
    result = CliRunner().invoke(caption_command, args)
    assert result.exit_code == 0, result.output
    assert "8 captioned" in result.stdout
    assert said(read_captions(cli)) == said(lines(tmp_path / "c.jsonl"))
    again_cli = CliRunner().invoke(caption_command, args)  # the folder exists now
    assert again_cli.exit_code == 0, again_cli.output
    assert "0 captioned, 8 already recorded" in again_cli.stdout


class Digit(BaseModel):
    digit: int


def test_retry_errors_asks_again_with_several_at_once(
    slots4: LlamaCppBackend, digits: Path, tmp_path: Path
) -> None:
    """Answers cut before their JSON ended are error lines in a four-at-a-time run; a
    run with retry_errors and room to answer asks about those pictures again, four at a
    time, and their newest lines are answers."""
    out = tmp_path / "out.jsonl"
    pictures = [digits / f"d{index}.png" for index in range(4)]
    with VisionChat(slots4, close_engine=False) as chat:
        first = caption(
            chat, pictures, out, prompt=DIGIT_PROMPT, schema=Digit, parallel=4,
            progress=False, temperature=0, max_tokens=2,
        )  # fmt: skip
        again = caption(
            chat, pictures, out, prompt=DIGIT_PROMPT, schema=Digit, parallel=4,
            retry_errors=True, progress=False, temperature=0, max_tokens=60,
        )  # fmt: skip
    assert (first.done, first.failed) == (0, 4)
    assert (again.retried, again.done, again.skipped) == (4, 4, 0)
    assert all(isinstance(r["parsed"]["digit"], int) for r in read_captions(out))
    assert len(lines(out)) == 8


def test_more_at_once_than_the_engine_holds_is_refused(
    slots4: LlamaCppBackend, digits: Path, tmp_path: Path
) -> None:
    """parallel=5 on a four-slot engine is refused before the output is made, saying how
    many it holds."""
    out = tmp_path / "out.jsonl"
    with (
        VisionChat(slots4, close_engine=False) as chat,
        pytest.raises(InvalidRequestError, match=r"holds \(4\)"),
    ):
        caption(chat, digits, out, prompt=DIGIT_PROMPT, parallel=5, progress=False)
    assert not out.exists()


def test_the_command_line_loads_the_slots_auto_chose_llama_cpp_for(
    digits: Path, tmp_path: Path
) -> None:
    """caption --parallel 2 with --backend auto choosing llama.cpp (the demo) loads the
    model with two slots: auto's choice is planned before anything loads, so both
    pictures are captioned two at a time instead of refused for one slot."""
    out = tmp_path / "out.jsonl"
    args = [str(digits), "-p", DIGIT_PROMPT, "-o", str(out), "--parallel", "2", "--limit", "2"]
    args += ["--backend", "auto", "-m", "demo", "--max-tokens", "4", "--no-progress"]
    result = CliRunner().invoke(caption_command, args)
    assert result.exit_code == 0, result.output
    assert "2 captioned" in result.stdout
    assert len(lines(out)) == 2


class Held(Backend):
    """Answers "caption N" for the Nth turn; from turn ``hold_from`` on, each waits until
    it is cancelled (and counts it)."""

    name: ClassVar[str] = "held"
    model = "held"

    def __init__(self, hold_from: int | None = None) -> None:
        self.hold_from = hold_from
        self.turns = 0
        self.held = 0
        self.cancelled = 0
        self.lock = threading.Lock()

    def generate(self, turn: Turn) -> Generator[str | Finish, None, None]:
        with self.lock:
            self.turns += 1
            n = self.turns
        if self.hold_from is not None and n >= self.hold_from:
            with self.lock:
                self.held += 1
            while not turn.control.cancelled:
                time.sleep(0.01)
            with self.lock:
                self.cancelled += 1
            raise TurnCancelledError("cancelled")
        yield f"caption {n}"
        yield Finish("stop", Stats(completion_tokens=2))


def test_ctrl_c_with_several_at_once_stops_every_turn_and_writes_no_more(
    tmp_path: Path,
) -> None:
    """SIGINT while three turns run (two lines written) raises KeyboardInterrupt once
    every turn is cancelled and every thread gone, leaves the two whole lines, and a
    rerun asks about the three others only."""
    folder = tmp_path / "pics"
    folder.mkdir()
    for index in range(5):
        (folder / f"p{index}.png").write_bytes(png_bytes((40, 40), seed=index))
    out = tmp_path / "out.jsonl"
    engine = Held(hold_from=3)

    def interrupt() -> None:
        deadline = time.monotonic() + 30
        while engine.held < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=interrupt)
    presser.start()
    with VisionChat(engine) as chat, pytest.raises(KeyboardInterrupt):
        caption(chat, folder, out, prompt="C.", parallel=3, progress=False)
    presser.join()
    assert (engine.held, engine.cancelled) == (3, 3)
    assert caption_threads() == []
    assert [Path(r["path"]).name for r in lines(out)] == ["p0.png", "p1.png"]
    with VisionChat(Held()) as chat:
        rerun = caption(chat, folder, out, prompt="C.", parallel=2, progress=False)
    assert (rerun.done, rerun.skipped) == (3, 2)
    assert set(pairs(lines(out)).values()) == {1}


def test_a_copy_of_a_picture_being_asked_about_waits_for_its_answer(tmp_path: Path) -> None:
    """Two files with the same bytes among pictures asked three at a time: the model is
    asked about the picture once, and the second file's line is a copy of the first's,
    written after it."""
    folder = tmp_path / "pics"
    folder.mkdir()
    same = png_bytes((40, 40), seed=7)
    (folder / "a.png").write_bytes(same)
    (folder / "b.png").write_bytes(same)
    (folder / "c.png").write_bytes(png_bytes((40, 40), seed=8))
    engine = Held()
    out = tmp_path / "out.jsonl"
    with VisionChat(engine) as chat:
        summary = caption(chat, folder, out, prompt="C.", parallel=3, progress=False)
    assert (engine.turns, summary.done, summary.copied) == (2, 3, 1)
    records = {Path(r["path"]).name: r for r in lines(out)}
    assert records["b.png"]["copy_of"].endswith("a.png")
    assert records["b.png"]["text"] == records["a.png"]["text"]
    assert [Path(r["path"]).name for r in lines(out)].index("b.png") > 0


def test_an_ollama_daemon_gets_that_many_requests_at_once(
    ollama_server: OllamaServer, tmp_path: Path
) -> None:
    """parallel=3 with an engine without slots (Ollama): up to three chats are in the
    daemon at once, never more, and each of six pictures is asked once and written once."""
    folder = tmp_path / "pics"
    folder.mkdir()
    for index in range(6):
        (folder / f"p{index}.png").write_bytes(png_bytes((40, 40), seed=50 + index))
    inside = 0
    most = 0
    lock = threading.Lock()

    def slowly(request: RecordedRequest) -> Script:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.3)  # the answer's wait, while other requests arrive
        with lock:
            inside -= 1
        return Script()

    ollama_server.script(slowly)
    out = tmp_path / "out.jsonl"
    with VisionChat.ollama(host=ollama_server.url) as chat:
        summary = caption(chat, folder, out, prompt="C.", parallel=3, progress=False)
    assert (summary.done, summary.failed) == (6, 0)
    assert most == 3
    assert len(ollama_server.requests_to("/api/chat")) == 6
    assert sorted(pairs(lines(out)).values()) == [1] * 6
