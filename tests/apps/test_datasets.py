"""Labelled picture sets: the built-in digits and shapes, folders, CSV and JSON Lines files."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from sklearn.datasets import load_digits

from llava_local import InvalidRequestError
from llava_local.apps import datasets as ds
from llava_local.apps.datasets import LabelledPicture, load_set
from training import data

from ..gguf_fixtures import png_bytes

# load_digits().target[1400:1797], counted once with scikit-learn
DIGIT_COUNTS = {0: 39, 1: 39, 2: 40, 3: 39, 4: 41, 5: 41, 6: 39, 7: 39, 8: 39, 9: 41}


def pixels(picture: LabelledPicture) -> np.ndarray:
    assert isinstance(picture.source, Image.Image)
    return np.asarray(picture.source)


# --- digits --------------------------------------------------------------------------


def test_digits_are_the_397_test_pictures_with_their_labels() -> None:
    """digits is sklearn's indices 1400-1796 with the test split's label distribution."""
    digits = load_set("digits")
    assert [p.name for p in digits] == [f"digits/{i}" for i in range(1400, 1797)]
    assert Counter(int(p.label) for p in digits) == DIGIT_COUNTS
    assert all(p.labels == {} for p in digits)


def test_digits_are_dark_ink_on_light_paper_at_64_px() -> None:
    """A digit is a 64 px RGB square of grey ink on white paper, blocky (nearest)."""
    first = pixels(load_set("digits", limit=1)[0])
    assert first.shape == (64, 64, 3)
    assert first.max() == 255
    assert first.min() < 64
    assert (first[..., 0] == first[..., 1]).all()
    assert len(np.unique(first[:8, :8].reshape(-1, 3), axis=0)) == 1  # one 8x8 source pixel
    assert np.median(first) == 255  # mostly paper


def test_the_data_file_holds_sklearns_test_split() -> None:
    """The shipped 8x8 values and labels equal load_digits() at indices 1400-1796."""
    reference = load_digits()
    images, labels, indices = ds._digits_data()
    assert indices.tolist() == list(range(1400, 1797))
    assert np.array_equal(images, reference.images[1400:].astype(np.uint8))
    assert np.array_equal(labels, reference.target[1400:])


def test_digits_size_and_resampling_can_be_chosen() -> None:
    """size and resample change the rendering; the same choice gives the same pixels."""
    nearest = load_set("digits", limit=3, size=28)
    smooth = load_set("digits", limit=3, size=28, resample="bilinear")
    assert pixels(nearest[0]).shape == (28, 28, 3)
    assert not np.array_equal(pixels(nearest[0]), pixels(smooth[0]))
    again = load_set("digits", limit=3, size=28, resample="bilinear")
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(smooth, again, strict=True))


def test_varied_digits_are_seeded() -> None:
    """vary draws sizes 8-512 per picture, the same for one seed, others for another."""
    sizes = [pixels(p).shape[:2] for p in load_set("digits", vary=True, limit=40)]
    assert len(set(sizes)) > 10
    assert all(8 <= w == h <= 512 for w, h in sizes)
    same = [pixels(p).shape[:2] for p in load_set("digits", vary=True, limit=40)]
    other = [pixels(p).shape[:2] for p in load_set("digits", vary=True, seed=1, limit=40)]
    assert same == sizes
    assert other != sizes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 4}, "8 to 512"),
        ({"resample": "sinc"}, "unknown resampling"),
        ({"vary": True, "size": 64}, "leave size"),
        ({"seed": 3}, "vary=True"),
        ({"limit": 0}, "positive"),
    ],
)
def test_bad_digit_options_are_refused(kwargs: dict[str, object], message: str) -> None:
    """Rendering options that make no sense are refused with a reason."""
    with pytest.raises(InvalidRequestError, match=message):
        load_set("digits", **kwargs)  # type: ignore[arg-type]


# --- shapes --------------------------------------------------------------------------


def test_shapes_are_balanced_and_labelled_with_shape_and_colour() -> None:
    """300 shapes: every shape/colour pair 10 times, all 30 pairs in the first 30."""
    shapes = load_set("shapes")
    pairs = [(p.labels["shape"], p.labels["colour"]) for p in shapes]
    assert len(shapes) == 300
    assert set(Counter(pairs).values()) == {10}
    assert len(set(pairs[:30])) == 30
    assert {s for s, _ in pairs} == set(ds.SHAPES)
    assert {c for _, c in pairs} == set(ds.COLOURS)
    assert all(p.label == p.labels["shape"] for p in shapes)


def test_shapes_are_deterministic_and_seeded() -> None:
    """Two loads give identical pixels; another seed draws other pictures."""
    first, second = load_set("shapes", limit=30), load_set("shapes", limit=30)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(first, second, strict=True))
    other = load_set("shapes", limit=30, seed=7)
    assert not all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(first, other, strict=True))


def test_shapes_refuse_digit_rendering_options() -> None:
    """size, resample and vary are for digits only."""
    with pytest.raises(InvalidRequestError, match="digits set only"):
        load_set("shapes", size=64)


def test_the_shapes_set_is_drawn_as_training_draws_shapes() -> None:
    """The built-in shapes are training's drawing from the set's own seed, in order, and
    the set's default questions are ones the demo was trained on."""
    assert ds.SHAPE_PROMPT in data.SHAPE_QUESTIONS_TRAIN
    assert ds.COLOUR_PROMPT in data.COLOUR_QUESTIONS_TRAIN
    rng = np.random.default_rng(ds.SHAPES_SEED)
    for picture in load_set("shapes", limit=30):
        spec = data.ShapeSpec(picture.labels["shape"], picture.labels["colour"])
        assert np.array_equal(pixels(picture), np.asarray(data.random_shape_picture(spec, rng)))


