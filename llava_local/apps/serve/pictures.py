"""A request's conversation as it came, and reading its pictures.

Both protocols' messages become :class:`Wanted` (role, text, pictures not read yet).
:func:`download_all` then downloads the pictures given as http(s) URLs, when the
server allows them (:mod:`.downloads`), in the event loop and before the request
queues for the model; :func:`prepare_all` reads each picture from the request only (a
data URI, base64 text or those downloaded bytes; never a path on this machine),
within the size limit, and prepares it as the chat would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...errors import ImageError
from ...images import decode_base64, decode_data_uri, prepare
from ...types import Message, PreparedImage
from .downloads import Downloads, DownloadsBusyError
from .errors import ApiError, library_error
from .limits import Limits

Role = Literal["system", "user", "assistant"]

#: The roles of both protocols, as the chat knows them.
ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "user",  # a function's result, for the model to read as the user's words
}


@dataclass
class Picture:
    """A picture of a request, still as the client sent it."""

    where: str  # the request field, for error messages
    source: str  # data URI, http(s) URL or base64
    base64_only: bool = False  # Ollama's images: base64 text and nothing else
    downloaded: bytes | None = None  # an http(s) URL's body, once downloaded

    @property
    def is_url(self) -> bool:
        return not self.base64_only and self.source.strip()[:8].lower().startswith(
            ("http://", "https://")
        )


@dataclass
class Wanted:
    """One message as the request sent it: its pictures not read yet."""

    role: Role
    text: str
    pictures: list[Picture]


def wanted(i: int, role: str, text: str, pictures: list[Picture]) -> Wanted:
    """Message ``i`` of a request, checked: a role the chat knows, pictures only from
    the user."""
    known = ROLES.get(role)
    if known is None:
        raise ApiError(
            400,
            f"messages[{i}]: role {role!r} is not supported here "
            "(system, developer, user, assistant or tool)",
            param=f"messages[{i}].role",
        )
    if pictures and known != "user":
        raise ApiError(
            400, f"messages[{i}]: only user messages may bring pictures", param=f"messages[{i}]"
        )
    return Wanted(known, text, pictures)


def urls(wanted: list[Wanted]) -> list[Picture]:
    """The pictures given as http(s) URLs."""
    return [picture for item in wanted for picture in item.pictures if picture.is_url]


async def download_all(wanted: list[Wanted], downloads: Downloads) -> None:
    """Download the pictures given as http(s) URLs, one after the other (in the event
    loop: no thread, no place in the queue). 400 for a URL the server does not
    download, 503 when every download slot stays taken."""
    for picture in urls(wanted):
        if not downloads.limits.picture_urls:
            raise ApiError(
                400,
                f"{picture.where}: this server does not download pictures (picture URLs "
                "are off unless it is started with --picture-urls); send the picture as "
                "a data URI (data:image/png;base64,...) instead",
                code="invalid_image_url",
                param=picture.where,
            )
        try:
            picture.downloaded = await downloads.fetch(picture.source.strip())
        except ImageError as exc:
            raise ApiError(
                400, f"{picture.where}: {exc}", code="invalid_image_url", param=picture.where
            ) from None
        except DownloadsBusyError:
            limits = downloads.limits
            raise ApiError(
                503,
                f"the server is busy: all {limits.downloads} picture downloads stayed taken "
                f"for {limits.fetch_timeout:g} s; try again shortly, or send the picture "
                "as a data URI",
                kind="server_error",
                code="server_busy",
                headers={"Retry-After": str(limits.retry_after_s)},
            ) from None


def prepare_all(wanted: list[Wanted], limits: Limits, max_side: int) -> list[Message]:
    """The conversation with its pictures read and prepared (in a worker thread)."""
    messages = []
    for item in wanted:
        prepared: list[PreparedImage] = []
        for picture in item.pictures:
            try:
                prepared.append(prepare(_picture_bytes(picture, limits), max_side=max_side))
            except ImageError as exc:
                if picture.downloaded is not None:  # never echo what a URL sent back
                    raise ApiError(
                        400,
                        f"{picture.where}: what {_short(picture.source)} sent is not a "
                        "picture this server can read",
                        code="invalid_image",
                        param=picture.where,
                    ) from None
                raise library_error(exc, picture.where) from exc
        messages.append(Message(role=item.role, content=item.text, images=tuple(prepared)))
    return messages


def _picture_bytes(picture: Picture, limits: Limits) -> bytes:
    source = picture.source.strip()
    data: bytes | None
    if picture.downloaded is not None:
        data = picture.downloaded
    elif picture.base64_only:
        data = decode_base64(source)
        if data is None:
            raise ImageError("<base64 text>", "not valid base64")
    elif source[:5].lower() == "data:":
        data = decode_data_uri(source)
    else:
        url = " or an http(s) URL" if limits.picture_urls else ""
        raise ImageError(_short(source), f"pass a data: URI (data:image/png;base64,...){url}")
    if len(data) > limits.max_picture_bytes:
        raise ApiError(
            413,
            f"the picture at {picture.where} is {len(data)} bytes, more than this "
            f"server's limit of {limits.max_picture_bytes} (--max-picture-mb)",
            code="picture_too_large",
            param=picture.where,
        )
    if not data:
        raise ImageError("<empty>", "no data (0 bytes)")
    return data


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
