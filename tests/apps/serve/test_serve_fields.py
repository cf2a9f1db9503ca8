"""``llava-local serve`` with the routes and fields real clients send (issue 27):
``/api/generate``, ``HEAD /``, ``/v1/models/{id}``, forced tool calls, Ollama's context
trimming, sampling defaults and log-probabilities.

One server (the bundled demo model, one slot, the demo's own 1024-token context) is
started once for the module as a subprocess; the official ``openai`` and ``ollama``
clients and plain httpx talk to it over real sockets.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest
from pydantic import BaseModel, Field

from llava_local import AsyncVisionChat, InvalidRequestError, Reply, VisionChat
from llava_local.demo import demo_paths
from llava_local.gguf_header import read_gguf
from llava_local.sampling import recommended

from ...paths import DIGIT
from ...serve_process import ANSWER, QUESTION, Server, ask, start, stop

pytestmark = pytest.mark.llama

PICTURE = base64.b64encode(DIGIT.read_bytes()).decode()
DIGIT_SCHEMA = {
    "type": "object",
    "properties": {"digit": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["digit"],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve-fields") / "server.log"
    running = start(log, "--parallel", "1", "--n-ctx", "1024")
    yield running
    stop(running)


def _post(server: Server, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


# -- /api/generate, HEAD /, /v1/models/{id} ---------------------------------------------


def test_generate_answers_whole_and_streamed(ollama_client: ollama.Client) -> None:
    """/api/generate reads the prompt and its picture, whole and streamed, and a repeat
    reuses the prefix the first one left in the cache."""
    whole = ollama_client.generate(
        model="demo", prompt=QUESTION, images=[PICTURE], options={"temperature": 0}, stream=False
    )
    assert whole.response == ANSWER
    assert whole.done
    assert whole.done_reason == "stop"
    assert (whole.eval_count or 0) > 0
    chunks = list(
        ollama_client.generate(
            model="demo", prompt=QUESTION, images=[PICTURE], options={"temperature": 0}, stream=True
        )
    )
    assert "".join(c.response or "" for c in chunks) == ANSWER
    assert len(chunks) > 2
    assert chunks[-1].done
    assert not any(c.done for c in chunks[:-1])
    assert 0 < (chunks[-1].prompt_eval_count or 0) < (whole.prompt_eval_count or 0)


def test_generate_takes_system_format_and_options(ollama_client: ollama.Client) -> None:
    """system, a JSON-schema format and options (num_predict) are applied."""
    shaped = ollama_client.generate(
        model="demo",
        prompt=QUESTION,
        images=[PICTURE],
        system="You are a helpful assistant.",
        format=DIGIT_SCHEMA,
        options={"temperature": 0},
    )
    assert json.loads(shaped.response or "") == {"digit": 7}
    options = {"temperature": 0, "num_predict": 3}
    cut = ollama_client.generate(model="demo", prompt=QUESTION, images=[PICTURE], options=options)
    assert cut.done_reason == "length"
    assert cut.eval_count == 3


def test_generate_loads_with_an_empty_prompt(server: Server) -> None:
    """An empty prompt is Ollama's way to load the model (done, reason "load") or, with
    keep_alive 0, to unload it ("unload"; the server keeps it for its other clients)."""
    loaded = _post(server, "/api/generate", {"model": "demo", "keep_alive": "5m"})
    assert loaded.status_code == 200
    assert loaded.json()["done_reason"] == "load"
    unloaded = _post(server, "/api/generate", {"model": "demo", "keep_alive": 0})
    assert unloaded.json()["done_reason"] == "unload"
    chat = _post(server, "/api/chat", {"model": "demo", "messages": [], "keep_alive": "0"})
    assert chat.json()["done_reason"] == "unload"
    after = {"model": "demo", "prompt": QUESTION, "images": [PICTURE], "stream": False}
    assert _post(server, "/api/generate", after).json()["done"]  # still answering


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("suffix", "ASSISTANT:", "does not support insert"),
        ("raw", True, "raw prompts are not supported"),
        ("template", "{{ .Prompt }}", "template is not supported"),
        ("context", [1, 2, 3], "/api/chat"),
    ],
)
def test_generate_refuses_what_it_does_not_do(
    server: Server, field: str, value: Any, words: str
) -> None:
    """suffix, raw, template and context are refused with a 400 that names them."""
    body = {"model": "demo", "prompt": QUESTION, "images": [PICTURE], "stream": False, field: value}
    refused = _post(server, "/api/generate", body)
    assert refused.status_code == 400
    assert words in refused.json()["error"]


def test_generate_unknown_model_is_404(ollama_client: ollama.Client) -> None:
    """/api/generate names the model it serves, with Ollama's 404."""
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.generate(model="llava", prompt=QUESTION)
    assert caught.value.status_code == 404