def test_default_prompts() -> None:
    """digits asks the trained question then the held-out ones; shapes a shape and a colour."""
    assert ds.default_prompts("digits") == (ds.DIGIT_PROMPT, *ds.DIGIT_PROMPTS_HELD_OUT)
    assert len(ds.default_prompts("digits")) == 11
    assert ds.default_prompts("shapes") == ("What shape is this?", "What colour is it?")
    with pytest.raises(InvalidRequestError):
        ds.default_prompts("pets")


# --- your own sets -------------------------------------------------------------------


@pytest.fixture
def pets(tmp_path: Path) -> Path:
    """cat (3 pictures), dog (1), bird (2), plus things that are not pictures of a class."""
    root = tmp_path / "pets"
    for kind, count in (("cat", 3), ("dog", 1), ("bird", 2)):
        (root / kind).mkdir(parents=True)
        for i in range(count):
            (root / kind / f"{i}.png").write_bytes(png_bytes((16, 16), seed=i))
    (root / "cat" / "notes.txt").write_text("not a picture")
    (root / "cat" / ".hidden.png").write_bytes(png_bytes((16, 16)))
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(png_bytes((16, 16)))
    (root / "loose.png").write_bytes(png_bytes((16, 16)))
    (root / "bird" / "more").mkdir()
    (root / "bird" / "more" / "deep.png").write_bytes(png_bytes((16, 16), seed=9))
    return root


def test_a_folder_labels_pictures_by_their_sub_folder(pets: Path) -> None:
    """Each class sub-folder gives its pictures (recursively) that class, a class at a
    time in turn, ignoring hidden entries and loose files."""
    pictures = load_set(pets)
    assert [p.label for p in pictures] == ["bird", "cat", "dog", "bird", "cat", "bird", "cat"]
    assert Counter(p.label for p in pictures) == {"cat": 3, "bird": 3, "dog": 1}
    assert all(isinstance(p.source, Path) and p.source.parent.name != ".cache" for p in pictures)
    assert [p.label for p in load_set(str(pets), limit=3)] == ["bird", "cat", "dog"]


def test_a_folder_without_pictures_is_refused(tmp_path: Path) -> None:
    """A folder with no class sub-folders holding pictures is an error, not an empty set."""
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(InvalidRequestError, match="no labelled pictures"):
        load_set(tmp_path / "empty")


def test_a_csv_of_path_and_label(tmp_path: Path) -> None:
    """CSV rows are path,label with or without a header; paths are relative to the file."""
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "img" / name).write_bytes(png_bytes((16, 16)))
    (tmp_path / "plain.csv").write_text("img/a.png,cat\n\nimg/b.png, dog \n")
    (tmp_path / "header.csv").write_text("path,label\nimg/a.png,cat\nimg/b.png,dog\n")
    for name in ("plain.csv", "header.csv"):
        pictures = load_set(tmp_path / name)
        assert [(p.source, p.label, p.labels) for p in pictures] == [
            (tmp_path / "img" / "a.png", "cat", {}),
            (tmp_path / "img" / "b.png", "dog", {}),
        ]


def test_a_csv_header_can_give_several_labels(tmp_path: Path) -> None:
    """A header path,shape,colour gives each picture both labels, the first the main one."""
    (tmp_path / "a.png").write_bytes(png_bytes((16, 16)))
    (tmp_path / "set.csv").write_text("path,shape,colour\na.png,star,red\n")
    (picture,) = load_set(tmp_path / "set.csv")
    assert picture.label == "star"
    assert picture.labels == {"shape": "star", "colour": "red"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.png,cat,extra\n", "line 1: expected 2 columns"),
        ("a.png,\n", "line 1: the label must be a non-empty"),
        (
            "path,label\na.png,cat\nmissing.png,dog\n",
            "1 picture listed in .* does not exist: .*missing.png",
        ),
        ("path,shape,shape\na.png,x,y\n", "distinct label column names"),
    ],
)
def test_bad_csv_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    """A malformed row or a missing picture names the file and the line."""
    (tmp_path / "a.png").write_bytes(png_bytes((16, 16)))
    (tmp_path / "set.csv").write_text(text)
    with pytest.raises(InvalidRequestError, match=message):
        load_set(tmp_path / "set.csv")


