"""Stateless clients against two servers: ``llava-local serve`` and ``llama_cpp.server``.

    python benchmarks/serve.py --preset tinyllava-1.1b
    python benchmarks/serve.py --preset llava-1.5-7b --update BENCHMARKS.md

Both servers get the same GGUF pair (a random-weight twin written by
``benchmarks/make_twins.py``, answering in word tokens: ``llava_local_dev.twins``), the same
threads and context size, one after the other on the same machine, in one run:

- ``llava-local serve -m LM --mmproj MM --chat-format vicuna``;
- ``python -m llama_cpp.server --model LM --clip_model_path MM --chat_format llava-1-5``
  (``pip install 'llama-cpp-python[server]'``), what a user would otherwise run.

What is measured, each request sent by the official ``openai`` client with the whole
history (as every client of these protocols does), ``stream=True``, ``temperature=0``,
``max_tokens`` new tokens (the twin cannot write end-of-sequence, so every answer is that
long):

1. one client, a three-turn conversation about one photo: time to the first content
   piece and total time of each turn;
2. ``--clients`` clients at once, each a three-turn conversation about a photo of its
   own: whether all were answered, the total wall time and each request's latency;
3. the server's peak resident memory (``VmHWM`` of its process): after the one-client
   conversation (what the memory target is about) and after the concurrent clients, where
   ``llava-local serve`` keeps each conversation's KV state (within its budget,
   ``--kv-cache-mb``) so that a client's next turn does not read its photo again.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import openai
from llava_local_dev.report import update_section
from llava_local_dev.twins import twin_pair, word_answers
from openai.types.chat import ChatCompletionChunk

from llava_local.apps import bench

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TWINS = Path("/tmp/twins")
SERVERS = ("llava-local serve", "llama_cpp.server")


@dataclass
class Turn:
    ttft_s: float
    total_s: float
    text: str


@dataclass
class Run:
    server: str
    load_s: float = 0.0
    turns: list[Turn] = field(default_factory=list)
    concurrent_wall_s: float = 0.0
    concurrent_latencies: list[float] = field(default_factory=list)
    concurrent_answered: int = 0
    concurrent_asked: int = 0
    peak_rss_one_mib: float = 0.0
    peak_rss_mib: float = 0.0
    load_before: str = ""
    load_after: str = ""


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _command(server: str, lm: Path, mm: Path, port: int, args: argparse.Namespace) -> list[str]:
    threads, ctx = str(args.threads), str(args.n_ctx)
    if server == "llava-local serve":
        return [
            sys.executable, "-m", "llava_local.cli", "serve", "--port", str(port),
            "-m", str(lm), "--mmproj", str(mm), "--chat-format", "vicuna",
            "--threads", threads, "--n-ctx", ctx, "--name", "twin", "--queue", "64",
        ]  # fmt: skip
    return [
        sys.executable, "-m", "llama_cpp.server", "--port", str(port),
        "--model", str(lm), "--clip_model_path", str(mm), "--chat_format", "llava-1-5",
        "--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", ctx,
        "--model_alias", "twin",
    ]  # fmt: skip


@contextmanager
def _running(command: list[str], url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{command[2]} exited: {log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{command[2]} did not start")
            time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else 0.0


def _turn(client: openai.OpenAI, messages: list[dict[str, Any]], max_tokens: int) -> Turn:
    start = time.perf_counter()
    first: float | None = None
    pieces = []
    stream = cast(
        "openai.Stream[ChatCompletionChunk]",
        client.chat.completions.create(
            model="twin",
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            temperature=0,
            max_tokens=max_tokens,
        ),
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - start
            pieces.append(chunk.choices[0].delta.content)
    total = time.perf_counter() - start
    return Turn(first if first is not None else total, total, "".join(pieces))


def _conversation(url: str, photo: bytes, turns: int, max_tokens: int) -> list[Turn]:
    picture = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
    done: list[Turn] = []
    messages: list[dict[str, Any]] = []
    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=3600) as client:
        for i in range(turns):
            question = bench.QUESTIONS[i % len(bench.QUESTIONS)]
            content: Any = question
            if i == 0:
                content = [
                    {"type": "text", "text": question},
                    {"type": "image_url", "image_url": {"url": picture}},
                ]
            messages.append({"role": "user", "content": content})
            turn = _turn(client, messages, max_tokens)
            done.append(turn)
            messages.append({"role": "assistant", "content": turn.text})
    return done


def measure(server: str, lm: Path, mm: Path, args: argparse.Namespace) -> Run:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(args.logs) / f"{server.split(maxsplit=1)[0].replace('.', '_')}.log"
    run = Run(server, load_before=_load())
    start = time.perf_counter()
    with _running(_command(server, lm, mm, port, args), url, log) as process:
        run.load_s = time.perf_counter() - start
        run.turns = _conversation(url, bench.synthetic_photo(), args.turns, args.max_tokens)
        run.peak_rss_one_mib = _peak_rss_mib(process.pid)
        photos = [bench.synthetic_photo(seed=1 + i) for i in range(args.clients)]
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            futures = [
                pool.submit(_conversation, url, photo, args.turns, args.max_tokens)
                for photo in photos
            ]
            results = []
            for future in futures:
                try:
                    results.extend(future.result())
                except openai.OpenAIError as exc:
                    print(f"{server}: a client failed: {exc}", file=sys.stderr)
        run.concurrent_wall_s = time.perf_counter() - started
        run.concurrent_latencies = [t.total_s for t in results]
        run.concurrent_answered = len([t for t in results if t.text])
        run.concurrent_asked = args.clients * args.turns
        run.peak_rss_mib = _peak_rss_mib(process.pid)
    run.load_after = _load()
    return run


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def markdown(runs: list[Run], label: str, args: argparse.Namespace, command: str) -> str:
    ours, theirs = runs
    lines = [
        f"{label}; {args.threads} threads, n_ctx {args.n_ctx}, {args.max_tokens} new tokens "
        f"per answer, streamed, temperature 0; measured {time.strftime('%Y-%m-%d %H:%M %Z')} "
        f"on a shared {os.cpu_count()}-core machine, both servers one after the other in one "
        f"run (`{command}`).",
        "",
        f"| one client, 3 turns, history resent | {ours.server} | {theirs.server} | ratio |",
        "|---|---:|---:|---:|",
    ]
    for i, (a, b) in enumerate(zip(ours.turns, theirs.turns, strict=True), start=1):
        lines.append(
            f"| turn {i}, time to first token | {a.ttft_s:.2f} s | {b.ttft_s:.2f} s | "
            f"{_ratio(b.ttft_s, a.ttft_s)} |"
        )
        lines.append(
            f"| turn {i}, total | {a.total_s:.2f} s | {b.total_s:.2f} s | "
            f"{_ratio(b.total_s, a.total_s)} |"
        )
    lines.append(
        f"| peak RSS of the server | {ours.peak_rss_one_mib:.0f} MiB "
        f"| {theirs.peak_rss_one_mib:.0f} MiB "
        f"| {_ratio(ours.peak_rss_one_mib, theirs.peak_rss_one_mib)} |"
    )
    lines += [
        "",
        f"| {args.clients} clients at once, 3 turns each on its own photo | {ours.server} "
        f"| {theirs.server} |",
        "|---|---:|---:|",
    ]
    rows: list[tuple[str, Callable[[Run], str]]] = [
        ("answered", lambda r: f"{r.concurrent_answered}/{r.concurrent_asked}"),
        ("total wall time", lambda r: f"{r.concurrent_wall_s:.1f} s"),
        ("median request latency", lambda r: _stat(r, statistics.median)),
        ("slowest request", lambda r: _stat(r, max)),
    ]
    for row_name, pick in rows:
        lines.append(f"| {row_name} | {pick(ours)} | {pick(theirs)} |")
    lines.append(
        f"| peak RSS of the server, both parts | {ours.peak_rss_mib:.0f} MiB "
        f"| {theirs.peak_rss_mib:.0f} MiB |"
    )
    lines.append(
        f"| load average, server start / end | {ours.load_before} / {ours.load_after} | "
        f"{theirs.load_before} / {theirs.load_after} |"
    )
    follow = [b.ttft_s / a.ttft_s for a, b in zip(ours.turns[1:], theirs.turns[1:], strict=True)]
    first = ours.turns[0].total_s / theirs.turns[0].total_s
    memory = ours.peak_rss_one_mib / theirs.peak_rss_one_mib
    lines += [
        "",
        "| target (issue 17) | measured | |",
        "|---|---|---|",
        f"| follow-up time to first token at least 20x lower | "
        f"{', '.join(f'{r:.1f}x' for r in follow)} lower | {_met(min(follow) >= 20)} |",
        f"| first turn within 1.05x | {first:.2f}x | {_met(first <= 1.05)} |",
        f"| peak memory within 10% | {memory:.2f}x | {_met(memory <= 1.10)} |",
    ]
    return "\n".join(lines) + "\n"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _stat(run: Run, how: Any) -> str:
    return f"{how(run.concurrent_latencies):.1f} s" if run.concurrent_latencies else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--preset", default="tinyllava-1.1b", help="twin (make_twins)")
    parser.add_argument("--twins", type=Path, default=DEFAULT_TWINS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--logs", default="/tmp", help="where the servers' logs go")
    parser.add_argument("--update", type=Path, help="BENCHMARKS.md to update")
    args = parser.parse_args(argv)

    maker = Path(__file__).with_name("make_twins.py")
    lm, mm = twin_pair(args.twins, args.preset, maker)
    lm = word_answers(lm)
    for path in (lm, mm):  # the page cache warm for both servers alike
        with path.open("rb") as f:
            while f.read(1 << 24):
                pass
    runs = [measure(server, lm, mm, args) for server in SERVERS]
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    label = f"{args.preset} twin"
    table = markdown(runs, label, args, command)
    print(table)
    if args.update:
        update_section(
            args.update, f"serve-{args.preset}", f"Stateless clients, {label}: serve", table
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
