"""KV states kept across conversations, loads and processes: warm against cold.

    python benchmarks/kv_cache.py --preset tinyllava-1.1b --update BENCHMARKS.md
    python benchmarks/kv_cache.py --preset llava-1.5-7b --update BENCHMARKS.md

Each case runs in processes of its own, one after the other, with the same GGUF files
(a random-weight twin with a real model's shapes: ``make_twins.py``, answering in word
tokens as ``followup.py`` explains), threads, n_ctx and n_batch, greedy decoding, 16 new
tokens per answer. Time to first token is ``reply.stats.first_token_s`` (from the call
that starts the turn to the first piece of text).

- **Resume**: a conversation (a photo, one question and its answer) is saved with
  ``chat.save``; a new process loads it and asks a follow-up. *Warm*: the JSON and the
  KV state beside it; *cold*: the JSON copied alone. Counted for warm: the restore (the
  engine reading, checking and setting the saved state; ``VisionChat.load`` does it)
  plus the follow-up's first token. Model loading is the same for both and not counted.
- **Taking turns**: two conversations about two photos on one engine, alternating,
  three turns each; the prefix cache on (its default memory budget) against off
  (``kv_cache_mb=0``: the engine keeps only its live KV cache, as before issue 18).
- **New process, warm disk cache**: a process asks about a photo with
  ``kv_cache_dir=DIR`` and exits (its state is written on close); a new process with
  the same folder (and no memory tier) asks the same question. Cold is the first
  process's turn: the same question with nothing kept.
- **State size** on disk per picture (the state file of the first question, and its
  share per picture token x the picture's tokens), and **restore time** (reading,
  checking and setting that file; the file is in the page cache, as just written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llava_local_dev.report import update_section
from llava_local_dev.twins import twin_pair, word_answers

DEFAULT_TWINS = Path("/tmp/twins")
MAX_TOKENS = 16
QUESTIONS = ("What is in this picture?", "What colours are there?", "Is there a person?")


# ------------------------------------------------------------------------- workers


def _chat(args: dict[str, Any], **engine: Any) -> Any:
    from llava_local import VisionChat

    return VisionChat.llama_cpp(
        args["model"],
        mmproj=args["mmproj"],
        n_ctx=args["n_ctx"],
        n_threads=args["threads"],
        temperature=0,
        max_tokens=MAX_TOKENS,
        **engine,
    )


def _turn(reply: Any) -> dict[str, Any]:
    s = reply.stats
    return {
        "ttft_s": s.first_token_s,
        "prompt_tokens": s.prompt_tokens,
        "cached_tokens": s.cached_tokens,
        "images_encoded": s.images_encoded,
        "prompt_s": s.prompt_s,
    }


def work_save(args: dict[str, Any]) -> dict[str, Any]:
    """Turn 1 about the photo, then save the conversation (JSON + KV state)."""
    from llava_local.apps.bench import synthetic_photo

    with _chat(args, kv_cache_mb=0) as chat:
        first = chat.ask(QUESTIONS[0], image=synthetic_photo(seed=1))
        t0 = time.perf_counter()
        chat.save(args["path"])
        save_s = time.perf_counter() - t0
    kv = Path(args["path"] + ".kv")
    return {"turn": _turn(first), "save_s": save_s, "kv_bytes": kv.stat().st_size}


def work_resume(args: dict[str, Any]) -> dict[str, Any]:
    """Load the conversation (model first, then the state, timed apart) and follow up."""
    from llava_local import VisionChat
    from llava_local.persist import state_path

    path = Path(args["path"])
    t0 = time.perf_counter()
    chat = VisionChat.load(path, n_ctx=args["n_ctx"], n_threads=args["threads"], kv_cache_mb=0)
    load_s = time.perf_counter() - t0
    # VisionChat.load restored the state already; time that step alone on the same file
    restore_s = None
    kv = state_path(path)
    if kv.exists():
        t0 = time.perf_counter()
        restored = chat.engine.load_state(kv)
        restore_s = time.perf_counter() - t0
        assert restored > 0
    with chat:
        reply = chat.ask(QUESTIONS[1])
    return {"load_s": load_s, "restore_s": restore_s, "turn": _turn(reply)}


def work_turns(args: dict[str, Any]) -> dict[str, Any]:
    """Two conversations on one engine, alternating, three turns each."""
    from llava_local import VisionChat
    from llava_local.apps.bench import synthetic_photo

    engine: dict[str, Any] = {} if args["cache"] else {"kv_cache_mb": 0}
    with _chat(args, **engine) as a:
        b = VisionChat(a.engine, temperature=0, max_tokens=MAX_TOKENS)
        photos = [synthetic_photo(seed=1), synthetic_photo(seed=2)]
        turns = []
        for i, question in enumerate(QUESTIONS):
            for name, chat, photo in (("A", a, photos[0]), ("B", b, photos[1])):
                reply = chat.ask(question, image=photo if i == 0 else None)
                turns.append({"conversation": name, "turn": i + 1, **_turn(reply)})
    return {"turns": turns}


def work_first(args: dict[str, Any]) -> dict[str, Any]:
    """The photo's first question with a disk folder (cold, or warm from an earlier process)."""
    from llava_local.apps.bench import synthetic_photo
    from llava_local.backends.llama_cpp import kv_cache

    with _chat(args, kv_cache_dir=args["dir"], kv_cache_mb=0) as chat:
        reply = chat.ask(QUESTIONS[0], image=synthetic_photo(seed=1))
        identity = chat.engine.identity
        image_tokens = int(chat.engine._image_tokens or 0)
        keys = reply.stats.cached_tokens + reply.stats.prompt_tokens
    files = sorted(Path(args["dir"]).rglob(f"*{kv_cache.SUFFIX}"))
    out: dict[str, Any] = {"turn": _turn(reply), "image_tokens": image_tokens, "positions": keys}
    if files:
        t0 = time.perf_counter()
        state = kv_cache.read_state(files[0], identity)
        out["read_s"] = time.perf_counter() - t0
        out["state_bytes"] = files[0].stat().st_size
        out["state_positions"] = len(state.keys) if state is not None else None
    return out


