"""What one request may bring, how many requests may wait for the model, and which
picture URLs the server downloads."""

from __future__ import annotations

from dataclasses import dataclass

MB = 2**20


@dataclass(frozen=True)
class Limits:
    """What one request may bring, and how many may wait for the model.

    Picture URLs are off by default: the server would fetch them itself, which lets
    anyone who can reach it make requests from its network (request forgery).
    ``picture_urls=True`` downloads http(s) URLs whose name resolves to public
    addresses only (never loopback, private, link-local, multicast, reserved or
    unspecified ones; every redirect is checked again); ``picture_url_allow`` names
    ``HOST`` or ``HOST:PORT`` entries exempt from that check (an internal picture
    host). Each download may take ``fetch_timeout`` seconds in all, and at most
    ``downloads`` run at once; they never hold a place in the queue."""

    max_body_bytes: int = 64 * MB
    max_picture_bytes: int = 20 * MB
    queue: int = 8
    fetch_timeout: float = 15.0
    retry_after_s: int = 2
    picture_urls: bool = False
    picture_url_allow: tuple[str, ...] = ()
    downloads: int = 4
    max_json_depth: int = 64
