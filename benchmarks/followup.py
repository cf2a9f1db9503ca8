"""Follow-up questions about one photo: llava-local against llama-cpp-python's handler.

    python benchmarks/followup.py --preset tinyllava-1.1b              # quick, ~3 min
    python benchmarks/followup.py --preset llava-1.5-7b --update BENCHMARKS.md

Three engines answer the same three-turn conversation about one photo, one after the
other, each in its own subprocess (so each peak RSS is its own), with the same GGUF
files, threads, context size, batch size and number of new tokens, greedy decoding:

- ``ours``: :class:`llava_local.VisionChat` (llama.cpp in-process; keeps the KV cache,
  encodes the picture once);
- ``handler``: ``Llama(..., chat_handler=Llava15ChatHandler(...))`` and
  ``create_chat_completion(stream=True)`` with the whole history resent each turn, the
  picture as a data URI of the file: what users of llama-cpp-python write;
- ``raw``: a minimal libmtmd script (``llava_local_dev.mtmd.MtmdRunner``) with our
  prompt text. Its turn 1 is the floor for a first turn. Its follow-ups evaluate only
  the new question's tokens (plus the previous answer's last token, which sampling never
  evaluates) on the warm KV cache: the floor for a follow-up turn.

One instrument times all three: ``Llama.generate`` of each engine's ``Llama`` object is
wrapped to note when each token comes out, so "time to first token" means the same
thing everywhere (the first new token sampled, counted from the call that starts the
turn). Decoding speed is (tokens - 1) / (last token - first token).

The handler's picture-encoding time: its ``mtmd_helper_eval_chunk_single`` call for the
image chunk is replaced by the two calls that helper makes (``mtmd_encode_chunk``, then
``mtmd_helper_decode_image_chunk`` on ``mtmd_get_output_embd``), timed between them;
the native work is the same. Its CLIP context is created before the clock starts (the
handler creates it lazily on the first call), as our engine creates it when loading.

The handler would stop at end-of-sequence; a logits processor bans it there, so it
writes exactly ``--max-tokens``. Our engine has no such option: ``new`` shows what it
wrote. Random-weight twins rarely pick end-of-sequence under greedy decoding.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llava_local_dev.mtmd import MtmdRunner
from llava_local_dev.report import command_line, update_section
from llava_local_dev.twins import ascii_answers, twin_pair, word_answers
from pydantic import BaseModel

from llava_local.apps import bench

ENGINES = ("ours", "handler", "raw")
DEFAULT_TWINS = Path("/tmp/twins")


class TurnRun(BaseModel):
    """One turn as one engine ran it."""

    turn: int
    ttft_s: float | None  # first new token sampled
    text_ttft_s: float | None  # first non-empty text handed to the caller
    total_s: float
    image_encode_s: float | None
    images_encoded: int
    prompt_tokens: int  # evaluated this turn
    reused_tokens: int  # taken from the KV cache
    question_tokens: int | None  # of the evaluated ones, the new question's (follow-ups)
    new_tokens: int
    hit_eos: bool
    decode_tps: float | None
    answer: str


class EngineRun(BaseModel):
    """One engine's whole conversation, from its own process."""

    engine: str
    load_s: float
    rss_after_load_mib: float
    peak_rss_mib: float
    load_average: tuple[float, float, float]  # when the worker finished
    load_before: tuple[float, float, float] | None = None  # when the parent started it
    turns: list[TurnRun]


class Config(BaseModel):
    """What every worker gets: the same files and settings."""

    model: str
    mmproj: str
    image: str | None
    threads: int
    n_ctx: int
    n_batch: int
    max_tokens: int
    turns: int


# ----------------------------------------------------------------------------- probe


class Probe:
    """Notes when ``Llama.generate`` yields each token: the same instrument for every engine."""

    def __init__(self, llama: Any) -> None:
        import llama_cpp

        self.first: float | None = None
        self.last: float | None = None
        self.count = 0
        self.eos = False
        self.last_token: int | None = None
        original = llama.generate
        vocab = llama._model.vocab

        def generate(*args: Any, **kwargs: Any) -> Iterator[int]:
            for token in original(*args, **kwargs):
                now = time.perf_counter()
                if self.first is None:
                    self.first = now
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    self.eos = True
                else:
                    self.last, self.count, self.last_token = now, self.count + 1, token
                yield token

        llama.generate = generate

    def start(self) -> None:
        """Forget the last turn."""
        self.first = self.last = None
        self.count = 0
        self.eos = False

    def ttft(self, start: float) -> float | None:
        return None if self.first is None else self.first - start

    def decode_tps(self) -> float | None:
        if self.first is None or self.last is None or self.count < 2 or self.last <= self.first:
            return None
        return (self.count - 1) / (self.last - self.first)


