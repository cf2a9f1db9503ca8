"""Write a random-weight "twin" of a real LLaVA pair: same shapes and dtypes, so same cost.

    python benchmarks/make_twins.py --preset llava-1.5-7b --out /tmp/twins
    python benchmarks/make_twins.py --preset tinyllava-1.1b --out /tmp/twins --check

Files are multi-GB: write them outside the repository (or under the gitignored
``/test-artifacts/``). ``--check`` then loads the pair with llama.cpp and runs one image
turn, printing the times and the peak resident memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np
from llava_local_dev.gguf_writer import PRESETS, write_preset
from llava_local_dev.mtmd import MtmdRunner
from llava_local_dev.pictures import png_bytes


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _check(lm: Path, mmproj: Path, image_size: int) -> None:
    start = time.perf_counter()
    threads = os.cpu_count() or 1
    with MtmdRunner(lm, mmproj, n_ctx=2048, n_threads=threads, n_threads_batch=threads) as runner:
        loaded = time.perf_counter()
        prompt = f"USER: {runner.marker}\nWhat is in the picture?\nASSISTANT:"
        picture = png_bytes(size=(image_size, image_size))
        chunks = runner.chunk_token_counts(prompt, [picture])
        encode_start = time.perf_counter()
        runner.image_embeddings(picture)
        encode = time.perf_counter() - encode_start
        turn_start = time.perf_counter()
        logits = runner.logits(prompt, [picture])
        turn = time.perf_counter() - turn_start
    print(f"load {loaded - start:.2f} s; chunks {chunks}")
    print(f"CLIP encode alone: {encode:.2f} s")
    print(f"one image turn (encode + prefill {sum(n for _, n in chunks)} tokens): {turn:.2f} s")
    print(f"logits finite: {bool(np.isfinite(logits).all())}; peak RSS {_peak_rss_mib():.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the pair, optionally check it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--out", type=Path, required=True, help="directory for the two files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm-dtype", choices=["f32", "f16", "q8_0", "q4_0"], default=None)
    parser.add_argument("--check", action="store_true", help="run one image turn afterwards")
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    print(f"{args.preset}: {preset.description}")
    start = time.perf_counter()
    lm, mmproj = write_preset(
        args.preset, args.out / args.preset, seed=args.seed, lm_dtype=args.lm_dtype
    )
    took = time.perf_counter() - start
    size = (lm.stat().st_size + mmproj.stat().st_size) / 2**30
    print(
        f"wrote {lm} and {mmproj}: {size:.2f} GiB in {took:.1f} s, "
        f"peak RSS {_peak_rss_mib():.0f} MiB"
    )
    if args.check:
        _check(lm, mmproj, preset.vision.image_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
