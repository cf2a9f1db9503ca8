"""What a newcomer trips over in the first hour (issue 20): saving to a missing folder,
``images=`` given one picture, a question with no picture, an answer longer than the
context allows, the picture and question swapped on the command line, and what a turn
is doing before its first token."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from llava_local import (
    InvalidRequestError,
    NoPictureWarning,
    OutputFileError,
    VisionChat,
)
from llava_local.apps.ui import NO_PICTURE as PAGE_NO_PICTURE
from llava_local.apps.ui import _Session
from llava_local.cli import main
from llava_local.cli.chat import NO_PICTURE, Repl

from ..known import known
from ..option_args import OptionArgs
from ..paths import DIGIT

GREEDY: OptionArgs = {"temperature": 0}


def test_save_creates_missing_folders(demo_chat: VisionChat, tmp_path: Path) -> None:
    """chat.save() into folders that do not exist yet creates them, as caption --out does."""
    demo_chat.reset()
    demo_chat.ask("What digit is this?", image=DIGIT, **GREEDY)
    target = tmp_path / "new" / "deeper" / "talk.json"
    assert demo_chat.save(target) == target
    assert len(VisionChat.load(target).history) == 2


def test_save_where_it_cannot_write_says_where_and_the_repl_stays_up(
    demo_chat: VisionChat, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A save that cannot be written raises OutputFileError naming the path; the chat
    REPL prints it and goes on to the next line."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputFileError, match=r"cannot save the conversation to .*file/x\.json"):
        demo_chat.save(blocker / "x.json")
    lines = iter([f"/save {blocker}/x.json", "/help"])

    def read(_prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    Repl(demo_chat, read=read).run()
    out = capsys.readouterr().out
    assert "error: cannot save the conversation to" in out
    assert "/image PATH" in out  # the /help after it ran: the REPL was still there


@pytest.mark.parametrize(
    ("target", "why"),
    [
        (
            "/proc/forbidden/x.json",
            "/proc/forbidden does not exist and cannot be created (No such file or directory)",
        ),
        ("{tmp}/file/deeper/x.json", "{tmp}/file is not a folder"),
        ("/proc/x.json", "cannot write a file in /proc (No such file or directory)"),
    ],
)
def test_save_says_why_this_path_failed(
    demo_chat: VisionChat,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    target: str,
    why: str,
) -> None:
    """The REPL's /save to a path it cannot write says which part of the path failed and
    why, never the contradictory "No such file ...; missing folders are created"."""
    demo_chat.reset()
    demo_chat.ask("What digit is this?", image=DIGIT, **GREEDY)
    (tmp_path / "file").write_text("not a folder")
    lines = iter([f"/save {target.format(tmp=tmp_path)}"])

    def read(_prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    Repl(demo_chat, read=read).run()
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert f"error: cannot save the conversation to {target.format(tmp=tmp_path)}: " in out
    assert why.format(tmp=tmp_path) in out
    assert "missing folders are created" not in out


def test_images_given_one_picture_is_refused(demo_chat: VisionChat) -> None:
    """images="x.png" is refused with a message naming image= instead of being read
    character by character."""
    with pytest.raises(InvalidRequestError, match=r"image=") as info:
        demo_chat.ask("What digit is this?", images=str(DIGIT))  # typed as a Sequence[str]
    assert "cannot use picture" not in str(info.value)
    with pytest.raises(InvalidRequestError, match="list of pictures"):
        demo_chat.ask("What digit is this?", images=DIGIT.read_bytes())  # type: ignore[arg-type]


def test_a_question_with_no_picture_warns_unless_text_only_is_allowed(
    demo_chat: VisionChat,
) -> None:
    """A first question with no picture issues NoPictureWarning; a follow-up about a
    picture already in the conversation, or allow_text_only=True, does not."""
    demo_chat.reset()
    with pytest.warns(NoPictureWarning, match="no picture in this conversation"):
        demo_chat.ask("What digit is this?", max_tokens=4)
    demo_chat.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoPictureWarning)
        demo_chat.ask("What digit is this?", image=DIGIT, **GREEDY)
        demo_chat.ask("Are you sure?", max_tokens=4)
        demo_chat.reset()
        demo_chat.allow_text_only = True
        try:
            demo_chat.ask("Hello?", max_tokens=4)
        finally:
            demo_chat.allow_text_only = False


def test_the_chat_repl_says_when_there_is_no_picture(
    demo_chat: VisionChat, capsys: pytest.CaptureFixture[str]
) -> None:
    """In `llava-local chat`, a question with no picture gets a notice on stderr."""
    demo_chat.reset()
    lines = iter(["What digit is this?"])

    def read(_prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    Repl(demo_chat, read=read, options={"max_tokens": 4}).run()
    assert NO_PICTURE in capsys.readouterr().err.replace("\n", " ")


def test_the_web_page_says_when_there_is_no_picture() -> None:
    """The page's status line carries the no-picture note for a question without one."""
    session = _Session({"backend": "llama_cpp", "temperature": 0, "max_tokens": 4})
    try:
        statuses = [doing for _, doing in session.turn("What digit is this?", None)]
    finally:
        session.close()
    assert any(PAGE_NO_PICTURE in s for s in statuses)


def test_max_tokens_beyond_the_context_is_capped(demo_chat: VisionChat) -> None:
    """A max_tokens larger than the context leaves is capped: the answer ends with
    done_reason "length" instead of a refusal."""
    with VisionChat.llama_cpp(n_ctx=256) as chat:
        n_ctx = chat.engine.n_ctx  # type: ignore[attr-defined]
        question = "Look closely at this handwritten picture. What digit is this?"
        reply = chat.ask(question, image=DIGIT, max_tokens=5000, temperature=0)
    assert reply.done_reason == "length"
    assert known(reply.stats.completion_tokens) > 0
    assert known(reply.stats.prompt_tokens) + known(reply.stats.completion_tokens) <= n_ctx


def test_a_turn_reports_what_it_is_doing_in_order(demo_chat: VisionChat) -> None:
    """on_status hears the picture prepared, encoded and read, then the answer."""
    demo_chat.reset()
    demo_chat.engine.embeddings.clear()  # type: ignore[attr-defined]
    demo_chat.engine.kv_cache.clear()  # type: ignore[attr-defined]  # no kept KV state of it
    seen: list[str] = []
    demo_chat.on_status = seen.append
    try:
        demo_chat.ask("What digit is this?", image=DIGIT, **GREEDY)
    finally:
        demo_chat.on_status = None
    order = ["preparing pictures", "encoding picture", "reading picture", "answering"]
    assert [s for s in seen if s in order] == order


def test_ask_with_the_picture_and_question_swapped_says_so() -> None:
    """`llava-local ask "What digit is this?" digit.png` is a usage error that says the
    picture comes first."""
    result = CliRunner().invoke(main, ["ask", "What digit is this?", str(DIGIT)])
    assert result.exit_code == 2
    assert "the picture comes first" in result.output
