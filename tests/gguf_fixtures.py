"""Tiny GGUF pairs for tests, written by the development package (``llava_local_dev``).

Fixtures (session-scoped; import them into ``tests/conftest.py``):

- ``tiny_pair``: the ``"tiny"`` preset, f32 language model + f16 projector.
- ``tiny_pair_q4``: the same pair with the language model quantized to Q4_0 by llama.cpp.
- ``tiny_mtmd``: a :class:`llava_local_dev.mtmd.MtmdRunner` loaded with ``tiny_pair``.

llama-cpp-python and the development package are part of the test install, so nothing
here skips: without them the fixtures fail with the ImportError.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from llava_local_dev import gguf_writer
from llava_local_dev.gguf_writer import TextConfig, VisionConfig, Vocab
from llava_local_dev.mtmd import MtmdRunner
from llava_local_dev.pictures import png_bytes

__all__ = [
    "GgufPair",
    "png_bytes",
    "tiny_mtmd",
    "tiny_pair",
    "tiny_pair_q4",
]


@dataclass(frozen=True)
class GgufPair:
    """Paths of a written pair and the shapes it was written with."""

    lm: Path
    mmproj: Path
    text: TextConfig
    vision: VisionConfig
    vocab: Vocab


def _tiny(directory: Path) -> GgufPair:
    import llama_cpp  # noqa: F401  (fail loudly here if the engine is missing)

    preset = gguf_writer.PRESETS["tiny"]
    lm, mm = gguf_writer.write_preset(preset, directory)
    return GgufPair(lm, mm, preset.text, preset.vision, gguf_writer.byte_vocab())


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> GgufPair:
    """The tiny random pair: f32 LM (byte vocabulary) + f16 projector, 16 image tokens."""
    return _tiny(tmp_path_factory.mktemp("tiny_pair"))


@pytest.fixture(scope="session")
def tiny_pair_q4(tiny_pair: GgufPair, tmp_path_factory: pytest.TempPathFactory) -> GgufPair:
    """``tiny_pair`` with its LM quantized to Q4_0 by llama.cpp (same projector)."""
    out = tmp_path_factory.mktemp("tiny_pair_q4") / "model-q4_0.gguf"
    lm = gguf_writer.quantize(tiny_pair.lm, out, "q4_0")
    return GgufPair(lm, tiny_pair.mmproj, tiny_pair.text, tiny_pair.vision, tiny_pair.vocab)


@pytest.fixture(scope="session")
def tiny_mtmd(tiny_pair: GgufPair) -> Iterator[MtmdRunner]:
    """An :class:`MtmdRunner` on ``tiny_pair``, shared by the session."""
    with MtmdRunner(tiny_pair.lm, tiny_pair.mmproj) as runner:
        yield runner