def test_a_jsonl_of_path_and_label(tmp_path: Path) -> None:
    """JSONL objects carry a label, labels of several kinds, or both; numbers are text."""
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(png_bytes((16, 16)))
    lines = [
        {"path": "a.png", "label": 7},
        {"path": "b.png", "labels": {"shape": "star", "colour": "red"}},
        {
            "path": str(tmp_path / "c.png"),
            "label": "red",
            "labels": {"shape": "x", "colour": "red"},
        },
    ]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    a, b, c = load_set(tmp_path / "set.jsonl")
    assert (a.label, a.labels) == ("7", {})
    assert (b.label, b.labels) == ("star", {"shape": "star", "colour": "red"})
    assert (c.source, c.label) == (tmp_path / "c.png", "red")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "line 1: not JSON"),
        ('["a.png", "cat"]', "expected an object"),
        ('{"path": "a.png"}', "no label"),
        ('{"path": "a.png", "label": true}', "non-empty string or number"),
        ('{"label": "cat"}', "the path must be"),
        ('{"path": "a.png", "labels": ["cat"]}', "labels must be an object"),
        ('{"path": "a.png", "label": "dog", "labels": {"kind": "cat"}}', "not one of the labels"),
    ],
)
def test_bad_jsonl_files_are_refused(tmp_path: Path, line: str, message: str) -> None:
    """A malformed line names the file and the line."""
    (tmp_path / "a.png").write_bytes(png_bytes((16, 16)))
    (tmp_path / "set.jsonl").write_text(line + "\n")
    with pytest.raises(InvalidRequestError, match=message):
        load_set(tmp_path / "set.jsonl")


def test_other_paths_are_refused(tmp_path: Path) -> None:
    """A missing path or a file of another kind is refused; seed is for built-ins only."""
    with pytest.raises(InvalidRequestError, match="no such file or folder"):
        load_set(tmp_path / "nope")
    (tmp_path / "set.txt").write_text("a.png cat\n")
    with pytest.raises(InvalidRequestError, match="not a labelled set"):
        load_set(tmp_path / "set.txt")
    with pytest.raises(InvalidRequestError, match="built-in sets only"):
        load_set(tmp_path, seed=1)


def test_a_labelled_picture_checks_its_labels() -> None:
    """The main label must be one of the labels, and label_for names what is missing."""
    with pytest.raises(ValidationError):
        LabelledPicture(name="x", source=Path("x.png"), label="dog", labels={"kind": "cat"})
    picture = LabelledPicture(name="x", source=Path("x.png"), label="cat")
    assert picture.label_for(None) == "cat"
    with pytest.raises(InvalidRequestError, match="no 'colour' label"):
        picture.label_for("colour")


def test_training_pairs_draw_one_digit_twice() -> None:
    """The blocky/smooth training pairs show the same 8x8 grid (the feature loss that
    pulls one to the other would teach nonsense otherwise)."""
    values, _ = ds._digits_data()[:2]
    rng = np.random.default_rng(0)

    def grid(image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), float)

    same, other = [], []
    for i in range(40):  # whole-factor blocky pictures: box-averaging gives the grid back
        blocky, smooth = data.paired_renders(values[i].astype(np.float32), rng, p_any=0.0)
        same.append(np.corrcoef(grid(blocky).ravel(), grid(smooth).ravel())[0, 1])
        _, unrelated = data.paired_renders(values[i + 1].astype(np.float32), rng)
        other.append(np.corrcoef(grid(blocky).ravel(), grid(unrelated).ravel())[0, 1])
    assert min(same) > 0.95 > max(other)
    sizes = {data.paired_renders(values[0], rng)[0].size[0] for _ in range(40)}
    assert len(sizes) > 10  # by default blocky pictures also come at any size and filter


def test_held_out_questions_stay_unseen() -> None:
    """No training question is a held-out one or within one word of a held-out shape or
    colour question, and no shape question names a colour."""
    trained = (
        data.DIGIT_QUESTIONS_TRAIN
        + data.GENERIC_QUESTIONS_TRAIN
        + data.SHAPE_QUESTIONS_TRAIN
        + data.COLOUR_QUESTIONS_TRAIN
        + data.DESCRIBE_SHAPE_QUESTIONS_TRAIN
    )
    held_out = (
        data.DIGIT_QUESTIONS_HELD_OUT
        + data.SHAPE_QUESTIONS_HELD_OUT
        + data.COLOUR_QUESTIONS_HELD_OUT
    )
    assert not set(trained) & set(held_out)
    for question in data.SHAPE_QUESTIONS_TRAIN + data.COLOUR_QUESTIONS_TRAIN:
        for unseen in data.SHAPE_QUESTIONS_HELD_OUT + data.COLOUR_QUESTIONS_HELD_OUT:
            assert data._word_distance(question, unseen) > 1, (question, unseen)
    assert data._word_distance("What colour is the shape?", "What color is the shape?") == 1
    colour_word = re.compile(r"colou?r", re.IGNORECASE)
    assert not any(colour_word.search(q) for q in data.SHAPE_QUESTIONS_TRAIN)
    assert all(colour_word.search(q) for q in data.COLOUR_QUESTIONS_TRAIN)
