"""The picture read before the question: time to the first token of a question asked
after ``chat.attach(photo)`` has finished, against the same question with the photo
given in ``ask``.

    python benchmarks/attach.py --preset llava-1.5-7b --update BENCHMARKS.md

One engine (the twin of a real model's shapes, written by ``benchmarks/make_twins.py``),
kept KV states off, so a picture's positions can come only from reading it; a new photo
for every question (no embedding cached), the rounds alternating the two ways. What a
user sees: ``attach`` while they type, then the question; the target (issue 30) is a first
token at least 10x sooner than with the picture given in ``ask``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from llava_local_dev.report import command_line, update_section
from llava_local_dev.twins import twin_pair

from llava_local import VisionChat
from llava_local.apps import bench
from llava_local.backends.llama_cpp import LlamaCppBackend

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TWINS = Path("/tmp/twins")
QUESTION = "What is in the picture?"
TARGET = 10.0


def first_token_s(chat: VisionChat, **ask: object) -> float:
    """Seconds from asking to the first piece of the answer."""
    start = time.perf_counter()
    with chat.stream(QUESTION, max_tokens=4, temperature=0, **ask) as stream:  # type: ignore[arg-type]
        next(iter(stream))
        first = time.perf_counter() - start
        for _ in stream:
            pass
    return first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llava-1.5-7b", help="twin (make_twins)")
    parser.add_argument("--twins", type=Path, default=DEFAULT_TWINS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--update", type=Path, help="BENCHMARKS.md to update")
    args = parser.parse_args(argv)
    lm, mm = twin_pair(args.twins, args.preset, ROOT / "benchmarks" / "make_twins.py")
    engine = LlamaCppBackend(lm, mm, n_threads=args.threads, kv_cache_mb=0, chat_format="vicuna")
    given: list[float] = []
    attached: list[float] = []
    loads: list[float] = []
    with VisionChat(engine) as chat:
        for i in range(args.rounds):
            loads.append(os.getloadavg()[0])
            chat.reset()
            given.append(first_token_s(chat, image=bench.synthetic_photo(seed=100 + 2 * i)))
            chat.reset()
            start = time.perf_counter()
            chat.attach(bench.synthetic_photo(seed=101 + 2 * i)).result()
            reading = time.perf_counter() - start
            attached.append(first_token_s(chat))
            print(
                f"round {i + 1}: given in ask {given[-1]:.2f} s; attach read for "
                f"{reading:.1f} s, then the question {attached[-1]:.2f} s",
                file=sys.stderr,
            )
    ratio = statistics.median(given) / statistics.median(attached)
    body = (
        f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.preset} twin, "
        f"{args.threads} threads, a new 1280x960 photo per question, kept states off; load "
        f"average {min(loads):.1f}-{max(loads):.1f}.\n\n"
        "| first token | median | runs |\n| --- | ---: | --- |\n"
        f"| picture given in `ask` | {statistics.median(given):.2f} s | "
        f"{', '.join(f'{t:.2f}' for t in given)} |\n"
        f"| question after `attach` finished | {statistics.median(attached):.2f} s | "
        f"{', '.join(f'{t:.2f}' for t in attached)} |\n\n"
        f"Sooner by {ratio:.1f}x: target {TARGET:.0f}x, "
        f"{'met' if ratio >= TARGET else 'missed'}.\n\n"
        f"`{command_line('benchmarks/attach.py', sys.argv[1:] if argv is None else argv)}`\n"
    )
    print(body)
    if args.update:
        update_section(
            args.update,
            f"attach-{args.preset}",
            f"The picture read before the question ({args.preset} twin)",
            body,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
