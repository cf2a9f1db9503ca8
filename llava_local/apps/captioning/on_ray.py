"""Captioning past one machine: :func:`caption_ray` runs :func:`.local.caption`'s job on
a Ray cluster (``pip install 'llava-local[ray]'``).

It is Ray Data's batch inference: the pictures are a dataset, and ``map_batches`` hands
small batches of them to a fixed pool of actors, each of which builds one
:class:`~llava_local.VisionChat` from the chat's serialisable config
(:attr:`VisionChat.config`, or a plan's description: ``EnginePlan.describe()``) in its
process's engine pool and keeps it for its life (a llama.cpp model cannot be pickled;
llama-cpp-python issue 27). The driver needs no engine: the command line plans on the
driver and sends the plan's config, so only the workers load the model. Workers read the
pictures themselves, so files must be on a path every node sees (or pass a dataset
that holds the bytes, such as ``ray.data.read_binary_files(..., include_paths=True)``).

The lines are those of the one-machine job, built by the same code (path, sha256, prompt,
text or error, model, backend, stats, parsed), and the output file is the same too: the
driver alone writes it, appending each batch's lines as it finishes (JSON Lines; or a
Parquet dataset, a folder of part files, with ``format="parquet"``), skipping what the
file already holds, exactly as :func:`.local.caption` resumes. Each worker also skips
the pictures and prompts the file held when the run began, so a resumed run asks only
what is missing; a file whose picture the file held under another name gets a copy of
that line (``copy_of``). Copies of a picture within one run may each be answered by a
worker (they are not known to be copies before they are read): each file gets its own
answer then.

Faults:

- a bad picture is an error line, never a failed job;
- a worker that dies (killed, out of memory) is restarted by Ray and its unfinished
  batch is run again (Ray Data's actor pool sets ``max_restarts`` and
  ``max_task_retries`` to -1, without limit); the lines of a batch that ran twice are
  dropped by the driver, which de-duplicates by file, picture (content hash, or path)
  and prompt before writing, so each is written once;
- a picture whose reading killed its worker ``MAX_WORKER_DEATHS`` times (a crash in the
  engine's C code, memory running out on that picture) is not tried again: it gets an
  ``ImageError`` line, as a broken file does, and the run goes on instead of restarting
  workers forever (the workers tell a small actor, :class:`_Attempts`, which pictures
  they begin and finish);
- an error that stops a one-machine run (the engine is unreachable, the model is gone)
  stops this one too, after its line is written; so do ``max_failures_in_a_row`` engine
  failures in a row;
- Ctrl-C on the driver stops the job (its actors are killed when the run's Ray instance
  is stopped, or when the job's executor shuts down on a cluster) and leaves a file the
  next run resumes.

Resources: each worker reserves ``cpus_per_worker`` CPUs (default: the llama.cpp
engine's ``n_threads``, else 1) and llama.cpp runs that many threads. Ray Data's own
tasks (reading a dataset) need a CPU besides the actors' (two one-CPU actors on a
two-CPU instance wait forever), so a run needs ``workers x cpus_per_worker + 1``
logical CPUs; the local instance started for a run is sized so (never refused: the
extra CPU is a slot for Ray Data's reading, not a core), and joining a cluster with
fewer is refused before anything starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import saving, structured
from ...chat import VisionChat
from ...errors import (
    BackendError,
    ImageError,
    InvalidRequestError,
    LlavaLocalError,
    MissingDependencyError,
)
from ...picture_files import find_pictures
from ...progress import RunProgress
from ...structured import Schema
from ...wording import count, plural
from ..engines import shared_pool
from .asking import Answer
from .job import CaptionJob, CaptionSummary
from .ledger import Ledger
from .lines import Identity, Pair
from .lines import identity as identity_of
from .output import Format, Output, open_output, settled_all
from .pool import Pool, pool_size
from .prefetch import Item, load_item

if TYPE_CHECKING:
    import ray.data

__all__ = ["caption_ray", "local_cpus_needed"]

#: Pictures per batch handed to a worker: small, so lines reach the file soon after
#: they are answered and a killed worker loses little.
BATCH_SIZE = 2


def caption_ray(
    chat: VisionChat | Mapping[str, Any],
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    out: str | os.PathLike[str],
    *,
    prompt: str | Sequence[str],
    schema: Schema | None = None,
    limit: int | None = None,
    recursive: bool = False,
    progress: bool = True,
    max_failures_in_a_row: int = 5,
    retry_errors: bool = False,
    parallel: int | None = None,
    dataset: ray.data.Dataset | None = None,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: int | None = None,
    hosts: Sequence[str] | None = None,
    format: Format = "jsonl",
    batch_size: int = BATCH_SIZE,
    **options: Any,
) -> CaptionSummary:
    """:func:`.local.caption` on a Ray cluster: the same arguments, lines and resuming.

    ``chat`` is a :class:`VisionChat` or its :attr:`~VisionChat.config` (or a plan's
    ``describe()`` with the chat's settings): each worker builds its own chat from that
    config (a driver's chat is not used for answers; the command line opens none).
    ``inputs`` names the pictures as for
    :func:`~llava_local.picture_files.find_pictures`; or pass ``inputs=None`` and
    ``dataset``, an existing ``ray.data.Dataset`` with a ``path`` column of paths (and a
    ``bytes`` column, as ``read_binary_files(include_paths=True)`` gives, so workers
    need not see the files).

    ``address``: None starts a new local Ray instance for the run and stops it after,
    unless this process is connected to Ray already (a cluster that ``RAY_ADDRESS`` or
    ``ray start`` names is joined only when asked for: ``"auto"``); it has no dashboard
    and as many logical CPUs as the machine, or ``workers x cpus_per_worker + 1`` if
    that is more, so it always fits the pool (threads beyond the cores share them).
    ``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:10001"`` joins a running cluster.
    ``workers``: actors in the pool (default: as many as the CPUs allow, keeping one for
    Ray Data); ``cpus_per_worker`` CPUs reserved for each, and llama.cpp's threads.
    ``hosts``: for the Ollama and OpenAI-compatible engines, the servers the workers are
    spread over (round robin). ``parallel``: turns each worker runs at once (default 1;
    the llama.cpp engine is opened with that many slots). ``format``: ``"jsonl"``
    (``out`` is a file) or ``"parquet"`` (``out`` is a folder of part files). ``limit``
    stops the run after that many pictures are written (answers in flight are dropped,
    and asked again later).
    """
    job = CaptionJob.of(
        prompt,
        schema=schema,
        limit=limit,
        recursive=recursive,
        retry_errors=retry_errors,
        max_failures_in_a_row=max_failures_in_a_row,
        parallel=parallel,
        options=options,
    )
    if workers is not None and workers < 1:
        raise InvalidRequestError("workers must be at least 1")
    if cpus_per_worker is not None and cpus_per_worker < 1:
        raise InvalidRequestError("cpus_per_worker must be at least 1")
    if batch_size < 1:
        raise InvalidRequestError("batch_size must be at least 1")
    if (inputs is None) == (dataset is None):
        raise InvalidRequestError("give either inputs (pictures) or a Ray dataset, not both")
    config = _worker_config(chat, cpus_per_worker, hosts, job.parallel)
    cpus = cpus_per_worker or int(config["engine"].get("n_threads") or 1)
    pictures = [] if inputs is None else find_pictures(inputs, recursive=job.recursive)
    ray = _import_ray()
    started = time.monotonic()
    with open_output(out, format) as output:  # an output that is not ours is refused first
        summary = job.summary(output.path, len(pictures), output.repaired_bytes)
        opened = _connect(ray, address, workers, cpus)
        try:
            workers = _pool_size(ray, workers, cpus)
            ledger = Ledger(output, summary, job)
            pipeline = _Pipeline(ray, config=config, job=job, output=output)
            with (
                _quiet_ray_data(ray),
                RunProgress(
                    "captioning", total=ledger.to_ask(), unit=job.unit, enabled=progress
                ) as bar,
            ):
                ledger.bar = bar
                results = pipeline.results(
                    pictures,
                    dataset,
                    workers=workers,
                    cpus=cpus,
                    batch_size=batch_size,
                    hosts=hosts,
                )
                _Driver(ledger, output, job.limit, counted=inputs is not None).run(results)
        finally:
            if opened:
                ray.shutdown()
            summary.elapsed_s = time.monotonic() - started
    return summary


def local_cpus_needed(workers: int, cpus_per_worker: int = 1) -> int:
    """The logical CPUs a Ray instance needs for ``workers`` actors of ``cpus_per_worker``
    CPUs each: theirs plus one, so Ray Data's own tasks always find a CPU."""
    return workers * cpus_per_worker + 1


# --- before the job ------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # the extra's Data part, checked here
    except ImportError:
        raise MissingDependencyError(
            "captioning on Ray needs Ray Data: pip install 'llava-local[ray]'"
        ) from None
    return ray


def _worker_config(
    chat: VisionChat | Mapping[str, Any],
    cpus: int | None,
    hosts: Sequence[str] | None,
    parallel: int | None,
) -> dict[str, Any]:
    """The chat config each worker builds its chat from; llama.cpp runs as many threads
    as the worker reserves CPUs, and holds a slot for each turn it runs at once (never
    "auto": workers sharing a machine would each count its memory as theirs)."""
    config = dict(chat.config if isinstance(chat, VisionChat) else chat)
    if not isinstance(config.get("backend"), str):
        raise InvalidRequestError("chat must be a VisionChat or its config (chat.config)")
    engine = dict(config.get("engine") or {})
    if config["backend"] == "llama_cpp":
        engine["n_threads"] = cpus or engine.get("n_threads") or 1
        engine["parallel"] = parallel or 1
    if hosts:
        key = _host_setting(config["backend"])
        if key is None:
            raise InvalidRequestError(
                f"the {config['backend']} engine has no host to spread workers over; "
                "hosts apply to the Ollama and OpenAI-compatible engines"
            )
        engine[key] = hosts[0]
    config["engine"] = engine
    return config


def _host_setting(backend: str) -> str | None:
    """The engine setting that names its server (the spec's address: Ollama's ``host``,
    OpenAI's ``base_url``), None for an engine in this process."""
    from ...backends import registry

    return registry.get(backend).address


def _connect(ray: Any, address: str | None, workers: int | None, cpus: int) -> bool:
    """Connect to Ray; True when this run did (and so disconnects, or stops the local
    instance it started, after)."""
    if ray.is_initialized():
        return False
    if address is None:
        wanted = local_cpus_needed(workers or 1, cpus)
        with _quiet_auth_notice():
            ray.init(
                address="local",  # a new instance, not one RAY_ADDRESS or `ray start` names
                num_cpus=max(os.cpu_count() or 1, wanted),
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
    else:
        try:
            with _quiet_auth_notice():
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise BackendError(
                f"cannot join the Ray cluster at {address}: {exc}; start it with "
                "`ray start --head` (or give its address: HOST:PORT, ray://HOST:10001, auto)"
            ) from None
    return True


#: Where Ray says, at each start, that token authentication is on (or off).
_AUTH_LOGGER = "ray._private.authentication"


@contextlib.contextmanager
def _quiet_auth_notice() -> Iterator[None]:
    """Ray's warning at ``ray.init`` that token authentication is on ("Set RAY_AUTH_MODE=
    disabled to opt out") is left out: the local instance is the run's own, and a
    cluster's owner chose its mode. Nothing about the mode changes, and Ray's errors
    still show."""
    logger = logging.getLogger(_AUTH_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _quiet_ray_data(ray: Any) -> Iterator[None]:
    """Ray Data's progress bars and INFO lines off for the run: the driver draws the
    one bar (its own log file, in the Ray session folder, still has everything)."""
    with warnings.catch_warnings():  # Ray Data's own deprecated default, not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    logger = logging.getLogger("ray.data")
    level = logger.level
    context.enable_progress_bars = False
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        context.enable_progress_bars = bars
        logger.setLevel(level)


def _pool_size(ray: Any, workers: int | None, cpus: int) -> int:
    """The workers to start: as asked, or as many as the cluster's CPUs allow; refused
    when the cluster could not run them and still read (the job would wait forever)."""
    total = int(ray.cluster_resources().get("CPU", 0))
    if workers is None:
        workers = max(1, (total - 1) // cpus)
    needed = local_cpus_needed(workers, cpus)
    if needed > total:
        raise InvalidRequestError(
            f"{count(workers, 'worker')} of {count(cpus, 'CPU')} {plural(workers, 'needs')} "
            f"{count(needed, 'CPU')} with the one Ray Data reads with, and the Ray cluster "
            f"has {total}; ask for fewer workers or threads"
        )
    return workers


# --- the workers ---------------------------------------------------------------------


#: How many workers a picture may kill (a worker that dies while reading it) before it
#: gets an error line instead of another try.
MAX_WORKER_DEATHS = 2


class _Attempts:
    """The pictures workers have begun and not finished (a Ray actor of its own): a
    picture begun again after its worker died counts that death."""

    def __init__(self) -> None:
        self._deaths: dict[str, int] = {}

    def begin(self, key: str) -> int:
        """Record that a worker begins ``key``; how many workers died reading it before."""
        deaths = self._deaths.get(key, 0)
        self._deaths[key] = deaths + 1  # a death, unless end() comes first
        return deaths

    def end(self, key: str) -> None:
        self._deaths.pop(key, None)


class _HostPicker:
    """Hands each worker the next host, round robin (a Ray actor of its own)."""

    def __init__(self, hosts: Sequence[str]) -> None:
        self._hosts = itertools.cycle(hosts)

    def next(self) -> str:
        return next(self._hosts)


class _Worker:
    """One Ray Data actor: builds its chat once, then answers batches of pictures with
    the one-machine job's own code (:class:`.pool.Pool`, ``parallel`` turns at once)."""

    def __init__(
        self,
        *,
        config: dict[str, Any],
        job: CaptionJob,
        settled: frozenset[Pair],
        attempts: Any,
        picker: Any = None,
    ) -> None:
        self.attempts = attempts
        if picker is not None:
            import ray

            key = _host_setting(config["backend"])
            assert key is not None
            config = {**config, "engine": {**config["engine"], key: ray.get(picker.next.remote())}}
        # this process's engine for the plan the driver made (the driver loads none)
        self.chat = shared_pool().chat_for(saving.arguments(config))
        self.job = job
        self.size = pool_size(self.chat, job.parallel)
        self.settled = settled
        self.settled_all = settled_all(settled, job.prompts)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        rows: list[str] = []
        contents = batch.get("bytes")
        files = batch.get("file")
        left: dict[Path, int] = {}  # answers still to come for each picture begun
        job = self.job
        with Pool(self.chat, self.size, schema=job.schema_, options=job.options) as pool:
            for index, given in enumerate(batch["path"]):
                item = load_item(
                    Path(str(given)),
                    self.settled_all,
                    self.chat.max_image_side,
                    data=None if contents is None else bytes(contents[index]),
                    source=None if files is None else Path(str(files[index])),
                )
                item = self._begin(item)
                left[item.path] = left.get(item.path, 0) + len(job.prompts)
                for prompt in job.prompts:
                    if (item.identity, prompt) in self.settled:
                        skip = {"path": str(item.path), "sha256": item.sha256, "prompt": prompt}
                        rows.append(json.dumps({"skip": skip}))
                        self._answered(item, left)
                        continue
                    while not pool.free:
                        rows.append(self._row(pool.take(), left))
                    pool.submit(item, prompt)
            rows.extend(self._row(done, left) for done in pool.drain())
        self.chat.reset()
        return {"row": np.array(rows, dtype=object)}

    def _row(self, done: tuple[Item, str, Answer], left: dict[Path, int]) -> str:
        item, _, answer = done
        self._answered(item, left)
        return json.dumps({"line": answer.record, "seconds": answer.seconds})

    def _answered(self, item: Item, left: dict[Path, int]) -> None:
        """One of ``item``'s prompts is done; with the last, no death is its any more."""
        left[item.path] -= 1
        if not left[item.path]:
            self.attempts.end.remote(str(item.path))

    def _begin(self, item: Item) -> Item:
        """``item``, or an error in its place when reading it killed too many workers."""
        if item.error is not None:
            return item
        import ray

        deaths = int(ray.get(self.attempts.begin.remote(str(item.path))))
        if deaths < MAX_WORKER_DEATHS:
            return item
        reason = (
            f"reading it killed the worker {count(deaths, 'time')} (a crash in the engine, or "
            "memory running out on this picture); it was not tried again: check the file, give the "
            "workers more memory, and run again with --retry-errors (retry_errors=True) "
            "to ask about it"
        )
        return dataclasses.replace(item, error=ImageError(str(item.path), reason))


class _Pipeline:
    """The Ray Data pipeline: pictures in, each one's lines (as JSON text) out."""

    def __init__(self, ray: Any, *, config: dict[str, Any], job: CaptionJob, output: Output):
        self.ray = ray
        self.config = config
        # a pydantic class may not import on a worker; its JSON schema always travels
        schema = job.schema_
        self.job = job.model_copy(
            update={"schema_": None if schema is None else structured.json_schema(schema)}
        )
        self.settled = output.settled(job.prompts, job.retry_errors)

    def results(
        self,
        pictures: Sequence[Path],
        dataset: ray.data.Dataset | None,
        *,
        workers: int,
        cpus: int,
        batch_size: int,
        hosts: Sequence[str] | None,
    ) -> Iterator[dict[str, Any]]:
        ray = self.ray
        if dataset is None:
            items = [{"path": str(p), "file": str(p.absolute())} for p in pictures]
            # a block per worker at least, so each has work; and no more workers than
            # blocks (Ray Data warns of a pool larger than its input, and each worker
            # loads a model)
            blocks = max(1, min(len(items), max(workers, math.ceil(len(items) / batch_size))))
            dataset = ray.data.from_items(items, override_num_blocks=blocks)
            workers = min(workers, blocks)
        picker = None
        if hosts:
            picker = ray.remote(num_cpus=0)(_HostPicker).remote(list(hosts))
        attempts = ray.remote(num_cpus=0)(_Attempts).remote()
        mapped = dataset.map_batches(
            _Worker,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus,
            fn_constructor_kwargs={
                "config": self.config,
                "job": self.job,
                "settled": self.settled,
                "picker": picker,
                "attempts": attempts,
            },
        )
        return iter(mapped.iter_batches(batch_size=None, batch_format="numpy"))


# --- the driver ----------------------------------------------------------------------


class _Driver:
    """Writes the lines as batches finish: each picture and prompt once, counted, with
    the one-machine job's rules for skipping and stopping (:class:`.ledger.Ledger`)."""

    def __init__(self, ledger: Ledger, output: Output, limit: int | None, *, counted: bool):
        self.ledger = ledger
        self.output = output
        self.limit = limit
        self.counted = counted  # pictures known up front; a dataset's are counted as they come
        self.pictures: set[Identity] = set()
        self.clock = time.monotonic()

    def run(self, results: Iterator[dict[str, Any]]) -> None:
        try:
            for batch in results:
                try:
                    for text in batch["row"]:
                        if not self.take(json.loads(str(text))):
                            return
                finally:
                    self.output.flush()
        except LlavaLocalError:
            raise
        except Exception as exc:
            if type(exc).__module__.split(".")[0] != "ray":
                raise
            message = " ".join(str(exc).split())[:2000]
            raise BackendError(
                f"the Ray job failed: {message}; the results so far are in "
                f"{self.output.path}, run again to continue"
            ) from None
        finally:
            with contextlib.suppress(Exception):
                results.close()  # type: ignore[attr-defined]

    def take(self, row: dict[str, Any]) -> bool:
        """Count or write one row from a worker; False once the limit is reached."""
        ledger = self.ledger
        record = row.get("skip") or row["line"]
        identity = identity_of(record["sha256"], record["path"])
        prompt, path = record["prompt"], str(record["path"])
        plan = ledger.plan(identity, prompt, path)
        if plan == "again":  # a batch run twice
            return True
        if not self.counted:
            ledger.summary.found += 1
        if "skip" in row:  # its picture was settled when the run began
            if plan == "copy":  # under another name: this file gets that line
                ledger.copy(identity, prompt, path)
            else:
                ledger.skip(identity, prompt, path)
            return True
        if plan == "skip":
            ledger.skip(identity, prompt, path)
            return True
        full = self.limit is not None and len(self.pictures) >= self.limit
        if full and identity not in self.pictures:
            return False
        # a copy answered by a worker too (it was not settled when the run began): this
        # file's own answer, as good as a copy and already paid for
        self.pictures.add(identity)
        now = time.monotonic()
        seconds, self.clock = now - self.clock, now  # the rate of the whole pool
        ledger.write(Answer(record, seconds))
        if not self.counted and ledger.bar is not None:
            ledger.bar.set_total(ledger.summary.found)
        return True
