"""Stateless clients against ``llava-local serve`` and the servers a user would run instead.

    python benchmarks/serve.py --preset tinyllava-1.1b
    python benchmarks/serve.py --preset llava-1.5-7b --update BENCHMARKS.md
    python benchmarks/serve.py --peers llama_cpp.server      # the older peer

Every server gets the same GGUF pair (a random-weight twin written by
``benchmarks/make_twins.py``, answering in word tokens: ``llava_local_dev.twins``), the same
threads and context size, one after the other on the same machine, in one run:

- ``llava-local serve -m LM --mmproj MM --chat-format vicuna`` (``--parallel`` as given,
  default: its own default);
- ``llama-server`` (llama.cpp's own, built by ``scripts/build-llama-server.sh`` from the
  llama.cpp inside the llama-cpp-python sdist, same safe CPU flags), given our prompt by
  ``--jinja --chat-template-file benchmarks/vicuna.jinja``: its default, and ``-np 4``
  (4 parallel slots, continuous batching); a line says so if it cannot be built;
- ``python -m llama_cpp.server --model LM --clip_model_path MM --chat_format llava-1-5``
  (``pip install 'llama-cpp-python[server]'``), with ``--peers llama_cpp.server``.

What is measured, each request sent by the official ``openai`` client with the whole
history (as every client of these protocols does), ``stream=True``, ``temperature=0``,
``max_tokens`` new tokens (the twin cannot write end-of-sequence, so every answer is that
long):

1. one client, a three-turn conversation about one photo: time to the first content
   piece and total time of each turn;
2. ``--clients`` clients at once, each a three-turn conversation about a photo of its
   own: whether all were answered, the total wall time and each request's latency;
With ``--rounds R`` every server is measured R times, in turn (each round starting with
the next server, so a drift of the machine's speed is shared out), and each figure is
the median over the rounds (a request latency: over every request of every round), the
range of the main ones beside the table: on a shared virtual machine the same server's
first turn varies by 10-20% from one minute to the next.

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
from llava_local_dev.report import command_line, update_section
from llava_local_dev.twins import twin_pair, word_answers
from openai.types.chat import ChatCompletionChunk

from llava_local.apps import bench

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TWINS = Path("/tmp/twins")
OURS = "llava-local serve"
PEERS = ("llama-server", "llama-server -np 4", "llama_cpp.server")
TEMPLATE = Path(__file__).with_name("vicuna.jinja")


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


def llama_server() -> str | None:
    """The llama-server binary (built once, cached), or None with the reason printed."""
    build = subprocess.run(
        [str(ROOT / "scripts" / "build-llama-server.sh"), sys.executable],
        capture_output=True,
        text=True,
        check=False,
    )
    if build.returncode != 0:
        print(f"llama-server skipped: it could not be built\n{build.stderr[-2000:]}")
        return None
    return build.stdout.strip().splitlines()[-1]


def _command(server: str, lm: Path, mm: Path, port: int, args: argparse.Namespace) -> list[str]:
    threads, ctx = str(args.threads), str(args.n_ctx)
    if server == OURS:
        parallel = ["--parallel", str(args.parallel)] if args.parallel else []
        return [
            sys.executable, "-m", "llava_local.cli", "serve", "--port", str(port),
            "-m", str(lm), "--mmproj", str(mm), "--chat-format", "vicuna",
            "--threads", threads, "--n-ctx", ctx, "--name", "twin", "--queue", "64",
            *parallel,
        ]  # fmt: skip
    if server.startswith("llama-server"):
        slots = ["-np", server.rsplit(maxsplit=1)[1]] if "-np" in server else []
        return [
            args.llama_server, "-m", str(lm), "--mmproj", str(mm), "-t", threads,
            "-tb", threads, "-c", ctx, "--host", "127.0.0.1", "--port", str(port),
            "--alias", "twin", "--jinja", "--chat-template-file", str(TEMPLATE), *slots,
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
                tail = log.read_text(errors="replace")[-2000:]
                raise SystemExit(f"{Path(command[0]).name} exited: {tail}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{Path(command[0]).name} did not start")
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
    log = Path(args.logs) / f"{re.sub(r'[^A-Za-z0-9]+', '_', server)}.log"
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


def combined(runs: list[Run]) -> Run:
    """One server's rounds as one run: medians of the times, every request's latency,
    the highest peak memory, the load averages at the first start and the last end."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    turns = [
        Turn(
            statistics.median(r.turns[i].ttft_s for r in runs),
            statistics.median(r.turns[i].total_s for r in runs),
            first.turns[i].text,
        )
        for i in range(len(first.turns))
    ]
    return Run(
        first.server,
        load_s=statistics.median(r.load_s for r in runs),
        turns=turns,
        concurrent_wall_s=statistics.median(r.concurrent_wall_s for r in runs),
        concurrent_latencies=[x for r in runs for x in r.concurrent_latencies],
        concurrent_answered=sum(r.concurrent_answered for r in runs),
        concurrent_asked=sum(r.concurrent_asked for r in runs),
        peak_rss_one_mib=max(r.peak_rss_one_mib for r in runs),
        peak_rss_mib=max(r.peak_rss_mib for r in runs),
        load_before=first.load_before,
        load_after=runs[-1].load_after,
    )


