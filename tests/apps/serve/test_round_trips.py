"""Our engines against our own server: the same answers and figures as in-process.

One real ``llava-local serve`` subprocess (the demo model through llama.cpp) is started
for the module; the ``openai`` engine (``/v1``) and the ``ollama`` engine (``/api``)
talk to it over real sockets, each through :mod:`llava_local.protocols` on both ends.
Beside it, the in-process llama.cpp engine on the same files and settings is asked the
same conversations in the same order, so both hold the same KV cache before every turn.
Answers are greedy, or sampled with a seed, so they must be equal, and so must the
token counts each protocol carries (prompt and completion tokens in both; the reused
tokens in OpenAI's ``cached_tokens`` and ``timings``; Ollama's protocol has no field
for them). One slot, and no KV states kept apart from the live one (``kv_cache_mb=0``),
so the prefix reuse depends on the conversation order alone, never on the memory free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from llava_local import Reply, Stats, VisionChat

from ...known import known
from ...paths import DIGIT, SHAPE
from ...serve_process import QUESTION, Server, start, stop

pytestmark = pytest.mark.llama

#: The settings the server and the in-process engine share.
SETTINGS: dict[str, Any] = {"n_ctx": 1024, "n_threads": 2, "kv_cache_mb": 0, "parallel": 1}
#: Greedy unless a test samples with a seed: llama.cpp draws its own seed otherwise.
GREEDY: dict[str, Any] = {"temperature": 0}
ENGINES = ("openai", "ollama")
#: A schema that leaves the demo free to write 24 characters: where sampling shows
#: (the demo answers its questions the same way at any temperature).
FREE_TEXT = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 24, "maxLength": 24}},
    "required": ["text"],
}


class Digit(BaseModel):
    digit: int = Field(ge=0, le=9)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("round_trips") / "server.log"
    flags = ["--backend", "llama_cpp", "--n-ctx", "1024", "--threads", "2", "--kv-cache-mb", "0"]
    running = start(log, *flags, "--parallel", "1")
    yield running
    stop(running)


@pytest.fixture(scope="module")
def local() -> Iterator[VisionChat]:
    """The in-process engine, asked every conversation the server is asked."""
    with VisionChat("llama_cpp", "demo", **SETTINGS, **GREEDY) as chat:
        yield chat


@pytest.fixture(params=ENGINES)
def remote(request: pytest.FixtureRequest, server: Server) -> Iterator[VisionChat]:
    """A chat whose engine talks to the server in one protocol."""
    if request.param == "openai":
        chat = VisionChat.openai(base_url=f"{server.url}/v1", max_retries=0, **GREEDY)
    else:
        chat = VisionChat("ollama", "demo", host=server.url, **GREEDY)
    with chat:
        yield chat


Ask = Callable[[VisionChat], Reply]


def both(remote: VisionChat, local: VisionChat, *turns: Ask) -> list[tuple[Reply, Reply]]:
    """Each turn asked of ``remote``, then the whole conversation of ``local`` (reset
    first), in that order: the server and the in-process engine see the same turns."""
    remote_replies = [turn(remote) for turn in turns]
    local.reset()
    local_replies = [turn(local) for turn in turns]
    return list(zip(remote_replies, local_replies, strict=True))


def assert_same_figures(engine: str, remote: Stats, local: Stats) -> None:
    """The counts the protocol carries equal the in-process engine's."""
    assert remote.prompt_tokens == known(local.prompt_tokens)
    assert remote.completion_tokens == known(local.completion_tokens)
    if engine == "openai":
        assert remote.cached_tokens == (local.cached_tokens or 0)
    else:
        assert remote.cached_tokens is None  # Ollama's protocol has no field for it
    assert known(remote.prompt_s) > 0  # timings cross the wire too
    assert known(remote.decode_s) > 0


def test_a_question_about_a_picture(remote: VisionChat, local: VisionChat) -> None:
    """A question with a picture gets the in-process answer, finish reason and counts."""
    [(got, expected)] = both(remote, local, lambda chat: chat.ask(QUESTION, image=DIGIT))
    assert got.text == expected.text
    assert got.done_reason == expected.done_reason == "stop"
    assert_same_figures(remote.backend, got.stats, expected.stats)
    assert got.backend == remote.backend


def test_a_streamed_follow_up_reuses_the_first_turn(remote: VisionChat, local: VisionChat) -> None:
    """Streamed, a first turn and its follow-up give the in-process pieces' text and
    counts; the follow-up reads only its new tokens, the reuse showing where the
    protocol carries it."""

    def streamed(question: str, image: Path | None = None) -> Ask:
        def turn(chat: VisionChat) -> Reply:
            stream = chat.stream(question, image=image) if image else chat.stream(question)
            pieces = list(stream)
            assert len([p for p in pieces if p]) > 1
            assert "".join(pieces) == stream.reply.text
            return stream.reply

        return turn

    replies = both(
        remote, local, streamed("What shape is this?", SHAPE), streamed("What colour is it?")
    )
    for got, expected in replies:
        assert got.text == expected.text
        assert_same_figures(remote.backend, got.stats, expected.stats)
    (_, first), (got, second) = replies
    first_prompt = known(first.stats.prompt_tokens) + (first.stats.cached_tokens or 0)
    assert known(second.stats.prompt_tokens) < first_prompt
    if remote.backend == "openai":
        assert known(got.stats.cached_tokens) >= first_prompt


def test_a_schema_shapes_the_answer_the_same(remote: VisionChat, local: VisionChat) -> None:
    """schema= crosses as the protocol's format: the same JSON, parsed the same."""
    [(got, expected)] = both(
        remote, local, lambda chat: chat.ask(QUESTION, image=DIGIT, schema=Digit)
    )
    assert got.text == expected.text
    assert isinstance(got.parsed, Digit)
    assert got.parsed == expected.parsed
    assert_same_figures(remote.backend, got.stats, expected.stats)


def test_options_cross_the_wire(remote: VisionChat, local: VisionChat) -> None:
    """Every option reaches the server's engine: a token limit cuts the answer at the
    same place ("length"), a stop string ends it at the same word, and seeded sampling
    with temperature, top_p, top_k and repeat_penalty writes the same free text (each
    of them changes that text when it changes)."""
    sampled: dict[str, Any] = {
        "seed": 42,
        "temperature": 1.5,
        "top_p": 0.9,
        "top_k": 20,
        "repeat_penalty": 1.3,
    }
    replies = both(
        remote,
        local,
        lambda chat: chat.ask(QUESTION, image=DIGIT, max_tokens=3),
        lambda chat: chat.ask(QUESTION, stop=["digit"]),
        lambda chat: chat.ask(QUESTION, schema=FREE_TEXT, **sampled),
    )
    (cut, cut_local), (stopped, stopped_local), (seeded, seeded_local) = replies
    assert cut.done_reason == cut_local.done_reason == "length"
    assert cut.stats.completion_tokens == 3
    assert stopped.text == stopped_local.text
    assert "digit" not in stopped.text
    assert seeded.text == seeded_local.text
    for got, expected in replies:
        assert got.text == expected.text
        assert_same_figures(remote.backend, got.stats, expected.stats)
