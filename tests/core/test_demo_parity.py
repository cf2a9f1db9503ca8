"""The shipped demo pair: an independent numpy forward pass agrees with llama.cpp.

The numpy reference reads the weights back from ``llava_local/data/demo/*.gguf`` with the
``gguf`` package's GGUFReader (no torch), runs the LLaVA-1.5 graph as this llama.cpp build
does (``llava_local_dev.reference``: vision through
``llava_local_dev.gguf_writer.reference_image_embeddings``, LM the llama graph with
adjacent-pair RoPE) and is compared with libmtmd's projected image embeddings and
llama.cpp's next-token logits. training/train_demo.py also checks PyTorch against these
functions when it exports.

Tolerances: the projector output within 1e-3 of its largest magnitude (ggml rounds the
patch im2col and both GELUs through f16 tables, which the reference copies; float32
summation order then sometimes tips a value to the neighbouring f16 step, an error that
grows with the activations: 2e-4 of the scale for the shipped model, whose embeddings reach
~300); logits within 2e-3 absolute, on logits of magnitude ~10.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from llava_local_dev import gguf_writer as gw
from llava_local_dev.mtmd import MtmdRunner
from llava_local_dev.reference import PairWeights, image_embeddings, next_logits, read_pair
from PIL import Image

from ..paths import PACKAGE

DEMO_DIR = PACKAGE / "data" / "demo"
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
EMBD_RTOL = 1e-3  # of the largest embedding magnitude
LOGITS_ATOL = 2e-3


# ---------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def demo_pair() -> PairWeights:
    """The shipped demo pair, read with GGUFReader."""
    return read_pair(DEMO_DIR / "demo-lm.gguf", DEMO_DIR / "demo-mmproj.gguf")


@pytest.fixture(scope="module")
def demo_runner() -> Iterator[MtmdRunner]:
    """llama.cpp (through libmtmd) on the shipped demo pair, with an f32 KV cache."""
    lm, mmproj = DEMO_DIR / "demo-lm.gguf", DEMO_DIR / "demo-mmproj.gguf"
    with MtmdRunner(lm, mmproj, type_k=0, type_v=0) as r:  # 0: GGML_TYPE_F32
        yield r


def _picture(size: int) -> tuple[Image.Image, bytes]:
    """A drawn '7' as dark ink on light paper, ``size`` pixels square, and its PNG."""
    seven = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 2, 12, 16, 16, 16, 9, 0],
            [0, 1, 5, 4, 6, 16, 7, 0],
            [0, 0, 0, 0, 11, 12, 0, 0],
            [0, 0, 0, 4, 16, 3, 0, 0],
            [0, 0, 0, 12, 10, 0, 0, 0],
            [0, 0, 2, 16, 4, 0, 0, 0],
            [0, 0, 3, 11, 0, 0, 0, 0],
        ],
        dtype=np.float32,
    )
    grey = np.round(255 - seven * (255 / 16)).astype(np.uint8)
    image = Image.fromarray(grey, mode="L").resize((size, size), Image.Resampling.NEAREST)
    image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return image, buffer.getvalue()


def test_projected_image_embeddings_match_numpy(
    demo_pair: PairWeights, demo_runner: MtmdRunner
) -> None:
    """libmtmd's projector output for a picture at image_size equals the numpy reference."""
    image, png = _picture(demo_pair.vision.image_size)
    pixels = gw.clip_preprocess(image, demo_pair.vision)
    got = demo_runner.image_embeddings(png)
    want = image_embeddings(demo_pair, pixels)
    assert got.shape == (demo_pair.vision.n_image_tokens, demo_pair.text.n_embd)
    np.testing.assert_allclose(got, want, atol=EMBD_RTOL * np.abs(want).max())
    assert np.abs(want).max() > 0.1  # the comparison is not between two near-zero arrays


def test_next_token_logits_match_numpy(demo_pair: PairWeights, demo_runner: MtmdRunner) -> None:
    """llama.cpp's next-token logits after a prompt with a picture equal the numpy graph's."""
    image, png = _picture(demo_pair.vision.image_size)
    before = f"{SYSTEM} USER: "
    after = "\nWhat digit is this? ASSISTANT:"
    got = demo_runner.logits(before + demo_runner.marker + after, png)
    pixels = gw.clip_preprocess(image, demo_pair.vision)
    want = next_logits(
        demo_pair,
        [gw.BOS_ID, *before.encode()],
        image_embeddings(demo_pair, pixels),
        list(after.encode()),
    )
    np.testing.assert_allclose(got, want, atol=LOGITS_ATOL)
    assert int(np.argmax(got)) == int(np.argmax(want))


def test_prompt_tokenizes_to_bos_bytes_image_bytes(demo_runner: MtmdRunner) -> None:
    """libmtmd splits the prompt into BOS+bytes, the image tokens, then bytes: nothing else."""
    _, png = _picture(32)
    before, after = f"{SYSTEM} USER: ", "\nWhat digit is this? ASSISTANT:"
    chunks = demo_runner.chunk_token_counts(before + demo_runner.marker + after, [png])
    n_image = demo_runner.image_embeddings(png).shape[0]
    assert chunks == [
        ("text", 1 + len(before.encode())),
        ("image", n_image),
        ("text", len(after.encode())),
    ]
    tokenize = demo_runner.llama.tokenize
    assert tokenize(before.encode(), add_bos=True, special=True) == [
        gw.BOS_ID,
        *before.encode(),
    ]
    assert tokenize(after.encode(), add_bos=False, special=True) == list(after.encode())
    history = " This digit is 7.</s>USER: Sure? ASSISTANT:"
    assert tokenize(history.encode(), add_bos=False, special=True) == [
        *b" This digit is 7.",
        gw.EOS_ID,
        *b"USER: Sure? ASSISTANT:",
    ]