def test_head_root_is_200(server: Server) -> None:
    """HEAD / answers 200 with no body, as Ollama's liveness check expects."""
    answer = httpx.head(f"{server.url}/", timeout=10)
    assert answer.status_code == 200
    assert answer.content == b""


def test_v1_model_by_id(client: openai.OpenAI) -> None:
    """GET /v1/models/{id} gives the served model, and 404 for any other."""
    model = client.models.retrieve("demo")
    assert model.id == "demo"
    assert model.owned_by == "llava-local"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found"


def test_chat_still_answers(client: openai.OpenAI) -> None:
    """The chat route answers as before beside the new routes."""
    answer = client.chat.completions.create(model="demo", messages=ask(), temperature=0)
    assert answer.choices[0].message.content == ANSWER


# -- forced tool calls -------------------------------------------------------------------


class Digit(BaseModel):
    """The digit the picture shows."""

    digit: int = Field(ge=0, le=9)


DIGIT_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "report_digit",
        "description": "Report the digit in the picture.",
        "parameters": DIGIT_SCHEMA,
    },
}
NAMED: Any = {"type": "function", "function": {"name": "report_digit"}}


def test_openai_forced_tool_is_a_tool_call(client: openai.OpenAI) -> None:
    """A function named by tool_choice is answered as its call, with arguments that
    fit its parameters, and finish_reason "tool_calls"."""
    answer = client.chat.completions.create(
        model="demo", messages=ask(), tools=[DIGIT_TOOL], tool_choice=NAMED, temperature=0
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    call: Any = calls[0]
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "report_digit"
    assert json.loads(call.function.arguments) == {"digit": 7}


def test_openai_required_tool_streams_its_arguments(client: openai.OpenAI) -> None:
    """ "required" with one tool streams the call: the first delta names it, the rest
    carry its arguments piece by piece."""
    stream = client.chat.completions.create(
        model="demo",
        messages=ask(),
        tools=[DIGIT_TOOL],
        tool_choice="required",
        temperature=0,
        stream=True,
    )
    deltas = [chunk.choices[0] for chunk in stream if chunk.choices]
    calls = [call for d in deltas for call in d.delta.tool_calls or []]
    assert calls[0].id is not None
    assert calls[0].function is not None
    assert calls[0].function.name == "report_digit"
    assert {call.index for call in calls} == {0}
    arguments = "".join((call.function.arguments or "") for call in calls if call.function)
    assert json.loads(arguments) == {"digit": 7}
    assert len(calls) > 2
    assert deltas[-1].finish_reason == "tool_calls"
    assert not any(d.delta.content for d in deltas)


def test_tools_left_to_the_model_are_refused_as_ollama_does(
    client: openai.OpenAI, ollama_client: ollama.Client
) -> None:
    """tool_choice "auto" (or none given) is a 400 "does not support tools" on both
    routes, as Ollama answers for a model not trained for tools; "none" answers text."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="demo", messages=ask(), tools=[DIGIT_TOOL])
    assert "demo does not support tools" in str(caught.value)
    with pytest.raises(ollama.ResponseError) as refused:
        ollama_client.chat(
            model="demo",
            messages=[{"role": "user", "content": QUESTION, "images": [PICTURE]}],
            tools=[DIGIT_TOOL],
        )
    assert refused.value.status_code == 400
    assert "demo does not support tools" in refused.value.error
    text = client.chat.completions.create(
        model="demo", messages=ask(), tools=[DIGIT_TOOL], tool_choice="none", temperature=0
    )
    assert text.choices[0].message.content == ANSWER
    assert text.choices[0].finish_reason == "stop"


def test_ollama_forced_tool_is_a_tool_call(server: Server) -> None:
    """On /api/chat a forced function comes back as Ollama's tool_calls (arguments an
    object), whole and streamed (as Ollama streams it: the call whole, then the last
    line)."""
    body: dict[str, Any] = {
        "model": "demo",
        "messages": [{"role": "user", "content": QUESTION, "images": [PICTURE]}],
        "tools": [DIGIT_TOOL],
        "tool_choice": NAMED,
        "options": {"temperature": 0},
    }
    whole = _post(server, "/api/chat", {**body, "stream": False}).json()
    assert whole["message"]["tool_calls"] == [
        {"function": {"name": "report_digit", "arguments": {"digit": 7}}}
    ]
    assert whole["done_reason"] == "stop"
    lines = [
        json.loads(line)
        for line in _post(server, "/api/chat", {**body, "stream": True}).text.splitlines()
    ]
    calls = [call for line in lines for call in line["message"].get("tool_calls", [])]
    assert calls == [{"function": {"name": "report_digit", "arguments": {"digit": 7}}}]
    assert lines[-2]["message"]["tool_calls"] == calls  # whole, in a line of its own
    assert not lines[-2]["done"]
    assert lines[-1]["done"]
    assert not any(line["message"]["content"] for line in lines)


def test_a_tool_result_can_be_sent_back(client: openai.OpenAI) -> None:
    """A conversation that carries an earlier call and its result (role "tool") is read."""
    first = client.chat.completions.create(
        model="demo", messages=ask(), tools=[DIGIT_TOOL], tool_choice=NAMED, temperature=0
    )
    call: Any = (first.choices[0].message.tool_calls or [])[0]
    messages: Any = [
        *ask(),
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "recorded"},
    ]
    answer = client.chat.completions.create(model="demo", messages=messages, max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_library_forced_tool_on_every_engine(server: Server) -> None:
    """ask(..., tool=Digit) returns the parsed call in-process, through the openai
    engine (tools passed to the server) and the Ollama engine (the daemon's format)."""
    with VisionChat.llama_cpp() as local:
        reply = local.ask(QUESTION, image=DIGIT, tool=Digit, temperature=0)
    assert [call.name for call in reply.tool_calls] == ["Digit"]
    assert reply.tool_calls[0].arguments == Digit(digit=7)
    assert json.loads(reply.tool_calls[0].arguments_json) == {"digit": 7}
    with VisionChat.openai(base_url=f"{server.url}/v1", api_key="none", temperature=0) as remote:
        remote_reply = remote.ask(QUESTION, image=DIGIT, tools=[DIGIT_TOOL])
    assert remote_reply.tool_calls[0].name == "report_digit"
    assert remote_reply.tool_calls[0].arguments == {"digit": 7}
    hub = ollama.Client(host=server.url)
    try:
        with VisionChat("ollama", "demo", client=hub, temperature=0) as daemon:
            daemon_reply = daemon.ask(QUESTION, image=DIGIT, tool=Digit)
    finally:
        hub.close()  # type: ignore[no-untyped-call]
    assert daemon_reply.tool_calls[0].arguments == Digit(digit=7)


def test_async_chat_forces_a_tool_too() -> None:
    """AsyncVisionChat.ask(..., tool=...) returns the parsed call as the sync chat does."""

    async def ask() -> Reply:
        async with AsyncVisionChat.llama_cpp(temperature=0) as chat:
            return await chat.ask(QUESTION, image=DIGIT, tool=Digit)

    reply = asyncio.run(ask())
    assert [(call.name, call.arguments) for call in reply.tool_calls] == [("Digit", Digit(digit=7))]


def test_library_refuses_a_choice_among_tools() -> None:
    """Several tools with none forced is refused before any turn: the model cannot choose."""
    other = {**DIGIT_TOOL, "function": {**DIGIT_TOOL["function"], "name": "other"}}
    with VisionChat.llama_cpp() as chat, pytest.raises(InvalidRequestError, match="name the one"):
        chat.ask(QUESTION, image=DIGIT, tools=[DIGIT_TOOL, other])
    assert chat.history == []


# -- Ollama's context behaviour -----------------------------------------------------------

#: Far more than a 1024-token context holds, with the demo's one token a byte.
PADDING = "Tell me about the picture again, please. " * 40


def _long_conversation() -> list[dict[str, Any]]:
    """A system message, a first question with the picture, and three long turns."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": QUESTION, "images": [PICTURE]},
        {"role": "assistant", "content": ANSWER},
    ]
    for _ in range(3):
        messages += [
            {"role": "user", "content": PADDING},
            {"role": "assistant", "content": ANSWER},
        ]
    return [*messages, {"role": "user", "content": QUESTION}]


def test_ollama_chat_keeps_the_newest_messages_and_picture(server: Server) -> None:
    """A conversation that outgrows the context is answered on /api/chat, from the
    system message, the newest messages and the picture, which is kept."""
    body = {
        "model": "demo",
        "messages": _long_conversation(),
        "stream": False,
        "options": {"temperature": 0},
    }
    answer = _post(server, "/api/chat", body)
    assert answer.status_code == 200
    data = answer.json()
    assert data["message"]["content"] == ANSWER
    assert data["prompt_eval_count"] < 1024


def test_ollama_routes_cut_a_prompt_too_long_alone(server: Server) -> None:
    """One message longer than the context (Open WebUI's title and follow-up tasks) is
    answered on both Ollama routes, its start cut, with room left to answer."""
    task = PADDING * 2 + "Generate a concise title for the chat."
    chat = _post(
        server,
        "/api/chat",
        {"model": "demo", "messages": [{"role": "user", "content": task}], "stream": False},
    )
    assert chat.status_code == 200
    assert chat.json()["done"]
    assert chat.json()["prompt_eval_count"] <= 1024 - 1024 // 4
    generate = _post(server, "/api/generate", {"model": "demo", "prompt": task, "stream": False})
    assert generate.status_code == 200
    assert generate.json()["done"]


def test_openai_route_still_refuses_what_does_not_fit(client: openai.OpenAI) -> None:
    """The OpenAI route answers 400 context_length_exceeded, as OpenAI does."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="demo", messages=ask(question=PADDING * 2))
    assert caught.value.code == "context_length_exceeded"


def test_library_truncate_keeps_the_end_of_a_long_question() -> None:
    """VisionChat(on_overflow="truncate") answers a question longer than the context,
    from its end (with room left to answer), and leaves the history whole."""
    with VisionChat.llama_cpp(on_overflow="truncate", temperature=0, n_ctx=1024) as chat:
        reply = chat.ask(PADDING * 2 + QUESTION, image=DIGIT)
        assert reply.text
        # a quarter of the context is left to answer in
        assert (reply.stats.prompt_tokens or 0) + (reply.stats.cached_tokens or 0) <= 768
        assert chat.history[0].content == PADDING * 2 + QUESTION


# -- sampling defaults --------------------------------------------------------------------


def test_show_says_which_sampling_a_request_without_options_gets(
    ollama_client: ollama.Client,
) -> None:
    """/api/show's parameters list the sampling applied when a request sets none (what
    the demo's GGUF recommends, else llama.cpp's defaults), and its modelfile says
    where it comes from."""
    meta = read_gguf(demo_paths()[0]).meta
    expected = recommended({k: str(v) for k, v in meta.items() if k.startswith("general.")})
    show = ollama_client.show("demo")
    parameters = dict(line.split() for line in (show.parameters or "").splitlines())
    assert parameters == {name: f"{value:g}" for name, value in expected.values().items()}
    assert set(parameters) == {"temperature", "top_k", "top_p", "min_p", "repeat_penalty"}
    assert f"# sampling: {expected.described}" in (show.modelfile or "")
    assert f"PARAMETER temperature {expected.temperature:g}" in (show.modelfile or "")


# -- log-probabilities ----------------------------------------------------------------------


def test_library_logprobs_come_from_the_engines_logits() -> None:
    """ask(..., logprobs=3) gives every answer token's log-probability with its three
    likeliest alternatives; greedy answers pick the likeliest, and the demo is sure
    of the digit."""
    with VisionChat.llama_cpp(temperature=0) as chat:
        reply = chat.ask(QUESTION, image=DIGIT, logprobs=3)
        assert chat.ask(QUESTION).logprobs is None  # not asked for: none
    tokens = reply.logprobs
    assert tokens is not None
    assert len(tokens) == reply.stats.completion_tokens
    assert "".join(t.token for t in tokens).strip() == ANSWER
    for t in tokens:
        assert t.logprob <= 0.0
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    seven = next(t for t in tokens if t.token == "7")
    assert seven.logprob > math.log(0.5)


def test_openai_route_logprobs_whole_and_streamed(client: openai.OpenAI) -> None:
    """logprobs/top_logprobs on /v1: one entry per token, whole and (with the last
    chunk) streamed."""
    whole = client.chat.completions.create(
        model="demo", messages=ask(), temperature=0, logprobs=True, top_logprobs=2
    )
    content = (whole.choices[0].logprobs.content or []) if whole.choices[0].logprobs else []
    assert "".join(t.token for t in content).strip() == ANSWER
    assert whole.usage is not None
    assert len(content) == whole.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in content)
    stream = client.chat.completions.create(
        model="demo", messages=ask(), temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [
        t for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.content or []
    ]
    assert [t.token for t in streamed] == [t.token for t in content]
    plain = client.chat.completions.create(model="demo", messages=ask(), temperature=0)
    assert plain.choices[0].logprobs is None


def test_ollama_routes_logprobs(ollama_client: ollama.Client) -> None:
    """Ollama's logprobs/top_logprobs on /api/chat and /api/generate."""
    chat = ollama_client.chat(
        model="demo",
        messages=[{"role": "user", "content": QUESTION, "images": [PICTURE]}],
        options={"temperature": 0},
        logprobs=True,
        top_logprobs=2,
    )
    assert chat.logprobs is not None
    assert "".join(t.token for t in chat.logprobs).strip() == ANSWER
    assert all(len(t.top_logprobs or []) == 2 for t in chat.logprobs)
    chunks = list(
        ollama_client.generate(
            model="demo",
            prompt=QUESTION,
            images=[PICTURE],
            options={"temperature": 0},
            logprobs=True,
            stream=True,
        )
    )
    tokens = [t for c in chunks for t in c.logprobs or []]
    assert "".join(t.token for t in tokens).strip() == ANSWER
    assert chunks[-1].logprobs


def test_openai_engine_passes_logprobs_through(server: Server) -> None:
    """The openai engine asks its server for logprobs and returns what it sends."""
    with VisionChat.openai(base_url=f"{server.url}/v1", api_key="none", temperature=0) as chat:
        reply = chat.ask(QUESTION, image=DIGIT, logprobs=2)
    assert reply.logprobs is not None
    assert "".join(t.token for t in reply.logprobs).strip() == ANSWER
    assert all(len(t.top_logprobs) == 2 for t in reply.logprobs)


def test_ollama_engine_passes_logprobs_through(server: Server) -> None:
    """The Ollama engine asks the daemon for logprobs and returns what it sends."""
    hub = ollama.Client(host=server.url)
    try:
        with VisionChat("ollama", "demo", client=hub, temperature=0) as chat:
            reply = chat.ask(QUESTION, image=DIGIT, logprobs=2)
            plain = chat.ask(QUESTION)
    finally:
        hub.close()  # type: ignore[no-untyped-call]
    assert reply.logprobs is not None
    assert "".join(t.token for t in reply.logprobs).strip() == ANSWER
    assert all(len(t.top_logprobs) == 2 for t in reply.logprobs)
    assert plain.logprobs is None
