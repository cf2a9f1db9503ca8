"""Write ``llava_local/data/probe-q4_0.gguf``: the tiny quantized model `doctor` runs.

``llava-local doctor`` judges the installed llama.cpp build by loading a quantized model
in a subprocess and evaluating a few tokens: a build compiled with ``-march=native`` on a
CPU that reports AMX but forbids it dies there with SIGSEGV. The model ships with the
package, so the check runs in a runtime install, which has no ``gguf`` package to write
one. Run once from the repository root (needs the development package, ``dev/``)::

    python scripts/make_probe_model.py [OUT]

One llama block, 64 wide (two heads of 32), FFN 128, the byte vocabulary; its matrices
are Q4_0 (``output.weight`` Q8_0, llava_local_dev.gguf_writer's rule for Q4_0 files whose
rows are not a multiple of 256). Every width is a multiple of 32, as ggml's quantized
matrix products need, and the prompt the doctor evaluates is a batch of ~40 tokens,
so both the batched and the single-token products run. The weights are drawn from a
fixed seed: the file is byte-for-byte reproducible, which ``tests/apps/test_doctor.py``
checks against the shipped copy.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llava_local_dev import gguf_writer

OUT = Path(__file__).resolve().parents[1] / "llava_local" / "data" / "probe-q4_0.gguf"
CONFIG = gguf_writer.TextConfig(n_embd=64, n_layer=1, n_ff=128, n_head=2, context_length=128)


def write(path: Path) -> Path:
    """Write the probe model to ``path``."""
    return gguf_writer.write_language_model(
        path, CONFIG, dtype="q4_0", name="llava-local build probe", seed=0
    )


def main(argv: list[str]) -> int:
    """Write the probe model to the path given, else into the package."""
    out = write(Path(argv[0]) if argv else OUT)
    print(f"wrote {out} ({out.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
