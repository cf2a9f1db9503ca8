"""The shipped demo model through ``VisionChat``: the whole path a user takes.

Pictures go through the core's preparation, the llama.cpp engine and the conversation, so
these tests check that awkward files (a phone photo stored sideways with an EXIF
orientation, a transparent PNG whose hidden pixels are black) are read as well as plain
ones, with answers that are right or wrong, not merely produced.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from llava_local import ImageSource, VisionChat
from llava_local.apps.datasets import LabelledPicture, load_set

N_DIGITS = 24  # test-split digits 1400-1423, never used in training


@pytest.fixture(scope="module")
def digits() -> list[LabelledPicture]:
    return load_set("digits", limit=N_DIGITS)


def _plain(picture: LabelledPicture) -> Image.Image:
    assert isinstance(picture.source, Image.Image)
    return picture.source.convert("RGB")


def sideways_jpeg(image: Image.Image) -> bytes:
    """The picture as a phone stores it: pixels rotated, EXIF orientation 6 ("rotate 90
    clockwise to view") so that a viewer shows it upright."""
    stored = image.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def transparent_png(image: Image.Image) -> bytes:
    """Ink as opacity over fully transparent, black paper: flattened onto white it is the
    plain picture; read without its alpha channel it is all black."""
    ink = 255 - np.asarray(image.convert("L"))
    rgba = np.zeros((*ink.shape, 4), dtype=np.uint8)
    rgba[..., 3] = ink
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def read_all(chat: VisionChat, pictures: Sequence[ImageSource]) -> list[str]:
    """The digit the model names for each picture (a fresh conversation each)."""
    answers = []
    for picture in pictures:
        chat.reset()
        answers.append(chat.ask("What digit is this?", image=picture, max_tokens=24).text)
    return answers


def score(answers: list[str], digits: list[LabelledPicture]) -> int:
    return sum(
        a.strip() == f"This digit is {d.label}." for a, d in zip(answers, digits, strict=True)
    )


def test_demo_reads_test_digits_through_visionchat(
    demo_chat: VisionChat, digits: list[LabelledPicture]
) -> None:
    answers = read_all(demo_chat, [_plain(d) for d in digits])
    assert score(answers, digits) >= N_DIGITS - 1, list(
        zip(answers, [d.label for d in digits], strict=True)
    )


def test_sideways_phone_photos_are_read_as_well_as_plain_ones(
    demo_chat: VisionChat, digits: list[LabelledPicture]
) -> None:
    plain = read_all(demo_chat, [_plain(d) for d in digits])
    sideways = read_all(demo_chat, [sideways_jpeg(_plain(d)) for d in digits])
    # without EXIF orientation these would be digits lying on their side
    assert score(sideways, digits) >= score(plain, digits) - 1
    assert score(sideways, digits) >= N_DIGITS - 2, sideways


def test_transparent_pngs_are_read_as_well_as_plain_ones(
    demo_chat: VisionChat, digits: list[LabelledPicture]
) -> None:
    plain = read_all(demo_chat, [_plain(d) for d in digits])
    see_through = read_all(demo_chat, [transparent_png(_plain(d)) for d in digits])
    assert see_through == plain  # flattened onto white, the picture is the same


def test_a_follow_up_asks_about_the_same_picture(demo_chat: VisionChat) -> None:
    """Shape first, then colour with no picture on the second turn: the conversation
    keeps the picture and the model answers about it."""
    shapes = [p for p in load_set("shapes", limit=40) if p.labels.get("shape") == "triangle"]
    assert shapes, "the built-in shapes have triangles"
    hits = 0
    for picture in shapes[:4]:
        demo_chat.reset()
        first = demo_chat.ask("What shape is this?", image=picture.source, max_tokens=24)
        second = demo_chat.ask("What colour is it?", max_tokens=24)
        hits += (first.text.strip(), second.text.strip()) == (
            "It is a triangle.",
            f"It is {picture.labels['colour']}.",
        )
        assert second.stats.images_encoded == 0  # the follow-up did not encode it again
    assert hits >= 3
