"""``caption`` on a real local Ray instance: the demo model in two Ray Data actors, the
same lines as the one-machine job, each picture once through a killed worker, Ctrl-C and
a resumed run, and Ollama workers spread over two look-alike daemons."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import ray
from click.testing import CliRunner
from PIL import Image

from llava_local import InvalidRequestError, VisionChat
from llava_local.apps.captioning import (
    MAX_WORKER_DEATHS,
    CaptionSummary,
    caption,
    caption_ray,
    local_cpus_needed,
    read_captions,
)
from llava_local.apps.datasets import DIGIT_PROMPT
from llava_local.cli.caption import caption as caption_command

from ...ollama_server import OllamaServer, RecordedRequest, Script
from ...option_args import OptionArgs
from ...paths import ROOT
from .caption_lines import lines, pairs, save_digits

DEMO = {"backend": "llama_cpp", "engine": {"model": "demo"}}
OPTIONS: OptionArgs = {"temperature": 0, "max_tokens": 20}
WORKER_TITLE = b"MapWorker(MapBatches(_Worker))"
BROKEN = ("broken-empty.png", "broken-html.png", "broken-cut.png")


@pytest.fixture(scope="session")
def ray_instance() -> Iterator[str]:
    """One local Ray instance for the session, sized for two one-CPU workers plus the
    CPU Ray Data reads with; its address, for processes that join it."""
    ray.init(
        num_cpus=local_cpus_needed(2),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """40 test digits as PNG files plus three broken files; the digit of each by name."""
    folder = tmp_path_factory.mktemp("digits")
    labels = save_digits(folder, 40)
    (folder / BROKEN[0]).write_bytes(b"")
    (folder / BROKEN[1]).write_bytes(b"<html>gone</html>")
    whole = (folder / "d00.png").read_bytes()
    (folder / BROKEN[2]).write_bytes(whole[: len(whole) // 2])
    return folder, labels


@pytest.fixture(scope="module")
def one_machine(
    digits: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The one-machine job's answer for each picture (greedy), by file name."""
    out = tmp_path_factory.mktemp("one") / "one.jsonl"
    with VisionChat.from_config(DEMO) as chat:
        caption(chat, digits[0], out, prompt=DIGIT_PROMPT, progress=False, **OPTIONS)
    return {Path(r["path"]).name: r.get("text") or r["error_type"] for r in read_captions(out)}


def worker_pids() -> list[int]:
    """The processes of this Ray instance's caption workers, found by their title."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if WORKER_TITLE in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_two_workers_write_every_picture_once_with_the_one_machine_answers(
    ray_instance: str,
    digits: tuple[Path, dict[str, str]],
    one_machine: dict[str, str],
    tmp_path: Path,
) -> None:
    """The demo model in two Ray workers answers 40 digits and records 3 broken files:
    each picture once, each answer equal to the one-machine job's, the digits read."""
    folder, labels = digits
    out = tmp_path / "ray.jsonl"
    summary = caption_ray(
        DEMO, folder, out, prompt=DIGIT_PROMPT, workers=2, progress=False, **OPTIONS
    )
    assert (summary.found, summary.done, summary.failed, summary.skipped) == (43, 40, 3, 0)
    records = lines(out)
    assert sorted(pairs(records).values()) == [1] * 43
    got = {Path(r["path"]).name: r.get("text") or r["error_type"] for r in records}
    assert got == one_machine
    for name in BROKEN:
        assert got[name] == "ImageError"
    right = sum(labels[name] in got[name] for name in labels)
    assert right >= 36
    again = caption_ray(DEMO, folder, out, prompt=DIGIT_PROMPT, workers=2, progress=False)
    assert (again.done, again.failed, again.skipped, again.skipped_errors) == (0, 0, 43, 3)
    assert len(lines(out)) == 43


def test_workers_asking_two_at_once_give_the_one_machine_answers(
    ray_instance: str,
    digits: tuple[Path, dict[str, str]],
    one_machine: dict[str, str],
    tmp_path: Path,
) -> None:
    """parallel=2 on Ray: each worker's engine holds two slots and answers its batch two
    pictures at a time; every picture is written once, with the one-machine answer."""
    folder, _ = digits
    out = tmp_path / "ray.jsonl"
    summary = caption_ray(
        DEMO, folder, out, prompt=DIGIT_PROMPT, workers=2, parallel=2, batch_size=4,
        progress=False, **OPTIONS,
    )  # fmt: skip
    assert (summary.done, summary.failed) == (40, 3)
    records = lines(out)
    assert sorted(pairs(records).values()) == [1] * 43
    assert {Path(r["path"]).name: r.get("text") or r["error_type"] for r in records} == (
        one_machine
    )


