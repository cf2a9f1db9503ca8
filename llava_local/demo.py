"""The demo model shipped inside the package, so everything works offline on a fresh machine.

A tiny LLaVA-1.5-architecture model trained here on handwritten digits and drawn
shapes (see ``training/`` in the repository). It reads pictures for real, but it
only knows digits, shapes and colours.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import ModelNotFoundError

#: The name that selects the demo model: ``VisionChat(backend="llama_cpp", model="demo")``.
DEMO_NAME = "demo"


def _demo_lm() -> Path:
    """Where the demo's language model sits in this install (the projector is beside it)."""
    return Path(str(resources.files("llava_local") / "data" / "demo" / "demo-lm.gguf"))


def demo_paths() -> tuple[Path, Path]:
    """The demo's language model and projector files inside the installed package."""
    model = _demo_lm()
    mmproj = model.with_name("demo-mmproj.gguf")
    if not (model.is_file() and mmproj.is_file()):
        raise ModelNotFoundError(
            f"the bundled demo model is missing from {model.parent}; reinstall llava-local, "
            "or pass model= and mmproj= paths of a GGUF pair"
        )
    return model, mmproj


def is_demo(model: Path) -> bool:
    """Whether ``model`` is the bundled demo's language model (saved as ``"demo"``, so
    a conversation outlives the install it was made in)."""
    return model == _demo_lm()
