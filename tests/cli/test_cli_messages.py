"""The command line's messages: printed exactly, in its own terms, about the engine asked for."""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from llava_local import errors
from llava_local.cli import main
from llava_local.cli._common import cli_message, engine_options, open_chat, run_safely

from ..gguf_fixtures import GgufPair, png_bytes
from ..paths import DIGIT, PACKAGE

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


# -- no Python-only advice on the command line ----------------------------------------

#: Commands that open an engine: every core and engine message may reach them.
ENGINE_COMMANDS = ("ask", "chat", "caption", "eval", "bench", "ui", "serve")
#: Where a job's own messages can be printed: the command that runs it.
JOB_COMMANDS = {
    "apps/captioning": ("caption",),
    "apps/eval.py": ("eval",),
    "apps/datasets.py": ("eval",),
    "apps/bench.py": ("bench",),
    "apps/ui.py": ("ui",),
    "apps/ui_access.py": ("ui",),
    "apps/ui_uploads.py": ("ui",),
    "apps/serve": ("serve",),
    "apps/models.py": ("models", "pull"),
    "apps/doctor.py": ("doctor",),
}
#: Python arguments in messages the command line can never get, and why.
PYTHON_ONLY = {
    "client": "an ollama.Client object: Python callers only",
    "transport": "an httpx transport object: Python callers only",
    "close_engine": "VisionChat(close_engine=False): the commands never share an engine",
    "image": "images= given one picture: the commands pass image= themselves",
    "images": "the same",
    "allow_text_only": "NoPictureWarning: chat prints its own notice (--text-only)",
    "use_saved_address": "VisionChat.load's address check: chat's /load keeps its engine",
    "tool": "ask(tool=...) with schema=: the commands pass schema= alone",
    "replace": "registry.register(spec, replace=True): engines are registered by Python "
    "code (plugins by their entry point), never by a command",
}
#: Python calls in messages the command line can never get, and why.
PYTHON_CALLS = {
    "answer()": "re-entering a chat from its own thread: the commands never do",
    "close()": "the same",
    "read()": "a file object that returns text: the commands pass paths and bytes",
    "register()": "registry.register given no EngineSpec: Python code only",
    "plan()": "VisionChat(plan, settings): the commands pass a plan alone",
    "attach()": "VisionChat.attach given no picture: chat's /image attaches the one named",
}
_PYTHON_ARGUMENT = re.compile(r"(?<![\w./\\?&-])([a-z_][a-z_0-9]*)=(?!=)")
_PYTHON_CALL = re.compile(r"\b[a-z_][a-z_0-9]*\(\)")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")
#: Another program's command line, quoted: `ray start --head` names ray's flags.
_COMMAND_QUOTED = re.compile(r"`[^`]*`")
_VALUE = "7"  # what a formatted value in a message becomes: a number reads in every slot


def _text(node: ast.expr | None) -> str:
    """The text a message expression makes, each formatted value as _VALUE."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(part) for part in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _text(node.left) + _text(node.right)
    return _VALUE


def _library_errors() -> Iterator[tuple[str, errors.LlavaLocalError]]:
    """Every library error the package's code constructs, with the message it writes
    (formatted values filled in), and the module it is in."""
    classes = {cls.__name__: cls for cls in _subclasses(errors.LlavaLocalError)}
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        if where.startswith("cli/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            cls = classes.get(str(name))
            if cls is None or cls is errors.NoPictureWarning:
                continue
            args = [_text(arg) for arg in node.args]
            numbers = {"needed": 212, "available": 200, "pictures": 16, "status_code": 404}
            kwargs: dict[str, object] = {
                k.arg: numbers.get(k.arg, _text(k.value)) for k in node.keywords if k.arg
            }
            if "needed" in kwargs:
                kwargs.update({k: v for k, v in numbers.items() if k in kwargs})
            if cls is errors.ContextOverflowError and "setting" in kwargs:
                kwargs["setting"] = "n_ctx"
            try:
                exc = cls(*args, **kwargs)
            except TypeError:  # built from a variable: (message) only
                exc = cls(*args)
            assert isinstance(exc, errors.LlavaLocalError)
            yield where, exc


def _commands(where: str) -> tuple[str, ...]:
    for prefix, commands in JOB_COMMANDS.items():
        if where.startswith(prefix):
            return commands
    return ENGINE_COMMANDS


def test_the_library_raises_every_error_class_the_scan_renders() -> None:
    """The scan below finds a constructor call of every printable error class, so no
    class escapes it (the root is never raised itself; the warning is not printed)."""
    found = {type(exc) for _, exc in _library_errors()}
    printable = set(ERRORS) - {errors.LlavaLocalError, errors.NoPictureWarning}
    assert printable - found == set()


@pytest.mark.parametrize("command", sorted({c for cs in JOB_COMMANDS.values() for c in cs}))
def test_no_python_advice_reaches_the_command_line(command: str) -> None:
    """Every library error a command can print, rendered by the CLI's printer in that
    command, has no Python argument (`force=True`, `n_ctx=`) or call (`reset()`) in it,
    and every flag it names is one of that command's."""
    cli = main.commands[command]
    flags = {name for param in cli.params for name in getattr(param, "opts", ())}
    wrong = []
    with click.Context(cli):
        for where, exc in _library_errors():
            if command not in _commands(where):
                continue
            line = cli_message(exc, one_shot=command == "ask")
            names = {m.group(1) for m in _PYTHON_ARGUMENT.finditer(line)} - set(PYTHON_ONLY)
            calls = set(_PYTHON_CALL.findall(line)) - set(PYTHON_CALLS)
            unknown = set(_FLAG.findall(_COMMAND_QUOTED.sub("", line))) - flags
            if names or calls or unknown:
                wrong.append(f"{where}: {line!r} ({sorted(names | calls | unknown)})")
    assert wrong == []


