"""``llava-local serve``, started for real and driven by the official clients.

One server (the bundled demo model) is started once per session as a subprocess on a
free port of 127.0.0.1, with an API key and small limits so that each limit can be
hit; the official ``openai`` and ``ollama`` clients, ``VisionChat.ollama`` and plain
httpx talk to it over real sockets. Every test that sends bad input then checks that
the server still answers a good question. Two tests start a server of their own: one
with --no-picture-urls, and one that they stop with Ctrl-C. What the server refuses to
untrusted callers (picture URLs, Host names, browsers, costly bodies) is tested in
tests/security/.
"""

from __future__ import annotations

import base64
import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from llava_local import VisionChat

from ...known import known
from ...paths import DIGIT, SHAPE
from ...security.sites import Site
from ...serve_process import ANSWER, QUESTION, Server, ask, ask_url, start, stop

pytestmark = pytest.mark.llama

KEY = "test-key-123"
#: A grammar that keeps the demo writing for a long while (over a thousand tokens):
#: a turn that holds the model while a test does something else.
LONG = {
    "type": "json_schema",
    "json_schema": {
        "name": "long",
        "schema": {
            "type": "object",
            "properties": {"text": {"type": "string", "minLength": 1400, "maxLength": 1400}},
            "required": ["text"],
        },
    },
}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The demo model served with an API key, one answer at a time
    (test_serve_parallel.py beside this file has several), a queue of 3 and small size limits."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    args = ["--api-key", KEY, "--parallel", "1", "--queue", "3", "--n-ctx", "2048"]
    running = start(log, *args, "--max-body-mb", "1", "--max-picture-mb", "0.5")
    yield running
    stop(running)


def _long_stream() -> dict[str, Any]:
    """A streamed request that keeps the model busy for a long while (see LONG)."""
    return {
        "model": "demo",
        "messages": ask(),
        "stream": True,
        "temperature": 0,
        "max_tokens": 1600,
        "response_format": LONG,
    }


def _healthy(server: Server, client: openai.OpenAI) -> None:
    """The server is up, idle, and still reads the digit."""
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "ok"
    answer = client.chat.completions.create(model="demo", messages=ask(), temperature=0)
    assert answer.choices[0].message.content == ANSWER


def _wait_idle(server: Server, *, cancelled_at_least: int = 0) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        health: dict[str, Any] = httpx.get(f"{server.url}/health", timeout=10).json()
        if not health["busy"] and health["cancelled"] >= cancelled_at_least:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the server stayed busy: {health}")


def _post(server: Server, path: str, body: bytes | dict[str, Any]) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=120)


# -- the OpenAI protocol -----------------------------------------------------------------


def test_openai_client_reads_the_digit(client: openai.OpenAI) -> None:
    """The official openai client gets the demo's answer about the example digit."""
    answer = client.chat.completions.create(model="demo", messages=ask(), temperature=0)
    assert answer.choices[0].message.content == ANSWER
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.completion_tokens > 0
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_openai_streams_the_answer(client: openai.OpenAI) -> None:
    """stream=True answers as server-sent events, piece by piece, ending with usage."""
    stream = client.chat.completions.create(
        model="demo",
        messages=ask(),
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == ANSWER
    assert len([p for p in pieces if p]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_stateless_followup_reuses_the_prefix(client: openai.OpenAI) -> None:
    """A follow-up that resends the conversation reads only its new tokens: the
    reported cached tokens cover the whole earlier conversation, picture included."""
    messages = ask(SHAPE, "What shape is this?")
    first = client.chat.completions.create(model="demo", messages=messages, temperature=0)
    assert first.usage is not None
    before = first.usage.prompt_tokens + first.usage.completion_tokens
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "What colour is it?"},
    ]
    second = client.chat.completions.create(model="demo", messages=messages, temperature=0)
    usage = second.usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0
    assert cached >= before - 1  # all of turn 1 (the answer's last token was never read)
    assert usage.prompt_tokens - cached < 60  # just the new question
    assert second.choices[0].message.content.startswith("It is")  # type: ignore[union-attr]


