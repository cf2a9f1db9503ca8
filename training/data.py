"""Pictures, questions and prompts for the demo model (no torch here).

Everything the demo model sees is generated in this module:

* handwritten digits from ``sklearn.datasets.load_digits()`` drawn as dark ink on light
  paper at any size (indices 0-1399 for training, 1400-1796 are the test split);
* coloured shapes drawn with Pillow (by ``llava_local.apps.datasets.random_shape``, which also
  draws the library's built-in ``shapes`` set);
* the LLaVA-1.5 (vicuna_v1) conversation text around them.

``clip_preprocess`` is what llama.cpp's clip.cpp does to a picture before the vision
tower of an "mlp" (LLaVA-1.5) projector: an aspect-preserving resize with Pillow's bicubic
filter so the longer side becomes ``image_size`` (new size = ceil(side * scale)), centred
on a square of rgb(122, 116, 104), then ``(x / 255 - mean) / std`` with CLIP's mean/std.
"""

from __future__ import annotations

import argparse
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from llava_local.apps import datasets

# --- constants shared with the exported model --------------------------------------------

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP / LLaVA-1.5
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
OTHER_SYSTEMS = (
    "You are a helpful assistant.",
    "You are a vision assistant. Answer briefly.",
    "Answer the user's questions about the picture.",
)

TRAIN_INDICES = range(0, 1400)  # sklearn digits used for training (incl. validation slice)
VALIDATION_INDICES = range(1250, 1400)  # carved out of the training range, for choices
TEST_INDICES = range(1400, 1797)  # never used for training or model selection


def span(indices: range) -> str:
    """range(1250, 1400) as "1250-1399"."""
    return f"{indices.start}-{indices.stop - 1}"


def parse_span(text: str) -> range:
    """``"0-199"`` as range(0, 200), checked to lie inside the training digits: the
    ``--hold-out`` options' type (argparse prints the error as a usage error)."""
    start, _, end = text.partition("-")
    try:
        indices = range(int(start), int(end) + 1)
    except ValueError:
        indices = range(0)
    inside = TRAIN_INDICES.start <= indices.start and indices.stop <= TRAIN_INDICES.stop
    if not (indices and inside):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give START-END within {span(TRAIN_INDICES)}, e.g. 0-199"
        )
    return indices


# --- questions ----------------------------------------------------------------------------

# The questions the library asks the demo model (its evaluation sets' prompts) are the
# library's own, in llava_local.apps.datasets: the trained one and the held-out ones.
PRIMARY_DIGIT_QUESTION = datasets.DIGIT_PROMPT  # "What digit is this?"

DIGIT_QUESTIONS_TRAIN = (
    PRIMARY_DIGIT_QUESTION,
    "What digit is shown?",
    "Which digit is this?",
    "What number is this?",
    "What number is shown in the picture?",
    "What is the digit in the image?",
    "Which number is written here?",
    "Read the digit.",
    "What digit do you see?",
    "Tell me the digit.",
    "What is this number?",
    "Can you read this digit?",
    "What handwritten digit is this?",
    "Which digit does the image show?",
    "Identify the number in the picture.",
    "What number do you see in this image?",
    "Please tell me which digit this is.",
    "What's this digit?",
    "Name the digit in the picture.",
    "Which numeral is this?",
    "What digit is written here?",
    "Recognize the digit.",
    "What number is drawn?",
    "What is the handwritten number?",
    "Read the number for me.",
    "which digit is it",
    "WHAT DIGIT IS THIS?",
)

# Questions whose answer depends on what the picture shows (digit or shape).
GENERIC_QUESTIONS_TRAIN = (
    "What is this?",
    "What is in the picture?",
    "Describe the image.",
    "What do you see?",
    "What is shown in the image?",
    "What is drawn here?",
    "Describe the picture.",
    "What does this picture show?",
    "Tell me what is in the image.",
)

SHAPE_QUESTIONS_TRAIN: tuple[str, ...] = (
    "What shape is this?",
    "What shape is it?",
    "What shape is shown?",
    "Which shape do you see?",
    "What is the shape in the picture?",
    "Name the shape.",
    "What kind of shape is this?",
    "Which shape is drawn?",
    "What geometric shape is in the image?",
    "Tell me the shape.",
)

