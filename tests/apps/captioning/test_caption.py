"""Batch captioning: real picture files, the stand-in Ollama daemon and the tiny GGUF pair."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
from click.testing import CliRunner
from PIL import Image
from pydantic import BaseModel

from llava_local import (
    BackendError,
    BackendUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
    Stats,
    VisionChat,
)
from llava_local import images as images_module
from llava_local.apps.captioning import CaptionSummary, caption, find_pictures, read_captions
from llava_local.backends import Backend, Finish, Turn
from llava_local.cli.caption import caption as caption_command

from ...gguf_fixtures import GgufPair, png_bytes
from ...ollama_server import OllamaServer, RecordedRequest, Script
from ...paths import EXAMPLES
from .caption_lines import lines

GOOD = ("B.PNG", "a.png", "c.jpg")
BROKEN = ("empty.jpg", "noise.png", "page.jpg")
PREFETCH = "llava-local-caption-prefetch"


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    legs: int


class Colour(BaseModel):
    colour: Literal["red", "green", "blue"]


class StandIn(Backend):
    """An engine that answers "caption N" for the Nth turn and runs ``hook`` first."""

    name: ClassVar[str] = "stand_in"
    model = "stand-in"

    def __init__(self, hook: Callable[[int], None] = lambda n: None) -> None:
        self.turns: list[Turn] = []
        self.hook = hook

    def generate(self, turn: Turn) -> Generator[str | Finish, None, None]:
        self.turns.append(turn)
        self.hook(len(self.turns))
        yield f"caption {len(self.turns)}"
        yield Finish("stop", Stats(completion_tokens=2))


def jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes((80, 60), seed=seed))).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three good pictures, three broken ones, a text file, a hidden picture, a subfolder."""
    pics = tmp_path / "pics"
    (pics / "sub").mkdir(parents=True)
    (pics / "a.png").write_bytes(png_bytes(seed=1))
    (pics / "B.PNG").write_bytes(png_bytes(seed=2))
    (pics / "c.jpg").write_bytes(jpeg_bytes(3))
    (pics / "empty.jpg").write_bytes(b"")
    (pics / "noise.png").write_bytes(os.urandom(500))
    (pics / "page.jpg").write_bytes(b"<!doctype html><html><body>Not found</body></html>")
    (pics / "notes.txt").write_text("not a picture")
    (pics / ".hidden.png").write_bytes(png_bytes(seed=4))
    (pics / "sub" / "deep.png").write_bytes(png_bytes(seed=5))
    return pics


@pytest.fixture
def good_folder(tmp_path: Path) -> Path:
    """Five distinct readable pictures."""
    pics = tmp_path / "good"
    pics.mkdir()
    for index in range(5):
        (pics / f"p{index}.png").write_bytes(png_bytes((40, 40), seed=100 + index))
    return pics


def names(records: list[dict[str, Any]]) -> list[str]:
    return [Path(r["path"]).name for r in records]


def no_prefetch_thread() -> bool:
    return all(thread.name != PREFETCH for thread in threading.enumerate())


def chat_bodies(server: OllamaServer) -> list[dict[str, Any]]:
    return [r.json for r in server.requests_to("/api/chat")]


# --- finding pictures ----------------------------------------------------------------


def test_a_folder_gives_its_pictures_by_extension_in_order(folder: Path) -> None:
    """A folder gives picture files of any extension case, sorted, without hidden ones."""
    assert [p.name for p in find_pictures(folder)] == sorted([*GOOD, *BROKEN])


def test_recursive_descends_into_subfolders(folder: Path) -> None:
    """recursive=True adds the pictures of subfolders."""
    found = find_pictures(str(folder), recursive=True)
    assert [p.relative_to(folder).as_posix() for p in found] == sorted(
        [*GOOD, *BROKEN, "sub/deep.png"]
    )


def test_globs_and_lists_are_merged_without_duplicates(folder: Path) -> None:
    """A glob keeps picture files; a list merges its items and names each file once."""
    pattern = str(folder / "**" / "*")
    assert "sub/deep.png" in [p.relative_to(folder).as_posix() for p in find_pictures(pattern)]
    assert "notes.txt" not in [p.name for p in find_pictures(pattern)]
    both = find_pictures([folder / "a.png", str(folder / "*.png"), folder / "notes.txt"])
    assert [p.name for p in both] == ["a.png", "noise.png", "notes.txt"]


def test_a_missing_path_is_refused(tmp_path: Path) -> None:
    """A path that does not exist and is no pattern is an error, not an empty run."""
    with pytest.raises(InvalidRequestError, match="no such file"):
        find_pictures(tmp_path / "nope")
    assert find_pictures(str(tmp_path / "nope*.jpg")) == []