def test_openai_options_are_applied(client: openai.OpenAI) -> None:
    """max_tokens, stop and seed reach the engine; a JSON schema shapes the answer."""
    capped = client.chat.completions.create(
        model="demo",
        messages=ask(),
        temperature=0,
        max_tokens=3,
    )
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage is not None
    assert capped.usage.completion_tokens == 3
    stopped = client.chat.completions.create(
        model="demo",
        messages=ask(),
        temperature=0,
        stop=["digit"],
    )
    assert stopped.choices[0].message.content.strip() == "This"  # type: ignore[union-attr]
    seeded = [
        client.chat.completions.create(
            model="demo",
            messages=ask(),
            temperature=1.5,
            top_p=1.0,
            seed=42,
            max_tokens=12,
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    schema: Any = {
        "type": "object",
        "properties": {"digit": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["digit"],
    }
    structured = client.chat.completions.create(
        model="demo",
        messages=ask(),
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "digit", "schema": schema, "strict": True},
        },
    )
    parsed = json.loads(structured.choices[0].message.content or "")
    assert set(parsed) == {"digit"}
    assert 0 <= parsed["digit"] <= 9


def test_no_picture_urls_still_starts_and_refuses_urls(tmp_path: Path) -> None:
    """--no-picture-urls (the default now, kept so that command lines naming it still
    work) answers an http(s) image_url with 400 in OpenAI's shape, saying to send a
    data URI, and never fetches it; data URIs are still answered."""
    running = start(tmp_path / "server.log", "--n-ctx", "2048", "--no-picture-urls")
    try:
        with (
            openai.OpenAI(base_url=f"{running.url}/v1", api_key="-", max_retries=0) as client,
            Site() as site,
        ):
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(
                    model="demo", messages=ask_url(f"{site.url}/digit.png")
                )
            answer = client.chat.completions.create(model="demo", messages=ask(), temperature=0)
    finally:
        stop(running)
    assert caught.value.code == "invalid_image_url"
    assert caught.value.param == "messages[0].content[1].image_url"
    assert "data URI" in caught.value.message
    assert site.requested == []
    assert answer.choices[0].message.content == ANSWER


# -- the Ollama protocol -------------------------------------------------------------------


def test_ollama_client_chats_and_streams(ollama_client: ollama.Client) -> None:
    """The official ollama client gets the answer, whole and streamed, with honest counts:
    a follow-up evaluates only its new tokens."""
    picture = base64.b64encode(SHAPE.read_bytes()).decode()
    first_message: Any = {"role": "user", "content": "What shape is this?", "images": [picture]}
    whole = ollama_client.chat(
        model="demo", messages=[first_message], options={"temperature": 0}, stream=False
    )
    assert whole.done
    assert whole.done_reason == "stop"
    assert (whole.message.content or "").startswith("It is")
    followup: Any = [
        first_message,
        {"role": "assistant", "content": whole.message.content},
        {"role": "user", "content": "What colour is it?"},
    ]
    chunks = list(
        ollama_client.chat(model="demo", messages=followup, options={"temperature": 0}, stream=True)
    )
    assert chunks[-1].done
    assert len(chunks) > 2
    assert "".join(c.message.content or "" for c in chunks).startswith("It is")
    assert 0 < (chunks[-1].prompt_eval_count or 0) < 60
    assert (chunks[-1].eval_count or 0) >= len([c for c in chunks if c.message.content])


def test_ollama_listing_routes(ollama_client: ollama.Client) -> None:
    """tags, show (with the vision capability), ps and version answer as Ollama does."""
    assert [m.model for m in ollama_client.list().models] == ["demo:latest"]
    show = ollama_client.show("demo")
    assert show.capabilities is not None
    assert "vision" in show.capabilities
    assert [m.model for m in ollama_client.ps().models] == ["demo:latest"]
    response = httpx.get(
        f"{ollama_client._client.base_url}/api/version",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert "version" in response.json()


def test_visionchat_ollama_engine_against_the_server(server: Server) -> None:
    """VisionChat's own Ollama engine, pointed at the server, converses unchanged."""
    client = ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"})
    try:
        with VisionChat("ollama", "demo", client=client, temperature=0) as chat:
            assert chat.ask(QUESTION, image=DIGIT).text == ANSWER
            second = chat.ask(QUESTION)
    finally:
        client.close()  # type: ignore[no-untyped-call]
    assert second.text == ANSWER
    assert known(second.stats.prompt_tokens) < 60


def test_visionchat_openai_engine_against_the_server(server: Server) -> None:
    """VisionChat's own OpenAI engine, pointed at the server, converses and sees the
    server's cache in its stats."""
    with VisionChat.openai(base_url=f"{server.url}/v1", api_key=KEY, temperature=0) as chat:
        assert chat.model == "demo"  # the only model listed
        first = chat.ask(QUESTION, image=DIGIT)
        second = chat.ask(QUESTION)
    assert first.text == ANSWER
    assert second.text == ANSWER
    assert (second.stats.cached_tokens or 0) > 200
    assert known(second.stats.prompt_tokens) < 60


# -- many clients, and clients that leave ----------------------------------------------------


def test_concurrent_clients_are_all_answered(server: Server) -> None:
    """Four clients at once, each a two-turn conversation, all get right answers."""

    def conversation(_: int) -> list[str]:
        messages = ask()
        answers = []
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
            for _turn in range(2):
                reply = client.chat.completions.create(
                    model="demo",
                    messages=messages,
                    temperature=0,
                )
                text = reply.choices[0].message.content or ""
                answers.append(text)
                messages += [
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": QUESTION},
                ]
        return answers

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(conversation, range(4)))
    assert results == [[ANSWER, ANSWER]] * 4


def test_disconnect_mid_stream_frees_the_model(server: Server, client: openai.OpenAI) -> None:
    """A client that hangs up mid-stream stops its turn at once (it is counted as
    cancelled, not finished), and the next request is answered."""
    before = httpx.get(f"{server.url}/health", timeout=10).json()
    body = _long_stream()
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert httpx.get(f"{server.url}/health", timeout=10).json()["busy"]
    after = _wait_idle(server, cancelled_at_least=before["cancelled"] + 1)
    assert after["served"] == before["served"]
    _healthy(server, client)
    assert "client gone mid-stream" in server.log_text()


def test_full_queue_answers_503(server: Server, client: openai.OpenAI) -> None:
    """With the model busy and three requests waiting, the next one gets 503 with
    Retry-After at once; the waiting ones are answered."""
    body = _long_stream()
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as holding:
        lines = holding.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)  # the model is busy with this one now
        with ThreadPoolExecutor(3) as pool:
            waiting = [
                pool.submit(
                    client.chat.completions.create,
                    model="demo",
                    messages=ask(),
                    temperature=0,
                )
                for _ in range(3)
            ]
            deadline = time.monotonic() + 60
            while httpx.get(f"{server.url}/health", timeout=10).json()["waiting"] < 3:
                assert time.monotonic() < deadline, "the requests never queued"
                time.sleep(0.02)
            refused = _post(server, "/v1/chat/completions", {**body, "stream": False})
            assert refused.status_code == 503
            assert refused.headers["retry-after"].isdigit()
            assert refused.json()["error"]["code"] == "server_busy"
            ollama_refused = _post(
                server,
                "/api/chat",
                {"model": "demo", "messages": [{"role": "user", "content": "x"}]},
            )
            assert ollama_refused.status_code == 503
            assert "busy" in ollama_refused.json()["error"]
            holding.close()  # hang up: the waiting ones get the model
            answers = [w.result().choices[0].message.content for w in waiting]
    assert answers == [ANSWER] * 3
    _wait_idle(server)


