"""Reading a request's body: one JSON object within the size and nesting limits, sent
as ``application/json``, then the protocol's pydantic model; each failure a 400, 413 or
415 in the protocol's shape.

Only JSON bodies are read because a web page may send a cross-origin POST of a
``text/plain`` body without asking the browser first (no CORS preflight): such a
request would start turns and downloads through a visitor's browser. A JSON body is
always preflighted, and the preflight is refused unless ``--cors`` allows the page.
A body sent with no ``Content-Type`` at all (litellm's ``ollama/`` provider does so;
Ollama reads it) is read as JSON only from a request without an ``Origin`` header:
a browser sends ``Origin`` with every POST (a page can POST a body without a type,
unpreflighted), programs do not."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import ApiError
from .limits import Limits

if TYPE_CHECKING:
    from starlette.requests import Request
else:
    try:  # FastAPI reads the routes' annotations at run time, from the protocol modules
        from starlette.requests import Request
    except ImportError:  # without the [serve] extra; create_app() says what to install
        Request = None

__all__ = ["Request", "read_json", "read_request"]

Model = TypeVar("Model", bound=BaseModel)


async def read_json(request: Request, limits: Limits) -> dict[str, Any]:
    """The request's JSON object, refusing bodies that are not JSON, or over the size
    limit, before reading them, and bodies nested deeper than the limit."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    untyped_program = not kind and "origin" not in request.headers  # not a browser
    if kind != "application/json" and not untyped_program:
        raise ApiError(
            415,
            f"the request body must be JSON sent with 'Content-Type: application/json', "
            f"not {kind or 'no Content-Type'!r}",
            code="unsupported_media_type",
        )
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)
    try:
        data = json.loads(body)
    except RecursionError:
        raise _too_deep(limits) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(
            400, f"the request body is not valid JSON ({exc}); send a JSON object"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    if _deeper_than(data, limits.max_json_depth):
        raise _too_deep(limits)
    return data


async def read_request(request: Request, limits: Limits, model: type[Model]) -> Model:
    """The request's body as ``model``, or a 400 naming the first fields that do not fit."""
    data = await read_json(request, limits)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise ApiError(400, f"invalid request ({problems})", param=where or None) from None


def _deeper_than(data: Any, limit: int) -> bool:
    """Whether ``data`` nests dicts and lists more than ``limit`` deep (no recursion)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _too_deep(limits: Limits) -> ApiError:
    return ApiError(
        400,
        f"the request body nests JSON objects and arrays more than this server's limit of "
        f"{limits.max_json_depth} levels deep; send a flatter body",
        code="too_deep",
    )


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is {size} bytes, more than this server's limit of {limit} "
        "(--max-body-mb); send smaller pictures",
        code="request_too_large",
    )