# --- with llama.cpp in-process --------------------------------------------------------


def test_llama_cpp_writes_one_line_per_picture_and_records_bad_ones(
    tiny_pair: GgufPair, folder: Path, tmp_path: Path
) -> None:
    """Every picture gets a line: answers with hash, model and stats; broken files an error."""
    out = tmp_path / "out.jsonl"
    with VisionChat.llama_cpp(model=tiny_pair.lm, mmproj=tiny_pair.mmproj) as chat:
        summary = caption(
            chat, folder, out, prompt="Describe.", temperature=0, max_tokens=4, progress=False
        )
        assert chat.history == []
    records = lines(out)
    assert names(records) == sorted([*GOOD, *BROKEN])
    assert summary.model_dump() == {
        "out": out,
        "found": 6,
        "done": 3,
        "skipped": 0,
        "failed": 3,
        "copied": 0,
        "retried": 0,
        "skipped_errors": 0,
        "skipped_error_pictures": 0,
        "elapsed_s": summary.elapsed_s,
        "repaired_bytes": 0,
    }
    for record in records:
        path = Path(record["path"])
        if path.name in GOOD:
            assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert isinstance(record["text"], str)
            assert "error" not in record
            assert record["backend"] == "llama_cpp"
            assert record["model"] == tiny_pair.lm.name
            assert record["stats"]["images_encoded"] == 1
            assert 1 <= record["stats"]["completion_tokens"] <= 4
        else:
            assert "text" not in record
            assert record["error"].startswith("ImageError: cannot use picture ")
            assert record["error_type"] == "ImageError"
            assert str(path) in record["error"]
            assert "\n" not in record["error"]
    by_name = {Path(r["path"]).name: r for r in records}
    assert by_name["empty.jpg"]["sha256"] is None
    assert "HTML" in by_name["page.jpg"]["error"]
    assert no_prefetch_thread()


def test_llama_cpp_schema_answers_are_parsed(
    tiny_pair: GgufPair, good_folder: Path, tmp_path: Path
) -> None:
    """With a schema, llama.cpp's grammar gives JSON that is validated into `parsed`."""
    out = tmp_path / "out.jsonl"
    with VisionChat.llama_cpp(model=tiny_pair.lm, mmproj=tiny_pair.mmproj) as chat:
        summary = caption(
            chat,
            good_folder,
            out,
            prompt="Colour?",
            schema=Colour,
            limit=2,
            temperature=0,
            progress=False,
        )
    assert summary.done == 2
    for record in lines(out):
        assert Colour.model_validate_json(record["text"]).colour == record["parsed"]["colour"]


# --- with the stand-in Ollama daemon -------------------------------------------------


def test_each_picture_is_its_own_conversation(
    ollama_server: OllamaServer, ollama_chat: VisionChat, good_folder: Path, tmp_path: Path
) -> None:
    """Every request carries one user message with one picture, and the options."""
    caption(
        ollama_chat,
        good_folder,
        tmp_path / "o.jsonl",
        prompt="Caption.",
        temperature=0,
        progress=False,
    )
    bodies = chat_bodies(ollama_server)
    assert len(bodies) == 5
    for body in bodies:
        assert [m["role"] for m in body["messages"]] == ["user"]
        assert len(body["messages"][0]["images"]) == 1
        assert body["options"] == {"temperature": 0.0}
    assert len({b["messages"][0]["images"][0] for b in bodies}) == 5
    record = lines(tmp_path / "o.jsonl")[0]
    assert record["text"] == "A cat on a mat."
    assert (record["model"], record["backend"], record["done_reason"]) == (
        "llava",
        "ollama",
        "stop",
    )
    assert record["stats"]["completion_tokens"] == 6