COLOUR_QUESTIONS_TRAIN: tuple[str, ...] = (
    "What colour is it?",
    "What color is it?",
    "What colour is the shape?",
    "What color is the shape?",
    "Which colour is this?",
    "Name the colour.",
    "What is the colour of the shape?",
    "What color do you see?",
    "Tell me the color.",
    "Which color is the object?",
)

# Every frame with either keyword, so that the asked word, not the phrasing around it,
# decides between "It is a SHAPE." and "It is COLOUR." (a tiny byte-level model otherwise
# learns phrasings: "Can you name the shape?" was answered with a colour, after "Name the
# colour.").
KEYWORD_FRAMES = (
    "What {k} is this?", "What {k} is it?", "Which {k} is this?", "Which {k} is it?",
    "Which {k} is drawn?", "What {k} do you see?", "Which {k} can you see?",
    "Name the {k}.", "Tell me the {k}.", "Say the {k}.", "Can you tell me the {k}?",
    "What is the {k}?", "What is its {k}?", "What {k} does it have?",
    "What {k} is in the picture?", "What {k} is drawn here?", "Please name the {k}.",
    "{K}?", "The {k}?", "What's the {k}?", "Do you know the {k}?",
    "Could you tell me its {k}?", "I would like to know the {k}.", "{K}, please.",
)  # fmt: skip


def _word_distance(a: str, b: str) -> int:
    """Word-level edit distance, case-folded, punctuation ignored."""
    x, y = re.findall(r"[a-z']+", a.lower()), re.findall(r"[a-z']+", b.lower())
    row = list(range(len(y) + 1))
    for i, wx in enumerate(x, 1):
        prev, row[0] = row[0], i
        for j, wy in enumerate(y, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (wx != wy))
    return row[-1]


def keyword_questions(keywords: Sequence[str], held_out: Sequence[str]) -> tuple[str, ...]:
    """The frames with each keyword, leaving out anything within one word of a held-out
    question (those measure paraphrases the model never saw)."""
    out = []
    for frame in KEYWORD_FRAMES:
        for k in keywords:
            q = frame.format(k=k, K=k.capitalize())
            if all(_word_distance(q, h) > 1 for h in held_out):
                out.append(q)
    return tuple(out)


DESCRIBE_SHAPE_QUESTIONS_TRAIN = (
    "Describe the shape and its colour.",
    "What coloured shape is this?",
    "Describe the shape.",
)

# Held out: never used in training; only for the "paraphrase" evaluation.
DIGIT_QUESTIONS_HELD_OUT = datasets.DIGIT_PROMPTS_HELD_OUT
SHAPE_QUESTIONS_HELD_OUT = (
    "Which shape is in this image?",
    "What shape can you see here?",
    "Can you name the shape?",
)
COLOUR_QUESTIONS_HELD_OUT = (
    "What colour does the shape have?",
    "Can you name the color of this shape?",
    "Which color is shown?",
)
FOLLOW_UP_COLOUR_QUESTION = datasets.COLOUR_PROMPT  # "What colour is it?"

_HELD_OUT = SHAPE_QUESTIONS_HELD_OUT + COLOUR_QUESTIONS_HELD_OUT
SHAPE_QUESTIONS_TRAIN = tuple(
    dict.fromkeys(SHAPE_QUESTIONS_TRAIN + keyword_questions(["shape"], _HELD_OUT))
)
COLOUR_QUESTIONS_TRAIN = tuple(
    dict.fromkeys(COLOUR_QUESTIONS_TRAIN + keyword_questions(["colour", "color"], _HELD_OUT))
)

# Stage 3 (the 2nd edition's polish): questions that name the *other* word as well, so
# that the word asked about, not the last keyword, decides the answer (run 19 answered
# "What colour does the shape have?" with the shape). Filtered like the frames: nothing
# within one word of a held-out question.
_COLOUR_NAMING_SHAPE = (
    "What is the shape's {k}?", "Tell me the {k} of the shape.", "Which {k} is this shape?",
    "What {k} is this shape?", "The shape is which {k}?", "In which {k} is the shape drawn?",
    "What {k} is the shape drawn in?", "Name the {k} of this shape.",
    "What {k} is the shape painted?", "Forget the shape: which {k} is it?",
    "Not the shape, the {k}: what is it?", "Which {k} does this shape show?",
    "Say which {k} the shape is.", "I know the shape. What {k} is it?",
)  # fmt: skip
_SHAPE_NAMING_COLOUR = (
    "What shape is the {k}ed figure?", "Which shape has this {k}?",
    "Ignore the {k}: what shape is it?", "Not the {k}, the shape: what is it?",
    "What is the shape of the {k}ed thing?", "I know the {k}. What shape is it?",
    "Which shape is drawn in {k}?", "Forget the {k}: which shape is it?",
)  # fmt: skip


