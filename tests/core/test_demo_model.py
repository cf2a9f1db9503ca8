"""The shipped demo model really reads pictures: greedy answers through llama.cpp (libmtmd).

Pictures are made here without scikit-learn: 20 digits of the test split (sklearn
``load_digits()`` indices 1400, 1420, ..., 1780, never used in training) are copied below
as 8x8 values 0-16 (one hex digit each, ``g`` = 16), drawn as the evaluator draws them
(dark ink on light paper, 64 px, nearest neighbour); shapes are drawn with Pillow.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np
import pytest
from llava_local_dev.mtmd import MtmdRunner
from PIL import Image, ImageDraw

from .test_demo_parity import DEMO_DIR, SYSTEM

EOS_ID = 257

# (sklearn index, label, 64 values row by row)
TEST_DIGITS = [
    (1400, 2, "007eb10006f67a000b702c0005401c00000039000000b3000009d230007gggg6"),
    (1420, 5, "01cccf6001e5541000c0000008ggf80001445c7000000b400272ac0002gf8100"),
    (1440, 5, "026ac1000eda51000a6000000adcc50002857e80000005c000221aa0005gge10"),
    (1460, 3, "008dc30006f79c0000007b000004f300000ag90000004f7000b21f70008ggc00"),
    (1480, 6, "002c1000006d000000d4000000g1000005ggga1002f61a8000aa0990002cgf10"),
    (1500, 1, "0003cc20007fgg0004f9eg300200eg000000eg000000fd000000ge100003gd20"),
    (1520, 9, "02bdb20007c4d80006d5ed00003b9b5000000880000003b0002019a001fgge20"),
    (1540, 9, "006ggb0001g88g60008gegb000143a800000097000001e100047b900009ga100"),
    (1560, 5, "004dge0002egc4000dg500000bga100005fg5000002f9000005f9000004g5000"),
    (1580, 9, "0004cgb000fc059004g56f3003fge100003ag2000000e2000000c0000004c000"),
    (1600, 2, "02dgc00009fag3000575g300000ae000005g700000eg137103gcagb100dgd710"),
    (1620, 0, "004fg60000gc8f0007g40b500af008900ae008b006g40b9001f78g50003ega10"),
    (1640, 1, "000e9000000ed000000bg200000eg500000dg400000gg400001gg000000ec000"),
    (1660, 4, "00b7000005g32e3009f0cf0006gfg500006fb000001g4000009c000000da0000"),
    (1680, 3, "018dgd0001dcfg000005f800005f5000006gb100002dgb000002eg4000dgf700"),
    (1700, 5, "0049cg8000ff882004gb410008ggge0000b98g0000007g000008gc00003d9100"),
    (1720, 8, "006e952007f62c8005f28f1001ceg400001gb000004ag3000092d800005eb300"),
    (1740, 9, "008gb00002f8g70003d1ed0000aggg3000025f4000000c6000565f40006fgc10"),
    (1760, 1, "001ca300007gg70000cgg30000egg20001fgg50000fgf20000bgg8000017ca00"),
    (1780, 2, "03ef600007fef0000272e3000001e4000007f200005fe41004fggg6004fdcb10"),
]

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220)}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def digit_png(values: str, size: int = 64) -> bytes:
    """A digit as dark ink on light paper, ``size`` px square (nearest neighbour)."""
    pixels = np.array([16 if c == "g" else int(c, 16) for c in values], dtype=np.float32)
    grey = np.round(255 - pixels.reshape(8, 8) * (255 / 16)).astype(np.uint8)
    small = Image.fromarray(grey, mode="L")
    return _png(small.resize((size, size), Image.Resampling.NEAREST).convert("RGB"))


def shape_png(shape: str, colour: str, size: int = 96) -> bytes:
    """A centred shape on white, drawn 4x larger and downsampled."""
    big, fill = size * 4, COLOURS[colour]
    image = Image.new("RGB", (big, big), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    c, r = big / 2, big * 0.36
    if shape == "circle":
        draw.ellipse((c - r, c - r, c + r, c + r), fill=fill)
    elif shape == "square":
        draw.rectangle((c - 0.8 * r, c - 0.8 * r, c + 0.8 * r, c + 0.8 * r), fill=fill)
    elif shape == "triangle":
        angles = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        draw.polygon([(c + r * math.cos(a), c + r * math.sin(a) + 0.12 * r) for a in angles], fill)
    else:  # star
        points = [
            (
                c + (r if i % 2 == 0 else 0.42 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                c + (r if i % 2 == 0 else 0.42 * r) * math.sin(-math.pi / 2 + i * math.pi / 5),
            )
            for i in range(10)
        ]
        draw.polygon(points, fill=fill)
    return _png(image.resize((size, size), Image.Resampling.BOX))


def prompt(marker: str, question: str, system: str = SYSTEM) -> str:
    """The LLaVA-1.5 vicuna prompt for one question about one picture."""
    head = f"{system} USER: " if system else "USER: "
    return f"{head}{marker}\n{question} ASSISTANT:"


def greedy(runner: MtmdRunner, text: str, png: bytes, max_tokens: int = 32) -> str:
    """The greedy answer: evaluate the prompt, then one token at a time up to EOS."""
    import llama_cpp

    logits = runner.logits(text, png)
    out: list[int] = []
    for _ in range(max_tokens):
        token = int(np.argmax(logits))
        if token == EOS_ID:
            break
        out.append(token)
        runner.llama.eval([token])
        ptr = llama_cpp.llama_get_logits_ith(runner.llama.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(runner.llama.n_vocab(),))
    return bytes(t for t in out if t < 256).decode(errors="replace")


@pytest.fixture(scope="module")
def demo() -> Iterator[MtmdRunner]:
    """llama.cpp on the shipped demo pair."""
    with MtmdRunner(DEMO_DIR / "demo-lm.gguf", DEMO_DIR / "demo-mmproj.gguf") as runner:
        yield runner


def test_demo_reads_test_split_digits(demo: MtmdRunner) -> None:
    """At least 18 of 20 held-out digits get exactly "This digit is N." (greedy).

    The shipped model reads 0.972 of the whole test split (README); chance is 0.1."""
    answers = [
        greedy(demo, prompt(demo.marker, "What digit is this?"), digit_png(values))
        for _, _, values in TEST_DIGITS
    ]
    labels = [label for _, label, _ in TEST_DIGITS]
    right = [a == f" This digit is {n}." for a, n in zip(answers, labels, strict=True)]
    assert sum(right) >= 18, list(zip(answers, labels, strict=True))


def test_demo_follows_a_paraphrase_it_never_saw(demo: MtmdRunner) -> None:
    """A held-out phrasing gets the same sentence for at least 9 of the first 10 digits."""
    question = "Can you tell me what digit this is?"
    answers = [
        greedy(demo, prompt(demo.marker, question), digit_png(values))
        for _, _, values in TEST_DIGITS[:10]
    ]
    labels = [label for _, label, _ in TEST_DIGITS[:10]]
    right = [a == f" This digit is {n}." for a, n in zip(answers, labels, strict=True)]
    assert sum(right) >= 9, list(zip(answers, labels, strict=True))


def test_demo_answers_without_a_system_prompt(demo: MtmdRunner) -> None:
    """With an empty system prompt ("USER: ..." first) the digits are still read.

    0.972 of the whole test split (demo.json), as with LLaVA's system prompt."""
    answers = [
        greedy(demo, prompt(demo.marker, "What digit is this?", system=""), digit_png(values))
        for _, _, values in TEST_DIGITS
    ]
    labels = [label for _, label, _ in TEST_DIGITS]
    right = [a == f" This digit is {n}." for a, n in zip(answers, labels, strict=True)]
    assert sum(right) >= 16, list(zip(answers, labels, strict=True))


@pytest.mark.parametrize(
    ("shape", "colour"),
    [("circle", "red"), ("square", "blue"), ("triangle", "green"), ("star", "red")],
)
def test_demo_names_shape_and_colour(demo: MtmdRunner, shape: str, colour: str) -> None:
    """Shape, colour and combined questions about a drawn shape get the trained sentences."""
    png = shape_png(shape, colour)
    assert greedy(demo, prompt(demo.marker, "What shape is this?"), png) == f" It is a {shape}."
    assert greedy(demo, prompt(demo.marker, "What colour is it?"), png) == f" It is {colour}."
    both = greedy(demo, prompt(demo.marker, "What is in the picture?"), png)
    assert both == f" It is a {colour} {shape}."


def test_demo_answers_a_follow_up_about_the_same_picture(demo: MtmdRunner) -> None:
    """After "It is a triangle.", the follow-up "What colour is it?" gets the colour."""
    png = shape_png("triangle", "blue")
    history = prompt(demo.marker, "What shape is this?") + " It is a triangle.</s>"
    follow_up = history + "USER: What colour is it? ASSISTANT:"
    assert greedy(demo, follow_up, png) == " It is blue."
