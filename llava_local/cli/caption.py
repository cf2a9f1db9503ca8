"""``llava-local caption DIR|GLOB... -p TEXT [-p TEXT...] --out results.jsonl``: a folder,
captioned (several prompts: each picture is read once and asked each).

A thin layer over :func:`llava_local.apps.captioning.caption` (the package documents the
line format and how a run resumes). Run the same command again after a crash, Ctrl-C or a stop: the
pictures already recorded are skipped, those that failed too unless --retry-errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ..apps.captioning import caption as caption_pictures
from ..apps.captioning import caption_ray, read_prompts
from ..backends import announce
from ..chat import VisionChat
from ..errors import InvalidRequestError, LlavaLocalError
from ..wording import count, plural
from ._common import engine_options, engine_plan, err_console, json_option, run_safely


def _load_schema(
    ctx: click.Context, param: click.Parameter, value: Path | None
) -> dict[str, Any] | None:
    """The JSON schema file's contents, refused at once if it is not a JSON object."""
    if value is None:
        return None
    try:
        schema = json.loads(value.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise click.BadParameter(f"cannot read a JSON schema from {value}: {exc}") from None
    if not isinstance(schema, dict):
        raise click.BadParameter(f"{value} holds JSON, but not a JSON schema object")
    return schema


@click.command()
@click.argument("inputs", nargs=-1, required=True, metavar="DIR|GLOB|IMAGE...")
@click.option(
    "--prompt",
    "-p",
    "prompt",
    multiple=True,
    help="What to ask about each picture; give it several times to ask several things.",
)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A text file of prompts, one a line, asked after any -p.",
)
@click.option(
    "--out",
    "-o",
    required=True,
    metavar="PATH",
    type=click.Path(path_type=Path),
    help="JSON Lines file to append to (a folder with --format parquet); an existing "
    "one is resumed.",
)
@click.option(
    "--schema",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    callback=_load_schema,
    help="JSON schema file the answers must fit (one retry on a misfit).",
)
@click.option("--limit", type=click.IntRange(min=1), help="Caption at most N new pictures.")
@click.option("--recursive", "-r", is_flag=True, help="Descend into subdirectories.")
@click.option(
    "--retry-errors",
    is_flag=True,
    help="Ask again about pictures whose line in --out is an error (else they are skipped).",
)
@click.option(
    "--parallel",
    type=click.IntRange(1, 64),
    help="Pictures, or prompts about one picture, asked at once (default 1). With the "
    "llama.cpp engine (chosen or found by auto) the model is loaded with that many slots "
    "(each its own KV memory), decoded together a token each per step, and a picture's "
    "prompts share one reading of it; Ollama or an OpenAI-compatible server gets that "
    "many requests at once; with --ray, per worker.",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    metavar="[ADDRESS]",
    help="Run on Ray: alone, a local instance for the run; or join a cluster "
    "(auto, HOST:PORT, ray://HOST:10001). Needs llava-local[ray].",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Ray workers, each with its own engine (default: as many as the CPUs allow).",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["jsonl", "parquet"]),
    default="jsonl",
    show_default=True,
    help="JSON Lines, or a Parquet dataset (--out is then a folder of part files).",
)
@engine_options
@click.option("--system", help="System prompt.")
@click.option("--temperature", type=float, help="Sampling temperature (0 = greedy).")
@click.option("--max-tokens", type=int, help="Stop each answer after this many tokens.")
@click.option("--seed", type=int, help="Random seed, for repeatable sampling.")
@click.option("--no-progress", is_flag=True, help="Do not draw the progress bar.")
@json_option("Print the summary as JSON.")
def caption(
    *,
    inputs: tuple[str, ...],
    prompt: tuple[str, ...],
    prompts_file: Path | None,
    out: Path,
    schema: dict[str, Any] | None,
    limit: int | None,
    recursive: bool,
    retry_errors: bool,
    ray_address: str | None,
    workers: int | None,
    parallel: int | None,
    output_format: str,
    system: str | None,
    temperature: float | None,
    max_tokens: int | None,
    seed: int | None,
    no_progress: bool,
    as_json: bool,
    **engine: Any,
) -> None:
    """Ask PROMPT about every picture of DIR, GLOB or IMAGE, one JSON line each in --out.

    With several prompts (-p A -p B, or --prompts FILE) each picture is read once and
    asked each, one line per picture and prompt. Pictures already recorded in --out for
    a prompt (same content, any name) are not asked it again, failed ones too unless
    --retry-errors, so the same command continues an interrupted run. --parallel asks
    several at once.
    """
    given = {"temperature": temperature, "max_tokens": max_tokens, "seed": seed}
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if not prompt and prompts_file is None:
        raise click.UsageError("give what to ask: --prompt/-p TEXT, or --prompts FILE")
    hosts: tuple[str, ...] = engine.pop("host")
    if ray_address is None and (len(hosts) > 1 or workers):
        raise click.UsageError("several --host and --workers need --ray")
    if ray_address is not None and not _ray_address(ray_address):
        raise click.UsageError(
            f"--ray took {ray_address!r} as a cluster's address, which it is not (auto, "
            "HOST:PORT or ray://HOST:PORT); put --ray after the pictures, or give it an address"
        )
    engine["host"] = hosts[0] if hosts else None

    def body() -> None:
        prompts = [*prompt, *(read_prompts(prompts_file) if prompts_file else [])]
        # the one-machine job's settings; --ray adds where and how to spread it
        job: dict[str, Any] = {
            "prompt": prompts,
            "schema": schema,
            "limit": limit,
            "recursive": recursive,
            "retry_errors": retry_errors,
            "progress": not no_progress,
            "parallel": parallel,
            "format": "parquet" if output_format == "parquet" else "jsonl",
            **options,
        }
        # Planned first: which engine (auto's choice too) is known before any model loads.
        planned = engine_plan(**engine)
        try:
            if ray_address is None:
                if parallel and planned.engine == "llama_cpp":
                    planned = planned.replace(parallel=parallel)  # a slot per turn at once
                with VisionChat(planned, system=system) as chat:
                    summary = caption_pictures(chat, list(inputs), out, **job)
            else:
                # Opened only by the workers (each with its slots): the driver loads no model.
                announce(planned)
                with _native_stderr_aside():
                    summary = caption_ray(
                        {**planned.describe(), "system": system},
                        list(inputs),
                        out,
                        address=None if ray_address == "local" else ray_address,
                        workers=workers,
                        cpus_per_worker=engine.get("n_threads"),
                        hosts=hosts if len(hosts) > 1 else None,
                        **job,
                    )
        except (LlavaLocalError, KeyboardInterrupt) as exc:
            if not isinstance(exc, InvalidRequestError):
                err_console.print(
                    f"the results so far are in {out}; run again to continue "
                    "(--retry-errors also asks again about pictures that failed)",
                    soft_wrap=True,
                )
            raise
        if as_json:
            click.echo(summary.model_dump_json(indent=2))
        else:
            click.echo(str(summary))
        if summary.skipped_errors:
            files, lines = summary.skipped_error_pictures, summary.skipped_errors
            per_prompt = f" ({count(lines, 'error line')})" if lines != files else ""
            err_console.print(
                f"{count(files, 'picture')} kept the error of an earlier run{per_prompt}; "
                f"--retry-errors asks about {plural(files, 'it')} again",
                soft_wrap=True,
            )
        if not summary.found:
            err_console.print(f"no pictures found in {' '.join(inputs)}", soft_wrap=True)

    run_safely(body, as_json=as_json)