def _photo(config: Config) -> bytes:
    return Path(config.image).read_bytes() if config.image else bench.synthetic_photo()


def _peak() -> float:
    return bench.peak_rss_mib()


def _questions(config: Config) -> list[str]:
    return [bench.QUESTIONS[i % len(bench.QUESTIONS)] for i in range(config.turns)]


def _question_suffix(previous: str, current: str, answer: str) -> str:
    """The text a follow-up adds after the previous answer ("</s>USER: ... ASSISTANT:")."""
    added = current[len(previous) :] if current.startswith(previous) else current
    at = added.find(answer) if answer else -1
    return added[at + len(answer) :] if at >= 0 else added


# --------------------------------------------------------------------------- workers


def work_ours(config: Config) -> EngineRun:
    """The library, through VisionChat, as a user calls it."""
    from llava_local import VisionChat

    start = time.perf_counter()
    chat = VisionChat.llama_cpp(
        config.model,
        config.mmproj,
        n_ctx=config.n_ctx,
        n_threads=config.threads,
        chat_format="vicuna",
    )
    load_s = time.perf_counter() - start
    rss_loaded = _peak()
    engine: Any = chat.engine
    llama = engine._llama  # instrumentation only: the probe wraps its generate()
    probe = Probe(llama)
    photo = _photo(config)
    turns: list[TurnRun] = []
    previous_text = ""
    answer = ""
    for index, question in enumerate(_questions(config)):
        messages = [*chat.history]
        probe.start()
        t0 = time.perf_counter()
        text_first = None
        image = photo if index == 0 else None
        with chat.stream(
            question, image, temperature=0.0, seed=0, max_tokens=config.max_tokens
        ) as stream:
            for piece in stream:
                if text_first is None and piece:
                    text_first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        stats = stream.reply.stats
        # How many of the evaluated tokens are the new question's (not re-read history).
        from llava_local.types import Message

        prompt_text = engine.chat_format.prompt(
            [*messages, Message(role="user", content=question, images=stream.images)],
            engine._marker,
        )
        question_tokens = None
        if index:
            suffix = _question_suffix(previous_text, prompt_text, answer)
            question_tokens = len(llama.tokenize(suffix.encode(), add_bos=False, special=True))
        previous_text, answer = prompt_text, stream.reply.text
        turns.append(
            TurnRun(
                turn=index + 1,
                ttft_s=probe.ttft(t0),
                text_ttft_s=text_first,
                total_s=total,
                image_encode_s=stats.image_encode_s,
                images_encoded=stats.images_encoded or 0,
                prompt_tokens=stats.prompt_tokens or 0,
                reused_tokens=stats.cached_tokens or 0,
                question_tokens=question_tokens,
                new_tokens=probe.count,
                hit_eos=probe.eos,
                decode_tps=probe.decode_tps(),
                answer=answer,
            )
        )
    chat.close()
    return EngineRun(
        engine="ours",
        load_s=load_s,
        rss_after_load_mib=rss_loaded,
        peak_rss_mib=_peak(),
        load_average=os.getloadavg(),
        turns=turns,
    )


class _TimedMtmd:
    """The handler's view of ``llama_cpp.mtmd_cpp``, with the image-chunk helper split.

    ``mtmd_helper_eval_chunk_single`` on an image chunk is exactly ``mtmd_encode_chunk``,
    ``mtmd_get_output_embd`` and ``mtmd_helper_decode_image_chunk`` (mtmd-helper.cpp);
    calling the three ourselves lets the encode be timed on its own.
    """

    def __init__(self, module: Any) -> None:
        self._m = module
        self.encode_s = 0.0
        self.encoded = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._m, name)

    def mtmd_helper_eval_chunk_single(self, *args: Any) -> int:
        ctx, lctx, chunk, n_past, seq_id, n_batch, _logits_last, new_n_past = args
        m = self._m
        if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
            result: int = m.mtmd_helper_eval_chunk_single(*args)
            return result
        t0 = time.perf_counter()
        if m.mtmd_encode_chunk(ctx, chunk) != 0:
            return 1
        embd = m.mtmd_get_output_embd(ctx)
        self.encode_s += time.perf_counter() - t0
        self.encoded += 1
        decoded: int = m.mtmd_helper_decode_image_chunk(
            ctx,
            lctx,
            chunk,
            embd,
            n_past,
            seq_id,
            n_batch,
            new_n_past,
            m.mtmd_helper_post_decode_callback(),
            None,
        )
        return decoded


