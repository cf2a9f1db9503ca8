"""The caption job on Ray, kept under its old name: it lives in
:mod:`llava_local.apps.captioning` (:mod:`~llava_local.apps.captioning.on_ray`)."""

from __future__ import annotations

from .captioning import MAX_WORKER_DEATHS, caption_ray, local_cpus_needed

__all__ = ["MAX_WORKER_DEATHS", "caption_ray", "local_cpus_needed"]