def _several_hosts(command: click.Command) -> click.Command:
    """The shared --host, but given several times: Ray workers spread over the hosts."""
    for index, param in enumerate(command.params):
        if param.name == "host":
            command.params[index] = click.Option(
                ["--host"],
                multiple=True,
                help="Ollama address (default: OLLAMA_HOST or 127.0.0.1:11434), or the "
                "OpenAI-compatible server's with --backend openai; with --ray, give it "
                "several times to spread the workers over several servers.",
            )
    return command


caption = _several_hosts(caption)


@contextlib.contextmanager
def _native_stderr_aside() -> Iterator[None]:
    """Ray's C++ core, in this process, writes its error-level log lines (such as
    "core_worker.cc ... E ... Actor ... has constructor arguments in the object store",
    about Ray Data's own actors) straight to file descriptor 2, as well as to its log
    files in the session folder. For the run, descriptor 2 goes to /dev/null and
    Python's ``sys.stderr`` (the progress bar, our messages, Python warnings) keeps the
    terminal through a copy of it; both are put back after."""
    sys.stderr.flush()
    try:
        python_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a stream of its own (tests, IDEs)
        python_fd2 = False
    saved = os.dup(2)
    python_stderr = sys.stderr
    if python_fd2:
        sys.stderr = open(  # noqa: SIM115  # closed below, after the run
            saved,
            "w",
            encoding=python_stderr.encoding,
            errors="backslashreplace",
            buffering=1,
            closefd=False,
        )
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        if python_fd2:
            sys.stderr.close()
            sys.stderr = python_stderr
        os.close(saved)


def _ray_address(text: str) -> bool:
    """Whether ``--ray``'s value is an address, not the next argument it swallowed."""
    return text in ("local", "auto") or text.startswith("ray://") or ":" in text