def work_handler(config: Config) -> EngineRun:
    """llama-cpp-python's Llava15ChatHandler, the history resent every turn."""
    import numpy as np
    from llama_cpp import Llama, LogitsProcessorList
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    start = time.perf_counter()
    handler: Any = Llava15ChatHandler(clip_model_path=config.mmproj, verbose=False)
    llama: Any = Llama(
        model_path=config.model,
        chat_handler=handler,
        n_ctx=config.n_ctx,
        n_batch=config.n_batch,
        n_ubatch=config.n_batch,
        n_threads=config.threads,
        n_threads_batch=config.threads,
        n_gpu_layers=0,
        verbose=False,
    )
    handler._init_mtmd_context(llama)  # CLIP loaded before the clock, like our engine
    _quiet_mtmd()  # its per-step log lines, which verbose=False does not silence
    load_s = time.perf_counter() - start
    rss_loaded = _peak()
    timer = _TimedMtmd(handler._mtmd_cpp)
    handler._mtmd_cpp = timer
    probe = Probe(llama)
    eos = llama.token_eos()
    prompt_len = {"n": 0}
    original_generate = llama.generate

    def count_prompt(tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
        prompt_len["n"] = len(tokens)  # the handler evaluated all of it itself
        result: Iterator[int] = original_generate(tokens, *args, **kwargs)
        return result

    llama.generate = count_prompt

    def ban_eos(_ids: Any, scores: Any) -> Any:
        scores[eos] = -np.inf
        return scores

    uri = "data:image/jpeg;base64," + base64.b64encode(_photo(config)).decode()
    messages: list[dict[str, Any]] = []
    turns: list[TurnRun] = []
    for index, question in enumerate(_questions(config)):
        if index == 0:
            content: Any = [
                {"type": "image_url", "image_url": {"url": uri}},
                {"type": "text", "text": question},
            ]
        else:
            content = question
        messages.append({"role": "user", "content": content})
        probe.start()
        timer.encode_s, timer.encoded = 0.0, 0
        t0 = time.perf_counter()
        text_first = None
        pieces: list[str] = []
        stream = llama.create_chat_completion(
            messages=messages,
            stream=True,
            max_tokens=config.max_tokens,
            temperature=0.0,
            repeat_penalty=1.0,
            seed=0,
            logits_processor=LogitsProcessorList([ban_eos]),
        )
        for chunk in stream:
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                if text_first is None:
                    text_first = time.perf_counter() - t0
                pieces.append(piece)
        total = time.perf_counter() - t0
        answer = "".join(pieces)
        messages.append({"role": "assistant", "content": answer})
        turns.append(
            TurnRun(
                turn=index + 1,
                ttft_s=probe.ttft(t0),
                text_ttft_s=text_first,
                total_s=total,
                image_encode_s=timer.encode_s,
                images_encoded=timer.encoded,
                prompt_tokens=prompt_len["n"],
                reused_tokens=0,
                question_tokens=None,
                new_tokens=probe.count,
                hit_eos=probe.eos,
                decode_tps=probe.decode_tps(),
                answer=answer,
            )
        )
    llama.close()
    return EngineRun(
        engine="handler",
        load_s=load_s,
        rss_after_load_mib=rss_loaded,
        peak_rss_mib=_peak(),
        load_average=os.getloadavg(),
        turns=turns,
    )


def work_raw(config: Config) -> EngineRun:
    """A minimal libmtmd script: the floor for turn 1 and for a follow-up's new tokens."""
    import llama_cpp

    from llava_local.chat_formats import get_format
    from llava_local.types import Message

    start = time.perf_counter()
    runner = MtmdRunner(
        config.model,
        config.mmproj,
        n_ctx=config.n_ctx,
        n_batch=config.n_batch,
        exact_clip=False,  # llama.cpp's default CLIP attention, as our engine uses
        n_threads=config.threads,
        n_threads_batch=config.threads,
    )
    llama = runner.llama
    load_s = time.perf_counter() - start
    rss_loaded = _peak()
    probe = Probe(llama)
    marker = runner.marker
    fmt = get_format("vicuna")
    photo = _photo(config)
    sampling: dict[str, Any] = {"temp": 0.0, "top_k": 40, "top_p": 0.95, "min_p": 0.05}

    def generate(tokens: list[int]) -> str:
        out = b""
        for token in llama.generate(tokens, reset=False, repeat_penalty=1.0, **sampling):
            if llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
                break
            out += bytes(llama.detokenize([token]))
            if probe.count >= config.max_tokens:
                break
        return out.decode("utf-8", "replace").lstrip()

    history: list[Message] = []
    turns: list[TurnRun] = []
    previous_text = ""
    answer = ""
    for index, question in enumerate(_questions(config)):
        user = Message(role="user", content=question)
        text = fmt.prompt([*history, user], marker) if index else ""
        carry = probe.last_token if not probe.eos else None  # sampled, never evaluated
        probe.start()
        encode_s, encoded = 0.0, 0
        t0 = time.perf_counter()
        if index == 0:
            text = fmt.prompt([user.model_copy(update={"images": (_fake_image(),)})], marker)
            encode_s = runner.evaluate(text, [photo])
            encoded, reused, evaluated, question_tokens = 1, 0, llama.n_tokens, None
            answer = generate([])
        else:
            suffix = _question_suffix(previous_text, text, answer)
            tokens = llama.tokenize(suffix.encode(), add_bos=False, special=True)
            if carry is not None:
                tokens = [carry, *tokens]
            reused, evaluated, question_tokens = llama.n_tokens, len(tokens), len(tokens)
            answer = generate(tokens)
        total = time.perf_counter() - t0
        history += [user, Message(role="assistant", content=answer)]
        previous_text = text
        turns.append(
            TurnRun(
                turn=index + 1,
                ttft_s=probe.ttft(t0),
                text_ttft_s=None,
                total_s=total,
                image_encode_s=encode_s,
                images_encoded=encoded,
                prompt_tokens=evaluated,
                reused_tokens=reused,
                question_tokens=question_tokens,
                new_tokens=probe.count,
                hit_eos=probe.eos,
                decode_tps=probe.decode_tps(),
                answer=answer,
            )
        )
    runner.close()
    llama.close()
    return EngineRun(
        engine="raw",
        load_s=load_s,
        rss_after_load_mib=rss_loaded,
        peak_rss_mib=_peak(),
        load_average=os.getloadavg(),
        turns=turns,
    )


def _quiet_mtmd() -> None:
    """Route libmtmd's log (a line per step, on stderr) to llama-cpp-python's quiet logger."""
    from llama_cpp import _logger
    from llama_cpp import mtmd_cpp as m

    m.mtmd_log_set(_logger.llama_log_callback, None)
    m.mtmd_helper_log_set(_logger.llama_log_callback, None)


def _fake_image() -> Any:
    """A stand-in picture for rendering the prompt text only (the format adds a marker)."""
    from llava_local.types import PreparedImage

    return PreparedImage(data=b"", mime="image/png", width=1, height=1, sha256="", source="")


WORKERS: dict[str, Callable[[Config], EngineRun]] = {
    "ours": work_ours,
    "handler": work_handler,
    "raw": work_raw,
}


# ---------------------------------------------------------------------------- parent


def _run_worker(engine: str, config: Config) -> EngineRun:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", engine, "--config", config.model_dump_json()]
        cmd += ["--out", str(out)]
        print(f"[{time.strftime('%H:%M:%S')}] {engine}: running ...", flush=True)
        before = os.getloadavg()
        subprocess.run(cmd, check=True)
        run = EngineRun.model_validate_json(out.read_text())
        return run.model_copy(update={"load_before": before})


def best(results: list[EngineRun]) -> EngineRun:
    """The repetition with the shortest whole conversation (noise only ever adds time),
    with the highest peak RSS of all of them."""
    chosen = min(results, key=lambda r: sum(t.total_s for t in r.turns))
    peak = max(r.peak_rss_mib for r in results)
    return chosen.model_copy(update={"peak_rss_mib": peak})


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def turn_rows(runs: dict[str, EngineRun]) -> list[list[str]]:
    """Rows of the per-turn table, engine by engine."""
    rows = []
    for name, run in runs.items():
        for t in run.turns:
            evaluated = str(t.prompt_tokens)
            if t.question_tokens is not None and name == "ours":
                evaluated += f" ({t.question_tokens} question)"
            rows.append(
                [
                    name,
                    str(t.turn) + ("+photo" if t.turn == 1 else ""),
                    _fmt(t.ttft_s),
                    _fmt(t.total_s),
                    _fmt(t.image_encode_s),
                    evaluated,
                    str(t.reused_tokens),
                    f"{t.new_tokens}{' (EOS)' if t.hit_eos and name == 'ours' else ''}",
                    _fmt(t.decode_tps, ".1f"),
                ]
            )
    return rows


TURN_HEADER = [
    "engine",
    "turn",
    "TTFT s",
    "total s",
    "image encode s",
    "prompt tokens evaluated",
    "reused",
    "new tokens",
    "decode tok/s",
]


def targets(runs: dict[str, EngineRun]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the issue's targets that these runs can decide."""
    out: list[tuple[str, str, bool | None]] = []
    ours, handler, raw = runs.get("ours"), runs.get("handler"), runs.get("raw")
    if ours and handler:
        for o, h in zip(ours.turns[1:], handler.turns[1:], strict=False):
            r = _ratio(h.ttft_s, o.ttft_s)
            out.append(
                (
                    f"turn {o.turn} TTFT >= 20x lower than the handler",
                    f"{_fmt(h.ttft_s)} s / {_fmt(o.ttft_s)} s = {_fmt(r, '.1f')}x",
                    None if r is None else r >= 20,
                )
            )
        r1 = _ratio(ours.turns[0].total_s, handler.turns[0].total_s)
        out.append(
            (
                "turn 1 total <= 1.05x the handler's",
                f"{_fmt(ours.turns[0].total_s)} s / {_fmt(handler.turns[0].total_s)} s "
                f"= {_fmt(r1, '.3f')}x",
                None if r1 is None else r1 <= 1.05,
            )
        )
        rr = _ratio(ours.peak_rss_mib, handler.peak_rss_mib)
        out.append(
            (
                "peak RSS within 10% of the handler's",
                f"{ours.peak_rss_mib:.0f} / {handler.peak_rss_mib:.0f} MiB = {_fmt(rr, '.3f')}x",
                None if rr is None else abs(rr - 1) <= 0.10,
            )
        )
    if ours and raw:
        for o, w in zip(ours.turns[1:], raw.turns[1:], strict=False):
            r = _ratio(o.ttft_s, w.ttft_s)
            out.append(
                (
                    f"turn {o.turn} TTFT within 1.2x of new-tokens-only",
                    f"{_fmt(o.ttft_s)} s / {_fmt(w.ttft_s)} s = {_fmt(r, '.2f')}x",
                    None if r is None else r <= 1.2,
                )
            )
        r = _ratio(ours.turns[0].total_s, raw.turns[0].total_s)
        out.append(
            (
                "turn 1 total vs the raw mtmd script (library overhead)",
                f"{_fmt(ours.turns[0].total_s)} s / {_fmt(raw.turns[0].total_s)} s = "
                f"{_fmt(r, '.3f')}x",
                None,
            )
        )
    return out


def markdown(
    label: str, config: Config, runs: dict[str, EngineRun], command: str, when: str, *, repeat: int
) -> str:
    """The section this run writes into BENCHMARKS.md."""
    lines = [
        f"Command: `{command}`  ",
        f"Run: {when}; {config.threads} threads, n_ctx {config.n_ctx}, n_batch "
        f"{config.n_batch}, {config.max_tokens} new tokens per answer, greedy; picture: "
        f"{config.image or 'generated 1280x960 photo-like JPEG (llava_local.apps.bench)'}"
        + (
            f"; best of {repeat} runs per engine (order alternating), peak RSS the highest."
            if repeat > 1
            else "."
        ),
        "",
        "| " + " | ".join(TURN_HEADER) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(TURN_HEADER) - 2)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in turn_rows(runs)]
    lines += ["", "| engine | load s | peak RSS after load MiB | peak RSS MiB | load average |"]
    lines += ["|---|---:|---:|---:|---|"]
    for name, run in runs.items():
        load = "/".join(f"{v:.2f}" for v in run.load_average)
        if run.load_before is not None:
            load = "/".join(f"{v:.2f}" for v in run.load_before) + " before, " + load + " after"
        lines.append(
            f"| {name} | {run.load_s:.1f} | {run.rss_after_load_mib:.0f} | "
            f"{run.peak_rss_mib:.0f} | {load} |"
        )
    checks = targets(runs)
    if checks:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        for target, measured, met in checks:
            verdict = "n/a" if met is None else ("yes" if met else "**no**")
            lines.append(f"| {target} | {measured} | {verdict} |")
    return "\n".join(lines) + "\n"


def print_tables(runs: dict[str, EngineRun]) -> None:
    """The per-turn table, memory and the targets, on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    grid = Table(title="three turns about one photo")
    for name in TURN_HEADER:
        grid.add_column(name, justify="left" if name in ("engine", "turn") else "right")
    for row in turn_rows(runs):
        grid.add_row(*row)
    console.print(grid)
    for name, run in runs.items():
        console.print(
            f"{name}: load {run.load_s:.1f} s, peak RSS {run.peak_rss_mib:.0f} MiB "
            f"({run.rss_after_load_mib:.0f} after loading)"
        )
    for target, measured, met in targets(runs):
        verdict = "n/a" if met is None else ("met" if met else "NOT met")
        console.print(f"{target}: {measured} -> {verdict}")


def _pair(args: argparse.Namespace) -> tuple[Path, Path, str]:
    if args.model:
        if not args.mmproj:
            raise SystemExit("--model needs --mmproj")
        return Path(args.model), Path(args.mmproj), args.label or Path(args.model).stem
    maker = Path(__file__).with_name("make_twins.py")
    lm, mm = twin_pair(args.twins, args.preset, maker)
    if args.answers == "words":
        return word_answers(lm), mm, args.label or f"{args.preset} twin"
    if args.answers == "letters":
        label = f"{args.preset} twin, letter tokens only"
        return word_answers(lm, whole_words=False), mm, args.label or label
    if args.answers == "ascii":
        return ascii_answers(lm), mm, args.label or f"{args.preset} twin, ASCII answers"
    return lm, mm, args.label or f"{args.preset} twin, answers as written"


def main(argv: list[str] | None = None) -> int:
    """Run the engines one after the other, print the tables, optionally update the file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tinyllava-1.1b", help="twin to use (make_twins)")
    parser.add_argument("--twins", type=Path, default=DEFAULT_TWINS, help="where twins live")
    parser.add_argument("--model", help="a GGUF language model instead of a twin")
    parser.add_argument("--mmproj", help="its projector")
    parser.add_argument("--label", help="name of the BENCHMARKS.md section")
    parser.add_argument(
        "--answers",
        choices=["words", "letters", "ascii", "any"],
        default="words",
        help="twins only: words = a copy answering in space-led word tokens, with the "
        "prompts' words as tokens (word_answers); letters = the same without whole words; "
        "ascii = printable bytes (ascii_answers); any = the twin as written",
    )
    parser.add_argument("--image", help="a photo (default: a generated one)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument(
        "--repeat", type=int, default=1, help="run every engine N times; report the best"
    )
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--update", type=Path, help="BENCHMARKS.md to update")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = WORKERS[args.worker](Config.model_validate_json(args.config))
        args.out.write_text(result.model_dump_json())
        return 0

    lm, mm, label = _pair(args)
    config = Config(
        model=str(lm),
        mmproj=str(mm),
        image=args.image,
        threads=args.threads,
        n_ctx=args.n_ctx,
        n_batch=args.n_batch,
        max_tokens=args.max_tokens,
        turns=args.turns,
    )
    for path in (lm, mm):  # page cache warm for every engine alike
        with path.open("rb") as f:
            while f.read(1 << 24):
                pass
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    command = command_line("benchmarks/followup.py", argv or sys.argv[1:])
    engines = args.engines.split(",")
    every: dict[str, list[EngineRun]] = {name: [] for name in engines}
    for rep in range(args.repeat):  # alternate the order, so no engine always goes first
        for name in engines if rep % 2 == 0 else engines[::-1]:
            every[name].append(_run_worker(name, config))
    runs = {name: best(results) for name, results in every.items()}
    print_tables(runs)
    if args.json:
        payload: dict[str, Any] = {"label": label, "when": when, "config": config.model_dump()}
        payload["repeat"] = args.repeat
        payload["runs"] = {k: v.model_dump() for k, v in runs.items()}
        payload["all_runs"] = {k: [r.model_dump() for r in v] for k, v in every.items()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.update:
        slug = re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-")
        update_section(
            args.update,
            f"followup:{slug}",
            label,
            markdown(label, config, runs, command, when, repeat=args.repeat),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
