"""Labelled picture sets to evaluate a model on: two built in, and your own.

Built in, generated here with no download and no scikit-learn at run time:

- ``digits``: the test split of scikit-learn's ``load_digits()`` (indices 1400-1796, 397
  pictures, never used to train the demo model), shipped as the 8x8 values in
  ``data/digits_test.npz`` (made by ``scripts/make_digits_data.py``). Each is drawn as dark
  ink on light paper, the way the demo model's training renders digits: 64 px square,
  nearest-neighbour by default; ``size`` and ``resample`` choose another rendering, and
  ``vary=True`` draws each picture at its own size (8-512 px) with its own filter.
- ``shapes``: 300 coloured shapes drawn with Pillow (5 shapes x 6 colours, each pair 10
  times, all 30 pairs within every 30 pictures), the same vocabulary and drawing as the
  demo model's training but from a seed that training never uses. Each picture has two
  labels, ``shape`` and ``colour``.

Your own, where the label of a picture is its class name:

- a folder with one sub-folder per class (``pets/cat/1.jpg``, ``pets/dog/2.png``...);
  hidden entries and files outside the sub-folders are ignored, sub-folders are searched
  recursively. Pictures are taken a class at a time in turn, so ``limit`` keeps a balance;
- a CSV file of ``path,label`` rows, with an optional header row starting ``path``; a
  header such as ``path,shape,colour`` gives each picture several labels, the first one
  being the main label;
- a JSON Lines file of ``{"path": ..., "label": ...}`` objects, optionally with
  ``"labels": {"shape": ..., "colour": ...}``.

Relative paths in a CSV or JSONL file are relative to the file. The names ``digits`` and
``shapes`` always mean the built-in sets; write ``./digits`` for a folder of that name.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import InvalidRequestError
from ..picture_files import find_pictures
from ..wording import count, plural

__all__ = [
    "BUILT_IN",
    "COLOURS",
    "COLOUR_PROMPT",
    "DIGIT_PROMPT",
    "DIGIT_PROMPTS_HELD_OUT",
    "RESAMPLING",
    "SHAPES",
    "SHAPES_SEED",
    "SHAPE_PROMPT",
    "LabelledPicture",
    "default_prompts",
    "draw_shape",
    "load_set",
    "random_shape",
    "render_digit",
]

#: The names of the built-in sets.
BUILT_IN = ("digits", "shapes")

# --- the demo model's vocabulary (training/data.py trains with these) ---------------------

#: The question the demo model was trained on first.
DIGIT_PROMPT = "What digit is this?"
#: Paraphrases never used in training (``DIGIT_QUESTIONS_HELD_OUT`` in training/data.py).
DIGIT_PROMPTS_HELD_OUT = (
    "Which digit is shown in this image?",
    "What number is written in this picture?",
    "Can you tell me what digit this is?",
    "What is the number in this image?",
    "Identify the handwritten digit.",
    "Which number is drawn here?",
    "What digit does this picture show?",
    "Please read the number in the image.",
    "What's the number shown?",
    "Tell me which number you see.",
)
#: Shape and colour questions, worded as in training.
SHAPE_PROMPT = "What shape is this?"
COLOUR_PROMPT = "What colour is it?"

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "orange": (245, 130, 20),
    "purple": (140, 40, 170),
}
#: The built-in shapes are drawn from this seed; the demo's training uses 0 and 1000, and
#: its own evaluation (training/evaluate_demo.py) draws the same 300 pictures from it.
SHAPES_SEED = 20_251_122
SHAPES_COUNT = 300
DIGITS_SIZE = 64

#: Pillow filters by name, for ``load_set("digits", resample=...)``.
RESAMPLING: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class LabelledPicture(BaseModel):
    """One picture of a set and what it shows.

    ``label`` is the main label; ``labels`` holds every label by kind for pictures that
    have several (``{"shape": "star", "colour": "red"}``), and is empty otherwise.
    ``source`` is a path or an image in memory, anything ``VisionChat.ask`` takes.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    source: Path | Image.Image = Field(repr=False)
    label: str = Field(min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _label_among_labels(self) -> LabelledPicture:
        if self.labels and self.label not in self.labels.values():
            raise ValueError(f"the label {self.label!r} is not one of the labels {self.labels}")
        if any(not value for value in self.labels.values()):
            raise ValueError(f"empty label in {self.labels}")
        return self

    def label_for(self, key: str | None) -> str:
        """The label of kind ``key`` (``None``: the main label)."""
        if key is None:
            return self.label
        try:
            return self.labels[key]
        except KeyError:
            raise InvalidRequestError(
                f"picture {self.name} has no {key!r} label (it has: "
                f"{', '.join(self.labels) or 'only a main label'})"
            ) from None


def default_prompts(name: str, *, wrapped: bool = False) -> tuple[str, ...]:
    """The questions a built-in set is asked unless told otherwise.

    digits: the trained question, then the ten held-out paraphrases (``wrapped``, asked
    through client wrappers: the trained question alone); shapes: a shape question and a
    colour question.
    """
    if name == "digits":
        return (DIGIT_PROMPT,) if wrapped else (DIGIT_PROMPT, *DIGIT_PROMPTS_HELD_OUT)
    if name == "shapes":
        return (SHAPE_PROMPT, COLOUR_PROMPT)
    raise InvalidRequestError(f"only the built-in sets ({', '.join(BUILT_IN)}) have prompts")


def load_set(
    name_or_path: str | os.PathLike[str],
    *,
    limit: int | None = None,
    size: int | None = None,
    resample: str | None = None,
    vary: bool = False,
    seed: int | None = None,
) -> list[LabelledPicture]:
    """The pictures of a built-in set (``"digits"``, ``"shapes"``) or of a folder or file.

    ``limit`` keeps the first pictures. For ``digits`` only: ``size`` (pixels, 8-512;
    default 64) and ``resample`` (a name of :data:`RESAMPLING`; default nearest) choose
    the rendering, and ``vary`` draws each picture at a random size and filter from
    ``seed`` (default 0). For ``shapes``, ``seed`` draws another set.
    """
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise InvalidRequestError(f"limit must be a positive number of pictures, not {limit!r}")
    name = os.fspath(name_or_path)
    if name != "digits" and (size is not None or resample is not None or vary):
        raise InvalidRequestError("size, resample and vary apply to the digits set only")
    if name == "digits":
        pictures = _digits(size, resample, vary, seed, limit)
    elif name == "shapes":
        pictures = _shapes(SHAPES_SEED if seed is None else seed, limit or SHAPES_COUNT)
    elif seed is not None:
        raise InvalidRequestError("seed applies to the built-in sets only")
    else:
        pictures = _user_set(Path(name).expanduser())
    return pictures[:limit]


# --- digits ------------------------------------------------------------------------------


def render_digit(
    values: np.ndarray[Any, Any],
    size: int = DIGITS_SIZE,
    resample: Image.Resampling = Image.Resampling.NEAREST,
) -> Image.Image:
    """An 8x8 digit of values 0..16 as black ink on white paper, ``size`` px square.

    The demo model's training renders its digits with this too (training/data.py), so
    the model sees the rendering it learnt from.
    """
    paper, ink = 255, 0
    grey = paper + (ink - paper) * (np.asarray(values, dtype=np.float32) / 16.0)
    small = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), mode="L")
    return small.resize((size, size), resample).convert("RGB")