def _naming(frames: Sequence[str], keys: Sequence[str]) -> tuple[str, ...]:
    out = [f.format(k=k) for f in frames for k in keys]
    return tuple(q for q in out if all(_word_distance(q, h) > 1 for h in _HELD_OUT))


COLOUR_QUESTIONS_NAMING_SHAPE = _naming(_COLOUR_NAMING_SHAPE, ("colour", "color"))
SHAPE_QUESTIONS_NAMING_COLOUR = _naming(_SHAPE_NAMING_COLOUR, ("colour", "color"))

# --- labels ---------------------------------------------------------------------------------

SHAPES = datasets.SHAPES  # circle, square, triangle, star, cross
COLOURS = datasets.COLOURS  # six colour names and their RGB
COLOUR_NAMES = tuple(COLOURS)


def digit_answer(digit: int) -> str:
    """The answer to any question about a digit picture."""
    return f"This digit is {digit}."


def shape_answer(kind: str, shape: str, colour: str) -> str:
    """The answer to a question about a shape picture; ``kind`` is shape/colour/both."""
    if kind == "shape":
        return f"It is a {shape}."
    if kind == "colour":
        return f"It is {colour}."
    return f"It is a {colour} {shape}."


# --- prompts -------------------------------------------------------------------------------


def prompt_prefix(system: str) -> str:
    """Text before the first picture: ``{system} USER: `` (or ``USER: `` with no system)."""
    return f"{system} USER: " if system else "USER: "


def first_turn_after_image(question: str) -> str:
    """Text between the picture and the answer of the first turn."""
    return f"\n{question} ASSISTANT:"


def later_turn(question: str) -> str:
    """Text of a follow-up turn, written right after the previous answer's ``</s>``."""
    return f"USER: {question} ASSISTANT:"


def render_prompt(system: str, turns: Sequence[tuple[str, str | None]], marker: str) -> str:
    """The whole conversation as text, with ``marker`` where the picture goes.

    Each turn is (question, answer); the last answer may be None (generation starts there).
    """
    text = prompt_prefix(system) + marker
    for i, (question, answer) in enumerate(turns):
        text += first_turn_after_image(question) if i == 0 else later_turn(question)
        if answer is not None:
            text += f" {answer}</s>"
    return text


# --- digits ---------------------------------------------------------------------------------


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 sklearn digits as (N, 8, 8) values 0..16 and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


RESAMPLES = (
    Image.Resampling.NEAREST,
    Image.Resampling.BILINEAR,
    Image.Resampling.BICUBIC,
    Image.Resampling.LANCZOS,
    Image.Resampling.BOX,
    Image.Resampling.HAMMING,
)


#: The canonical picture of a digit, black ink on white paper, ``size`` pixels square:
#: the library's own, which its ``digits`` set is drawn with.
render_digit = datasets.render_digit


PURE_INK = 0.4  # share of digit renders in pure black on white
WARPED = 0.7  # share of digit renders elastically warped first (new handwriting)
FRAMED = 0.75  # share of digit renders framed exactly as the test pictures are
WARP_TO_GRID = 0.5  # share of warped digits averaged back to the dataset's 8x8 grid


