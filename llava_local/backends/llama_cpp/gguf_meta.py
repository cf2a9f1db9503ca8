"""Read GGUF headers before llama.cpp sees the files.

llama.cpp aborts the whole process on some wrong inputs (a projector whose width
does not match the model, a language model passed as the projector), and a native
crash cannot be caught afterwards. So the pair is checked here first, from the
files' metadata alone, with errors that say which file is wrong and how.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import ModelLoadError
from ...gguf_header import check_magic, read_gguf


def read(path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The metadata and the tensor shapes (GGUF order) of a GGUF file."""
    check_magic(path)
    header = read_gguf(path)
    return header.meta, {t.name: t.shape for t in header.tensors}


def check_pair(model: Path, mmproj: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check that ``model`` is a language model and ``mmproj`` its vision projector.

    Returns a short summary of each: the language model's ``architecture``,
    ``context_length`` and ``embedding_length``; the projector's ``image_size``,
    ``patch_size``, ``projector_type``, ``anyres`` and ``output_width``.
    """
    lm_meta, _ = read(model)
    mm_meta, mm_shapes = read(mmproj)
    lm_arch = str(lm_meta.get("general.architecture", ""))
    mm_arch = str(mm_meta.get("general.architecture", ""))
    if lm_arch == "clip":
        raise ModelLoadError(
            f"{model} is a vision projector (mmproj), not a language model; "
            "swap the model and mmproj arguments"
        )
    if mm_arch != "clip":
        raise ModelLoadError(
            f"{mmproj} is a language model ({mm_arch or 'unknown architecture'}), not a vision "
            "projector; pass the mmproj-*.gguf file that comes with the model as mmproj"
        )
    if not mm_meta.get("clip.has_vision_encoder", False):
        raise ModelLoadError(f"{mmproj} has no vision encoder; it cannot read pictures")
    lm = {
        "architecture": lm_arch,
        "name": str(lm_meta.get("general.name", "")),
        "context_length": _int(lm_meta.get(f"{lm_arch}.context_length")),
        "embedding_length": _int(lm_meta.get(f"{lm_arch}.embedding_length")),
    }
    out_width = _projector_width(mm_shapes)
    mm = {
        "image_size": _int(mm_meta.get("clip.vision.image_size")),
        "patch_size": _int(mm_meta.get("clip.vision.patch_size")),
        "projector_type": str(mm_meta.get("clip.projector_type", "")),
        "anyres": "clip.vision.image_grid_pinpoints" in mm_meta,
        "output_width": out_width,
    }
    if out_width and lm["embedding_length"] and out_width != lm["embedding_length"]:
        raise ModelLoadError(
            f"the projector {mmproj.name} makes {out_width}-wide embeddings but "
            f"{model.name} reads {lm['embedding_length']}-wide ones: they are not a pair; "
            "use the mmproj file published with this model"
        )
    return lm, mm


def _projector_width(shapes: dict[str, tuple[int, ...]]) -> int | None:
    # LLaVA's MLP projector ends in mm.2; GGUF lists the output width first.
    shape = shapes.get("mm.2.bias") or shapes.get("mm.2.weight")
    if shape and len(shape) == 1:
        return shape[0]
    if shape:
        return shape[-1] if len(shape) > 1 else None
    return None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None


def image_tokens(mm: dict[str, Any]) -> int | None:
    """Tokens one picture takes, when it is fixed (LLaVA-1.5: 576); None otherwise."""
    size, patch = mm.get("image_size"), mm.get("patch_size")
    if mm.get("projector_type") in ("mlp", "") and not mm.get("anyres") and size and patch:
        return int((size // patch) ** 2)
    return None


def image_size(mm: dict[str, Any]) -> int | None:
    """The encoder's input side in pixels, for fixed-size encoders."""
    return mm.get("image_size") if not mm.get("anyres") else None