def test_resume_asks_only_new_content_and_renamed_copies_get_the_line_of_their_picture(
    ollama_server: OllamaServer, ollama_chat: VisionChat, folder: Path, tmp_path: Path
) -> None:
    """A second run asks only about new content; a renamed or copied picture is not asked
    again but gets its own line, a copy of its picture's (copy_of), and broken files are
    skipped, as they already have their error line."""
    out = tmp_path / "out.jsonl"
    caption(ollama_chat, folder, out, prompt="Caption.", progress=False)
    asked = len(chat_bodies(ollama_server))
    first = {Path(r["path"]).name: r for r in lines(out)}
    (folder / "a.png").rename(folder / "renamed.png")
    shutil.copy(folder / "c.jpg", folder / "copy.jpg")
    (folder / "new.png").write_bytes(png_bytes(seed=77))
    summary = caption(ollama_chat, folder, out, prompt="Caption.", progress=False)
    assert (summary.found, summary.done, summary.skipped, summary.failed) == (8, 3, 5, 0)
    assert (summary.copied, summary.skipped_errors) == (2, 3)
    assert len(chat_bodies(ollama_server)) == asked + 1
    second_run = lines(out)[6:]
    assert names(second_run) == ["copy.jpg", "new.png", "renamed.png"]
    copies = {Path(r["path"]).name: r for r in second_run if "copy_of" in r}
    assert copies["renamed.png"]["copy_of"] == str(folder / "a.png")
    assert copies["renamed.png"]["text"] == first["a.png"]["text"]
    assert copies["copy.jpg"]["copy_of"] == str(folder / "c.jpg")
    assert copies["copy.jpg"]["text"] == first["c.jpg"]["text"]
    assert copies["copy.jpg"]["elapsed_s"] == 0.0
    assert "copied from the same picture under another name" in str(summary)


def test_copies_in_one_run_are_asked_about_once_and_each_gets_its_line(
    ollama_server: OllamaServer, ollama_chat: VisionChat, good_folder: Path, tmp_path: Path
) -> None:
    """Two files with the same bytes in one run: the model answers the first, the second
    gets a copy of that line under its own path."""
    shutil.copy(good_folder / "p0.png", good_folder / "p9.png")
    out = tmp_path / "o.jsonl"
    summary = caption(ollama_chat, good_folder, out, prompt="C.", progress=False)
    assert (summary.found, summary.done, summary.skipped, summary.copied) == (6, 6, 0, 1)
    assert len(chat_bodies(ollama_server)) == 5
    by_name = {Path(r["path"]).name: r for r in read_captions(out)}
    assert sorted(by_name) == ["p0.png", "p1.png", "p2.png", "p3.png", "p4.png", "p9.png"]
    assert by_name["p9.png"]["text"] == by_name["p0.png"]["text"]
    assert by_name["p9.png"]["copy_of"] == str(good_folder / "p0.png")


def test_an_engine_error_on_one_picture_is_recorded_and_the_run_goes_on(
    ollama_server: OllamaServer, ollama_chat: VisionChat, good_folder: Path, tmp_path: Path
) -> None:
    """A daemon error on one picture is a line with the error; the next run keeps it,
    and retry_errors=True asks about it again."""
    out = tmp_path / "out.jsonl"
    ollama_server.script(Script(), Script(fault="error_line", after=1), Script())
    summary = caption(ollama_chat, good_folder, out, prompt="C.", progress=False)
    assert (summary.done, summary.failed) == (4, 1)
    failed = lines(out)[1]
    assert failed["error"].startswith("ResponseError: Ollama at ")
    assert "unexpected EOF" in failed["error"]
    again = caption(ollama_chat, good_folder, out, prompt="C.", progress=False)
    assert (again.done, again.skipped, again.skipped_errors, again.failed) == (0, 5, 1, 0)
    assert len(lines(out)) == 5
    retried = caption(ollama_chat, good_folder, out, prompt="C.", retry_errors=True, progress=False)
    assert (retried.done, retried.skipped, retried.retried, retried.failed) == (1, 4, 1, 0)
    assert names(lines(out)[5:]) == ["p1.png"]


def test_a_dead_daemon_stops_the_run_after_recording_it(
    ollama_server: OllamaServer, ollama_chat: VisionChat, good_folder: Path, tmp_path: Path
) -> None:
    """A dropped connection stops the run with its error, in a line marked for retry;
    a re-run completes the file."""
    out = tmp_path / "out.jsonl"
    ollama_server.script(Script(), Script(fault="drop", after=1), Script())
    with pytest.raises(BackendUnavailableError, match="dropped"):
        caption(ollama_chat, good_folder, out, prompt="C.", progress=False)
    assert no_prefetch_thread()
    assert [("error" in r) for r in lines(out)] == [False, True]
    assert lines(out)[1]["retry"] is True
    summary = caption(ollama_chat, good_folder, out, prompt="C.", progress=False)
    assert (summary.done, summary.skipped, summary.retried) == (4, 1, 1)


def test_a_vanished_model_stops_the_run(
    ollama_server: OllamaServer, ollama_chat: VisionChat, good_folder: Path, tmp_path: Path
) -> None:
    """A model removed mid-run fails every picture alike, so the run stops at once."""
    out = tmp_path / "out.jsonl"
    ollama_server.script(Script(), Script(fault="model_gone"))
    with pytest.raises(ModelNotFoundError):
        caption(ollama_chat, good_folder, out, prompt="C.", progress=False)
    assert [r["error_type"] for r in lines(out) if "error" in r] == ["ModelNotFoundError"]