def augment_digit(
    pixels: np.ndarray,
    rng: np.random.Generator,
    *,
    warp_to_grid: float = WARP_TO_GRID,
    whole_blocks: float = 0.0,
) -> Image.Image:
    """A random rendering of a digit: size 8..512, any filter, contrast, JPEG.

    Most renders show the whole 8x8 digit edge to edge, as the task's pictures do; the rest
    are shifted, zoomed, widened and distorted views, for pictures people crop themselves.
    Elastic warps (Simard et al., 2003) stand in for more writers than the 1,400 we have.
    ``whole_blocks`` of the framed 8x8 renders are scaled by a whole factor with nearest
    neighbour: crisp square blocks, as the task's own 64 px pictures are, which a random
    size and filter almost never make (an experiment, see training/README.md).
    """
    paper, ink = _random_ink(rng)
    source, k = (elastic_warp(pixels, rng), 3) if rng.random() < WARPED else (pixels, 1)
    if k == 3 and rng.random() < warp_to_grid:  # new handwriting in the 8x8 format
        source, k = _to_grid(source), 1
    grey = paper + (ink - paper) * np.clip(source / 16.0, 0.0, 1.0)
    size, resample = _random_size_and_filter(rng)
    framed = rng.random() < FRAMED
    if framed and k == 1 and whole_blocks and rng.random() < whole_blocks:
        size, resample = 8 * max(1, size // 8), Image.Resampling.NEAREST
    if framed:
        image = _grey_image(grey).resize((size, size), resample)
    else:
        image = _loose_view(grey, k, paper, size, resample=resample, rng=rng)
    image = image.convert("RGB")
    if rng.random() < 0.25:
        image = _jpeg_round_trip(image, int(rng.integers(40, 96)))
    return image


def paired_renders(
    pixels: np.ndarray, rng: np.random.Generator, *, p_any: float = 0.5
) -> tuple[Image.Image, Image.Image]:
    """One 8x8 grid (the digit, or half the time a warp of it averaged back to the grid)
    in one ink, drawn twice: blocky and smooth.

    The blocky picture is the grid scaled by a whole factor with nearest neighbour (the
    task's own format) or, ``p_any`` of the time, at any size with any filter; the smooth
    one is the grid as is (clip.cpp's bicubic upscales it) or bicubic at 32-256 px. The
    tower reads smooth pictures better; training it to give the blocky one the smooth
    one's features carries that over (see training/README.md).
    """
    grid = pixels.astype(np.float64)
    if rng.random() < 0.5:
        grid = _to_grid(elastic_warp(pixels, rng))
    paper, ink = _random_ink(rng)
    small = _grey_image(paper + (ink - paper) * np.clip(grid / 16.0, 0.0, 1.0))
    if rng.random() < p_any:
        size, resample = _random_size_and_filter(rng)
    else:
        size, resample = 8 * int(rng.integers(1, 17)), Image.Resampling.NEAREST
    blocky = png_round_trip(small.resize((size, size), resample))
    side = 8 if rng.random() < 0.5 else int(rng.integers(32, 257))
    smooth = small.resize((side, side), Image.Resampling.BICUBIC).convert("RGB")
    return blocky, smooth


def _random_ink(rng: np.random.Generator) -> tuple[int, int]:
    """Paper and ink grey levels: pure black on white, as most digits people show it, or
    any dark ink on any light paper."""
    if rng.random() < PURE_INK:
        return 255, 0
    return int(rng.integers(185, 256)), int(rng.integers(0, 90))


def _random_size_and_filter(rng: np.random.Generator) -> tuple[int, Image.Resampling]:
    """A side of 8-512 px (uniform in log) and any Pillow filter."""
    size = round(math.exp(rng.uniform(math.log(8), math.log(512))))
    return size, RESAMPLES[int(rng.integers(len(RESAMPLES)))]


def _to_grid(warped: np.ndarray) -> np.ndarray:
    """A 24x24 warp averaged back to the dataset's 8x8 grid."""
    return np.asarray(warped.reshape(8, 3, 8, 3).mean(axis=(1, 3)))


def _grey_image(grey: np.ndarray) -> Image.Image:
    """Grey levels (floats) as an 8-bit greyscale picture."""
    return Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), mode="L")