def ranges(rounds: dict[str, list[Run]]) -> str:
    """The spread over the rounds of the first turn and of the clients' wall time."""

    def span(values: list[float]) -> str:
        return f"{min(values):.2f}-{max(values):.2f} s"

    parts = [
        f"{server}: first turn {span([r.turns[0].ttft_s for r in runs])}, "
        f"clients' wall {span([r.concurrent_wall_s for r in runs])}"
        for server, runs in rounds.items()
    ]
    return "Over the rounds: " + "; ".join(parts) + "."


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def markdown(runs: list[Run], label: str, args: argparse.Namespace, command: str) -> str:
    """The runs as tables: one client, then the clients at once; ratios are each peer's
    figure over ours (above 1: we are faster), then the targets against the best peer."""
    ours, peers = runs[0], runs[1:]
    names = " | ".join(r.server for r in runs)
    lines = [
        f"{label}; {args.threads} threads, n_ctx {args.n_ctx}, {args.max_tokens} new tokens "
        f"per answer, streamed, temperature 0; measured {time.strftime('%Y-%m-%d %H:%M %Z')} "
        f"on a {os.cpu_count()}-core machine, the servers one after the other in one run"
        + (f", {args.rounds} rounds, each figure the median" if args.rounds > 1 else "")
        + f" (`{command}`). Ratios: the peer's time over ours.",
        "",
        f"| one client, {args.turns} turns, history resent | {names} |",
        "|---|" + "---:|" * len(runs),
    ]

    def row(name: str, value: Callable[[Run], float], unit: str = "s", ratio: bool = True) -> str:
        cells = [f"{value(ours):.2f} {unit}"]
        for peer in peers:
            text = f"{value(peer):.2f} {unit}"
            if ratio and value(ours):
                text += f" ({value(peer) / value(ours):.2f}x)"
            cells.append(text)
        return f"| {name} | " + " | ".join(cells) + " |"

    for i in range(len(ours.turns)):
        lines.append(row(f"turn {i + 1}, time to first token", _ttft(i)))
        lines.append(row(f"turn {i + 1}, total", _total(i)))
    lines.append(row("peak RSS of the server", lambda r: r.peak_rss_one_mib, "MiB", False))
    lines += [
        "",
        f"| {args.clients} clients at once, {args.turns} turns each on its own photo | {names} |",
        "|---|" + "---:|" * len(runs),
        "| answered | "
        + " | ".join(f"{r.concurrent_answered}/{r.concurrent_asked}" for r in runs)
        + " |",
        row("total wall time", lambda r: r.concurrent_wall_s),
        row("median request latency", lambda r: _stat(r, statistics.median)),
        row("slowest request", lambda r: _stat(r, max)),
        row("peak RSS of the server, both parts", lambda r: r.peak_rss_mib, "MiB", False),
        "| load average, server start / end | "
        + " | ".join(f"{r.load_before} / {r.load_after}" for r in runs)
        + " |",
    ]
    servers = [p for p in peers if p.server.startswith("llama-server")]
    if servers:
        lines += ["", *targets(ours, servers)]
    return "\n".join(lines) + "\n"


