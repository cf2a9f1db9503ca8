"""Answers other than 200, in the shape of the protocol of the route that gives them.

OpenAI's routes answer ``{"error": {"message", "type", "param", "code"}}``, Ollama's
(``/api/...``) ``{"error": "message"}``; :func:`library_error` maps what the chat
raised to a status and a message. A 500 names the failure and nothing of its
exception: the traceback goes to the server's log, once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...errors import (
    ContextOverflowError,
    ImageError,
    InvalidRequestError,
    LlavaLocalError,
    SchemaError,
)
from ...protocols import ollama, openai

if TYPE_CHECKING:
    from starlette.responses import Response

log = logging.getLogger("llava_local.serve")


class ApiError(Exception):
    """An answer other than 200, shaped by the protocol of the route that raised it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self, path: str) -> dict[str, Any]:
        if is_ollama(path):
            return ollama.ErrorBody(error=self.message).model_dump()
        detail = openai.ErrorDetail(
            message=self.message, type=self.kind, param=self.param, code=self.code
        )
        return openai.ErrorBody(error=detail).model_dump()

    def response(self, path: str) -> Response:
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(path), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client closed the connection; nothing is left to answer."""


def is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def library_error(exc: LlavaLocalError, param: str | None = None) -> ApiError:
    """The HTTP answer for an error the chat raised."""
    if isinstance(exc, ContextOverflowError):
        return ApiError(
            400,
            f"the conversation is {exc.needed} tokens with room to answer, and this "
            f"server's context window holds {exc.available}: send a shorter conversation "
            "or fewer pictures, or restart the server with a larger --n-ctx",
            code="context_length_exceeded",
            param="messages",
        )
    if isinstance(exc, ImageError):
        return ApiError(400, str(exc), code="invalid_image", param=param)
    if isinstance(exc, InvalidRequestError):
        return ApiError(400, str(exc), param=param)
    if isinstance(exc, SchemaError):
        log.error("the answer does not fit the request's schema: %s", exc)
        return ApiError(
            500,
            "the model's answer does not fit the requested JSON schema (the grammar "
            "could not carry all of the schema, such as a pattern it leaves out); "
            "simplify the schema",
            kind="server_error",
            code="schema",
        )
    log.error("the engine failed", exc_info=exc)
    return ApiError(
        500, "the engine failed while answering; the server's log says why", kind="server_error"
    )
