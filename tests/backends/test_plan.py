"""Planning an engine apart from opening it: what a plan settles, which choices are one
plan, and that planning reads files and caches but loads no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from llava_local import InvalidRequestError, ModelNotFoundError, VisionChat, catalog
from llava_local.backends import EnginePlan, open, plan
from llava_local.backends.llama_cpp import LlamaCppBackend
from llava_local.demo import demo_paths

from ..gguf_fixtures import GgufPair
from ..hub_server import prefill

SMOL = catalog.find("smolvlm-256m")


@pytest.fixture
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto finds no Ollama daemon (nothing listens on port 9) and no LLAVA_LOCAL_MODEL."""
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")
    monkeypatch.delenv("LLAVA_LOCAL_MODEL", raising=False)


def test_the_demo_is_one_plan_however_it_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto with no daemon, llama_cpp with no model, "demo" and the demo's two file paths
    are one plan, recorded as "demo"; only auto's carries the notice for the user."""
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    monkeypatch.delenv("LLAVA_LOCAL_MODEL", raising=False)
    lm, mmproj = demo_paths()
    plans = [
        plan(),
        plan("llama_cpp"),
        plan("llama.cpp", "demo"),
        plan("llama_cpp", str(lm), mmproj=mmproj),
        plan("llama_cpp", lm),  # the projector beside it is the demo's
    ]
    assert all(p == plans[0] for p in plans)
    assert len({p.key for p in plans}) == 1
    assert plans[0].describe() == {"backend": "llama_cpp", "engine": {"model": "demo"}}
    assert plans[0].notice is not None
    assert "using the bundled demo model" in plans[0].notice
    assert [p.notice for p in plans[1:]] == [None] * 4


def test_a_file_is_planned_as_its_absolute_path_with_the_projector_beside_it(
    tiny_pair: GgufPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model given by a relative path is recorded by its absolute path, with the one
    projector beside it found and recorded too; both spellings are one plan."""
    monkeypatch.chdir(tiny_pair.lm.parent)
    relative = plan("llama_cpp", tiny_pair.lm.name)
    absolute = plan("llama_cpp", str(tiny_pair.lm), mmproj=str(tiny_pair.mmproj))
    assert relative == absolute
    assert relative.settings() == {
        "model": str(tiny_pair.lm.resolve()),
        "mmproj": str(tiny_pair.mmproj.resolve()),
    }
    assert plan("llama_cpp", tiny_pair.lm.name, n_ctx=512) != relative


def test_a_catalogue_model_is_one_plan_by_name_or_by_its_cache_files(
    tiny_pair: GgufPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pulled catalogue model named by its name, and by the paths of its two files in
    the Hugging Face cache, is one plan, recorded by name with the catalogue's prompt
    format; not pulled, planning says how to pull it."""
    cache = tmp_path / "hf-cache"
    files = {
        str(SMOL.gguf): tiny_pair.lm.read_bytes(),
        str(SMOL.mmproj): tiny_pair.mmproj.read_bytes(),
    }
    commit = prefill(cache, SMOL, files)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    org, name = str(SMOL.hf_repo).split("/")
    snapshot = cache / f"models--{org}--{name}" / "snapshots" / commit
    by_name = plan("llama_cpp", SMOL.name)
    by_files = plan("llama_cpp", str(snapshot / str(SMOL.gguf)), mmproj=snapshot / str(SMOL.mmproj))
    assert by_name == by_files
    assert by_name.settings()["model"] == SMOL.name
    assert "mmproj" not in by_name.settings()
    assert by_name.config.chat_format == SMOL.chat_format  # type: ignore[attr-defined]
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match=f"run `llava-local pull {SMOL.name}`"):
        plan("llama_cpp", SMOL.name)


def test_two_spellings_of_a_server_are_one_plan() -> None:
    """A daemon's address written two ways is one plan (the config keeps it as given);
    another server, or another setting, is another plan."""
    short = plan("ollama", "llava", host="127.0.0.1:11434")
    long = plan("ollama", "llava", host="http://127.0.0.1:11434/")
    assert short == long
    assert short.settings() == {"host": "127.0.0.1:11434"}
    assert plan("ollama", "llava", host="127.0.0.1:11435") != short
    assert plan("ollama", "llava", host="127.0.0.1:11434", num_ctx=4096) != short


def test_planning_checks_settings_and_files_before_anything_loads(tmp_path: Path) -> None:
    """A misspelt setting, a missing model file and a folder given as the projector are
    refused while planning, with the library's errors, before any model is opened."""
    with pytest.raises(InvalidRequestError, match="did you mean 'n_ctx'"):
        plan("llama_cpp", n_cxt=512)
    with pytest.raises(ModelNotFoundError, match="no language model file at"):
        plan("llama_cpp", str(tmp_path / "missing.gguf"))
    lm = tmp_path / "model.gguf"
    lm.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match=r"projector \(mmproj\) path .* is not a file"):
        plan("llama_cpp", str(lm), mmproj=tmp_path)


def test_a_plan_opens_the_engine_it_describes(tiny_pair: GgufPair) -> None:
    """open(plan) opens the settled config: the engine's own config is the plan's, and a
    chat opened on the plan keeps it and describes it in its config."""
    planned = plan("llama_cpp", str(tiny_pair.lm), n_ctx=256, kv_cache_mb=0)
    engine = open(planned)
    try:
        assert isinstance(engine, LlamaCppBackend)
        assert engine.config == planned.config
        assert engine.n_ctx == 256
    finally:
        engine.close()
    with VisionChat(planned) as chat:
        assert chat.plan is planned
        assert chat.config["engine"] == planned.settings()
        assert json.loads(json.dumps(chat.config))["backend"] == "llama_cpp"
    with pytest.raises(InvalidRequestError, match="give them to plan"):
        VisionChat(planned, n_ctx=512)


def test_a_plan_is_rebuilt_from_its_description(tiny_pair: GgufPair) -> None:
    """A plan's describe() (what caption --ray sends its workers) plans the same engine
    again, and replace() changes a setting, checked."""
    planned = plan("llama_cpp", str(tiny_pair.lm))
    described = planned.describe()
    engine = dict(described["engine"])
    again = plan(described["backend"], engine.pop("model"), **engine)
    assert again == planned
    fewer = planned.replace(n_threads=1)
    assert fewer.config.n_threads == 1  # type: ignore[attr-defined]
    assert isinstance(fewer, EnginePlan)
    assert fewer != planned
    with pytest.raises(InvalidRequestError, match="n_threads"):
        planned.replace(n_threads="many")
