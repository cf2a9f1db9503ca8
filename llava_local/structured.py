"""Structured answers: a pydantic model or JSON schema in, a validated object out."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import InvalidRequestError, SchemaError

Schema = type[BaseModel] | dict[str, Any]


def json_schema(schema: Schema) -> dict[str, Any]:
    """The JSON schema the engine must follow (Ollama ``format``, llama.cpp grammar)."""
    if isinstance(schema, dict):
        return schema
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_json_schema()
    raise InvalidRequestError(
        f"schema must be a pydantic model class or a JSON schema dict, not {type(schema).__name__}"
    )


def parse(text: str, schema: Schema) -> Any:
    """The answer as an object: a model instance, or plain JSON data for a dict schema."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"the answer is not valid JSON ({exc.msg} at {exc.pos})", text) from exc
    if isinstance(schema, dict):
        return data
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise SchemaError(
            f"the answer does not fit {schema.__name__}: {exc.error_count()} error(s): "
            + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()),
            text,
        ) from exc