def _digits_data() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    with (resources.files("llava_local") / "data" / "digits_test.npz").open("rb") as file:
        data = np.load(io.BytesIO(file.read()), allow_pickle=False)
        return data["images"], data["labels"], data["indices"]


def _digits(
    size: int | None, resample: str | None, vary: bool, seed: int | None, limit: int | None
) -> list[LabelledPicture]:
    if vary and (size is not None or resample is not None):
        raise InvalidRequestError("vary draws sizes and filters itself; leave size and resample")
    if size is not None and not 8 <= size <= 512:
        raise InvalidRequestError(f"size must be 8 to 512 pixels, not {size}")
    if resample is not None and resample not in RESAMPLING:
        raise InvalidRequestError(
            f"unknown resampling {resample!r}; choose one of {', '.join(RESAMPLING)}"
        )
    if seed is not None and not vary:
        raise InvalidRequestError("seed applies to digits only with vary=True")
    images, labels, indices = _digits_data()
    count = len(images) if limit is None else min(limit, len(images))
    rng = np.random.default_rng(0 if seed is None else seed)
    filters = list(RESAMPLING.values())
    pictures = []
    for i in range(count):
        if vary:
            side = round(math.exp(rng.uniform(math.log(8), math.log(512))))
            filter_ = filters[int(rng.integers(len(filters)))]
        else:
            side, filter_ = size or DIGITS_SIZE, RESAMPLING[resample or "nearest"]
        pictures.append(
            LabelledPicture(
                name=f"digits/{int(indices[i])}",
                source=render_digit(images[i], side, filter_),
                label=str(int(labels[i])),
            )
        )
    return pictures