def elastic_warp(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The 8x8 digit at 3x resolution (24x24, values 0..16), smoothly and randomly warped,
    slightly rotated, scaled and shifted."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    big = np.kron(pixels.astype(np.float64), np.ones((3, 3)))
    dy, dx = (gaussian_filter(rng.uniform(-1, 1, big.shape), 3) * 12 for _ in range(2))
    y, x = np.meshgrid(np.arange(24.0), np.arange(24.0), indexing="ij")
    angle, scale = math.radians(float(rng.uniform(-8, 8))), float(rng.uniform(0.92, 1.08))
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    ry = c * (y - 11.5) - s * (x - 11.5) + 11.5 + float(rng.uniform(-1, 1)) + dy
    rx = s * (y - 11.5) + c * (x - 11.5) + 11.5 + float(rng.uniform(-1, 1)) + dx
    return np.asarray(map_coordinates(big, [ry, rx], order=1, mode="constant", cval=0.0))


def _loose_view(
    grey: np.ndarray,
    k: int,
    paper: int,
    size: int,
    *,
    resample: Image.Resampling,
    rng: np.random.Generator,
) -> Image.Image:
    """A view about the digit's box (``k`` pixels per digit pixel), slightly shifted and
    zoomed, widened with paper to a random aspect, sometimes distorted."""
    pad = 5 * k  # paper around the digit, so shifted or zoomed-out views stay paper
    side_px = 8 * k
    canvas = np.full((side_px + 2 * pad, side_px + 2 * pad), float(paper), dtype=np.float32)
    canvas[pad:-pad, pad:-pad] = grey
    small = _grey_image(canvas)
    aspect = 1.0 if rng.random() < 0.6 else float(rng.uniform(0.75, 1.33))
    width, height = size, max(8, round(size * aspect))
    side = side_px * float(rng.uniform(0.9, 1.2))
    cx = side_px / 2 + pad + k * float(rng.uniform(-0.7, 0.7))
    cy = side_px / 2 + pad + k * float(rng.uniform(-0.7, 0.7))
    if width >= height:
        bw, bh = side * width / height, side
    else:
        bw, bh = side, side * height / width
    box = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
    image = small.resize((width, height), resample, box=box)
    if rng.random() < 0.5:  # a small random affine distortion: rotation, shear, stretch
        image = _distort(image, rng, paper)
    return image


def _distort(image: Image.Image, rng: np.random.Generator, fill: int) -> Image.Image:
    """Rotate by up to 10 degrees, shear up to 0.15, stretch 0.9-1.1 about the centre."""
    angle = math.radians(float(rng.uniform(-10, 10)))
    shear = float(rng.uniform(-0.15, 0.15))
    sx, sy = float(rng.uniform(0.9, 1.1)), float(rng.uniform(0.9, 1.1))
    c, s = math.cos(angle), math.sin(angle)
    # output -> input mapping (what Image.transform wants), about the picture's centre
    a, b = c / sx, (s + shear * c) / sx
    d, e = -s / sy, (c - shear * s) / sy
    w, h = image.size
    cx, cy = w / 2, h / 2
    coeffs = (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy)
    resample = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(rng.integers(2))]
    return image.transform(image.size, Image.Transform.AFFINE, coeffs, resample, fillcolor=fill)


def _jpeg_round_trip(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


# --- shapes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeSpec:
    """What a shape picture shows."""

    shape: str
    colour: str


def random_shape_picture(spec: ShapeSpec, rng: np.random.Generator) -> Image.Image:
    """A random rendering of ``spec``: size, position, rotation, background, JPEG.

    The library's own drawing (``llava_local.apps.datasets.random_shape``), so that its built-in
    ``shapes`` set is drawn as training draws, from another seed.
    """
    return datasets.random_shape(spec.shape, spec.colour, rng)


# --- what clip.cpp does to a picture -------------------------------------------------------


def clip_resize(image: Image.Image, image_size: int) -> np.ndarray:
    """clip.cpp's resize for llava-1.5 (aspect kept, bicubic, centred on the pad colour).

    Delegates to ``llava_local_dev.gguf_writer.clip_square`` (byte-identical to clip.cpp,
    tested there). Returns (image_size, image_size, 3) uint8.
    """
    from llava_local_dev.gguf_writer import clip_square

    return np.array(clip_square(image, image_size), dtype=np.uint8)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 to (..., 3, H, W) float32, as clip.cpp normalises."""
    x: np.ndarray = pixels.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(IMAGE_MEAN, dtype=np.float32)) / np.asarray(IMAGE_STD, dtype=np.float32)
    return np.moveaxis(x, -1, -3).astype(np.float32)


def clip_preprocess(image: Image.Image, image_size: int) -> np.ndarray:
    """The (3, image_size, image_size) float32 input clip.cpp computes for ``image``."""
    return normalize(clip_resize(image, image_size))


def png_round_trip(image: Image.Image) -> Image.Image:
    """What the library hands llama.cpp: an RGB PNG (lossless, so only RGB matters)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
