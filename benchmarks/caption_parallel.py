"""Turns at once in ``caption``: pictures per minute with ``--parallel 4`` against
``--parallel 1``, and a picture's three prompts asked together against one after another.

    python benchmarks/caption_parallel.py --preset tinyllava-1.1b --update BENCHMARKS.md

The same generated 1280x960 photo-like JPEG files, GGUF files (the twin of a real
model's shapes whose answers are word tokens and never end, so every answer has exactly
``--max-tokens`` tokens: see ``caption_prompts.py``), threads, n_ctx and greedy decoding
on every side. Every run is a process of its own (``caption_prompts.py``'s worker:
``caption(chat, folder, out, prompt=..., parallel=N)`` on an engine loaded with N slots,
what ``llava-local caption --backend llama_cpp --parallel N`` runs), one after another,
the model loaded before the clock starts:

- **pictures**: one prompt about each picture, ``--parallel 1`` (one answer at a time,
  as before slots) and ``--parallel 4`` (four pictures' answers decoded together);
- **prompts**: ``-p A -p B -p C`` about each picture, one after another (``--parallel
  1``: the engine keeps the picture's prefix from one prompt to the next) and together
  (``--parallel 3``: the picture read once, its positions copied to two more slots, the
  three answers decoded side by side).

The machine is shared: the load average before and after each run is in the table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from caption_prompts import PROMPTS, _load, run_worker
from llava_local_dev.report import update_section
from llava_local_dev.twins import twin_pair, word_answers

DEFAULT_TWINS = Path("/tmp/twins")
#: pictures per minute, together against one at a time
TARGETS = {"pictures": 1.4, "prompts": 1.3}


def _row(name: str, run: dict[str, Any], pictures: int) -> str:
    per_min = 60 * pictures / run["seconds"]
    return (
        f"| {name} | {pictures} | {run['answers']} | {run['seconds']:.1f} | **{per_min:.2f}** | "
        f"{run['images_encoded']} | {run['new_tokens']} | {run['load_before']} before, "
        f"{run['load_after']} after |"
    )


def _target(what: str, together: dict[str, Any], alone: dict[str, Any]) -> str:
    ratio = alone["seconds"] / together["seconds"]
    met = "met" if ratio >= TARGETS[what] else "**missed**"
    return (
        f"| {what}: together >= {TARGETS[what]}x the pictures per minute of one at a time | "
        f"{alone['seconds']:.1f} s / {together['seconds']:.1f} s = {ratio:.2f}x | {met} |"
    )


def report(results: dict[str, Any], command: str, settings: str, args: Any) -> str:
    pictures, prompts = results["pictures"], results["prompts"]
    quoted = ", ".join(f'"{p}"' for p in PROMPTS)
    return (
        "\n".join(
            [
                f"Command: `{command}`  ",
                f"Run: {results['started']} to {time.strftime('%H:%M', time.gmtime())} UTC; "
                f"{settings}; load average {results['load_start']} at the start, {_load()} at "
                "the end; every run a process of its own, one after the other, model loaded "
                "before the clock.",
                "",
                "| run | pictures | answers | seconds | pictures/min | pictures encoded | "
                "new tokens | load average |",
                "|---|---:|---:|---:|---:|---:|---:|---|",
                _row(f'`-p "{PROMPTS[0]}"` `--parallel 1`', pictures["alone"], args.pictures),
                _row(
                    f'`-p "{PROMPTS[0]}"` `--parallel {args.parallel}`',
                    pictures["together"],
                    args.pictures,
                ),
                _row("`-p A -p B -p C` `--parallel 1`", prompts["alone"], args.prompt_pictures),
                _row("`-p A -p B -p C` `--parallel 3`", prompts["together"], args.prompt_pictures),
                "",
                f"Prompts A, B, C: {quoted}.",
                "",
                "| target | measured | |",
                "|---|---|---|",
                _target("pictures", pictures["together"], pictures["alone"]),
                _target("prompts", prompts["together"], prompts["alone"]),
            ]
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tinyllava-1.1b", help="twin to use (make_twins)")
    parser.add_argument("--twins", type=Path, default=DEFAULT_TWINS, help="where twins live")
    parser.add_argument("--pictures", type=int, default=16, help="pictures, one prompt each")
    parser.add_argument(
        "--prompt-pictures", type=int, default=16, help="pictures asked the three prompts"
    )
    parser.add_argument("--parallel", type=int, default=4, help="turns at once (pictures)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-ctx", type=int, default=1024, help="positions per conversation")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per answer")
    parser.add_argument("--update", type=Path, help="BENCHMARKS.md to update")
    args = parser.parse_args(argv)

    from llava_local.apps.bench import synthetic_photo

    maker = Path(__file__).with_name("make_twins.py")
    lm, mm = twin_pair(args.twins, args.preset, maker)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "load_start": _load(),
    }
    with tempfile.TemporaryDirectory(prefix="caption-parallel-") as tmp:
        base = {
            "model": str(word_answers(lm)),
            "mmproj": str(mm),
            "n_ctx": args.n_ctx,
            "threads": args.threads,
            "max_tokens": args.max_tokens,
        }
        for path in (base["model"], base["mmproj"]):  # the page cache warm for every run
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass

        def run(name: str, pictures: int, prompts: list[str], parallel: int) -> dict[str, Any]:
            folder = Path(tmp) / f"pictures-{pictures}"
            if not folder.exists():
                folder.mkdir()
                for index in range(pictures):
                    picture = synthetic_photo(seed=100 + index)
                    (folder / f"p{index:03d}.jpg").write_bytes(picture)
            out = str(Path(tmp) / f"{name}.jsonl")
            settings = {"prompts": prompts, "parallel": parallel}
            return run_worker("caption", {**base, **settings, "folder": str(folder), "out": out})

        first = [PROMPTS[0]]
        results["pictures"] = {
            "alone": run("pictures-1", args.pictures, first, 1),
            "together": run("pictures-n", args.pictures, first, args.parallel),
        }
        results["prompts"] = {
            "together": run("prompts-3", args.prompt_pictures, list(PROMPTS), 3),
            "alone": run("prompts-1", args.prompt_pictures, list(PROMPTS), 1),
        }
    command = (
        f"python benchmarks/caption_parallel.py --preset {args.preset} --pictures "
        f"{args.pictures} --prompt-pictures {args.prompt_pictures} --parallel {args.parallel} "
        f"--threads {args.threads} --n-ctx {args.n_ctx} --max-tokens {args.max_tokens} "
        "--update BENCHMARKS.md"
    )
    settings = (
        f"{args.threads} threads, n_ctx {args.n_ctx} per conversation, n_batch 512, "
        f"{args.max_tokens} new tokens per answer, greedy; pictures: generated 1280x960 "
        "photo-like JPEGs"
    )
    body = report(results, command, settings, args)
    title = f"Turns at once in caption: {args.preset} twin"
    print(f"### {title}\n\n{body}")
    if args.update:
        update_section(args.update, f"caption-parallel:{args.preset}-twin", title, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
