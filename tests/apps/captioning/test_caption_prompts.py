"""Several prompts per picture in ``caption``: every prompt asked about each picture, the
picture read once (the engine keeps its KV prefix from one prompt to the next), one
line per picture and prompt, resumable per picture and prompt, with a schema too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Literal

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from llava_local import InvalidRequestError, VisionChat
from llava_local.apps.captioning import caption, read_captions, read_prompts
from llava_local.apps.datasets import DIGIT_PROMPT, DIGIT_PROMPTS_HELD_OUT
from llava_local.cli.caption import caption as caption_command

from ...gguf_fixtures import png_bytes
from ...ollama_server import OllamaServer, RecordedRequest, Script
from ...paths import ROOT
from .caption_lines import lines, pairs, save_digits

PROMPTS = (DIGIT_PROMPT, DIGIT_PROMPTS_HELD_OUT[1], DIGIT_PROMPTS_HELD_OUT[4])


class Pet(BaseModel):
    kind: Literal["cat", "dog"]


@pytest.fixture
def digits(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Four test digits as PNG files, and the digit each shows by file name."""
    folder = tmp_path / "digits"
    return folder, save_digits(folder, 4)


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    """Three distinct readable pictures and one broken file."""
    folder = tmp_path / "pics"
    folder.mkdir()
    for index in range(3):
        (folder / f"p{index}.png").write_bytes(png_bytes((40, 40), seed=300 + index))
    (folder / "broken.png").write_bytes(b"<html>not a picture</html>")
    return folder


def asked(server: OllamaServer) -> list[str]:
    """The prompt of each chat request the daemon got, in order."""
    return [r.json["messages"][-1]["content"] for r in server.requests_to("/api/chat")]


# --- with the demo model: read once, same answers -------------------------------------


