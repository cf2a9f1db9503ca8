"""The public surface: exported names, the error tree, option validation."""

from __future__ import annotations

import builtins
import inspect

import pytest
from pydantic import BaseModel

import llava_local
from llava_local import (
    BackendTimeoutError,
    BackendUnavailableError,
    ContextOverflowError,
    ImageError,
    InvalidRequestError,
    LlavaLocalError,
    ModelNotFoundError,
    Options,
    Reply,
    SchemaError,
    Stats,
)
from llava_local import errors as errors_module
from llava_local.chat import _options
from llava_local.structured import json_schema, parse

from ..option_args import OptionArgs


def test_all_is_exactly_the_public_surface() -> None:
    """`__all__` lists every public name the package exports, and each one exists."""
    public = {
        name
        for name, value in vars(llava_local).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    } - {"version", "PackageNotFoundError"}
    assert set(llava_local.__all__) - {"__version__"} == public
    for name in llava_local.__all__:
        assert hasattr(llava_local, name)


def test_issue_names_are_importable() -> None:
    """The names the issue fixes import from the top-level package."""
    from llava_local import (  # noqa: F401
        BackendUnavailableError,
        ContextOverflowError,
        ImageError,
        LlavaLocalError,
        Message,
        ModelNotFoundError,
        Reply,
        VisionChat,
    )


def test_warnings_import_from_the_package_beside_the_errors() -> None:
    """The library's warnings (no picture, a saved conversation resuming cold) import from
    the top-level package, so `warnings.filterwarnings` and `pytest.warns` can name them."""
    from llava_local import ColdResumeWarning, NoPictureWarning
    from llava_local.persist import ColdResumeWarning as defined_in_persist

    assert ColdResumeWarning is defined_in_persist
    for warning in (ColdResumeWarning, NoPictureWarning):
        assert issubclass(warning, LlavaLocalError)
        assert issubclass(warning, UserWarning)


def test_every_error_has_one_root_and_a_builtin_parent() -> None:
    """Each library error derives from LlavaLocalError and from a builtin exception."""
    classes = [
        obj
        for obj in vars(errors_module).values()
        if isinstance(obj, type) and issubclass(obj, Exception) and obj is not LlavaLocalError
    ]
    assert len(classes) >= 12
    for cls in classes:
        assert issubclass(cls, LlavaLocalError), cls
        builtin_parents = [
            base
            for base in cls.__mro__[1:]
            if base.__module__ == "builtins" and base not in (Exception, BaseException, object)
        ]
        assert builtin_parents, f"{cls.__name__} resembles no builtin"


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (ImageError, ValueError),
        (BackendUnavailableError, ConnectionError),
        (BackendTimeoutError, TimeoutError),
        (ModelNotFoundError, LookupError),
        (InvalidRequestError, ValueError),
        (SchemaError, ValueError),
        (ContextOverflowError, ValueError),
    ],
)
def test_errors_subclass_the_builtin_they_resemble(cls: type, builtin: type) -> None:
    """`except ValueError` (and friends) keeps working for callers who don't know our types."""
    assert issubclass(cls, builtin)
    assert getattr(builtins, builtin.__name__) is builtin


def test_image_error_names_source_and_reason() -> None:
    """ImageError's message carries where the picture came from and what is wrong."""
    err = ImageError("cat.jpg", "empty file")
    assert "cat.jpg" in str(err)
    assert "empty file" in str(err)
    assert (err.source, err.reason) == ("cat.jpg", "empty file")


def test_misspelt_option_is_an_error_listing_valid_names() -> None:
    """A misspelt generation option fails loudly and says which names exist."""
    with pytest.raises(InvalidRequestError, match="max_tokens") as info:
        _options({"max_token": 5})
    assert "temperature" in str(info.value)


@pytest.mark.parametrize(
    "bad", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_tokens": 0}, {"top_k": -2}]
)
def test_out_of_range_options_are_refused(bad: dict[str, float]) -> None:
    """Values outside an option's range are refused before anything is sent."""
    with pytest.raises(InvalidRequestError):
        _options(bad)


def test_options_overlay_keeps_unset_fields() -> None:
    """Per-call options override chat defaults only where they are set."""
    base = Options(temperature=0.5, max_tokens=10)
    merged = base.overlay(Options.model_validate({"max_tokens": 3, "stop": "END"}))
    assert merged == Options(temperature=0.5, max_tokens=3, stop=("END",))


def test_typed_option_arguments_are_the_options_fields() -> None:
    """The tests' typed keyword arguments (tests/option_args.py) name exactly Options' fields."""
    assert set(OptionArgs.__annotations__) == set(Options.model_fields)


def test_reply_str_is_its_text() -> None:
    """str(reply) is the answer text."""
    reply = Reply(text="A cat.", model="m", backend="ollama", stats=Stats(prompt_tokens=3))
    assert str(reply) == "A cat."
    assert reply.stats.prompt_tokens == 3


def test_decode_rate_needs_decode_time() -> None:
    """The tokens-per-second figure exists only when there was decoding."""
    assert Stats().decode_tokens_per_s is None
    assert Stats(completion_tokens=10, decode_s=2.0).decode_tokens_per_s == 5.0


class Animal(BaseModel):
    name: str
    legs: int


def test_schema_from_pydantic_and_dict() -> None:
    """A pydantic model class becomes its JSON schema; a dict passes through."""
    assert json_schema(Animal)["properties"]["legs"]["type"] == "integer"
    raw = {"type": "object"}
    assert json_schema(raw) is raw
    with pytest.raises(InvalidRequestError):
        json_schema("not a schema")  # type: ignore[arg-type]


def test_parse_validates_against_the_model() -> None:
    """Valid JSON becomes a model instance; invalid JSON or a wrong shape is a SchemaError."""
    assert parse('{"name": "cat", "legs": 4}', Animal) == Animal(name="cat", legs=4)
    with pytest.raises(SchemaError, match="not valid JSON") as info:
        parse("{oops", Animal)
    assert info.value.text == "{oops"
    with pytest.raises(SchemaError, match="legs"):
        parse('{"name": "cat", "legs": "many"}', Animal)
    assert parse("[1, 2]", {"type": "array"}) == [1, 2]
