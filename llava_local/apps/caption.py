"""The one-machine caption job, kept under its old name: it lives in
:mod:`llava_local.apps.captioning` (which documents the line format and resuming)."""

from __future__ import annotations

from .captioning import (
    PICTURE_EXTENSIONS,
    CaptionJob,
    CaptionSummary,
    caption,
    find_pictures,
    read_captions,
    read_prompts,
)

__all__ = [
    "PICTURE_EXTENSIONS",
    "CaptionJob",
    "CaptionSummary",
    "caption",
    "find_pictures",
    "read_captions",
    "read_prompts",
]