def test_every_prompt_gets_a_line_and_the_picture_is_read_once(
    demo_chat: VisionChat, digits: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """Three prompts about four digits give twelve lines, each naming the digit; after
    the first prompt of a picture the engine encodes nothing and restores more than the
    first prompt did: the picture's positions come from its KV cache."""
    folder, labels = digits
    out = tmp_path / "out.jsonl"
    summary = caption(demo_chat, folder, out, prompt=list(PROMPTS), max_tokens=24, progress=False)
    assert (summary.found, summary.done, summary.failed) == (12, 12, 0)
    records = lines(out)
    assert [(Path(r["path"]).name, r["prompt"]) for r in records] == [
        (name, prompt) for name in sorted(labels) for prompt in PROMPTS
    ]
    for first, *others in (records[i : i + 3] for i in range(0, 12, 3)):
        assert first["stats"]["images_encoded"] == 1
        for later in others:  # the system prompt and the picture come from the KV cache
            assert later["stats"]["images_encoded"] == 0
            assert later["stats"]["cached_tokens"] > first["stats"]["cached_tokens"]
    for record in records:
        assert labels[Path(record["path"]).name] in record["text"]


def test_answers_equal_those_of_one_prompt_runs(
    demo_chat: VisionChat, digits: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """The shared picture prefix changes no answer: each prompt's lines are the same
    (greedy) as a run asking that prompt alone."""
    folder, _ = digits
    together = tmp_path / "together.jsonl"
    caption(demo_chat, folder, together, prompt=list(PROMPTS[:2]), max_tokens=24, progress=False)
    for prompt in PROMPTS[:2]:
        alone = tmp_path / f"alone{PROMPTS.index(prompt)}.jsonl"
        caption(demo_chat, folder, alone, prompt=prompt, max_tokens=24, progress=False)
        expected = {r["path"]: r["text"] for r in lines(alone)}
        got = {r["path"]: r["text"] for r in lines(together) if r["prompt"] == prompt}
        assert got == expected


def test_a_schema_applies_to_every_prompt(
    ollama_server: OllamaServer, pictures: Path, tmp_path: Path
) -> None:
    """With a schema, every prompt's answer is sent the format and stored parsed, and a
    broken picture is one error line per prompt."""
    ollama_server.script(pieces=['{"kind": "cat"}'])
    out = tmp_path / "out.jsonl"
    with VisionChat.ollama(host=ollama_server.url) as chat:
        summary = caption(chat, pictures, out, prompt=["Pet?", "Animal?"], schema=Pet)
    assert (summary.found, summary.done, summary.failed) == (8, 6, 2)
    records = lines(out)
    assert pairs(records) == Counter(
        (name, prompt)
        for name in ("broken.png", "p0.png", "p1.png", "p2.png")
        for prompt in ("Pet?", "Animal?")
    )
    for record in records:
        if record["path"].endswith("broken.png"):
            assert record["error_type"] == "ImageError"
        else:
            assert record["parsed"] == {"kind": "cat"}
    bodies = [r.json for r in ollama_server.requests_to("/api/chat")]
    assert len(bodies) == 6
    assert all(body["format"] == Pet.model_json_schema() for body in bodies)
    assert asked(ollama_server) == ["Pet?", "Animal?"] * 3


# --- resuming per picture and prompt --------------------------------------------------


def test_a_new_prompt_asks_only_that_prompt(
    ollama_server: OllamaServer, pictures: Path, tmp_path: Path
) -> None:
    """A second run with one more prompt asks only the new prompt about each picture;
    the broken file gets its error line for the new prompt only."""
    out = tmp_path / "out.jsonl"
    with VisionChat.ollama(host=ollama_server.url) as chat:
        caption(chat, pictures, out, prompt="Caption.", progress=False)
        summary = caption(chat, pictures, out, prompt=["Caption.", "Tags."], progress=False)
    assert (summary.found, summary.done, summary.failed, summary.skipped) == (8, 3, 1, 4)
    assert summary.skipped_errors == 1
    assert asked(ollama_server) == ["Caption."] * 3 + ["Tags."] * 3
    assert sorted(pairs(lines(out)).values()) == [1] * 8
    assert "of 8 answers (4 pictures x 2 prompts)" in str(summary)


def test_limit_counts_pictures_with_all_their_prompts(
    ollama_server: OllamaServer, pictures: Path, tmp_path: Path
) -> None:
    """limit=2 records two pictures with every prompt each; the next run does the rest."""
    out = tmp_path / "out.jsonl"
    with VisionChat.ollama(host=ollama_server.url) as chat:
        first = caption(chat, pictures, out, prompt=["A.", "B."], limit=2, progress=False)
        rest = caption(chat, pictures, out, prompt=["A.", "B."], progress=False)
    assert (first.done + first.failed, rest.done + rest.failed, rest.skipped) == (4, 4, 4)
    assert sorted(pairs(lines(out)).values()) == [1] * 8


def test_prompts_are_checked_and_read_from_a_file(tmp_path: Path) -> None:
    """Prompts from a file are its non-blank lines; an empty list or prompt is refused
    before the output file is made; a prompt given twice is asked once."""
    listing = tmp_path / "prompts.txt"
    listing.write_text("Describe it.\n\n  Tag it.  \n")
    assert read_prompts(listing) == ["Describe it.", "Tag it."]
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(InvalidRequestError, match="no prompt"):
        read_prompts(tmp_path / "blank.txt")
    out = tmp_path / "o.jsonl"
    with VisionChat.llama_cpp() as chat:
        for bad in ([], ["ok", " "]):
            with pytest.raises(InvalidRequestError, match="prompt"):
                caption(chat, tmp_path, out, prompt=bad, progress=False)
        assert not out.exists()
        (tmp_path / "d.png").write_bytes(png_bytes((40, 40), seed=5))
        summary = caption(chat, tmp_path / "d.png", out, prompt=["A?", "A?"], max_tokens=2)
    assert summary.found == 1
    assert [r["prompt"] for r in read_captions(out)] == ["A?"]


def test_cli_takes_several_prompts_and_a_prompts_file(
    ollama_server: OllamaServer, pictures: Path, tmp_path: Path
) -> None:
    """`caption -p A --prompts FILE` asks -p first, then the file's prompts, and a rerun
    asks nothing; no prompt at all is a usage error."""
    listing = tmp_path / "prompts.txt"
    listing.write_text("Tags.\nText in it?\n")
    out = tmp_path / "out.jsonl"
    args = [str(pictures), "-p", "Caption.", "--prompts", str(listing), "-o", str(out)]
    args += ["--backend", "ollama", "--host", ollama_server.url, "--no-progress"]
    result = CliRunner().invoke(caption_command, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("9 captioned, 0 already recorded, 3 failed of 12 answers")
    assert asked(ollama_server) == ["Caption.", "Tags.", "Text in it?"] * 3
    again = CliRunner().invoke(caption_command, args)
    assert again.exit_code == 0, again.output
    assert len(asked(ollama_server)) == 9
    assert len(lines(out)) == 12
    none = CliRunner().invoke(caption_command, [str(pictures), "-o", str(out)])
    assert none.exit_code == 2
    assert "--prompts FILE" in none.output


def test_ctrl_c_in_a_real_process_then_resume_gives_each_pair_once(
    ollama_server: OllamaServer, pictures: Path, tmp_path: Path
) -> None:
    """SIGINT to a `caption -p -p -p` process while the daemon answers the fifth
    question exits 130 with whole lines; the same command again ends with every
    picture and prompt exactly once."""
    (pictures / "broken.png").unlink()
    out = tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "llava_local.cli", "caption", str(pictures), "-o", str(out)]
    for prompt in ("A?", "B?", "C?"):
        args += ["-p", prompt]
    args += ["--backend", "ollama", "--host", ollama_server.url, "--no-progress"]
    process: list[subprocess.Popen[str]] = []
    chats = 0
    lock = threading.Lock()

    def interrupt_on_the_fifth(request: RecordedRequest) -> Script:
        nonlocal chats
        with lock:
            chats += 1
            if chats == 5:
                os.kill(process[0].pid, signal.SIGINT)
                return Script(fault="stall")
        return Script()

    ollama_server.script(interrupt_on_the_fifth)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process.append(
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    )
    _, stderr = process[0].communicate(timeout=120)
    assert process[0].returncode == 130, stderr
    assert "run again to continue" in stderr
    first = lines(out)
    assert pairs(first) == Counter(
        [("p0.png", "A?"), ("p0.png", "B?"), ("p0.png", "C?"), ("p1.png", "A?")]
    )
    ollama_server.script(Script())
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert pairs(lines(out)) == Counter(
        (f"p{i}.png", prompt) for i in range(3) for prompt in ("A?", "B?", "C?")
    )


def test_cli_resume_counts_pictures_and_their_error_lines_apart(tmp_path: Path) -> None:
    """One broken picture asked three prompts, then captioned again: the note on stderr
    says one picture (singular) kept the error of an earlier run, in three error lines,
    and the summary counts answers as pictures x prompts."""
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "broken.png").write_bytes(b"<html>gone</html>")
    out = tmp_path / "out.jsonl"
    args = [str(pics), "-p", "A?", "-p", "B?", "-p", "C?", "-o", str(out), "--no-progress"]
    args += ["--backend", "llama_cpp"]
    first = CliRunner().invoke(caption_command, args)
    assert first.exit_code == 0, first.output
    assert "0 captioned, 0 already recorded, 3 failed of 3 answers (1 picture x 3 prompts)" in (
        first.stdout
    )
    again = CliRunner().invoke(caption_command, args)
    assert again.exit_code == 0, again.output
    assert again.stderr == (
        "1 picture kept the error of an earlier run (3 error lines); "
        "--retry-errors asks about it again\n"
    )