def test_a_killed_worker_is_restarted_and_no_picture_is_written_twice(
    ray_instance: str, digits: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """SIGKILL to one worker's process mid-run: Ray restarts it, its batch is redone,
    and the file still holds every picture and prompt exactly once."""
    folder, _ = digits
    out = tmp_path / "ray.jsonl"
    killed: list[int] = []

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            lines_so_far = out.read_bytes().count(b"\n") if out.exists() else 0
            pids = worker_pids()
            if lines_so_far >= 6 and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    prompts = [DIGIT_PROMPT, "Identify the handwritten digit."]
    summary = caption_ray(DEMO, folder, out, prompt=prompts, workers=2, progress=False, **OPTIONS)
    killer.join(timeout=5)
    assert killed, "no worker was killed: the run ended first"
    assert summary.done + summary.failed == 86
    assert sorted(pairs(lines(out)).values()) == [1] * 86


def test_a_picture_that_kills_every_worker_gets_an_error_line_and_the_run_ends(
    ray_instance: str, ollama_server: OllamaServer, tmp_path: Path
) -> None:
    """A picture whose reading kills the worker every time (the daemon's stand-in
    SIGKILLs the worker that asks about it, as a crash in the engine would end it) is
    tried MAX_WORKER_DEATHS times, then written as an ImageError line; Ray would
    otherwise restart the worker and retry it forever. The other pictures are written
    once each."""
    folder = tmp_path / "pics"
    folder.mkdir()
    for index in range(4):
        Image.new("RGB", (64, 64), (index * 60, 80, 120)).save(folder / f"ok{index}.png")
    Image.new("RGB", (37, 23), "red").save(folder / "poison.png")
    killed: list[int] = []

    def answer(request: RecordedRequest) -> Script:
        for pictures in request.pictures():
            for data in pictures:
                if Image.open(io.BytesIO(data)).size == (37, 23):
                    for pid in worker_pids():
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                    return Script(fault="stall", stall_s=5)
        return Script()

    ollama_server.script(answer)
    out = tmp_path / "ray.jsonl"
    args = [str(folder), "-p", "Caption.", "-o", str(out), "--ray", "--workers", "1"]
    args += ["--backend", "ollama", "--host", ollama_server.url, "--no-progress"]
    result = CliRunner().invoke(caption_command, args)
    assert result.exit_code == 0, result.output
    assert len(killed) == MAX_WORKER_DEATHS
    records = lines(out)
    assert sorted(pairs(records).values()) == [1] * 5
    poison = next(r for r in records if Path(r["path"]).name == "poison.png")
    assert poison["error_type"] == "ImageError"
    assert f"killed the worker {MAX_WORKER_DEATHS} times" in poison["error"]
    assert {r["text"] for r in records if "text" in r} == {"A cat on a mat."}


def test_ctrl_c_on_the_driver_then_a_ray_run_completes_without_repeats(
    ray_instance: str, digits: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """SIGINT to a `caption --ray ADDRESS` process mid-run exits 130 with whole lines;
    the same command again (its work stopped, so the CPUs are free) finishes the file
    with every picture and prompt once."""
    folder, _ = digits
    out = tmp_path / "ray.jsonl"
    args = [str(folder), "-o", str(out), "--no-progress", "--ray", ray_instance]
    args += ["-p", DIGIT_PROMPT, "-p", "What number is written in this picture?"]
    args += ["--workers", "2", "--backend", "llama_cpp", "--threads", "1"]
    args += ["--max-tokens", "20", "--temperature", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "llava_local.cli", "caption", *args]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not out.exists() or out.read_bytes().count(b"\n") < 8:
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "run again to continue" in stderr
    first = lines(out)
    assert len(first) < 86
    assert max(pairs(first).values()) == 1
    result = CliRunner().invoke(caption_command, args)
    assert result.exit_code == 0, result.output
    assert sorted(pairs(lines(out)).values()) == [1] * 86
    assert f"{len(first)} already recorded" in result.stdout


def test_ollama_workers_spread_over_two_hosts(
    ray_instance: str,
    ollama_server: OllamaServer,
    digits: tuple[Path, dict[str, str]],
    tmp_path: Path,
) -> None:
    """With two --host daemons, the two Ollama workers each talk to one of them: both
    answer, and each picture is asked once in all."""
    folder, _ = digits
    second = OllamaServer()
    second.add_model("llava")
    try:
        out = tmp_path / "ray.jsonl"
        args = [str(folder), "-p", "Caption.", "-o", str(out), "--ray", "--workers", "2"]
        args += ["--backend", "ollama", "--host", ollama_server.url, "--host", second.url]
        result = CliRunner().invoke(caption_command, [*args, "--no-progress"])
        assert result.exit_code == 0, result.output
        first = len(ollama_server.requests_to("/api/chat"))
        other = len(second.requests_to("/api/chat"))
    finally:
        second.stop()
    assert first > 0
    assert other > 0
    assert first + other == 40
    records = lines(out)
    assert sorted(pairs(records).values()) == [1] * 43
    assert {r["text"] for r in records if "text" in r} == {"A cat on a mat."}


def test_parquet_output_resumes_and_a_full_cluster_is_refused(
    ray_instance: str, digits: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """format="parquet" writes a folder of part files with the lines' fields, and a
    second run adds only the pictures the first (limit=10) left; more workers than the
    CPUs allow is refused before any work."""
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    folder, _ = digits
    out = tmp_path / "captions.parquet"
    summary = caption_ray(
        DEMO,
        folder,
        out,
        prompt=DIGIT_PROMPT,
        format="parquet",
        limit=10,
        progress=False,
        **OPTIONS,
    )
    assert summary.done + summary.failed == 10
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == summary.done + summary.failed
    assert all(json.loads(r["stats"])["completion_tokens"] > 0 for r in rows if r["text"])
    rest = caption_ray(
        DEMO, folder, out, prompt=DIGIT_PROMPT, format="parquet", progress=False, **OPTIONS
    )
    assert rest.skipped == len(rows)
    assert sorted(Counter(r["path"] for r in pq.read_table(out).to_pylist()).values()) == [1] * 43
    with pytest.raises(InvalidRequestError, match="need 4 CPUs"):
        caption_ray(DEMO, folder, tmp_path / "x.jsonl", prompt="x", workers=3, progress=False)


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_identical_pictures_under_two_names_each_get_their_line_on_ray(
    ray_instance: str, output_format: Literal["jsonl", "parquet"], tmp_path: Path
) -> None:
    """On Ray too, two byte-identical files each get their line with the same answer,
    and a copy added before a rerun gets the line of its picture from the output
    (copy_of), read back from the JSON Lines file or the Parquet part file."""
    pics = tmp_path / "pics"
    pics.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(ROOT / "examples" / "digit.png", pics / name)
    shutil.copy(ROOT / "examples" / "shape.png", pics / "s.png")
    out = tmp_path / ("out.parquet" if output_format == "parquet" else "out.jsonl")

    def run() -> CaptionSummary:
        return caption_ray(
            DEMO,
            pics,
            out,
            prompt="What is it?",
            workers=2,
            format=output_format,
            progress=False,
            **OPTIONS,
        )

    def rows() -> dict[str, dict[str, Any]]:
        if output_format == "jsonl":
            return {Path(r["path"]).name: r for r in read_captions(out)}
        import pyarrow.parquet as pq

        return {Path(r["path"]).name: r for r in pq.read_table(out).to_pylist()}

    first = run()
    assert (first.found, first.done, first.failed, first.skipped) == (3, 3, 0, 0)
    got = rows()
    assert sorted(got) == ["a.png", "b.png", "s.png"]
    assert got["a.png"]["text"] == got["b.png"]["text"] == "This digit is 7."
    shutil.copy(ROOT / "examples" / "digit.png", pics / "c.png")
    again = run()
    assert (again.found, again.done, again.skipped, again.copied) == (4, 1, 3, 1)
    copy = rows()["c.png"]
    assert copy["text"] == "This digit is 7."
    assert Path(copy["copy_of"]).name in ("a.png", "b.png")
    if output_format == "parquet":
        assert json.loads(copy["stats"])["completion_tokens"] > 0
    else:
        assert copy["stats"]["completion_tokens"] > 0


def test_a_local_ray_run_keeps_stderr_clean_and_two_one_thread_workers_fit(
    tmp_path: Path,
) -> None:
    """`caption --ray --workers 2 --threads 1` in a process of its own starts a local
    Ray instance sized for the pool (never refused, whatever the machine's CPUs),
    finishes, and leaves stderr empty: no token-authentication notice, no
    core_worker.cc error lines."""
    pics = tmp_path / "pics"
    pics.mkdir()
    shutil.copy(ROOT / "examples" / "digit.png", pics / "a.png")
    shutil.copy(ROOT / "examples" / "shape.png", pics / "s.png")
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    args = ["caption", str(pics), "-p", "What is it?", "--out", str(out), "--ray"]
    args += ["--backend", "llama_cpp", "--workers", "2", "--threads", "1", "--no-progress"]
    result = subprocess.run(
        [sys.executable, "-m", "llava_local.cli", *args, "--temperature", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("2 captioned, 0 already recorded, 0 failed of 2 pictures")
    assert result.stderr == ""
    assert sorted(r["text"] for r in lines(out)) == ["It is a red triangle.", "This digit is 7."]


def test_ray_refuses_a_picture_it_took_for_its_address(tmp_path: Path) -> None:
    """`--ray` given before a picture would swallow it as the cluster's address: the
    command says so instead of captioning one picture fewer on a cluster that is not."""
    picture = tmp_path / "b.png"
    Image.new("RGB", (8, 8)).save(picture)
    args = [str(picture), "--ray", str(picture), "-p", "What?", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(caption_command, args)
    assert result.exit_code == 2
    assert f"--ray took '{picture}' as a cluster's address" in result.output
    assert not (tmp_path / "o").exists()


#: Reports the process's peak resident memory (VmHWM, in kB) as it exits, after the
#: command's own output: ``caption --ray``'s driver, measured from inside.
PEAK_RSS_DRIVER = """
import atexit, sys
from llava_local.cli import main

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            print("PEAK_KB", line.split()[1], flush=True)

atexit.register(peak)
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def large_twin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A GGUF pair whose language model file is over 1 GB (a 393,216-token vocabulary at
    2048 wide, Q4_0, one block) and cheap to answer with: loading it maps the whole file,
    while a turn reads one row of the embeddings and one output product per token."""
    from llava_local_dev import gguf_writer

    text = gguf_writer.TextConfig(n_embd=2048, n_layer=1, n_ff=4096, n_head=16)
    vision = gguf_writer.VisionConfig(
        image_size=56, patch_size=14, n_embd=32, n_ff=64, n_head=4, n_layer=3, projection_dim=2048
    )
    return gguf_writer.write_pair(
        tmp_path_factory.mktemp("large_twin"),
        text,
        vision,
        lm_dtype="q4_0",
        vocab=gguf_writer.padded_vocab(393_216),
    )


def test_the_ray_driver_plans_and_never_loads_the_model(
    large_twin: tuple[Path, Path], tmp_path: Path
) -> None:
    """`caption --ray` with a llama.cpp model over 1 GB: the worker loads it and answers,
    while the driver process only plans, its peak resident memory staying under a third
    of the model file's size (loading it maps the whole file into the process)."""
    lm, mmproj = large_twin
    pics = tmp_path / "pics"
    pics.mkdir()
    shutil.copy(ROOT / "examples" / "digit.png", pics / "a.png")
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    args = ["caption", str(pics), "-p", "What is it?", "--out", str(out), "--ray"]
    args += ["--backend", "llama_cpp", "-m", str(lm), "--mmproj", str(mmproj)]
    args += ["--workers", "1", "--threads", "1", "--max-tokens", "1", "--no-progress"]
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_DRIVER, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 captioned, 0 already recorded, 0 failed of 1 picture")
    (record,) = lines(out)
    assert (record["model"], record["stats"]["completion_tokens"]) == (lm.name, 1)
    peak_kb = int(result.stdout.split("PEAK_KB")[1].split()[0])
    assert lm.stat().st_size > 2**30
    assert peak_kb * 1024 < lm.stat().st_size / 3
