"""The standard benchmark: a short conversation about one photo, timed turn by turn.

Why one fixed recipe: a number such as "12 s per answer" means little until one knows
whether the picture was encoded again, how many tokens were read and how many written.
:func:`run` asks the same questions (the first with the photo, the others about it) with
greedy decoding and a fixed answer length, through :class:`~llava_local.VisionChat`, so
the same code measures either engine on any model a user has. Per turn it reports the
time to the first answer text, the total time, the picture-encoding time, the prompt
tokens evaluated and reused and the decoding speed; then the peak resident memory of this
process. With Ollama the token counts and speeds are the daemon's own (its memory is not
this process's; its picture encoding is not reported separately).

Without a photo of the user's own, :func:`synthetic_photo` draws a photo-like JPEG
(sky, hills, soft shapes, grain) with numpy and Pillow: it compresses and encodes like a
photograph, and is the same on every machine.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, Field

from .. import host
from ..types import Stats
from ..wording import count

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from ..chat import VisionChat
    from ..images import ImageSource

__all__ = [
    "QUESTIONS",
    "BenchResult",
    "Machine",
    "TurnResult",
    "machine",
    "peak_rss_mib",
    "render",
    "run",
    "synthetic_photo",
    "table",
]

#: The questions, in order: the first comes with the photo, the rest are follow-ups.
QUESTIONS: tuple[str, ...] = (
    "What is in this picture?",
    "What colours stand out in it?",
    "What time of day does it look like, and why?",
    "Is there anything unusual in it?",
    "Describe it in one sentence.",
)


class Machine(BaseModel):
    """Where a benchmark ran: enough to tell whether two results are comparable."""

    cpu: str
    cores: int
    ram_gib: float | None
    os: str
    python: str
    llama_cpp_python: str | None
    load_average: tuple[float, float, float] | None


class TurnResult(BaseModel):
    """One question and its answer, timed.

    ``ttft_s`` and ``total_s`` are wall-clock times seen by the caller (picture
    preparation included); the other fields come from the engine's :class:`Stats`.
    """

    turn: int
    question: str
    with_image: bool
    ttft_s: float | None = Field(description="seconds to the first answer text; None if empty")
    total_s: float
    image_encode_s: float | None
    images_encoded: int | None
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None
    decode_tokens_per_s: float | None
    done_reason: str | None
    answer: str
    stats: Stats


class BenchResult(BaseModel):
    """A whole benchmark run: the turns plus what is needed to read them."""

    backend: str
    model: str
    image: str
    max_tokens: int
    load_s: float
    peak_rss_mib: float = Field(description="peak resident memory of this process")
    turns: list[TurnResult]
    machine: Machine
    started_at: str


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


def machine() -> Machine:
    """Describe this machine (CPU, cores, RAM, OS, Python, llama-cpp-python, load)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        llama_version: str | None = version("llama_cpp_python")
    except PackageNotFoundError:
        llama_version = None
    try:
        load: tuple[float, float, float] | None = os.getloadavg()
    except OSError:
        load = None
    return Machine(
        cpu=host.cpu_model(),
        cores=os.cpu_count() or 1,
        ram_gib=None if (total := host.total_bytes()) is None else total / 2**30,
        os=platform.platform(),
        python=platform.python_version(),
        llama_cpp_python=llama_version,
        load_average=load,
    )


