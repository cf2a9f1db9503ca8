"""What an upload to the web page (``llava-local ui``) may cost, and how long it is kept.

Gradio writes every file sent to its upload route (the page's picture, uploaded, pasted
or taken with the webcam, goes there first) into its upload folder (``GRADIO_TEMP_DIR``,
by default ``gradio`` in the system's temporary folder, often a RAM disk) before any
handler of ours sees it, with no size limit unless told one, and takes up to 1000 files
in one request. So:

* each file may be at most ``max_picture_mb`` (``--max-picture-mb``, 20 as for
  ``serve``), Gradio's ``max_file_size``: the page refuses a bigger picture before
  sending it, and the upload route answers 413 and deletes what it had written;
* a request's whole body may be at most that plus :data:`BODY_SLACK` (one picture's
  multipart headers, or a handler's JSON call): :class:`LimitBody` answers 413 from
  its ``Content-Length`` before a byte of it is read, so several pictures in one
  request cost no more than one; a body of unannounced length (chunked) gets 411: it
  could only be cut off part-way, and Gradio keeps the part it has written of a
  request cut off (browsers never send one);
* what the page stored is deleted when it stops, and while it runs once it is a week
  old (Gradio's ``delete_cache``, :data:`DELETE_CACHE`; a tab left open that long
  loses its pictures).

A connection broken in the middle of an upload still leaves Gradio's part-written file
(at most the limit) in the upload folder, where the system's cleaning of its temporary
folder finds it.

A picture must come this way: the picture box (:mod:`.ui_picture`) takes no picture
sent inside a handler's call as a ``data:`` or http(s) URL, which Gradio would decode
or download before any limit here applies; :data:`NO_DATA_URL`, :data:`NO_PICTURE_URL`
and :data:`NOT_UPLOADED` are what such a call is told.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from ..errors import InvalidRequestError
from ..wording import count
from .ui_access import send_text

if TYPE_CHECKING:
    from starlette.middleware import Middleware
    from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "BODY_SLACK",
    "DELETE_CACHE",
    "MAX_PICTURE_MB",
    "NOT_UPLOADED",
    "NO_DATA_URL",
    "NO_PICTURE_URL",
    "LimitBody",
    "UploadLimits",
    "upload_limits",
]

MB = 2**20
#: The default largest picture, in MB: ``serve``'s default too.
MAX_PICTURE_MB = 20.0
#: What a request may bring beyond one picture: multipart headers, a handler's JSON call.
BODY_SLACK = MB
#: Gradio's ``delete_cache``: every hour, delete stored files a week old (all at the end).
DELETE_CACHE = (3600, 7 * 86400)

#: How a client gives the page a picture: what each refusal of another way ends with.
_UPLOAD_FIRST = (
    "upload the file first (POST it to /gradio_api/upload, as the page does; "
    "gradio_client's handle_file() does it for a path) and send the path it returns"
)
NO_DATA_URL = f"this page takes no picture sent as a data: URL: {_UPLOAD_FIRST}"
NO_PICTURE_URL = f"this page downloads no picture from an address: {_UPLOAD_FIRST}"
NOT_UPLOADED = f"that picture was not uploaded to this page: {_UPLOAD_FIRST}"


class UploadLimits(NamedTuple):
    """What bounds uploads: Gradio ``launch()``'s ``max_file_size`` (bytes), and
    :class:`LimitBody` for its ``app_kwargs`` middleware."""

    max_file_size: int
    middleware: Middleware


def upload_limits(max_picture_mb: float) -> UploadLimits:
    """The limits for pictures of up to ``max_picture_mb`` MB."""
    if not max_picture_mb > 0:
        raise InvalidRequestError(
            f"the largest picture must be more than 0 MB, not {max_picture_mb}"
        )
    from starlette.middleware import Middleware

    picture = max(1, int(max_picture_mb * MB))
    body = Middleware(LimitBody, limit=picture + BODY_SLACK, max_picture_mb=max_picture_mb)
    return UploadLimits(picture, body)


class LimitBody:
    """413 for a request whose ``Content-Length`` is over ``limit``, 411 for one whose
    body has no announced length, before the body is read; both in plain text naming
    ``--max-picture-mb``. The server (uvicorn) passes on no more of a body than its
    ``Content-Length``, so that is all a request can cost."""

    def __init__(self, app: ASGIApp, limit: int, max_picture_mb: float) -> None:
        self.app = app
        self.limit = limit
        self.max_picture_mb = max_picture_mb

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) <= self.limit:
            await self.app(scope, receive, send)
        elif declared.isdigit():
            await send_text(
                send,
                413,
                f"the request body is {count(int(declared), 'byte')}, more than this page takes: "
                f"pictures of up to {self.max_picture_mb:g} MB (llava-local ui "
                "--max-picture-mb); send a smaller picture",
            )
        elif b"transfer-encoding" in headers:
            await send_text(
                send,
                411,
                "send the request body with a Content-Length header: this page takes "
                "no body of unknown length",
            )
        else:  # no body
            await self.app(scope, receive, send)