def test_failures_in_a_row_stop_the_run(
    ollama_server: OllamaServer, ollama_chat: VisionChat, good_folder: Path, tmp_path: Path
) -> None:
    """An engine failing on every picture stops after max_failures_in_a_row, not 1000 lines."""
    out = tmp_path / "out.jsonl"
    ollama_server.script(Script(fault="http_error", status=500, error="runner crashed"))
    with pytest.raises(BackendError, match="last 2 pictures all failed"):
        caption(ollama_chat, good_folder, out, prompt="C.", max_failures_in_a_row=2, progress=False)
    assert len(lines(out)) == 2
    assert no_prefetch_thread()


def test_schema_answers_are_validated_and_parsed(
    ollama_server: OllamaServer, ollama_chat: VisionChat, good_folder: Path, tmp_path: Path
) -> None:
    """A schema goes as Ollama's format and the valid answer is stored parsed, first try."""
    out = tmp_path / "out.jsonl"
    ollama_server.script(pieces=['{"kind": "cat", ', '"legs": 4}'])
    caption(ollama_chat, good_folder, out, prompt="Pet?", schema=Pet, limit=1, progress=False)
    (record,) = lines(out)
    assert record["parsed"] == {"kind": "cat", "legs": 4}
    assert record["attempts"] == 1
    (body,) = chat_bodies(ollama_server)
    assert body["format"] == Pet.model_json_schema()


def test_an_invalid_answer_is_retried_exactly_once_with_a_firmer_prompt(
    ollama_server: OllamaServer, ollama_chat: VisionChat, good_folder: Path, tmp_path: Path
) -> None:
    """A misfit answer is asked again once, with the schema in the prompt, then accepted."""
    out = tmp_path / "out.jsonl"
    ollama_server.script(
        Script(pieces=['{"kind": "cow"}']), Script(pieces=['{"kind":"dog","legs":3}'])
    )
    caption(ollama_chat, good_folder, out, prompt="Pet?", schema=Pet, limit=1, progress=False)
    first, second = chat_bodies(ollama_server)
    assert first["messages"][0]["content"] == "Pet?"
    assert second["messages"][0]["content"].startswith("Pet?\n\nAnswer with one JSON object")
    assert '"legs"' in second["messages"][0]["content"]
    assert [m["role"] for m in second["messages"]] == ["user"]
    (record,) = lines(out)
    assert (record["parsed"], record["attempts"]) == ({"kind": "dog", "legs": 3}, 2)


def test_an_answer_invalid_twice_is_recorded_as_a_schema_error(
    ollama_server: OllamaServer, ollama_chat: VisionChat, good_folder: Path, tmp_path: Path
) -> None:
    """Two misfit answers make an error line with the rejected text; two requests each."""
    out = tmp_path / "out.jsonl"
    ollama_server.script(pieces=['{"kind": "c'])
    schema = Pet.model_json_schema()
    summary = caption(
        ollama_chat, good_folder, out, prompt="Pet?", schema=schema, limit=2, progress=False
    )
    assert (summary.done, summary.failed) == (0, 2)
    assert len(chat_bodies(ollama_server)) == 4
    for record in lines(out):
        assert record["error"].startswith("SchemaError: the answer is not valid JSON")
        assert record["rejected_text"] == '{"kind": "c'


def test_limit_counts_new_pictures_and_the_next_run_continues(
    ollama_server: OllamaServer, ollama_chat: VisionChat, good_folder: Path, tmp_path: Path
) -> None:
    """limit=2 asks about two pictures per run; runs continue where the last stopped."""
    out = tmp_path / "out.jsonl"
    first = caption(ollama_chat, good_folder, out, prompt="C.", limit=2, progress=False)
    second = caption(ollama_chat, good_folder, out, prompt="C.", limit=2, progress=False)
    assert (first.done, second.done, second.skipped) == (2, 2, 2)
    assert names(lines(out)) == ["p0.png", "p1.png", "p2.png", "p3.png"]
    assert no_prefetch_thread()


# --- the output file -----------------------------------------------------------------