# --- shapes ------------------------------------------------------------------------------


def _polygon(
    shape: str, cx: float, cy: float, radius: float, angle: float
) -> list[tuple[float, float]]:
    def rotated(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if shape == "square":
        r = radius * 0.8
        return rotated([(-r, -r), (r, -r), (r, r), (-r, r)])
    if shape == "triangle":
        corners = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        return rotated(
            [(radius * math.cos(a), radius * math.sin(a) + radius * 0.12) for a in corners]
        )
    if shape == "star":
        points = []
        for i in range(10):
            r = radius if i % 2 == 0 else radius * 0.42
            a = -math.pi / 2 + i * math.pi / 5
            points.append((r * math.cos(a), r * math.sin(a)))
        return rotated(points)
    if shape == "cross":
        a, b = radius * 0.85, radius * 0.3
        return rotated(
            [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b),
             (-a, b), (-a, -b), (-b, -b)]
        )  # fmt: skip
    raise InvalidRequestError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def draw_shape(
    shape: str,
    colour: tuple[int, int, int],
    *,
    size: int = 64,
    height: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
    rel_radius: float = 0.38,
    centre: tuple[float, float] = (0.5, 0.5),
    angle: float = 0.0,
) -> Image.Image:
    """A filled shape on a plain background, drawn supersampled then box-filtered down
    (smooth edges)."""
    width, height = size, height or size
    scale = max(1, min(4, 512 // max(width, height)))
    image = Image.new("RGB", (width * scale, height * scale), background)
    draw = ImageDraw.Draw(image)
    side = min(width, height) * scale
    radius = rel_radius * side
    cx, cy = centre[0] * width * scale, centre[1] * height * scale
    if shape == "circle":
        r = radius * 0.9
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon(_polygon(shape, cx, cy, radius, angle), fill=colour)
    return image.resize((width, height), Image.Resampling.BOX)


def random_shape(shape: str, colour: str, rng: np.random.Generator) -> Image.Image:
    """A random rendering: size 24-384 px, some not square, light or dark background,
    size, position, rotation, jittered colour, some JPEG.

    The demo model's training draws its shapes with this too (training/data.py), from
    other seeds than the built-in set's."""
    size = round(math.exp(rng.uniform(math.log(24), math.log(384))))
    height = size if rng.random() < 0.8 else max(16, round(size * rng.uniform(0.75, 1.33)))
    light = rng.random() < 0.75
    level = int(rng.integers(200, 256)) if light else int(rng.integers(0, 60))
    r, g, b = (int(np.clip(level + rng.integers(-12, 13), 0, 255)) for _ in range(3))
    rel_radius = float(rng.uniform(0.22, 0.45))
    side = min(size, height)
    mx, my = rel_radius * 1.05 * side / size, rel_radius * 1.05 * side / height
    centre = (float(rng.uniform(mx, 1 - mx)), float(rng.uniform(my, 1 - my)))
    angle = float(rng.uniform(-0.26, 0.26))
    jittered = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 21, 3), 0, 255)
    fill = (int(jittered[0]), int(jittered[1]), int(jittered[2]))
    image = draw_shape(
        shape,
        fill,
        size=size,
        height=height,
        background=(r, g, b),
        rel_radius=rel_radius,
        centre=centre,
        angle=angle,
    )
    if rng.random() < 0.2:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(50, 95)))
        buffer.seek(0)
        image = Image.open(buffer).convert("RGB")
    return image


def _shapes(seed: int, count: int) -> list[LabelledPicture]:
    rng = np.random.default_rng(seed)
    pairs = [(shape, colour) for shape in SHAPES for colour in COLOURS]
    pictures = []
    for i in range(min(count, SHAPES_COUNT)):
        shape, colour = pairs[i % len(pairs)]
        pictures.append(
            LabelledPicture(
                name=f"shapes/{i:03d}",
                source=random_shape(shape, colour, rng),
                label=shape,
                labels={"shape": shape, "colour": colour},
            )
        )
    return pictures