CASES = ("resume", "first", "turns")
WORKERS = {"save": work_save, "resume": work_resume, "turns": work_turns, "first": work_first}


def run_worker(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """``kind`` in a process of its own; its result as JSON on the last stdout line."""
    cmd = [sys.executable, __file__, "--worker", kind, "--args", json.dumps(args)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker {kind} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {kind} {args.get('cache', '')}: {json.dumps(result)[:300]}", file=sys.stderr)
    return result


# --------------------------------------------------------------------------- report


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _x(cold: float | None, warm: float | None) -> str:
    if not cold or not warm:
        return "-"
    return f"{cold / warm:.1f}x"


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def report(label: str, results: dict[str, Any], command: str, settings: str) -> str:
    """The section: the cases this run measured (``--cases``), each as a table."""
    lines = [
        f"Command: `{command}`  ",
        f"Run: {results['started']} to {time.strftime('%H:%M', time.gmtime())} UTC; {settings}; "
        f"load average {results['load_before']} at the start, {_load()} at the end; one run, "
        "both sides of each row one after the other (the machine is shared: read the ratios).",
    ]
    if "resume_warm" in results:
        lines += _warm_cold(results)
    if "turns_on" in results:
        lines += _taking_turns(results)
    if "first_cold" in results:
        lines += _state_size(results)
    return "\n".join(lines) + "\n"


def _warm_cold(results: dict[str, Any]) -> list[str]:
    warm, cold = results["resume_warm"], results["resume_cold"]
    warm_cost = (warm["restore_s"] or 0) + warm["turn"]["ttft_s"]
    lines = [
        "",
        "| case | cold | warm | warm is |",
        "|---|---:|---:|---:|",
        f"| resume: first follow-up after `VisionChat.load`, to first token (warm: restore "
        f"{_s(warm['restore_s'])} + {_s(warm['turn']['ttft_s'])}) | "
        f"{_s(cold['turn']['ttft_s'])} | {_s(warm_cost)} | "
        f"**{_x(cold['turn']['ttft_s'], warm_cost)} sooner** |",
    ]
    if "first_cold" in results:
        first, again = results["first_cold"], results["first_warm"]
        lines.append(
            f"| new process, same photo and question, to first token (disk folder) | "
            f"{_s(first['turn']['ttft_s'])} | {_s(again['turn']['ttft_s'])} | "
            f"**{_x(first['turn']['ttft_s'], again['turn']['ttft_s'])} sooner** |"
        )
    lines += [
        f"| prompt tokens read, resume | {cold['turn']['prompt_tokens']} | "
        f"{warm['turn']['prompt_tokens']} | |",
    ]
    return lines


def _taking_turns(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Taking turns: two conversations about two photos on one engine, alternating "
        "(A1 B1 A2 B2 A3 B3); time to first token and prompt tokens read per turn.",
        "",
        "| turn | cache off: first token | read | cache on: first token | read | restored |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    off, on = results["turns_off"]["turns"], results["turns_on"]["turns"]
    for t_off, t_on in zip(off, on, strict=True):
        lines.append(
            f"| {t_on['conversation']}{t_on['turn']} | {_s(t_off['ttft_s'])} | "
            f"{t_off['prompt_tokens']} | {_s(t_on['ttft_s'])} | {t_on['prompt_tokens']} | "
            f"{t_on['cached_tokens']} |"
        )
    follow_off = sum(t["ttft_s"] for t in off if t["turn"] > 1)
    follow_on = sum(t["ttft_s"] for t in on if t["turn"] > 1)
    lines.append(
        f"| follow-ups, total | {_s(follow_off)} | | {_s(follow_on)} | | "
        f"**{_x(follow_off, follow_on)} sooner** |"
    )
    return lines


def _state_size(results: dict[str, Any]) -> list[str]:
    first = results["first_cold"]
    mib = 2**20
    per_token = first["state_bytes"] / max(1, first["state_positions"] or first["positions"])
    lines = [
        "",
        "| state on disk | |",
        "|---|---:|",
        f"| first question's state ({first['state_positions']} positions) | "
        f"{first['state_bytes'] / mib:.1f} MiB |",
        f"| per picture ({first['image_tokens']} tokens x {per_token / 1024:.1f} KiB) | "
        f"{first['image_tokens'] * per_token / mib:.1f} MiB |",
        f"| reading and checking it (sha256) | {_s(first.get('read_s'))} |",
    ]
    if "resume_warm" in results:
        lines += [
            "| restoring a saved conversation (read, check, set) | "
            f"{_s(results['resume_warm']['restore_s'])} |",
            "| saving a conversation with its state (`chat.save`) | "
            f"{_s(results['save']['save_s'])} |",
        ]
    return lines


def measure(base: dict[str, Any], cases: list[str], keep: Callable[[str, Any], None]) -> None:
    """Run the cases, each side in a process of its own; ``keep`` gets each result."""
    with tempfile.TemporaryDirectory(prefix="kv-bench-") as tmp:
        if "resume" in cases:
            talk = Path(tmp) / "talk.json"
            alone = Path(tmp) / "alone" / "talk.json"
            keep("save", run_worker("save", {**base, "path": str(talk)}))
            alone.parent.mkdir()
            shutil.copyfile(talk, alone)
            keep("resume_cold", run_worker("resume", {**base, "path": str(alone)}))
            keep("resume_warm", run_worker("resume", {**base, "path": str(talk)}))
        if "first" in cases:
            folder = Path(tmp) / "kv"
            keep("first_cold", run_worker("first", {**base, "dir": str(folder)}))
            keep("first_warm", run_worker("first", {**base, "dir": str(folder)}))
        if "turns" in cases:
            keep("turns_off", run_worker("turns", {**base, "cache": False}))
            keep("turns_on", run_worker("turns", {**base, "cache": True}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tinyllava-1.1b", help="twin to use (make_twins)")
    parser.add_argument("--twins", type=Path, default=DEFAULT_TWINS, help="where twins live")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        help="comma-separated subset of " + ", ".join(CASES) + " (a subset writes a section "
        "of its own)",
    )
    parser.add_argument("--json", type=Path, help="write all results here (after each case)")
    parser.add_argument("--update", type=Path, help="BENCHMARKS.md to update")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.args))))
        return 0

    maker = Path(__file__).with_name("make_twins.py")
    lm, mm = twin_pair(args.twins, args.preset, maker)
    base = {
        "model": str(word_answers(lm)),
        "mmproj": str(mm),
        "n_ctx": args.n_ctx,
        "threads": args.threads,
    }
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "load_before": _load(),
    }
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := sorted(set(cases) - set(CASES)):
        parser.error(f"--cases: unknown {', '.join(unknown)} (choose from {', '.join(CASES)})")

    def keep(name: str, result: dict[str, Any]) -> None:
        results[name] = result
        if args.json:  # after each case, so an interrupted run keeps what it measured
            args.json.write_text(json.dumps(results, indent=1))

    measure(base, cases, keep)
    command = f"python benchmarks/kv_cache.py --preset {args.preset} --threads {args.threads}"
    command += f" --n-ctx {args.n_ctx}"
    section = f"kv-cache:{args.preset}-twin"
    if cases != list(CASES):
        command += f" --cases {','.join(cases)}"
        section += ":" + "+".join(cases)
    command += " --update BENCHMARKS.md"
    settings = (
        f"{args.threads} threads, n_ctx {args.n_ctx}, {MAX_TOKENS} new tokens per answer, "
        "greedy; photos: generated 1280x960 photo-like JPEGs"
    )
    label = f"Kept KV states (issue 18): {args.preset} twin"
    if cases != list(CASES):
        label += ", " + ", ".join(cases)
    body = report(label, results, command, settings)
    print(f"### {label}\n\n{body}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.update:
        update_section(args.update, section, label, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
