"""A model's recommended sampling (llava_local.sampling): read from the GGUF's
``general.sampling.*`` keys, else the catalogue, else llama.cpp's defaults, and used by
the llama.cpp engine for every option a turn leaves unset."""

from __future__ import annotations

from pathlib import Path

import pytest
from llava_local_dev import gguf_writer

from llava_local import Options, VisionChat
from llava_local.sampling import LLAMA_CPP, Sampling, recommended

from ..gguf_fixtures import GgufPair, png_bytes


def test_gguf_keys_win_and_fill_in_the_rest() -> None:
    """The GGUF's keys are read (as llama.cpp gives them: text); keys it leaves out keep
    llama.cpp's values."""
    found = recommended({"general.sampling.temp": "0.2", "general.sampling.top_k": "20"})
    assert found == Sampling(temperature=0.2, top_k=20, source="gguf")
    assert found.top_p == LLAMA_CPP.top_p


def test_bad_gguf_values_are_ignored() -> None:
    """A value out of range or not a number says nothing (the file is not trusted)."""
    bad = {"general.sampling.temp": "-3", "general.sampling.top_p": "banana"}
    assert recommended(bad) == LLAMA_CPP


def test_catalogue_then_llama_cpp() -> None:
    """Without GGUF keys the catalogue's recommendation applies, else llama.cpp's."""
    card = Sampling(temperature=0.1, top_p=0.9)
    assert recommended({}, card) == Sampling(temperature=0.1, top_p=0.9, source="catalog")
    assert recommended({"general.name": "x"}) == LLAMA_CPP
    assert LLAMA_CPP.source == "llama.cpp"


def test_a_turns_own_options_win() -> None:
    """fill() takes only the options a turn leaves unset."""
    filled = Sampling(temperature=0.0, top_k=7).fill(Options(temperature=0.5))
    assert filled.temperature == 0.5
    assert filled.top_k == 7


def _answers(lm: Path, mmproj: Path, temperature: float | None = None) -> set[str]:
    """The answers to one question with three seeds."""
    with VisionChat.llama_cpp(model=lm, mmproj=mmproj) as chat:
        answers = set()
        for seed in (1, 2, 3):
            chat.reset()
            picture = png_bytes(seed=1)
            reply = chat.ask(
                "What is it?", image=picture, max_tokens=12, seed=seed, temperature=temperature
            )
            answers.add(reply.text)
        return answers


@pytest.mark.llama
def test_the_engine_samples_as_the_gguf_recommends(tiny_pair: GgufPair, tmp_path: Path) -> None:
    """A GGUF recommending temperature 0 is answered greedily when the turn sets no
    temperature (the same answer whatever the seed); the same weights without the key
    sample at llama.cpp's 0.8, and a turn's own temperature still wins."""
    lm = gguf_writer.write_language_model(
        tmp_path / "greedy.gguf", tiny_pair.text, vocab=tiny_pair.vocab, sampling={"temp": 0.0}
    )
    plain = gguf_writer.write_language_model(
        tmp_path / "plain.gguf", tiny_pair.text, vocab=tiny_pair.vocab
    )
    with VisionChat.llama_cpp(model=lm, mmproj=tiny_pair.mmproj) as chat:
        sampling = chat.engine.sampling  # type: ignore[attr-defined]
    assert sampling == Sampling(temperature=0.0, source="gguf")
    assert len(_answers(lm, tiny_pair.mmproj)) == 1
    assert len(_answers(plain, tiny_pair.mmproj)) > 1
    assert len(_answers(lm, tiny_pair.mmproj, temperature=1.5)) > 1
