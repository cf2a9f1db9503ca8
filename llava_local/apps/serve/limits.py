"""What one request may bring, and how many requests may wait for the model."""

from __future__ import annotations

from dataclasses import dataclass

MB = 2**20


@dataclass(frozen=True)
class Limits:
    """What one request may bring, and how many may wait for the model.

    ``picture_urls=False`` refuses ``image_url`` parts that are http(s) URLs (400, send
    a data URI instead): the server would fetch them itself, which lets anyone who can
    reach it make requests from its network (request forgery) once it is exposed beyond
    127.0.0.1."""

    max_body_bytes: int = 64 * MB
    max_picture_bytes: int = 20 * MB
    queue: int = 8
    fetch_timeout: float = 15.0
    retry_after_s: int = 2
    picture_urls: bool = True