# --- your own sets -----------------------------------------------------------------------


def _user_set(path: Path) -> list[LabelledPicture]:
    if path.is_dir():
        pictures = _folder(path)
    elif not path.exists():
        raise InvalidRequestError(
            f"no such file or folder: {path} (the built-in sets are {', '.join(BUILT_IN)})"
        )
    elif path.suffix.lower() == ".csv":
        pictures = list(_csv_rows(path))
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        pictures = list(_jsonl_rows(path))
    else:
        raise InvalidRequestError(
            f"{path} is not a labelled set: give a folder with one sub-folder per class, "
            "a .csv or a .jsonl file"
        )
    if not pictures:
        raise InvalidRequestError(f"no labelled pictures in {path}")
    missing = [p for p in pictures if isinstance(p.source, Path) and not p.source.is_file()]
    if missing:
        first = ": " if len(missing) == 1 else ", the first: "
        raise InvalidRequestError(
            f"{count(len(missing), 'picture')} listed in {path} {plural(len(missing), 'does')} "
            f"not exist{first}{missing[0].source}"
        )
    return pictures


def _folder(folder: Path) -> list[LabelledPicture]:
    """Pictures of each class sub-folder, a class at a time in turn (round robin)."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [
        [
            LabelledPicture(name=str(f), source=f, label=c.name)
            for f in find_pictures(c, recursive=True)
        ]
        for c in classes
    ]
    return [p for turn in zip_longest(*per_class) for p in turn if p is not None]


def _picture(
    base: Path, where: str, path: object, label: object, labels: dict[str, object]
) -> LabelledPicture:
    """One row of a CSV or JSONL set, checked; no ``label`` means the first of ``labels``."""
    if not isinstance(path, str) or not path.strip():
        raise InvalidRequestError(f"{where}: the path must be a non-empty string")
    main = None if label is None else _label_text(where, "label", label)
    texts = {key: _label_text(where, key, value) for key, value in labels.items()}
    if main is None:
        if not texts:
            raise InvalidRequestError(f"{where}: no label")
        main = next(iter(texts.values()))
    if texts and main not in texts.values():
        raise InvalidRequestError(f"{where}: the label {main!r} is not one of the labels {texts}")
    source = base / Path(path.strip()).expanduser()
    return LabelledPicture(name=str(source), source=source, label=main, labels=texts)


def _label_text(where: str, key: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
        raise InvalidRequestError(f"{where}: the {key} must be a non-empty string or number")
    return str(value).strip()


def _csv_rows(path: Path) -> Iterator[LabelledPicture]:
    with path.open(newline="", encoding="utf-8-sig") as file:
        rows = [
            (n, row) for n, row in enumerate(csv.reader(file), 1) if any(c.strip() for c in row)
        ]
    keys: Sequence[str] = ("label",)
    if rows and rows[0][1][0].strip().lower() == "path":
        keys = [c.strip() for c in rows[0][1][1:]]
        rows = rows[1:]
        if not keys or not all(keys) or len(set(keys)) != len(keys):
            raise InvalidRequestError(f"{path}: the header needs distinct label column names")
    for n, row in rows:
        where = f"{path}, line {n}"
        if len(row) != len(keys) + 1:
            raise InvalidRequestError(
                f"{where}: expected {len(keys) + 1} columns (path, {', '.join(keys)}), "
                f"found {len(row)}"
            )
        if len(keys) == 1:
            yield _picture(path.parent, where, row[0], row[1], {})
        else:
            yield _picture(path.parent, where, row[0], None, dict(zip(keys, row[1:], strict=True)))


def _jsonl_rows(path: Path) -> Iterator[LabelledPicture]:
    with path.open(encoding="utf-8-sig") as file:
        for n, line in enumerate(file, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise InvalidRequestError(f"{where}: not JSON ({exc})") from None
            if not isinstance(item, dict):
                raise InvalidRequestError(f"{where}: expected an object with path and label")
            labels = item.get("labels", {})
            if not isinstance(labels, dict):
                raise InvalidRequestError(f"{where}: labels must be an object")
            yield _picture(path.parent, where, item.get("path"), item.get("label"), labels)
