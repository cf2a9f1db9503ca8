"""A request's conversation as it came, and reading its pictures.

Both protocols' messages become :class:`Wanted` (role, text, pictures not read yet);
:func:`prepare_all` then reads each picture from the request only (a data URI, base64
text or, unless :attr:`Limits.picture_urls` is off, an http(s) URL; never a path on
this machine), within the size limit, and prepares it as the chat would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ...errors import ImageError
from ...images import decode_base64, decode_data_uri, fetch_url, prepare
from ...types import Message, PreparedImage
from .errors import ApiError, library_error
from .limits import Limits

Role = Literal["system", "user", "assistant"]

#: The roles of both protocols, as the chat knows them.
ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}


@dataclass
class Picture:
    """A picture of a request, still as the client sent it."""

    where: str  # the request field, for error messages
    source: str  # data URI, http(s) URL or base64
    base64_only: bool = False  # Ollama's images: base64 text and nothing else


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
            "(system, developer, user or assistant)",
            param=f"messages[{i}].role",
        )
    if pictures and known != "user":
        raise ApiError(
            400, f"messages[{i}]: only user messages may bring pictures", param=f"messages[{i}]"
        )
    return Wanted(known, text, pictures)


def prepare_all(wanted: list[Wanted], limits: Limits, max_side: int) -> list[Message]:
    """The conversation with its pictures read and prepared (in a worker thread)."""
    messages = []
    for item in wanted:
        prepared: list[PreparedImage] = []
        for picture in item.pictures:
            try:
                prepared.append(prepare(_picture_bytes(picture, limits), max_side=max_side))
            except ImageError as exc:
                raise library_error(exc, picture.where) from exc
        messages.append(Message(role=item.role, content=item.text, images=tuple(prepared)))
    return messages


def _picture_bytes(picture: Picture, limits: Limits) -> bytes:
    source = picture.source.strip()
    kind = source[:8].lower()
    if picture.base64_only:
        data = decode_base64(source)
        if data is None:
            raise ImageError("<base64 text>", "not valid base64")
    elif kind.startswith("data:"):
        data = decode_data_uri(source)
    elif kind.startswith(("http://", "https://")):
        if not limits.picture_urls:
            raise ApiError(
                400,
                f"{picture.where}: this server does not download pictures (it runs with "
                "--no-picture-urls); send the picture as a data URI "
                "(data:image/png;base64,...) instead",
                code="invalid_image_url",
                param=picture.where,
            )
        data = fetch_url(source, max_bytes=limits.max_picture_bytes, timeout=limits.fetch_timeout)
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