# -- bad input -------------------------------------------------------------------------------


def test_malformed_json_is_refused_in_each_protocol(server: Server, client: openai.OpenAI) -> None:
    """A body that is not JSON gets 400 in the protocol's own error shape."""
    response = _post(server, "/v1/chat/completions", b'{"model": "demo", "messages": [')
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "not valid JSON" in error["message"]
    response = _post(server, "/api/chat", b"not json at all")
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]
    missing = _post(server, "/v1/chat/completions", {"model": "demo"})
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "messages"
    _healthy(server, client)


def test_unknown_model_is_404(
    server: Server, client: openai.OpenAI, ollama_client: ollama.Client
) -> None:
    """A model the server does not serve is 404 for both clients."""
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="llava", messages=ask())
    assert caught.value.code == "model_not_found"
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client.chat(model="llava", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as unknown:
        ollama_client.show("llava")
    assert unknown.value.status_code == 404
    _healthy(server, client)


def test_a_picture_that_is_not_a_picture_is_400(
    server: Server, client: openai.OpenAI, ollama_client: ollama.Client
) -> None:
    """Bytes that are no picture, and a path on the server's disk, are refused with 400."""
    for url in (
        "data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode(),
        str(DIGIT),  # never read from the server's own disk
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="demo", messages=ask_url(url))
        assert caught.value.code == "invalid_image"
        assert caught.value.param == "messages[0].content[1].image_url"
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client.chat(
            model="demo",
            messages=[{"role": "user", "content": QUESTION, "images": ["aGVsbG8gd29ybGQ="]}],
        )
    assert refused.value.status_code == 400
    _healthy(server, client)


def test_oversized_body_and_picture_are_413(server: Server, client: openai.OpenAI) -> None:
    """A body over --max-body-mb and a picture over --max-picture-mb get 413."""
    big = _post(server, "/v1/chat/completions", b" " * (1024 * 1024 + 10))
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "request_too_large"
    picture = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(600_000)).decode()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="demo", messages=ask_url(picture))
    assert caught.value.status_code == 413
    _healthy(server, client)


