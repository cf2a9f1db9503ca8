"""The web page's picture box: it takes only a picture already uploaded to the page.

Gradio's ``gr.Image`` takes more than that in a call of the page's handlers
(``respond``, the upload event), and pays for it before any handler of ours runs:

* a ``data:`` URL as the picture's ``url``: its ``preprocess`` decodes it in full with
  Pillow and saves it again in its upload folder. A 20 KB PNG declaring 13000x13000
  pixels took the page's process from 0.2 to 2 GB of memory, for seconds, and left a
  file behind; the request was within the upload limits (:mod:`.ui_uploads`), which
  bound bytes, not pixels;
* an http(s) URL as its ``path``: Gradio downloads it (``safehttpx``, public hosts only)
  whole into memory, of any size, and stores it, before ``preprocess``.

The page itself sends neither, only the path of a file it uploaded through the upload
route, which the upload limits bound. So :class:`Picture` refuses both with an error
that says what to send instead (the URL before anything is fetched, through the
component's own ``async_move_resource_to_block_cache``), and passes an uploaded file's
path on unopened (``type="filepath"``; Gradio's own ``preprocess`` would open it): the
one decode is the engine's, by :func:`llava_local.images.prepare`, which refuses from
its header a picture over its pixel and memory limits (``MAX_PIXELS``,
``MAX_DECODED_BYTES``).

Imported only by :func:`.ui.build_app`, once Gradio is (with its telemetry off).
"""

from __future__ import annotations

from abc import ABCMeta
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.component_meta import ComponentMeta
from gradio.data_classes import ImageData

from .ui_uploads import NO_DATA_URL, NO_PICTURE_URL, NOT_UPLOADED

__all__ = ["Picture"]


class _NoStub(ComponentMeta):
    """Gradio's metaclass of components, less its side effect: defining a component
    class makes Gradio write a type stub (``.pyi``, for its custom-component tooling)
    beside the class's source file, here into llava_local's own folder, where it would
    go stale and hide the module from type checkers. All else it does concerns a class
    that defines ``__init__`` or ``EVENTS``, which one made with this may not."""

    def __new__(mcls, name: str, bases: tuple[type, ...], attrs: dict[str, Any]) -> _NoStub:
        if "__init__" in attrs or "EVENTS" in attrs:
            raise TypeError(f"{name} defines __init__ or EVENTS: it needs ComponentMeta")
        return ABCMeta.__new__(mcls, name, bases, attrs)


class Picture(gr.Image, metaclass=_NoStub):
    """``gr.Image`` (the same box on the page: a Gradio template) whose handlers get the
    path of a file uploaded to the page, and nothing else: see the module's docstring.
    Made with ``type="filepath"``; the handler reads the file through the engine."""

    is_template = True  # drawn by Gradio's own Image component

    def preprocess(self, payload: ImageData | None) -> str | None:
        """The uploaded file's path, unopened; a data: URL or a file from elsewhere is
        refused (``gr.Error``: the caller is told why, the handler never runs)."""
        if payload is None:
            return None
        if (payload.url or "").lstrip().lower().startswith("data:"):
            raise gr.Error(NO_DATA_URL)
        if payload.path is None or not _inside(payload.path, self.GRADIO_CACHE):
            raise gr.Error(NOT_UPLOADED)
        return str(payload.path)

    async def async_move_resource_to_block_cache(
        self, url_or_file_path: str | Path | None
    ) -> str | None:
        """Gradio's step before ``preprocess`` (it downloads a URL here): a URL is
        refused before it is fetched, a file goes on as Gradio moves it."""
        _refuse_address(url_or_file_path)
        return await super().async_move_resource_to_block_cache(url_or_file_path)

    def move_resource_to_block_cache(self, url_or_file_path: str | Path | None) -> str | None:
        """The same step where Gradio takes it synchronously."""
        _refuse_address(url_or_file_path)
        return super().move_resource_to_block_cache(url_or_file_path)


def _refuse_address(given: Any) -> None:
    if isinstance(given, str) and given.lstrip().lower().startswith(("http://", "https://")):
        raise gr.Error(NO_PICTURE_URL)


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is a file in ``folder`` (Gradio's upload folder) or under it."""
    try:
        return Path(path).resolve().is_relative_to(Path(folder).resolve())
    except (OSError, ValueError):
        return False
