"""Engines by name: the built-in ones register with typed configs, a misspelt setting is
refused with the valid names, and an engine written outside the package is usable by
name everywhere after one register() call."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Generator, Iterator

import pytest
from click.testing import CliRunner

from llava_local import InvalidRequestError, VisionChat
from llava_local.apps.models import pull, pull_engines
from llava_local.apps.ui import _engine_choice
from llava_local.backends import Backend, Finish, Turn, engine_names, registry
from llava_local.backends.llama_cpp import LlamaCppConfig
from llava_local.backends.ollama import OllamaConfig
from llava_local.cli import main
from llava_local.types import Stats

from ..paths import ROOT


class EchoConfig(registry.EngineConfig):
    """The test engine's settings."""

    model: str | None = "echo-1"
    shout: bool = False


class EchoEngine(Backend):
    """Answers with the question, to show an outside engine needs nothing else."""

    name = "echo"

    def __init__(self, config: EchoConfig) -> None:
        self.config = config
        self.model = config.model or "echo-1"

    def generate(self, turn: Turn) -> Generator[str | Finish, None, None]:
        text = turn.messages[-1].content
        yield text.upper() if isinstance(self.config, EchoConfig) and self.config.shout else text
        yield Finish("stop", Stats(completion_tokens=1))


@pytest.fixture
def echo() -> Iterator[None]:
    registry.register(registry.EngineSpec("echo", EchoConfig, EchoEngine, aliases=("parrot",)))
    yield
    registry._ENGINES.pop("echo")
    registry._ALIASES.pop("parrot")


def test_built_in_engines_have_typed_json_configs() -> None:
    """ollama and llama_cpp are registered with frozen configs that round-trip as JSON."""
    assert {"ollama", "llama_cpp"} <= set(registry.names())
    assert engine_names()[0] == "auto"
    config = registry.make_config("ollama", {"model": "llava", "num_thread": 2})
    assert isinstance(config, OllamaConfig)
    assert config.options == {"num_thread": 2}
    again = OllamaConfig.model_validate(json.loads(json.dumps(config.model_dump(mode="json"))))
    assert again == config
    with pytest.raises(Exception, match="frozen"):
        config.host = "elsewhere"
    assert registry.get("llama.cpp").config is LlamaCppConfig


def test_a_misspelt_setting_is_refused_with_the_valid_names() -> None:
    """VisionChat.llama_cpp(n_cxt=...) fails before loading, naming n_ctx and the rest."""
    with pytest.raises(InvalidRequestError, match=r"no setting 'n_cxt' \(did you mean 'n_ctx'\?\)"):
        VisionChat("llama_cpp", None, n_cxt=512)
    with pytest.raises(InvalidRequestError, match="embedding_cache_mb"):
        VisionChat("llama_cpp", None, n_cxt=512)
    with pytest.raises(InvalidRequestError, match="n_batch"):
        VisionChat("llama_cpp", None, n_batch="many")