def synthetic_photo(
    width: int = 1280,
    height: int = 960,
    *,
    seed: int = 0,
    quality: int = 90,
    exif: dict[int, Any] | None = None,
) -> bytes:
    """A photo-like JPEG: sky gradient, hills, blurred shapes and sensor grain.

    Smooth areas, edges and noise together make it compress (and cost to decode and
    encode) like a camera picture; flat test patterns would flatter every step.
    ``exif`` maps EXIF tag numbers to values (e.g. ``{0x0112: 6}`` for "rotate 90").
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    ridge = 0.55 + 0.08 * np.sin(x * 7.0 + seed) + 0.05 * np.sin(x * 23.0 + 1.3 * seed)
    ground = y > ridge
    img = np.empty((height, width, 3), np.float32)
    sky = ((0.35, 0.4), (0.55, 0.3), (0.95, -0.2))  # (top, slope) per channel
    grass = ((0.35, -0.1), (0.5, -0.15), (0.2, 0.0))
    for c in range(3):
        img[..., c] = np.where(ground, grass[c][0] + grass[c][1] * y, sky[c][0] + sky[c][1] * y)
    for _ in range(6):  # soft round shapes: a sun, bushes, a pond
        cy, cx = rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.95)
        r = rng.uniform(0.04, 0.15)
        d = ((y - cy) / r) ** 2 + ((x - cx) * (width / height) / r) ** 2
        mask = np.clip(1.5 - d, 0.0, 1.0)[..., None]
        img *= 1.0 - mask
        img += rng.uniform(0.1, 1.0, 3).astype(np.float32) * mask
    texture = np.zeros((height, width), np.float32)
    for cells in (8, 32, 128):  # multi-scale texture, bilinear-upsampled with Pillow
        grid = rng.standard_normal((cells * height // width + 1, cells + 1)).astype(np.float32)
        up = Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BILINEAR)
        texture += np.asarray(up) * (0.06 / (cells**0.3))
    img = img + texture[..., None] + rng.normal(0.0, 0.02, img.shape).astype(np.float32)
    pixels = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    picture = Image.fromarray(pixels, "RGB")
    out = io.BytesIO()
    kwargs: dict[str, Any] = {"quality": quality}
    if exif:
        tags = Image.Exif()
        for tag, value in exif.items():
            tags[tag] = value
        kwargs["exif"] = tags.tobytes()
    picture.save(out, format="JPEG", **kwargs)
    return out.getvalue()


def run(
    chat: VisionChat,
    image: ImageSource | None = None,
    *,
    turns: int = 3,
    max_tokens: int = 32,
    questions: Sequence[str] = QUESTIONS,
    on_turn: Callable[[TurnResult], None] | None = None,
) -> BenchResult:
    """Run the benchmark on ``chat`` (starting a new conversation) and return the result.

    ``image`` defaults to :func:`synthetic_photo`. Decoding is greedy (temperature 0,
    seed 0) and answers stop at ``max_tokens``, so runs differ only in timing. A model may
    still end an answer early; ``completion_tokens`` says how many it wrote.
    """
    if turns < 1:
        raise ValueError("turns must be at least 1")
    if not questions:
        raise ValueError("questions must not be empty")
    if image is None:
        image, description = synthetic_photo(), "generated 1280x960 photo-like JPEG"
    else:
        description = os.fspath(image) if isinstance(image, str | os.PathLike) else repr(image)
        description = description if len(description) <= 200 else description[:197] + "..."
    started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    mach = machine()
    chat.reset()
    results: list[TurnResult] = []
    load_s = 0.0
    for index in range(turns):
        question = questions[index % len(questions)]
        result = _turn(chat, index, question, image if index == 0 else None, max_tokens)
        load_s += result.stats.load_s
        results.append(result)
        if on_turn is not None:
            on_turn(result)
    return BenchResult(
        backend=chat.backend,
        model=chat.model,
        image=description,
        max_tokens=max_tokens,
        load_s=load_s,
        peak_rss_mib=peak_rss_mib(),
        turns=results,
        machine=mach,
        started_at=started_at,
    )


def _turn(
    chat: VisionChat, index: int, question: str, image: ImageSource | None, max_tokens: int
) -> TurnResult:
    start = time.perf_counter()
    first: float | None = None
    with chat.stream(question, image, temperature=0.0, seed=0, max_tokens=max_tokens) as stream:
        for piece in stream:
            if first is None and piece:
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    reply = stream.reply
    stats = reply.stats
    return TurnResult(
        turn=index + 1,
        question=question,
        with_image=image is not None,
        ttft_s=first,
        total_s=total,
        image_encode_s=stats.image_encode_s,
        images_encoded=stats.images_encoded,
        prompt_tokens=stats.prompt_tokens,
        cached_tokens=stats.cached_tokens,
        completion_tokens=stats.completion_tokens,
        decode_tokens_per_s=stats.decode_tokens_per_s,
        done_reason=reply.done_reason,
        answer=reply.text,
        stats=stats,
    )


def _num(value: float | int | None, fmt: str = ".2f") -> str:
    return "n/a" if value is None else format(value, fmt)


def table(result: BenchResult) -> Table:
    """The turns as a rich table; its caption names the engine, model, picture and memory."""
    from rich.table import Table

    grid = Table(
        title=f"llava-local bench: {result.backend}, {result.model}",
        caption=(
            "TTFT: time to the first answer text; encode: picture encoding; evaluated / "
            "reused: prompt tokens read this turn / taken from the cache; new: tokens "
            f"written; tok/s: decoding speed. Picture: {result.image}; up to "
            f"{result.max_tokens} new tokens per answer, greedy; "
            f"load {result.load_s:.2f} s; peak RSS {result.peak_rss_mib:.0f} MiB"
            + (" (this process; the daemon's memory is not counted)" if _remote(result) else "")
        ),
    )
    columns = ("turn", "TTFT s", "total s", "encode s", "evaluated", "reused", "new", "tok/s")
    for name in columns:
        grid.add_column(name, justify="left" if name == "turn" else "right", no_wrap=True)
    for t in result.turns:
        grid.add_row(
            f"{t.turn}{'+photo' if t.with_image else ''}",
            _num(t.ttft_s),
            _num(t.total_s),
            _num(t.image_encode_s),
            _num(t.prompt_tokens, "d"),
            _num(t.cached_tokens, "d"),
            _num(t.completion_tokens, "d"),
            _num(t.decode_tokens_per_s, ".1f"),
        )
    return grid


def _remote(result: BenchResult) -> bool:
    return result.backend == "ollama"


def render(result: BenchResult, console: Console | None = None) -> None:
    """Print the table, then one line about the machine."""
    from rich.console import Console

    out = console or Console()
    out.print(table(result))
    m = result.machine
    load = "n/a" if m.load_average is None else ", ".join(f"{v:.2f}" for v in m.load_average)
    out.print(
        f"{m.cpu}, {count(m.cores, 'core')}, {_num(m.ram_gib, '.1f')} GiB RAM; {m.os}; "
        f"Python {m.python}; llama-cpp-python {m.llama_cpp_python or 'not installed'}; "
        f"load average {load}",
        highlight=False,
    )
