"""The command line's messages: printed exactly, in its own terms, about the engine asked for."""

from __future__ import annotations

import inspect
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from llava_local import errors
from llava_local.cli import main
from llava_local.cli._common import run_safely

from .gguf_fixtures import GgufPair, png_bytes

#: Everything rich markup would take for itself: tags, closing tags, escapes, links.
MESSAGE = (
    "pip install 'llava-local[ui]' or 'llava-local[llama-cpp]'; [bold]not bold[/bold] [/] "
    r"C:\models\[x]\ \[y] [link=http://x]z[/link] [red] [#ff0000]"
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _subclasses(cls: type[Exception]) -> Iterator[type[Exception]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _instance(cls: type[Exception]) -> Exception:
    """``cls`` built with MESSAGE for every text argument and 1 for every number."""
    try:
        params = list(inspect.signature(cls).parameters.values())
    except ValueError:  # a builtin signature: (*args)
        return cls(MESSAGE)
    args: list[str] = []
    kwargs: dict[str, int] = {}
    for param in params:
        if param.kind is param.VAR_POSITIONAL:
            args.append(MESSAGE)
        elif param.kind is param.VAR_KEYWORD or param.default is not param.empty:
            continue
        elif param.kind is param.KEYWORD_ONLY:
            kwargs[param.name] = 1
        else:
            args.append(MESSAGE)
    return cls(*args, **kwargs)


ERRORS = sorted({errors.LlavaLocalError, *_subclasses(errors.LlavaLocalError)}, key=str)


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "pic.png"
    path.write_bytes(png_bytes(seed=5))
    return path


@pytest.fixture
def no_ollama_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OLLAMA_HOST from the machine running the tests."""
    monkeypatch.delenv("OLLAMA_HOST", raising=False)


@pytest.mark.parametrize("cls", ERRORS, ids=lambda cls: cls.__name__)
def test_every_error_is_printed_exactly(
    cls: type[Exception], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each library error's message reaches stderr character for character: rich markup
    does not eat `[ui]` or `[llama-cpp]`, brackets or backslashes, and adds no breaks."""
    exc = _instance(cls)
    assert isinstance(exc, errors.LlavaLocalError)
    if isinstance(exc, errors.ContextOverflowError):
        exc.needed = 0  # with sizes the CLI words the line itself; without, the text is printed
    assert MESSAGE in str(exc)

    def fail() -> None:
        raise exc

    with pytest.raises(SystemExit) as info:
        run_safely(fail)
    assert info.value.code == 1
    assert _ANSI.sub("", capsys.readouterr().err) == f"error: {exc}\n"


def test_a_picture_given_as_the_model_is_not_a_gguf_file(
    picture: Path, no_ollama_host: None
) -> None:
    """`-m photo.png` says the file is a picture, not a GGUF model, not that mmproj is missing."""
    result = CliRunner().invoke(main, ["ask", str(picture), "What is it?", "-m", str(picture)])
    assert result.exit_code == 1
    assert f"{picture} is not a GGUF file (it is a PNG picture)" in result.stderr
    assert "mmproj" not in result.stderr
    assert result.stdout == ""


def test_a_missing_projector_names_the_flag(tiny_pair: GgufPair, tmp_path: Path) -> None:
    """A GGUF model with no projector beside it asks for --mmproj, not Python's mmproj=."""
    alone = tmp_path / "alone" / "model.gguf"
    alone.parent.mkdir()
    shutil.copy(tiny_pair.lm, alone)
    (tmp_path / "pic.png").write_bytes(png_bytes(seed=6))
    args = ["ask", str(tmp_path / "pic.png"), "Hi", "--backend", "llama_cpp", "-m", str(alone)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "pass --mmproj path/to/mmproj.gguf" in result.stderr
    assert "mmproj=" not in result.stderr


def test_one_shot_prompt_too_long_says_shorten_or_n_ctx(picture: Path) -> None:
    """`ask` with a prompt longer than the context says to shorten it or raise --n-ctx,
    with both numbers, and never to call reset()."""
    prompt = "What digit is this? " * 40
    args = ["ask", str(picture), prompt, "--backend", "llama_cpp", "--n-ctx", "512"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    found = re.search(r"needs (\d+) tokens .* holds 512: shorten the prompt", result.stderr)
    assert found, result.stderr
    needed = int(found.group(1))
    assert needed > len(prompt) > 512  # the demo's vocabulary is bytes: one token per character
    assert f"raise --n-ctx above {needed}" in result.stderr
    assert "reset()" not in result.stderr
    assert result.stdout.strip() == ""


DIGIT = Path(__file__).resolve().parents[1] / "examples" / "digit.png"


@pytest.mark.parametrize(
    ("n_ctx", "line"),
    [
        (
            "200",
            "error: this question needs 212 tokens (prompt, pictures and room to answer; "
            "the picture takes 16) but the context window holds 200: shorten the prompt, "
            "or raise --n-ctx above 212 (e.g. --n-ctx 512)",
        ),
        (
            "10",
            "error: the picture alone needs 16 positions but the context window holds 10: "
            "raise --n-ctx above 212 (e.g. --n-ctx 512)",
        ),
    ],
)
def test_a_small_context_says_what_the_picture_needs_and_names_the_flag(
    n_ctx: str, line: str
) -> None:
    """`ask examples/digit.png ... --n-ctx 200` (the README's demo picture, a context
    llama.cpp pads to 256) is one ContextOverflowError line on stderr with what the
    picture takes and --n-ctx, not an engine crash; so is a context smaller than the
    picture itself."""
    args = ["ask", str(DIGIT), "What digit is this?", "--backend", "llama_cpp"]
    result = CliRunner().invoke(main, [*args, "--n-ctx", n_ctx])
    assert result.exit_code == 1, result.output
    assert result.stderr == line + "\n"
    assert result.stdout == ""


@pytest.mark.parametrize("how", ["--host", "OLLAMA_HOST"])
def test_auto_with_a_named_host_is_ollama_or_an_error(
    how: str, picture: Path, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--backend auto` with a host the user named (--host or OLLAMA_HOST) where nothing
    listens fails with the Ollama error naming it, instead of answering with the demo."""
    host = f"127.0.0.1:{closed_port}"
    args = ["ask", str(picture), "What digit is this?", "--backend", "auto"]
    if how == "--host":
        monkeypatch.delenv("OLLAMA_HOST", raising=False)
        args += ["--host", host]
    else:
        monkeypatch.setenv("OLLAMA_HOST", host)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert f"no Ollama daemon answers at http://{host}" in result.stderr
    assert "demo model" not in result.stderr
    assert result.stdout == ""


def test_bench_table_shows_names_exactly(
    tiny_pair: GgufPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bench` prints the picture's name as it is, even when it looks like rich markup."""
    monkeypatch.chdir(tmp_path)
    Path("p[red].png").write_bytes(png_bytes(seed=7))
    args = ["bench", "p[red].png", "-m", str(tiny_pair.lm), "--mmproj", str(tiny_pair.mmproj)]
    result = CliRunner(env={"COLUMNS": "160"}).invoke(main, [*args, "--turns", "1"])
    assert result.exit_code == 0, result.output
    assert "Picture: p[red].png;" in result.stdout
