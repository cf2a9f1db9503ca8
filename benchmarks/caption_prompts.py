"""Several prompts per picture: one ``caption -p A -p B -p C`` run against three one-prompt
runs and against three runs of llama-cpp-python's ``Llava15ChatHandler``.

    python benchmarks/caption_prompts.py --preset tinyllava-1.1b --update BENCHMARKS.md
    python benchmarks/caption_prompts.py --preset llava-1.5-7b --pictures 4 \
        --update BENCHMARKS.md

The same pictures (generated 1280x960 photo-like JPEG files), GGUF files (a random-weight
twin with a real model's shapes, answering in word tokens as ``followup.py`` explains: it
cannot write end-of-sequence, so every answer has exactly ``--max-tokens`` tokens), threads,
n_ctx, n_batch, prompts and greedy decoding on every side. Every run is a process of its
own, one after the other, as a user's runs would be; the model is loaded before the clock
starts (load times are reported apart, and in a second ratio that counts them), the
files read once beforehand so that every run finds them in the page cache:

- **three prompts, one run**: ``llava_local.apps.captioning.caption(chat, folder, out,
  prompt=[A, B, C])``, what ``llava-local caption DIR -p A -p B -p C`` runs. Each picture is
  read and prepared once; each prompt is a fresh conversation beginning with the picture,
  so the engine reads the picture once and then only each prompt's own tokens;
- **three one-prompt runs**: the same call with ``prompt=A``, then ``B``, then ``C``, each in
  a new process (``llava-local caption DIR -p A``, three times); the three-prompt run runs
  between the first and the second of them;
- **Llava15ChatHandler, three runs**: ``Llama(..., chat_handler=Llava15ChatHandler(
  clip_model_path=...))`` and one ``create_chat_completion`` per picture, the picture as a
  data URI of the file, as its users write it; one run per prompt.

Throughput is pictures x prompts per minute of captioning. The machine is shared, so the
load average before and after each run is in the table; compare the sides of one run. The
three-prompt run's own lines also give a ratio free of the machine's drift between runs:
the mean time of an answer that read the picture against one that reused it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llava_local_dev.report import update_section
from llava_local_dev.twins import twin_pair, word_answers

DEFAULT_TWINS = Path("/tmp/twins")
PROMPTS = (
    "Describe this picture in one sentence.",
    "List the main things you can see.",
    "Which colours stand out?",
)
TARGET = 2.5


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------- workers


def work_caption(args: dict[str, Any]) -> dict[str, Any]:
    """``caption`` over the folder with the given prompts, the model loaded first."""
    from llava_local import VisionChat
    from llava_local.apps.captioning import caption, read_captions

    t0 = time.perf_counter()
    parallel = args.get("parallel", 1)
    chat = VisionChat.llama_cpp(
        args["model"],
        mmproj=args["mmproj"],
        n_ctx=args["n_ctx"],
        n_threads=args["threads"],
        chat_format="vicuna",
        parallel=parallel,
    )
    load_s = time.perf_counter() - t0
    out = Path(args["out"])
    with chat:
        t0 = time.perf_counter()
        summary = caption(
            chat,
            args["folder"],
            out,
            prompt=args["prompts"],
            progress=False,
            parallel=parallel,
            temperature=0,
            max_tokens=args["max_tokens"],
        )
        seconds = time.perf_counter() - t0
    lines = read_captions(out)
    errors = [line["error"] for line in lines if "error" in line]
    if errors:
        raise SystemExit(f"caption failed on {len(errors)} lines: {errors[0]}")
    stats = [line["stats"] for line in lines]
    reads = [line for line in lines if line["stats"]["images_encoded"]]
    reuses = [line for line in lines if not line["stats"]["images_encoded"]]
    return {
        "picture_answers": len(reads),
        "picture_answer_s": sum(line["elapsed_s"] for line in reads),
        "reuse_answers": len(reuses),
        "reuse_answer_s": sum(line["elapsed_s"] for line in reuses),
        "load_s": load_s,
        "seconds": seconds,
        "answers": summary.done,
        "prompt_tokens": sum(s["prompt_tokens"] for s in stats),
        "cached_tokens": sum(s["cached_tokens"] or 0 for s in stats),
        "images_encoded": sum(s["images_encoded"] or 0 for s in stats),
        "new_tokens": sum(s["completion_tokens"] for s in stats),
    }


def work_handler(args: dict[str, Any]) -> dict[str, Any]:
    """Llava15ChatHandler, one create_chat_completion per picture for the given prompt."""
    from llama_cpp import Llama, _logger
    from llama_cpp import mtmd_cpp as m
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    (prompt,) = args["prompts"]
    t0 = time.perf_counter()
    handler: Any = Llava15ChatHandler(clip_model_path=args["mmproj"], verbose=False)
    llama: Any = Llama(
        model_path=args["model"],
        chat_handler=handler,
        n_ctx=args["n_ctx"],
        n_batch=512,
        n_ubatch=512,
        n_threads=args["threads"],
        n_threads_batch=args["threads"],
        n_gpu_layers=0,
        verbose=False,
    )
    handler._init_mtmd_context(llama)  # CLIP loaded before the clock, like our engine's
    m.mtmd_log_set(_logger.llama_log_callback, None)  # its per-step lines on stderr
    m.mtmd_helper_log_set(_logger.llama_log_callback, None)
    load_s = time.perf_counter() - t0
    pictures = sorted(Path(args["folder"]).glob("*.jpg"))
    prompt_tokens = new_tokens = 0
    t0 = time.perf_counter()
    for picture in pictures:
        uri = "data:image/jpeg;base64," + base64.b64encode(picture.read_bytes()).decode()
        response = llama.create_chat_completion(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": uri}},
                        {"type": "text", "text": prompt},
                    ],
                }
            ],
            max_tokens=args["max_tokens"],
            temperature=0.0,
            repeat_penalty=1.0,
            seed=0,
        )
        prompt_tokens += response["usage"]["prompt_tokens"]
        new_tokens += response["usage"]["completion_tokens"]
    seconds = time.perf_counter() - t0
    llama.close()
    return {
        "load_s": load_s,
        "seconds": seconds,
        "answers": len(pictures),
        "prompt_tokens": prompt_tokens,
        "cached_tokens": None,
        "images_encoded": None,
        "new_tokens": new_tokens,
    }


WORKERS = {"caption": work_caption, "handler": work_handler}


def run_worker(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """``kind`` in a process of its own; its result (and the load average) as a dict."""
    cmd = [sys.executable, __file__, "--worker", kind, "--args", json.dumps(args)]
    before = _load()
    print(f"[{time.strftime('%H:%M:%S')}] {kind} {args['prompts']} ...", file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker {kind} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result |= {"load_before": before, "load_after": _load()}
    print(f"  {json.dumps(result)}", file=sys.stderr)
    return result


# --------------------------------------------------------------------------- report


def _total(runs: list[dict[str, Any]], key: str) -> Any:
    values = [run[key] for run in runs]
    return None if any(v is None for v in values) else sum(values)


def _row(name: str, runs: list[dict[str, Any]]) -> str:
    answers, seconds = _total(runs, "answers"), _total(runs, "seconds")
    loads = f"{runs[0]['load_before']} before, {runs[-1]['load_after']} after"

    def count(key: str) -> str:
        value = _total(runs, key)
        return "-" if value is None else str(value)

    return (
        f"| {name} | {answers} | {seconds:.1f} | **{60 * answers / seconds:.1f}** | "
        f"{_total(runs, 'load_s'):.1f} | {count('prompt_tokens')} | {count('cached_tokens')} | "
        f"{count('images_encoded')} | {count('new_tokens')} | {loads} |"
    )


def _handler_rows(handler: list[dict[str, Any]]) -> list[str]:
    if not handler:
        return ["| `Llava15ChatHandler`: not run (`--no-handler`) | | | | | | | | | |"]
    return [
        _row("`Llava15ChatHandler`, three runs", handler),
        *(_row(f"&nbsp;&nbsp;run {i + 1}", [run]) for i, run in enumerate(handler)),
    ]


def report(
    results: dict[str, Any], command: str, settings: str, pictures: int, parallel: int = 1
) -> str:
    multi, singles, handler = results["multi"], results["singles"], results["handler"]
    one_s, three_s = multi["seconds"], _total(singles, "seconds")
    vs_three = three_s / one_s
    with_loads = (three_s + _total(singles, "load_s")) / (one_s + multi["load_s"])
    met = "met" if vs_three >= TARGET else "**missed**"
    lines = [
        f"Command: `{command}`  ",
        f"Run: {results['started']} to {time.strftime('%H:%M', time.gmtime())} UTC; {settings}; "
        f"load average {results['load_start']} at the start, {_load()} at the end; every "
        "run a process of its own, one after the other, model loaded before the clock.",
        "",
        f"{pictures} pictures x {len(PROMPTS)} prompts: "
        + ", ".join(f'"{p}"' for p in PROMPTS)
        + ".",
        "",
        "| run | answers | seconds | answers/min | model load s | prompt tokens read | "
        "reused | pictures encoded | new tokens | load average |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        _row(
            "`caption -p A -p B -p C`"
            + (f" `--parallel {parallel}`" if parallel != 1 else "")
            + ", one run",
            [multi],
        ),
        _row("`caption -p A`, `-p B`, `-p C`: three runs", singles),
        *(_row(f"&nbsp;&nbsp;run {i + 1}", [run]) for i, run in enumerate(singles)),
        *_handler_rows(handler),
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| one three-prompt run >= {TARGET}x the throughput of three one-prompt runs | "
        f"{three_s:.1f} s / {one_s:.1f} s = {vs_three:.2f}x | {met} |",
        f"| the same, counting each run's model load | {with_loads:.2f}x | reported |",
    ]
    if handler:
        handler_s = _total(handler, "seconds")
        handler_loads = (handler_s + _total(handler, "load_s")) / (one_s + multi["load_s"])
        lines.append(
            f"| one three-prompt run against three `Llava15ChatHandler` runs | "
            f"{handler_s:.1f} s / {one_s:.1f} s = {handler_s / one_s:.2f}x "
            f"({handler_loads:.2f}x counting loads) | reported |"
        )
    if multi.get("reuse_answers"):
        read = multi["picture_answer_s"] / multi["picture_answers"]
        reuse = multi["reuse_answer_s"] / multi["reuse_answers"]
        prompts = len(PROMPTS)
        lines += [
            "",
            f"Within the three-prompt run (one process, same moment): an answer that reads the "
            f"picture took {read:.2f} s on average, one that reuses it {reuse:.2f} s, so "
            f"{prompts} one-prompt answers against one of each kind: {prompts} x {read:.2f} / "
            f"({read:.2f} + {prompts - 1} x {reuse:.2f}) = "
            f"**{prompts * read / (read + (prompts - 1) * reuse):.2f}x**, a ratio that the "
            "machine's speed changing between runs does not move.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tinyllava-1.1b", help="twin to use (make_twins)")
    parser.add_argument("--twins", type=Path, default=DEFAULT_TWINS, help="where twins live")
    parser.add_argument("--pictures", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=8, help="new tokens per answer")
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="turns at once in the three-prompt run (3: a picture's prompts together)",
    )
    parser.add_argument(
        "--no-handler", action="store_true", help="leave out the Llava15ChatHandler runs"
    )
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--update", type=Path, help="BENCHMARKS.md to update")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.args))))
        return 0

    from llava_local.apps.bench import synthetic_photo

    maker = Path(__file__).with_name("make_twins.py")
    lm, mm = twin_pair(args.twins, args.preset, maker)
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "load_start": _load(),
    }
    with tempfile.TemporaryDirectory(prefix="caption-prompts-") as tmp:
        folder = Path(tmp) / "pictures"
        folder.mkdir()
        for index in range(args.pictures):
            (folder / f"p{index:03d}.jpg").write_bytes(synthetic_photo(seed=100 + index))
        base = {
            "model": str(word_answers(lm)),
            "mmproj": str(mm),
            "n_ctx": args.n_ctx,
            "threads": args.threads,
            "max_tokens": args.max_tokens,
            "folder": str(folder),
        }
        out = Path(tmp) / "out"
        out.mkdir()
        for path in (base["model"], base["mmproj"]):  # the page cache warm for every run
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass

        def single(index: int) -> dict[str, Any]:
            args = {**base, "prompts": [PROMPTS[index]], "out": str(out / f"{index}.jsonl")}
            return run_worker("caption", args)

        # the three-prompt run between the one-prompt runs: a machine speeding up or
        # slowing down during the run favours neither side
        first = single(0)
        results["multi"] = run_worker(
            "caption",
            {
                **base,
                "prompts": list(PROMPTS),
                "out": str(out / "all.jsonl"),
                "parallel": args.parallel,
            },
        )
        results["singles"] = [first, *(single(i) for i in range(1, len(PROMPTS)))]
        results["handler"] = (
            []
            if args.no_handler
            else [run_worker("handler", {**base, "prompts": [p]}) for p in PROMPTS]
        )
    command = (
        f"python benchmarks/caption_prompts.py --preset {args.preset} --pictures {args.pictures}"
        f" --threads {args.threads} --n-ctx {args.n_ctx} --max-tokens {args.max_tokens}"
        + (f" --parallel {args.parallel}" if args.parallel != 1 else "")
        + (" --no-handler" if args.no_handler else "")
        + " --update BENCHMARKS.md"
    )
    settings = (
        f"{args.threads} threads, n_ctx {args.n_ctx}, n_batch 512, {args.max_tokens} new tokens "
        "per answer, greedy; pictures: generated 1280x960 photo-like JPEGs"
    )
    body = report(results, command, settings, args.pictures, args.parallel)
    title = f"Prompts per picture (issue 18): {args.preset} twin"
    print(f"### {title}\n\n{body}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.update:
        update_section(args.update, f"caption-prompts:{args.preset}-twin", title, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