@pytest.mark.parametrize("torn", [b'{"path": "p2.png", "sha256": "ab', b'{"pa'])
def test_a_torn_last_line_is_cut_before_appending(
    ollama_chat: VisionChat, good_folder: Path, tmp_path: Path, torn: bytes
) -> None:
    """A half-written last line left by a crash is cut off and its picture done again."""
    out = tmp_path / "out.jsonl"
    caption(ollama_chat, good_folder, out, prompt="C.", limit=2, progress=False)
    with out.open("ab") as file:
        file.write(torn)
    summary = caption(ollama_chat, good_folder, out, prompt="C.", progress=False)
    assert summary.repaired_bytes == len(torn)
    assert "torn" in str(summary)
    assert names(lines(out)) == [f"p{i}.png" for i in range(5)]


def test_a_whole_last_line_without_its_newline_is_kept(
    ollama_chat: VisionChat, good_folder: Path, tmp_path: Path
) -> None:
    """A complete last record that only lost its newline counts as done."""
    out = tmp_path / "out.jsonl"
    caption(ollama_chat, good_folder, out, prompt="C.", limit=1, progress=False)
    out.write_bytes(out.read_bytes().rstrip(b"\n"))
    summary = caption(ollama_chat, good_folder, out, prompt="C.", progress=False)
    assert (summary.skipped, summary.done, summary.repaired_bytes) == (1, 4, 0)
    assert len(lines(out)) == 5


@pytest.mark.parametrize("content", [b"hello", b"a,b\n1,2\n", b'{"x": 1}\n{"path": '])
def test_a_file_that_is_not_ours_is_refused_untouched(
    ollama_chat: VisionChat, good_folder: Path, tmp_path: Path, content: bytes
) -> None:
    """An output file of another kind is refused and left byte for byte as it was."""
    out = tmp_path / "out.jsonl"
    out.write_bytes(content)
    with pytest.raises(InvalidRequestError, match="not a caption file"):
        caption(ollama_chat, good_folder, out, prompt="C.", progress=False)
    assert out.read_bytes() == content
    assert no_prefetch_thread()


def test_a_file_name_that_is_not_utf8_still_makes_a_valid_line(tmp_path: Path) -> None:
    """A Latin-1 file name is written escaped, so the line stays valid UTF-8 JSON."""
    folder = tmp_path / "latin1"
    folder.mkdir()
    name = os.path.join(os.fsencode(folder), b"caf\xe9.png")
    with open(name, "wb") as file:
        file.write(png_bytes(seed=9))
    out = tmp_path / "out.jsonl"
    with VisionChat(StandIn()) as chat:
        caption(chat, folder, out, prompt="C.", progress=False)
    (record,) = lines(out)
    assert os.fsencode(record["path"]) == name
    assert record["text"] == "caption 1"


def test_a_second_writer_is_refused(
    ollama_chat: VisionChat, good_folder: Path, tmp_path: Path
) -> None:
    """Two runs cannot append to the same file at once."""
    out = tmp_path / "out.jsonl"
    with out.open("ab") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        with pytest.raises(InvalidRequestError, match="another caption run"):
            caption(ollama_chat, good_folder, out, prompt="C.", progress=False)


def test_bad_arguments_fail_before_the_file_is_made(
    ollama_chat: VisionChat, good_folder: Path, tmp_path: Path
) -> None:
    """A bad option, prompt or schema is refused before anything is written."""
    out = tmp_path / "out.jsonl"
    for kwargs in (
        {"prompt": " "},
        {"prompt": "C.", "temprature": 0},
        {"prompt": "C.", "schema": 3},
    ):
        with pytest.raises(InvalidRequestError):
            caption(ollama_chat, good_folder, out, progress=False, **kwargs)
    assert not out.exists()


# --- interruption and the prefetch thread --------------------------------------------


def test_ctrl_c_mid_run_leaves_a_valid_file_and_a_resumed_run_completes_it(
    good_folder: Path, tmp_path: Path
) -> None:
    """A KeyboardInterrupt during the third answer leaves two whole lines; resuming adds
    the other three."""
    out = tmp_path / "out.jsonl"

    def interrupt(turn: int) -> None:
        if turn == 3:
            raise KeyboardInterrupt

    with VisionChat(StandIn(interrupt)) as chat, pytest.raises(KeyboardInterrupt):
        caption(chat, good_folder, out, prompt="C.", progress=False)
    assert no_prefetch_thread()
    assert names(lines(out)) == ["p0.png", "p1.png"]
    with VisionChat(StandIn()) as chat:
        summary = caption(chat, good_folder, out, prompt="C.", progress=False)
    assert (summary.done, summary.skipped) == (3, 2)
    assert names(lines(out)) == [f"p{i}.png" for i in range(5)]