@pytest.mark.usefixtures("echo")
def test_an_outside_engine_is_usable_by_name_everywhere() -> None:
    """After one register() call, the engine answers through VisionChat (by name and
    alias), the CLI's --backend and the web page's engine list."""
    with VisionChat("echo", shout=True) as chat:
        reply = chat.ask("hello")
    assert reply.text == "HELLO"
    assert reply.backend == "echo"
    with VisionChat("parrot") as chat:
        assert chat.ask("hi").text == "hi"
    with pytest.raises(InvalidRequestError, match="shout"):
        VisionChat("echo", shou=True)
    assert "echo" in engine_names()
    assert _engine_choice({"backend": "auto"}, "echo", "", "", "")["backend"] == "echo"
    result = CliRunner().invoke(
        main, ["ask", "examples/digit.png", "Say it", "--backend", "echo", "--no-stream"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "Say it"


def test_the_address_field_fills_each_engines_own_setting() -> None:
    """The page's address field (and --host) becomes the chosen engine's address setting:
    base_url for openai, host for Ollama; llama.cpp, which has none, gets neither."""
    page = {"backend": "auto", "model": None, "n_ctx": 512}
    url = "http://127.0.0.1:9/v1"
    assert _engine_choice(page, "openai", "m", "x.gguf", url) == {
        "backend": "openai",
        "model": "m",
        "base_url": url,
    }
    ollama = _engine_choice(page, "ollama", "llava", "", "box:11434")
    assert ollama == {"backend": "ollama", "model": "llava", "host": "box:11434"}
    local = _engine_choice(page, "llama_cpp", "", "p.gguf", "box:11434")
    assert local == {"backend": "llama_cpp", "model": None, "n_ctx": 512, "mmproj": "p.gguf"}
    assert registry.address_settings("openai", {"host": url}) == {"base_url": url}
    assert registry.address_settings("auto", {"host": url}) == {"host": url}


@pytest.mark.usefixtures("echo")
def test_pull_offers_only_the_engines_that_pull_models() -> None:
    """`pull --backend` and models.pull take the registry's pulling engines: a registered
    engine without pulls_models is refused by name, before any download."""
    assert set(pull_engines()) == {"ollama", "llama_cpp"}
    choices = ", ".join(["auto", *pull_engines()])
    with pytest.raises(InvalidRequestError, match="the echo engine has no models to pull"):
        pull("llava", backend="parrot")
    result = CliRunner().invoke(main, ["pull", "llava", "--backend", "echo"])
    assert result.exit_code == 2
    assert f"'echo' is not one of {choices}" in result.output
    assert "echo" not in CliRunner().invoke(main, ["pull", "--help"]).output


def test_a_chat_described_as_json_is_rebuilt_in_another_process() -> None:
    """json.dumps(chat.config) in a fresh process rebuilds a chat that reads the example
    digit exactly as the original does; the demo is recorded by name, not by path."""
    with VisionChat.llama_cpp(n_ctx=1024, temperature=0, system="Answer briefly.") as chat:
        original = chat.ask("What digit is this?", image="examples/digit.png").text
        data = json.dumps(chat.config)
    config = json.loads(data)
    assert config["engine"]["model"] == "demo"
    assert "mmproj" not in config["engine"]
    assert config["options"] == {"temperature": 0.0}
    script = (
        "import json, sys\n"
        "from llava_local import VisionChat\n"
        "chat = VisionChat.from_config(json.loads(sys.argv[1]))\n"
        "print(chat.ask('What digit is this?', image='examples/digit.png').text)\n"
    )
    rebuilt = subprocess.run(
        [sys.executable, "-c", script, data],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert rebuilt.stdout.strip() == original
    assert original == "This digit is 7."


def test_an_ollama_chat_config_keeps_the_key_settings_and_no_objects() -> None:
    """An Ollama chat's config holds its host and runner options, not its transport."""
    import httpx

    chat = VisionChat.ollama(
        "llava", host="http://127.0.0.1:9", num_thread=2, transport=httpx.HTTPTransport()
    )
    with chat:
        config = chat.config
    assert config["engine"] == {"host": "http://127.0.0.1:9", "options": {"num_thread": 2}}
    assert json.loads(json.dumps(config)) == config
    with pytest.raises(InvalidRequestError, match="not a chat config"):
        VisionChat.from_config({"engine": {}})


def test_the_async_chat_has_the_config_too() -> None:
    """AsyncVisionChat.config and from_config match the sync ones."""
    from llava_local import AsyncVisionChat

    chat = AsyncVisionChat.llama_cpp(temperature=0)
    try:
        again = AsyncVisionChat.from_config(json.loads(json.dumps(chat.config)))
        assert again.config == chat.config
        again.sync.close()
    finally:
        chat.sync.close()


@pytest.mark.usefixtures("echo")
def test_an_engine_that_reports_no_phases_still_says_it_is_answering() -> None:
    """The core reports "answering" at the first piece, so a status line (the CLI's
    spinner) ends even with an engine that reports nothing itself."""
    seen: list[str] = []
    with VisionChat("echo", on_status=seen.append) as chat:
        chat.ask("hello", image="examples/digit.png")
    assert seen == ["preparing pictures", "answering"]


def test_a_registered_name_is_replaced_only_when_asked() -> None:
    """Registering an engine under a name or alias another engine has is refused, naming
    replace=True; with it, the new engine takes the name (the old one is put back)."""
    ollama = registry.get("ollama")
    impostor = registry.EngineSpec("ollama", EchoConfig, EchoEngine)
    taken = r"'ollama' already names the registered ollama engine.*replace=True"
    with pytest.raises(InvalidRequestError, match=taken):
        registry.register(impostor)
    alias_thief = registry.EngineSpec("thief", EchoConfig, EchoEngine, aliases=("llama.cpp",))
    with pytest.raises(InvalidRequestError, match=r"'llama\.cpp' already names .* llama_cpp"):
        registry.register(alias_thief)
    assert registry.get("ollama") is ollama
    assert "thief" not in registry.names()
    try:
        registry.register(impostor, replace=True)
        assert registry.get("ollama") is impostor
    finally:
        registry.register(ollama, replace=True)
    assert registry.get("ollama") is ollama


def test_a_plugin_that_fails_to_load_is_left_out_with_a_warning() -> None:
    """An installed package's entry point that cannot be imported, is no engine, or takes
    a built-in's name is left out with an EnginePluginWarning naming it; the engines
    stay as they were."""
    from importlib.metadata import EntryPoint

    from llava_local import EnginePluginWarning

    before = registry.names()
    points = [
        EntryPoint("broken", "no_such_module_here:SPEC", "g"),
        EntryPoint("notanengine", "llava_local.backends.registry:BUILTINS", "g"),
        EntryPoint("double", "llava_local.backends.ollama:SPEC", "g"),
    ]
    whys = ["No module named", "not an EngineSpec", "already names the registered ollama"]
    for point, why in zip(points, whys, strict=True):
        with pytest.warns(EnginePluginWarning, match=f"'{point.name}' from .*{why}"):
            registry._add_plugin(point)
    assert registry.names() == before
