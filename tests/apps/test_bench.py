"""The standard benchmark (apps.bench) and `llava-local bench`: behaviour, not timings."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from llava_local import VisionChat
from llava_local.apps import bench
from llava_local.cli.bench import bench as bench_command

from ..gguf_fixtures import GgufPair, png_bytes
from ..known import known
from ..ollama_server import OllamaServer, Script


def llama_args(pair: GgufPair) -> list[str]:
    return ["--backend", "llama_cpp", "-m", str(pair.lm), "--mmproj", str(pair.mmproj)]


def test_llama_cpp_follow_ups_reuse_the_picture(tiny_pair: GgufPair) -> None:
    """In-process, turns 2-3 encode no picture and reuse cached tokens."""
    with VisionChat.llama_cpp(tiny_pair.lm, tiny_pair.mmproj) as chat:
        result = bench.run(chat, max_tokens=4)
    assert [t.turn for t in result.turns] == [1, 2, 3]
    first, *follow_ups = result.turns
    assert first.with_image
    assert first.images_encoded == 1
    assert first.image_encode_s is not None
    assert known(first.prompt_tokens) > 0
    for turn in follow_ups:
        assert not turn.with_image
        assert turn.images_encoded == 0
        assert turn.cached_tokens is not None
        assert turn.cached_tokens > 0
        assert 0 < known(turn.prompt_tokens) < known(first.prompt_tokens)
    assert all(known(t.completion_tokens) <= 4 for t in result.turns)
    assert result.backend == "llama_cpp"
    assert result.peak_rss_mib > 0
    assert result.load_s > 0


def test_result_round_trips_through_json(tiny_pair: GgufPair) -> None:
    """A result dumped to JSON loads back equal, so saved runs can be compared later."""
    with VisionChat.llama_cpp(tiny_pair.lm, tiny_pair.mmproj) as chat:
        result = bench.run(chat, png_bytes(seed=3), turns=1, max_tokens=2)
    again = bench.BenchResult.model_validate_json(result.model_dump_json())
    assert again == result
    assert len(result.turns) == 1


def test_ollama_stats_come_from_the_daemon(ollama_server: OllamaServer) -> None:
    """Through Ollama, token counts and speeds are the daemon's and the photo goes once."""
    ollama_server.script(
        Script(pieces=["A ", "field."], prompt_eval_count=600, eval_count=2),
        Script(pieces=["Green."], prompt_eval_count=12, eval_count=1),
        Script(pieces=["Noon."], prompt_eval_count=14, eval_count=1, eval_duration=500_000_000),
    )
    with VisionChat.ollama("llava", host=ollama_server.url) as chat:
        result = bench.run(chat, max_tokens=8)
    assert [t.prompt_tokens for t in result.turns] == [600, 12, 14]
    assert [t.answer for t in result.turns] == ["A field.", "Green.", "Noon."]
    assert result.turns[2].decode_tokens_per_s == pytest.approx(2.0)
    assert all(t.image_encode_s is None for t in result.turns)
    chats = [r.json for r in ollama_server.requests_to("/api/chat")]
    assert len(chats) == 3
    assert chats[0]["messages"][-1]["images"]
    assert "images" not in chats[1]["messages"][-1] or not chats[1]["messages"][-1]["images"]
    assert chats[1]["messages"][0]["images"] == chats[0]["messages"][-1]["images"]
    assert all(c["options"]["temperature"] == 0 for c in chats)
    assert all(c["options"]["num_predict"] == 8 for c in chats)


def test_run_refuses_zero_turns(ollama_server: OllamaServer) -> None:
    """Asking for no turns is a caller mistake, refused before anything is sent."""
    with (
        VisionChat.ollama("llava", host=ollama_server.url) as chat,
        pytest.raises(ValueError, match="turns"),
    ):
        bench.run(chat, turns=0)
    assert not ollama_server.requests_to("/api/chat")


def test_synthetic_photo_is_a_deterministic_jpeg_with_exif() -> None:
    """The generated photo is a JPEG of the asked size, the same for the same seed."""
    data = bench.synthetic_photo(320, 240, seed=5, exif={0x0112: 6})
    assert data == bench.synthetic_photo(320, 240, seed=5, exif={0x0112: 6})
    assert data != bench.synthetic_photo(320, 240, seed=6)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG"
        assert img.size == (320, 240)
        assert img.getexif()[0x0112] == 6


def test_table_shows_every_turn(tiny_pair: GgufPair) -> None:
    """The rich table has one row per turn and marks the turn with the photo."""
    with VisionChat.llama_cpp(tiny_pair.lm, tiny_pair.mmproj) as chat:
        result = bench.run(chat, turns=2, max_tokens=2)
    grid = bench.table(result)
    assert grid.row_count == 2
    assert "TTFT s" in [str(c.header) for c in grid.columns]


def test_cli_prints_a_table(tiny_pair: GgufPair, tmp_path: Path) -> None:
    """`bench IMAGE` prints the table with one row per turn and the peak memory."""
    picture = tmp_path / "pic.png"
    picture.write_bytes(png_bytes(seed=8))
    args = [str(picture), *llama_args(tiny_pair), "--max-tokens", "3"]
    result = CliRunner(env={"COLUMNS": "160"}).invoke(bench_command, args)
    assert result.exit_code == 0, result.output
    assert "TTFT s" in result.stdout
    assert "peak RSS" in result.stdout
    for row in ("1+photo", "│ 2 ", "│ 3 "):
        assert row in result.stdout
    assert "turn 3/3" in result.stderr


def test_cli_json_is_valid(tiny_pair: GgufPair) -> None:
    """`bench --json` without a picture prints one JSON document with the asked turns."""
    args = [*llama_args(tiny_pair), "--max-tokens", "2", "--turns", "2", "--json"]
    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["backend"] == "llama_cpp"
    assert data["image"].startswith("generated")
    assert [t["images_encoded"] for t in data["turns"]] == [1, 0]
    assert result.stderr == ""


def test_cli_reports_a_missing_daemon_cleanly(closed_port: int) -> None:
    """With no daemon listening, `bench` exits 1 with a one-line error, no traceback."""
    args = ["--backend", "ollama", "--host", f"http://127.0.0.1:{closed_port}"]
    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 1
    assert "error:" in result.stderr
    assert "Traceback" not in result.output