def test_pictures_are_prepared_ahead_while_the_model_works(
    good_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the first picture is being answered, the thread prepares the next ones."""
    prepared: list[threading.Event] = [threading.Event() for _ in range(5)]
    real_prepare = images_module.prepare

    def counting_prepare(source: Any, **kwargs: Any) -> Any:
        image = real_prepare(source, **kwargs)
        if threading.current_thread().name == PREFETCH:  # chat.py shares the module
            next(event for event in prepared if not event.is_set()).set()
        return image

    monkeypatch.setattr(images_module, "prepare", counting_prepare)
    ahead: list[bool] = []
    asked_in: list[str] = []

    def wait_for_the_next_pictures(turn: int) -> None:
        if turn == 1:
            ahead.append(prepared[2].wait(timeout=30))
            asked_in.append(threading.current_thread().name)

    with VisionChat(StandIn(wait_for_the_next_pictures)) as chat:
        caption(chat, good_folder, tmp_path / "o.jsonl", prompt="C.", progress=False)
    assert ahead == [True]
    assert asked_in == ["llava-local-caption-ask-0"]  # the model's thread, not the reader's
    assert no_prefetch_thread()


def test_a_crash_in_the_prefetch_thread_surfaces_in_the_caller(
    good_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error while preparing is raised by caption() and the thread is gone."""

    def broken(source: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug in preparation")

    monkeypatch.setattr(images_module, "prepare", broken)
    with VisionChat(StandIn()) as chat, pytest.raises(RuntimeError, match="bug in preparation"):
        caption(chat, good_folder, tmp_path / "o.jsonl", prompt="C.", progress=False)
    assert no_prefetch_thread()


def test_the_progress_bar_goes_to_stderr(
    good_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """progress=True draws count and rate on stderr and nothing on stdout."""
    with VisionChat(StandIn()) as chat:
        caption(chat, good_folder, tmp_path / "o.jsonl", prompt="C.")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "5/5 pictures" in captured.err
    assert "pictures/s" in captured.err or "s/picture" in captured.err


# --- resuming: one line per picture and prompt, broken ones included -----------------


@pytest.fixture
def broken_folder(folder: Path) -> Path:
    """The folder's three good and three broken pictures, plus a PNG cut in half."""
    whole = png_bytes((40, 40), seed=8)
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    return folder


BROKEN_TOO = (*BROKEN, "cut.png")


def test_a_rerun_over_broken_files_appends_no_line(
    demo_chat: VisionChat, broken_folder: Path, tmp_path: Path
) -> None:
    """Broken files are recorded once: a second run skips them, so the file keeps one
    line per picture (an empty file, known by its path, included)."""
    out = tmp_path / "out.jsonl"
    first = caption(
        demo_chat, broken_folder, out, prompt="What is it?", max_tokens=4, progress=False
    )
    assert (first.found, first.done, first.failed) == (7, 3, 4)
    second = caption(
        demo_chat, broken_folder, out, prompt="What is it?", max_tokens=4, progress=False
    )
    assert (second.done, second.failed, second.retried) == (0, 0, 0)
    assert (second.skipped, second.skipped_errors) == (7, 4)
    records = lines(out)
    assert len(records) == 7
    assert sorted(names(records)) == sorted([*GOOD, *BROKEN_TOO])
    assert {r["prompt"] for r in records} == {"What is it?"}
    assert next(r for r in records if r["path"].endswith("empty.jpg"))["sha256"] is None


def test_retry_errors_asks_again_and_the_newest_line_counts(
    demo_chat: VisionChat, broken_folder: Path, tmp_path: Path
) -> None:
    """retry_errors=True asks again about every picture whose line is an error, the
    summary counts them, and read_captions returns each picture's newest line."""
    out = tmp_path / "out.jsonl"

    def ask(max_tokens: int, retry_errors: bool = False) -> CaptionSummary:
        return caption(
            demo_chat,
            broken_folder,
            out,
            prompt="What colour is it?",
            schema=Colour,
            temperature=0,
            max_tokens=max_tokens,
            retry_errors=retry_errors,
            progress=False,
        )

    cut_short = ask(max_tokens=3)
    assert (cut_short.done, cut_short.failed) == (0, 7)  # 3 tokens cannot hold the JSON
    again = ask(max_tokens=40, retry_errors=True)
    assert (again.retried, again.done, again.failed, again.skipped) == (7, 3, 4, 0)
    assert "7 retried after an earlier error" in str(again)
    assert len(lines(out)) == 14
    newest = {Path(r["path"]).name: r for r in read_captions(out)}
    assert sorted(newest) == sorted([*GOOD, *BROKEN_TOO])
    for name in GOOD:
        assert "error" not in newest[name]
        assert newest[name]["parsed"]["colour"] in ("red", "green", "blue")
    for name in BROKEN_TOO:
        assert newest[name]["error_type"] == "ImageError"
    settled = ask(max_tokens=40)
    assert (settled.skipped, settled.skipped_errors, settled.retried) == (7, 4, 0)


def test_resuming_is_per_prompt_and_old_lines_stand_for_any_prompt(
    ollama_server: OllamaServer, ollama_chat: VisionChat, good_folder: Path, tmp_path: Path
) -> None:
    """Another prompt asks about every picture again; a line written before lines named
    their prompt still counts as done."""
    out = tmp_path / "out.jsonl"
    caption(ollama_chat, good_folder, out, prompt="Caption.", limit=2, progress=False)
    other = caption(ollama_chat, good_folder, out, prompt="Tag it.", progress=False)
    assert (other.done, other.skipped) == (5, 0)
    assert len(chat_bodies(ollama_server)) == 7
    legacy = [{k: v for k, v in r.items() if k != "prompt"} for r in lines(out)[:2]]
    out.write_text("".join(json.dumps(r) + "\n" for r in legacy))
    resumed = caption(ollama_chat, good_folder, out, prompt="Caption.", progress=False)
    assert (resumed.done, resumed.skipped) == (3, 2)
    assert len(read_captions(out)) == 5


def test_a_run_over_broken_files_shows_no_rate(
    demo_chat: VisionChat, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pictures that failed at once are counted but make no rate and no ETA: nothing
    was answered."""
    pics = tmp_path / "broken"
    pics.mkdir()
    (pics / "empty.jpg").write_bytes(b"")
    (pics / "page.png").write_bytes(b"<html>gone</html>")
    caption(demo_chat, pics, tmp_path / "o.jsonl", prompt="What is it?", max_tokens=4)
    err = capsys.readouterr().err
    assert "2/2 pictures" in err
    assert "-- s/picture" in err
    assert "pic/s" not in err


# --- the command line ----------------------------------------------------------------


def ollama_args(server: OllamaServer) -> list[str]:
    return ["--backend", "ollama", "--host", server.url]


def test_cli_captions_a_folder_and_prints_the_summary(
    ollama_server: OllamaServer, folder: Path, tmp_path: Path
) -> None:
    """`caption DIR --prompt --out` writes the lines and prints the summary."""
    out = tmp_path / "res.jsonl"
    args = [str(folder), "--prompt", "Caption.", "--out", str(out), "--recursive"]
    result = CliRunner().invoke(caption_command, [*args, *ollama_args(ollama_server), "--json"])
    assert result.exit_code == 0, result.output
    summary = CaptionSummary.model_validate_json(result.stdout)
    assert (summary.found, summary.done, summary.failed) == (7, 4, 3)
    assert len(lines(out)) == 7
    again = CliRunner().invoke(caption_command, [*args, *ollama_args(ollama_server)])
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith(
        "0 captioned, 7 already recorded (3 of them errors), 0 failed of 7 pictures"
    )
    assert "3 pictures kept the error of an earlier run; --retry-errors" in again.stderr
    assert len(lines(out)) == 7


def test_cli_identical_pictures_under_two_names_each_get_their_line(tmp_path: Path) -> None:
    """Two byte-identical copies of examples/digit.png and the shape, captioned into a
    fresh --out with the demo model: three lines, the copy's the first's answer under
    its own path; the summary counts three captioned, one of them copied; a rerun has
    them all, and a third copy added later gets its line from the file."""
    pics = tmp_path / "pics"
    pics.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(EXAMPLES / "digit.png", pics / name)
    shutil.copy(EXAMPLES / "shape.png", pics / "s.png")
    out = tmp_path / "fresh.jsonl"
    args = [str(pics), "-p", "What is it?", "-o", str(out), "--backend", "llama_cpp"]
    args += ["--temperature", "0", "--no-progress"]
    first = CliRunner().invoke(caption_command, args)
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("3 captioned, 0 already recorded, 0 failed of 3 pictures")
    assert first.stdout.rstrip().endswith("; 1 copied from the same picture under another name")
    by_name = {Path(r["path"]).name: r for r in lines(out)}
    assert sorted(by_name) == ["a.png", "b.png", "s.png"]
    assert by_name["b.png"]["text"] == by_name["a.png"]["text"] == "This digit is 7."
    assert by_name["b.png"]["copy_of"] == str(pics / "a.png")
    assert "copy_of" not in by_name["a.png"]
    again = CliRunner().invoke(caption_command, args)
    assert again.stdout.startswith("0 captioned, 3 already recorded, 0 failed of 3 pictures")
    shutil.copy(EXAMPLES / "digit.png", pics / "c.png")
    third = CliRunner().invoke(caption_command, [*args, "--json"])
    summary = CaptionSummary.model_validate_json(third.stdout)
    assert (summary.found, summary.done, summary.skipped, summary.copied) == (4, 1, 3, 1)
    newest = lines(out)[-1]
    assert (Path(newest["path"]).name, newest["copy_of"]) == ("c.png", str(pics / "a.png"))
    assert newest["text"] == "This digit is 7."


def test_cli_retry_errors_asks_about_failed_pictures_again(
    broken_folder: Path, tmp_path: Path
) -> None:
    """--retry-errors on the demo model asks again about the broken pictures and the
    summary says how many were retried."""
    out = tmp_path / "res.jsonl"
    args = [str(broken_folder), "-p", "What is it?", "-o", str(out), "--max-tokens", "4"]
    args += ["--backend", "llama_cpp", "--no-progress"]
    first = CliRunner().invoke(caption_command, args)
    assert first.exit_code == 0, first.output
    assert len(lines(out)) == 7
    again = CliRunner().invoke(caption_command, [*args, "--retry-errors", "--json"])
    assert again.exit_code == 0, again.output
    summary = CaptionSummary.model_validate_json(again.stdout)
    assert (summary.retried, summary.failed, summary.skipped, summary.skipped_errors) == (
        4,
        4,
        3,
        0,
    )
    assert len(lines(out)) == 11
    text = CliRunner().invoke(caption_command, [*args, "--retry-errors"])
    assert "4 retried after an earlier error" in text.stdout


def test_cli_schema_file_and_limit(
    ollama_server: OllamaServer, good_folder: Path, tmp_path: Path
) -> None:
    """--schema reads a JSON schema file that goes to the engine; --limit bounds the run."""
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(Pet.model_json_schema()))
    ollama_server.script(pieces=['{"kind":"cat","legs":4}'])
    out = tmp_path / "res.jsonl"
    args = [str(good_folder / "*.png"), "-p", "Pet?", "-o", str(out), "--schema", str(schema_file)]
    result = CliRunner().invoke(
        caption_command, [*args, "--limit", "2", *ollama_args(ollama_server)]
    )
    assert result.exit_code == 0, result.output
    assert [r["parsed"] for r in lines(out)] == [{"kind": "cat", "legs": 4}] * 2
    assert chat_bodies(ollama_server)[0]["format"] == Pet.model_json_schema()


def test_cli_refuses_a_schema_file_that_is_not_json(good_folder: Path, tmp_path: Path) -> None:
    """A --schema file that is not a JSON object is a usage error (exit 2)."""
    schema_file = tmp_path / "schema.json"
    schema_file.write_text("[1, 2]")
    args = [
        str(good_folder),
        "-p",
        "x",
        "-o",
        str(tmp_path / "o.jsonl"),
        "--schema",
        str(schema_file),
    ]
    result = CliRunner().invoke(caption_command, args)
    assert result.exit_code == 2
    assert "not a JSON schema object" in result.output


def test_cli_ctrl_c_exits_130_with_a_valid_file_and_a_rerun_completes_it(
    ollama_server: OllamaServer, good_folder: Path, tmp_path: Path
) -> None:
    """SIGINT while the daemon works on the third picture: exit 130, two whole lines;
    the same command again finishes the folder."""
    main_thread = threading.main_thread().ident
    assert main_thread is not None
    chats = 0

    def interrupt_on_the_third(request: RecordedRequest) -> Script:
        nonlocal chats
        chats += 1
        if chats == 3:
            signal.pthread_kill(main_thread, signal.SIGINT)
            return Script(fault="stall")
        return Script()

    ollama_server.script(interrupt_on_the_third)
    out = tmp_path / "res.jsonl"
    args = [str(good_folder), "-p", "C.", "-o", str(out), *ollama_args(ollama_server)]
    result = CliRunner().invoke(caption_command, args)
    assert result.exit_code == 130, result.output
    assert "run again to continue" in result.stderr
    assert names(lines(out)) == ["p0.png", "p1.png"]
    assert no_prefetch_thread()
    ollama_server.script(Script())
    again = CliRunner().invoke(caption_command, [*args, "--no-progress"])
    assert again.exit_code == 0, again.output
    assert names(lines(out)) == [f"p{i}.png" for i in range(5)]