def test_the_memory_advice_names_force_and_force_reaches_the_engine(tmp_path: Path) -> None:
    """`ask --n-ctx 100000000` is refused with advice the command line can follow
    (--force, --n-ctx; no `force=True`), and --force, an engine option of every command
    that loads a model, reaches the engine's settings."""
    args = ["ask", str(DIGIT), "What digit is this?", "--backend", "llama_cpp"]
    result = CliRunner().invoke(main, [*args, "--n-ctx", "100000000"])
    assert result.exit_code == 1, result.output
    assert "pass a smaller --n-ctx than 100000000" in result.stderr
    assert "or pass --force to load anyway" in result.stderr
    assert "force=" not in result.stderr
    assert "n_ctx=" not in result.stderr

    seen: dict[str, object] = {}

    @click.command()
    @engine_options
    def load(**engine: object) -> None:
        with open_chat(**engine) as chat:  # type: ignore[arg-type]
            seen.update(chat.config["engine"])

    assert CliRunner().invoke(load, ["--backend", "llama_cpp", "--force"]).exit_code == 0
    assert seen["force"] is True


# -- stderr holds what concerns the user ------------------------------------------------


def test_a_missing_picture_is_the_only_line_on_stderr(
    tmp_path: Path, no_ollama_host: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ask` about a file that is not there prints the error alone: the picture is read
    before an engine is chosen, so no notice about the demo model comes first."""
    monkeypatch.delenv("LLAVA_LOCAL_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["ask", "nothere.png", "What digit is this?"])
    assert result.exit_code == 1
    assert result.stderr == "error: cannot use picture nothere.png: no such file\n"
    assert result.stdout == ""


def test_ask_json_prints_an_error_as_json_on_stdout(tmp_path: Path) -> None:
    """`ask --json` prints an error as one JSON object on stdout (type and the message
    in the command line's terms), exits 1 and leaves stderr empty; --help says so."""
    args = ["ask", str(DIGIT), "What digit is this?", "--backend", "llama_cpp", "--json"]
    result = CliRunner().invoke(main, [*args, "--n-ctx", "200"])
    assert result.exit_code == 1
    assert result.stderr == ""
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "ContextOverflowError"
    assert error["message"].startswith("this question needs 212 tokens")
    assert "--n-ctx" in error["message"]
    missing = CliRunner().invoke(main, ["ask", str(tmp_path / "gone.png"), "Hi?", "--json"])
    assert (missing.exit_code, missing.stderr) == (1, "")
    assert json.loads(missing.stdout) == {
        "error": {
            "type": "ImageError",
            "message": f"cannot use picture {tmp_path / 'gone.png'}: no such file",
        }
    }
    help_text = " ".join(CliRunner().invoke(main, ["ask", "--help"]).stdout.split())
    assert 'An error too, as {"error": {"type", "message"}} (exit status 1).' in help_text


def test_no_resource_warning_at_exit(tmp_path: Path) -> None:
    """`python -W always -m llava_local.cli ask ...` on the demo prints the answer and
    nothing on stderr: no ResourceWarning about llama-cpp-python's /dev/null files."""
    args = ["ask", str(DIGIT), "What digit is this?", "--backend", "llama_cpp"]
    result = subprocess.run(
        [sys.executable, "-W", "always", "-m", "llava_local.cli", *args, "--temperature", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "This digit is 7.\n"
    assert result.stderr == ""