def test_prompt_longer_than_the_context_is_400(
    server: Server, client: openai.OpenAI, ollama_client: ollama.Client
) -> None:
    """A conversation that does not fit the context gets 400 context_length_exceeded on
    the OpenAI route; the Ollama route cuts it and answers, as Ollama does
    (tests/apps/serve/test_serve_fields.py has the details)."""
    long_question = "Is it a seven? " * 200  # about 3000 tokens with the demo's bytes
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="demo",
            messages=ask(question=long_question),
            stream=True,
        )
    assert caught.value.code == "context_length_exceeded"
    cut = ollama_client.chat(model="demo", messages=[{"role": "user", "content": long_question}])
    assert cut.done
    assert (cut.prompt_eval_count or 0) < 2048
    _healthy(server, client)


def test_api_key_is_required_but_not_for_health(server: Server) -> None:
    """Without the key every route but /health is 401; with a wrong key too."""
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    with (
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as wrong,
        pytest.raises(openai.AuthenticationError),
    ):
        wrong.models.list()
    for path in ("/api/tags", "/v1/models", "/api/ps"):
        assert httpx.get(f"{server.url}{path}", timeout=10).status_code == 401
    denied = httpx.post(f"{server.url}/api/chat", json={"model": "demo"}, timeout=10)
    assert denied.status_code == 401
    assert "API key" in denied.json()["error"]


def test_one_log_line_per_request(server: Server, client: openai.OpenAI) -> None:
    """Each answer is logged with its method, route, status, tokens and seconds."""
    client.chat.completions.create(model="demo", messages=ask(), temperature=0)
    lines = [line for line in server.log_text().splitlines() if "POST /v1/chat/completions" in line]
    assert lines
    last = lines[-1].split()
    assert last[1:4] == ["POST", "/v1/chat/completions", "200"]
    assert last[4].startswith("prompt=")
    assert last[6].startswith("completion=")
    assert last[7].endswith("s")


def test_ctrl_c_stops_the_server_cleanly(tmp_path: Path) -> None:
    """SIGINT while an answer streams stops the turn and the server, which exits as
    every command does on Ctrl-C (status 130, no traceback)."""
    running = start(tmp_path / "server.log", "--n-ctx", "2048")
    body = _long_stream()
    try:
        url = f"{running.url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=120) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)
            running.process.send_signal(signal.SIGINT)
            assert running.process.wait(timeout=60) == 130
    finally:
        stop(running)
    log = running.log_text()
    assert "Traceback" not in log
    assert "interrupted" in log
