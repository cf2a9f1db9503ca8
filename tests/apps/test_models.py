"""The model catalogue, `models` (what is installed and what fits) and `pull`, against the
stand-in Ollama daemon and the stand-in Hugging Face Hub on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download

from llava_local import catalog, memory
from llava_local.apps import models
from llava_local.catalog import CATALOG, CatalogEntry, estimate_memory
from llava_local.chat_formats import BUILTIN
from llava_local.errors import (
    BackendUnavailableError,
    InvalidRequestError,
    ModelNotFoundError,
)

from ..gguf_fixtures import GgufPair, png_bytes
from ..hub_server import HubServer, prefill
from ..ollama_server import OllamaServer
from ..paths import DIGIT, ROOT

SMOL = catalog.find("smolvlm-256m")
MIB = 1024 * 1024


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """An empty Hugging Face cache directory of the test's own."""
    return tmp_path / "hf-cache"


def publish(hub_server: HubServer, entry: CatalogEntry, lm_size: int = 4000) -> tuple[bytes, bytes]:
    """Put stand-in files for ``entry`` on the Hub; returns their contents."""
    lm = b"GGUF" + hashlib.sha256(entry.name.encode()).digest() * (lm_size // 32)
    mm = b"GGUF" + b"projector" * 100
    hub_server.add_file(str(entry.hf_repo), str(entry.gguf), lm)
    hub_server.add_file(str(entry.hf_repo), str(entry.mmproj), mm)
    return lm, mm


#: A picture that exists: `ask` reads it before it looks for the model.


def run_cli(
    module: str, command: str, args: list[str], **env: str
) -> subprocess.CompletedProcess[str]:
    """Run a command object in a fresh interpreter with ``env`` added to the environment,
    so huggingface_hub reads HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE as users set them."""
    code = f"from llava_local.cli.{module} import {command}; {command}(prog_name='llava-local')"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- the catalogue -------------------------------------------------------------------


def test_catalogue_has_the_models_people_ask_for() -> None:
    """The catalogue holds the classic LLaVAs, Moondream2, LLaVA-Phi-3, SmolVLMs and the demo."""
    wanted = {
        "llava-1.5-7b",
        "llava-1.5-13b",
        "llava-1.6-mistral-7b",
        "bakllava-1",
        "moondream2",
        "llava-phi3-mini",
        "smolvlm-256m",
        "smolvlm-500m",
        "smolvlm2-2.2b",
        "demo",
    }
    assert wanted <= set(catalog.names())


def test_entries_are_complete_and_say_how_they_were_checked() -> None:
    """Every downloadable entry names repo, both files and a built-in or GGUF chat format;
    entries read from a listing have both sizes; names never collide."""
    spellings: list[str] = []
    for entry in CATALOG:
        spellings += [entry.name, *entry.aliases]
        assert entry.description
        assert entry.evidence_note
        assert entry.chat_format is None or entry.chat_format in BUILTIN
        if entry.evidence == "bundled":
            continue
        assert entry.has_gguf, entry.name
        assert str(entry.gguf).endswith(".gguf")
        assert str(entry.mmproj).endswith(".gguf")
        if entry.evidence == "listing":
            assert entry.gguf_bytes, entry.name
            assert entry.mmproj_bytes, entry.name
    assert len(spellings) == len(set(spellings))
    tags = {e.ollama for e in CATALOG if e.ollama}
    assert not tags & set(spellings), "an Ollama tag must not shadow a catalogue name"


def test_small_models_fit_a_raspberry_pi() -> None:
    """The SmolVLMs need well under the 4 GB of a small Raspberry Pi, and a 7B under 8 GB."""
    for name in ("smolvlm-256m", "smolvlm-500m", "smolvlm2-2.2b"):
        assert (catalog.find(name).memory_bytes or 0) < 3e9
    assert (catalog.find("llava-1.5-7b").memory_bytes or 0) < 8e9


def test_find_accepts_names_aliases_and_ollama_tags() -> None:
    """An entry is found by its name, an alias, or its Ollama tag (with or without :latest)."""
    assert catalog.find("LLaVA-1.5-7B").name == "llava-1.5-7b"
    assert catalog.find("llava-v1.5-7b").name == "llava-1.5-7b"
    assert catalog.find("llava-phi3:latest").name == "llava-phi3-mini"
    assert catalog.match("moondream") == (catalog.find("moondream2"), "ollama")


def test_unknown_name_lists_the_choices() -> None:
    """An unknown name raises ModelNotFoundError (a LookupError) with close and all names."""
    with pytest.raises(LookupError) as caught:
        catalog.find("smolvlm-300m")
    assert isinstance(caught.value, ModelNotFoundError)
    text = str(caught.value)
    assert "did you mean" in text
    assert "smolvlm-256m" in text
    assert all(name in text for name in catalog.names())


def test_memory_estimate_counts_files_cache_and_buffers() -> None:
    """The estimate is both files, the KV cache of one picture plus 2048 tokens, and buffers."""
    base = estimate_memory(1000 * MIB, 100 * MIB, kv_bytes_per_token=0)
    with_kv = estimate_memory(1000 * MIB, 100 * MIB, kv_bytes_per_token=1000, image_tokens=576)
    assert base > 1100 * MIB
    assert with_kv - base == 1000 * (576 + catalog.TEXT_TOKENS)


# --- pulling GGUF pairs from the Hub -------------------------------------------------


def test_pull_downloads_the_pair_into_the_cache(hub_server: HubServer, cache: Path) -> None:
    """A catalogue name downloads both files through the Hub's redirect to its CDN."""
    lm, mm = publish(hub_server, SMOL)
    result = models.pull(SMOL.name, cache_dir=cache, endpoint=hub_server.url, progress=False)
    assert result.backend == "llama_cpp"
    assert result.model_path is not None
    assert result.mmproj_path is not None
    assert result.model_path.read_bytes() == lm
    assert result.mmproj_path.read_bytes() == mm
    assert cache in result.model_path.parents
    heads = [r.path for r in hub_server.requests_for("hub", "HEAD")]
    assert heads[0] == "/"  # the one reachability check
    assert len([path for path in heads if "/resolve/" in path]) == 2
    assert len(hub_server.requests_for("cdn", "GET")) == 2


def test_interrupted_download_resumes_with_a_range_request(
    hub_server: HubServer, cache: Path
) -> None:
    """A connection dropped mid-file is resumed from the bytes already received."""
    lm, _ = publish(hub_server, SMOL, lm_size=12 * MIB)
    hub_server.drop_after(str(SMOL.gguf), 10 * MIB + 12345)
    result = models.pull(SMOL.name, cache_dir=cache, endpoint=hub_server.url, progress=False)
    assert result.model_path is not None
    assert result.model_path.read_bytes() == lm
    ranges = [r.headers.get("range") for r in hub_server.requests_for("cdn", "GET")]
    # huggingface_hub writes in 10 MiB chunks: the resume starts at the last whole chunk.
    assert ranges[:2] == [None, f"bytes={10 * MIB}-"]


def test_second_pull_downloads_nothing(hub_server: HubServer, cache: Path) -> None:
    """Pulling again only asks the Hub for metadata: no file is fetched twice."""
    publish(hub_server, SMOL)
    first = models.pull(SMOL.name, cache_dir=cache, endpoint=hub_server.url, progress=False)
    gets = len(hub_server.requests_for("cdn", "GET"))
    again = models.pull(SMOL.name, cache_dir=cache, endpoint=hub_server.url, progress=False)
    assert again == first
    assert len(hub_server.requests_for("cdn", "GET")) == gets


def test_prefilled_cache_needs_no_network(cache: Path, closed_port: int) -> None:
    """With the files in the cache and no Hub reachable, pull returns the cached paths."""
    prefill(cache, SMOL, {str(SMOL.gguf): b"GGUF lm", str(SMOL.mmproj): b"GGUF mm"})
    endpoint = f"http://127.0.0.1:{closed_port}"
    result = models.pull(SMOL.name, cache_dir=cache, endpoint=endpoint, progress=False)
    assert result.model_path is not None
    assert result.model_path.read_bytes() == b"GGUF lm"
    assert result.mmproj_path is not None
    assert result.mmproj_path.read_bytes() == b"GGUF mm"


def test_missing_file_on_the_hub_is_model_not_found(hub_server: HubServer, cache: Path) -> None:
    """A repository without the catalogue's projector file says which file is missing."""
    hub_server.add_file(str(SMOL.hf_repo), str(SMOL.gguf), b"GGUF")
    with pytest.raises(ModelNotFoundError, match=f"has no file {SMOL.mmproj}"):
        models.pull(SMOL.name, cache_dir=cache, endpoint=hub_server.url, progress=False)


def test_missing_repository_is_model_not_found(hub_server: HubServer, cache: Path) -> None:
    """A repository the Hub does not have raises ModelNotFoundError naming it."""
    with pytest.raises(ModelNotFoundError, match=f"no repository {SMOL.hf_repo}"):
        models.pull(SMOL.name, cache_dir=cache, endpoint=hub_server.url, progress=False)


def test_offline_without_cached_files_says_what_to_do(cache: Path, closed_port: int) -> None:
    """No network and nothing cached raises BackendUnavailableError naming the cache
    (HF_HUB_OFFLINE makes huggingface_hub give up at once instead of retrying)."""
    result = run_cli(
        "models",
        "pull_command",
        [SMOL.name, "--quiet"],
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(cache),
        HF_ENDPOINT=f"http://127.0.0.1:{closed_port}",
    )
    assert result.returncode == 1
    assert "HF_HUB_OFFLINE is set" in result.stderr
    assert str(cache) in result.stderr.replace("\n", "")


def test_unreachable_hub_fails_at_once_without_retry_lines(cache: Path, closed_port: int) -> None:
    """`pull` with the Hub's address refusing connections prints no retry lines, only one
    error naming the address (huggingface_hub alone retries for 24 s, printing each try)."""
    endpoint = f"http://127.0.0.1:{closed_port}"
    result = run_cli(
        "models", "pull_command", [SMOL.name], HF_HUB_CACHE=str(cache), HF_ENDPOINT=endpoint
    )
    assert result.returncode == 1, result.stderr
    assert "Retry" not in result.stderr
    assert "thrown while requesting" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach the Hugging Face Hub at " + endpoint)
    assert "Connection refused" in line
    assert str(cache) in line


def test_hub_errors_become_library_errors(cache: Path) -> None:
    """The unreachable-Hub error is a BackendUnavailableError, a ConnectionError."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    error = models._hub_error(LocalEntryNotFoundError("x"), SMOL, "f.gguf", None, cache)
    assert isinstance(error, BackendUnavailableError)
    assert isinstance(error, ConnectionError)


# --- pulling through Ollama ----------------------------------------------------------


def test_ollama_tag_of_an_entry_pulls_through_the_daemon(ollama_server: OllamaServer) -> None:
    """An entry's Ollama tag (llava-phi3) is pulled by the daemon, not downloaded as GGUF."""
    ollama_server.add_model("llava-phi3", pullable=True)
    result = models.pull("llava-phi3", host=ollama_server.url, progress=False)
    assert result.backend == "ollama"
    assert result.ollama_tag == "llava-phi3"
    assert result.name == "llava-phi3-mini"
    assert [r.json["model"] for r in ollama_server.requests_to("/api/pull")] == ["llava-phi3"]
    assert ollama_server.find_model("llava-phi3") is not None


def test_the_ollama_engine_pulls_the_entrys_tag(ollama_server: OllamaServer) -> None:
    """backend="ollama" with a catalogue name pulls that entry's Ollama tag."""
    ollama_server.add_model("llava:7b-v1.5-q4_K_M", pullable=True)
    result = models.pull("llava-1.5-7b", host=ollama_server.url, backend="ollama", progress=False)
    assert result.ollama_tag == "llava:7b-v1.5-q4_K_M"


def test_any_tag_is_pulled_when_a_daemon_answers(
    ollama_server: OllamaServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A name outside the catalogue goes to the daemon, with a progress bar on stderr."""
    ollama_server.add_model("qwen2.5vl:7b", pullable=True)
    result = models.pull("qwen2.5vl:7b", host=ollama_server.url)
    assert result.name == "qwen2.5vl:7b"
    assert result.backend == "ollama"
    assert "success" in capsys.readouterr().err


def test_unknown_tag_on_the_daemon_is_model_not_found(ollama_server: OllamaServer) -> None:
    """A tag the registry lacks raises ModelNotFoundError with the daemon's reason."""
    with pytest.raises(ModelNotFoundError, match="file does not exist"):
        models.pull("no-such-model", host=ollama_server.url, progress=False)


def test_unknown_name_without_a_daemon_lists_the_catalogue(closed_port: int) -> None:
    """With no daemon, an unknown name fails with the catalogue's names and how to start one."""
    with pytest.raises(ModelNotFoundError, match="ollama serve") as caught:
        models.pull("llava-9000", host=f"127.0.0.1:{closed_port}")
    assert "smolvlm-500m" in str(caught.value)


def test_the_ollama_engine_without_a_daemon_says_start_it(closed_port: int) -> None:
    """Forcing Ollama with no daemon raises BackendUnavailableError saying `ollama serve`."""
    with pytest.raises(BackendUnavailableError, match="ollama serve"):
        models.pull("moondream", host=f"127.0.0.1:{closed_port}", backend="ollama")


def test_entry_without_an_ollama_tag_cannot_go_to_ollama() -> None:
    """SmolVLM has no Ollama tag, so backend="ollama" is refused before any I/O."""
    with pytest.raises(InvalidRequestError, match="not in Ollama's library"):
        models.pull("smolvlm-500m", backend="ollama")


def test_demo_is_pulled_from_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`pull demo` returns the bundled pair's paths and downloads nothing."""
    pair = (tmp_path / "demo-lm.gguf", tmp_path / "demo-mmproj.gguf")
    monkeypatch.setattr(models, "demo_paths", lambda: pair)
    result = models.pull("demo")
    assert (result.model_path, result.mmproj_path) == pair


# --- what is installed ---------------------------------------------------------------


def test_models_lists_ollama_tags_with_their_vision(
    ollama_server: OllamaServer, cache: Path
) -> None:
    """Daemon models are listed with vision from /api/show and matched to the catalogue."""
    ollama_server.add_model("llava-phi3", size=2_900_000_000)
    ollama_server.add_model("llama3.2", capabilities=["completion"])
    report = models.list_models(host=ollama_server.url, cache_dir=cache)
    assert report.ollama.reachable
    assert report.ollama.version == ollama_server.version
    found = {m.name: m for m in report.installed if m.source == "ollama"}
    assert found["llava"].vision is True
    assert found["llama3.2"].vision is False
    assert found["llava-phi3"].catalog_name == "llava-phi3-mini"
    assert found["llava-phi3"].size_bytes == 2_900_000_000
    listed = {a.entry.name: a for a in report.available}
    assert listed["llava-phi3-mini"].installed == ["ollama"]


def test_models_finds_downloaded_pairs(
    hub_server: HubServer, cache: Path, closed_port: int
) -> None:
    """A pulled pair shows as installed from the Hugging Face cache, with its paths."""
    publish(hub_server, SMOL)
    pulled = models.pull(SMOL.name, cache_dir=cache, endpoint=hub_server.url, progress=False)
    report = models.list_models(host=f"127.0.0.1:{closed_port}", cache_dir=cache)
    assert not report.ollama.reachable
    assert report.hf_cache == cache
    (pair,) = [m for m in report.installed if m.source == "hf-cache"]
    assert pair.catalog_name == SMOL.name
    assert not pair.note
    assert (pair.model_path, pair.mmproj_path) == (pulled.model_path, pulled.mmproj_path)
    assert {a.entry.name: a.installed for a in report.available}[SMOL.name] == ["hf-cache"]


def test_half_downloaded_pair_is_flagged(hub_server: HubServer, cache: Path) -> None:
    """A cached language model without its projector is listed as incomplete."""
    publish(hub_server, SMOL)
    hf_hub_download(str(SMOL.hf_repo), str(SMOL.gguf), cache_dir=cache, endpoint=hub_server.url)
    (pair,) = models.cached_pairs(cache)
    assert pair.mmproj_path is None
    assert "incomplete" in pair.note
    assert str(SMOL.mmproj) in pair.note


def test_models_lists_the_environment_pair(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: Path, closed_port: int
) -> None:
    """LLAVA_LOCAL_MODEL / LLAVA_LOCAL_MMPROJ are listed; a missing file is named."""
    lm = tmp_path / "my-model.gguf"
    lm.write_bytes(b"GGUF" * 100)
    monkeypatch.setenv("LLAVA_LOCAL_MODEL", str(lm))
    monkeypatch.setenv("LLAVA_LOCAL_MMPROJ", str(tmp_path / "gone.gguf"))
    report = models.list_models(host=f"127.0.0.1:{closed_port}", cache_dir=cache)
    (pair,) = [m for m in report.installed if m.source == "env"]
    assert pair.name == "my-model.gguf"
    assert pair.model_path == lm
    assert "gone.gguf" in pair.note


def test_real_pairs_are_sized_from_their_headers(
    monkeypatch: pytest.MonkeyPatch, tiny_pair: GgufPair, cache: Path, closed_port: int
) -> None:
    """A real GGUF pair's memory is llava_local.memory's estimate from its headers."""
    monkeypatch.setenv("LLAVA_LOCAL_MODEL", str(tiny_pair.lm))
    monkeypatch.setenv("LLAVA_LOCAL_MMPROJ", str(tiny_pair.mmproj))
    report = models.list_models(host=f"127.0.0.1:{closed_port}", cache_dir=cache)
    (pair,) = [m for m in report.installed if m.source == "env"]
    expected = memory.estimate(tiny_pair.lm, tiny_pair.mmproj, n_ctx=576 + catalog.TEXT_TOKENS)
    assert pair.memory_bytes == expected.needed_bytes
    assert pair.fits is True


def test_fits_compares_the_estimate_with_available_memory(
    monkeypatch: pytest.MonkeyPatch, cache: Path, closed_port: int
) -> None:
    """With 1 GB available the smallest SmolVLM fits and LLaVA-1.5 7B does not."""
    monkeypatch.setattr(models, "available_memory", lambda: 1_000_000_000)
    report = models.list_models(host=f"127.0.0.1:{closed_port}", cache_dir=cache)
    fits = {a.entry.name: a.fits for a in report.available}
    assert fits["smolvlm-256m"] is True
    assert fits["llava-1.5-7b"] is False
    assert report.available_memory_bytes == 1_000_000_000


def test_models_uses_the_machines_available_memory(cache: Path, closed_port: int) -> None:
    """Without overrides, the report carries llava_local.memory's available bytes."""
    report = models.list_models(host=f"127.0.0.1:{closed_port}", cache_dir=cache)
    assert report.available_memory_bytes is not None
    assert report.available_memory_bytes > 0


# --- the commands, in a fresh interpreter --------------------------------------------


def test_cli_pull_downloads_from_hf_endpoint(hub_server: HubServer, cache: Path) -> None:
    """`pull NAME --json` downloads from HF_ENDPOINT into HF_HUB_CACHE and prints the paths."""
    lm, _ = publish(hub_server, SMOL)
    result = run_cli(
        "models",
        "pull_command",
        [SMOL.name, "--quiet", "--json"],
        HF_ENDPOINT=hub_server.url,
        HF_HUB_CACHE=str(cache),
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["backend"] == "llama_cpp"
    assert Path(data["model_path"]).read_bytes() == lm
    assert str(cache) in data["mmproj_path"]


def test_cli_pull_offline_uses_the_cache(cache: Path, closed_port: int) -> None:
    """With HF_HUB_OFFLINE=1 and the files cached, `pull` succeeds and prints both paths."""
    prefill(cache, SMOL, {str(SMOL.gguf): b"GGUF lm", str(SMOL.mmproj): b"GGUF mm"})
    result = run_cli(
        "models",
        "pull_command",
        [SMOL.name],
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(cache),
        HF_ENDPOINT=f"http://127.0.0.1:{closed_port}",
    )
    assert result.returncode == 0, result.stderr
    assert str(SMOL.gguf) in result.stdout
    assert str(SMOL.mmproj) in result.stdout


def test_cli_pull_unknown_name_exits_1(closed_port: int) -> None:
    """An unknown name exits with status 1 and one line listing the choices."""
    result = run_cli("models", "pull_command", ["nope"], OLLAMA_HOST=f"127.0.0.1:{closed_port}")
    assert result.returncode == 1
    assert "error:" in result.stderr
    assert "llava-1.5-7b" in result.stderr


def test_cli_models_json_and_table(ollama_server: OllamaServer, cache: Path) -> None:
    """`models --json` reports the daemon's models; the table names the catalogue entries."""
    env = {"OLLAMA_HOST": ollama_server.host, "HF_HUB_CACHE": str(cache)}
    result = run_cli("models", "models", ["--json"], **env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ollama"]["reachable"] is True
    assert [m["name"] for m in data["installed"] if m["source"] == "ollama"] == ["llava"]
    table = run_cli("models", "models", [], COLUMNS="160", **env)
    assert table.returncode == 0, table.stderr
    assert "llava-phi3-mini" in table.stdout
    assert "Installed" in table.stdout
    assert "evidence" in table.stdout


def test_cli_models_table_fits_80_columns(ollama_server: OllamaServer, cache: Path) -> None:
    """In an 80-column terminal every catalogue name, Ollama tag (installed ones too) and
    size is shown whole, on one line."""
    long_tag = "llava:7b-v1.6-mistral-q4_k_m"  # as the stand-in daemon spells it
    ollama_server.add_model(long_tag, size=4_400_000_000)
    env = {"OLLAMA_HOST": ollama_server.host, "HF_HUB_CACHE": str(cache), "COLUMNS": "80"}
    table = run_cli("models", "models", [], **env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any(line.split()[:2] == [long_tag, "ollama"] for line in lines if line.strip())
    rows = {line.split()[0]: line for line in lines if line.strip()}
    for entry in CATALOG:
        cells = rows[entry.name].split()
        if entry.ollama:
            assert cells[1] == entry.ollama, rows[entry.name]
        if entry.download_bytes:
            figures = re.findall(r"(?<= )\d+(?:\.\d\d)? [GM]B(?= )", rows[entry.name])
            assert len(figures) == 2, rows[entry.name]  # download and memory, whole


def test_commands_take_the_options_the_readme_says() -> None:
    """The engine options are on every command that opens a chat; `models`, `pull` and
    `doctor` take --host, `models` and `doctor` --timeout (the README's sentence)."""
    from llava_local.cli import main

    engine = {"--backend", "--model", "-m", "--mmproj", "--host", "--timeout", "--n-ctx"}
    engine |= {"--threads", "--chat-format"}
    wanted = {name: engine for name in ("ask", "chat", "caption", "eval", "bench", "ui")}
    wanted |= {"models": {"--host", "--timeout"}, "doctor": {"--host", "--timeout"}}
    wanted |= {"pull": {"--host", "--backend"}}
    for name, options in wanted.items():
        command = main.commands[name]
        taken = {opt for param in command.params for opt in param.opts}
        assert options <= taken, (name, options - taken)
    readme = (ROOT / "README.md").read_text()
    assert "Every command takes" not in readme
    assert "`models`, `pull` and `doctor` take `--host`" in readme


# --- using a pulled pair by its name -------------------------------------------------


def test_pulled_pair_is_used_by_its_catalogue_name(
    tiny_pair: GgufPair, cache: Path, tmp_path: Path
) -> None:
    """After a pull, `-m NAME` runs the cached pair on llama.cpp: no paths to copy."""
    prefill(
        cache,
        SMOL,
        {
            str(SMOL.gguf): tiny_pair.lm.read_bytes(),
            str(SMOL.mmproj): tiny_pair.mmproj.read_bytes(),
        },
    )
    picture = tmp_path / "picture.png"
    picture.write_bytes(png_bytes(seed=70))
    args = [str(picture), "What is it?", "--backend", "llama_cpp", "-m", SMOL.name]
    result = run_cli(
        "ask",
        "ask",
        [*args, "--max-tokens", "3", "--temperature", "0", "--json"],
        HF_HUB_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["backend"] == "llama_cpp"
    assert reply["model"] == SMOL.gguf
    assert reply["stats"]["completion_tokens"] == 3


def test_catalogue_name_not_pulled_says_how_to_pull_it(cache: Path, closed_port: int) -> None:
    """A catalogue name that is not in the cache names the pull command, on either route."""
    with pytest.raises(
        ModelNotFoundError, match=f"run `llava-local pull {SMOL.name}` \\(0.3 GB\\)"
    ):
        models.pulled_pair(SMOL.name, cache_dir=cache)
    assert models.pulled_pair("not-in-the-catalogue", cache_dir=cache) is None
    result = run_cli(
        "ask",
        "ask",
        [str(DIGIT), "What?", "-m", SMOL.name, "--host", f"127.0.0.1:{closed_port}"],
        HF_HUB_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
    )
    assert result.returncode == 1
    assert "no Ollama daemon had it" in result.stderr
    assert f"llava-local pull {SMOL.name}" in result.stderr
    assert f"ollama pull {SMOL.name}" not in result.stderr  # it has no Ollama tag