def _ttft(turn: int) -> Callable[[Run], float]:
    return lambda run: run.turns[turn].ttft_s


def _total(turn: int) -> Callable[[Run], float]:
    return lambda run: run.turns[turn].total_s


def targets(ours: Run, servers: list[Run]) -> list[str]:
    """Issue 30's targets, each against llama-server's best setting for that figure."""

    def best(value: Callable[[Run], float]) -> float:
        return min(value(r) for r in servers)

    wall = ours.concurrent_wall_s / best(lambda r: r.concurrent_wall_s)
    median = _stat(ours, statistics.median) / best(lambda r: _stat(r, statistics.median))
    first = ours.turns[0].ttft_s / best(lambda r: r.turns[0].ttft_s)
    follow = [ours.turns[i].ttft_s / best(_ttft(i)) for i in range(1, len(ours.turns))]
    answered = ours.concurrent_answered == ours.concurrent_asked
    return [
        "| target (against llama-server's best) | ours / theirs | |",
        "|---|---|---|",
        f"| clients at once: wall <= 0.85x | {wall:.2f}x | {_met(wall <= 0.85)} |",
        f"| clients at once: median latency <= 1.0x | {median:.2f}x | {_met(median <= 1.0)} |",
        f"| clients at once: all answered | {ours.concurrent_answered}/"
        f"{ours.concurrent_asked} | {_met(answered)} |",
        f"| one client: first turn <= 1.0x | {first:.2f}x | {_met(first <= 1.0)} |",
        "| one client: follow-ups <= 1.0x | "
        + ", ".join(f"{f:.2f}x" for f in follow)
        + f" | {_met(bool(follow) and max(follow) <= 1.0)} |",
    ]


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _stat(run: Run, how: Any) -> float:
    return float(how(run.concurrent_latencies)) if run.concurrent_latencies else 0.0


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
    parser.add_argument(
        "--peers",
        default="llama-server,llama-server -np 4",
        help=f"comma-separated, of: {', '.join(PEERS)}",
    )
    parser.add_argument("--parallel", type=int, help="serve's --parallel (default: its own)")
    parser.add_argument("--rounds", type=int, default=1, help="measure every server R times")
    parser.add_argument("--update", type=Path, help="BENCHMARKS.md to update")
    args = parser.parse_args(argv)

    maker = Path(__file__).with_name("make_twins.py")
    lm, mm = twin_pair(args.twins, args.preset, maker)
    lm = word_answers(lm)
    for path in (lm, mm):  # the page cache warm for both servers alike
        with path.open("rb") as f:
            while f.read(1 << 24):
                pass
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers: {', '.join(sorted(unknown))}")
    if any(p.startswith("llama-server") for p in peers):
        args.llama_server = llama_server()
        if args.llama_server is None:
            peers = [p for p in peers if not p.startswith("llama-server")]
    servers = [OURS, *peers]
    rounds: dict[str, list[Run]] = {server: [] for server in servers}
    for r in range(args.rounds):
        for server in servers[r % len(servers) :] + servers[: r % len(servers)]:
            rounds[server].append(measure(server, lm, mm, args))
    runs = [combined(rounds[server]) for server in servers]
    command = command_line("benchmarks/serve.py", argv or sys.argv[1:])
    label = f"{args.preset} twin"
    table = markdown(runs, label, args, command)
    if args.rounds > 1:
        table += "\n" + ranges(rounds) + "\n"
    print(table)
    if args.update:
        update_section(
            args.update, f"serve-{args.preset}", f"Stateless clients, {label}: serve", table
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
