"""Client libraries nobody here wrote, each driven as its own documentation shows,
against the real ``serve`` (the demo model) behind the recording proxy: each test
asserts the right digit and the request shape the server saw (issue 27)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from ..paths import DIGIT
from ..serve_process import ANSWER, QUESTION
from .recorder import Recorder

# litellm fetches its model price list from GitHub when imported, unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

pytestmark = pytest.mark.llama

PICTURE_URI = "data:image/png;base64," + base64.b64encode(DIGIT.read_bytes()).decode()
#: A user message with the picture, in OpenAI's shape (what litellm and langchain take).
CONTENT: Any = [
    {"type": "text", "text": QUESTION},
    {"type": "image_url", "image_url": {"url": PICTURE_URI}},
]


class Digit(BaseModel):
    """The digit in the picture."""

    digit: int = Field(ge=0, le=9)


# -- llm + llm-ollama --------------------------------------------------------------------


def _llm(recorder: Recorder, home: Path, *args: str) -> str:
    """The ``llm`` command (its own log and settings in ``home``), with llm-ollama
    pointed at the server by ``OLLAMA_HOST`` (and a key for OpenAI-style models, which
    llm asks for even when the server needs none)."""
    env = {
        **os.environ,
        "LLM_USER_PATH": str(home),
        "OLLAMA_HOST": recorder.url,
        "OPENAI_API_KEY": "unused",
    }
    llm = Path(sys.executable).with_name("llm")
    done = subprocess.run(
        [str(llm), *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_llm_with_llm_ollama_asks_and_follows_up(recorder: Recorder, tmp_path: Path) -> None:
    """``llm -m ollama/demo -a picture`` reads the digit, and ``llm -c`` follows up
    with the whole conversation (picture included) sent back to /api/chat."""
    mark = len(recorder.seen)
    greedy = ("-o", "temperature", "0")
    first = _llm(recorder, tmp_path, "-m", "ollama/demo", "-a", str(DIGIT), *greedy, QUESTION)
    assert first == ANSWER
    again = _llm(recorder, tmp_path, "-c", *greedy, QUESTION)
    assert again == ANSWER
    asked, followed = recorder.posts(mark, "/api/chat")
    assert asked["model"] == "demo:latest"
    assert asked["options"]["temperature"] == 0
    assert asked["messages"][-1]["images"]
    assert [m["role"] for m in followed["messages"]] == ["user", "assistant", "user"]
    assert followed["messages"][0]["images"] == asked["messages"][-1]["images"]


def test_llm_with_an_openai_compatible_model(recorder: Recorder, tmp_path: Path) -> None:
    """``llm`` with the server declared in ``extra-openai-models.yaml`` (``vision: true``)
    sends the picture as an image_url part and reads the digit."""
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: demo-openai\n  model_name: demo\n  api_base: {recorder.url}/v1\n"
        "  vision: true\n"
    )
    mark = len(recorder.seen)
    said = _llm(
        recorder,
        tmp_path,
        "-m",
        "demo-openai",
        "-a",
        str(DIGIT),
        "-o",
        "temperature",
        "0",
        QUESTION,
    )
    assert said == ANSWER
    (body,) = recorder.posts(mark, "/v1/chat/completions")
    assert body["model"] == "demo"
    parts = body["messages"][-1]["content"]
    assert {part["type"] for part in parts} == {"text", "image_url"}


# -- litellm -------------------------------------------------------------------------------


# One litellm completion whole and one streamed, as its docs show; prints both texts.
LITELLM = """
import json, sys
import litellm

model, base, content = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
messages = [{"role": "user", "content": content}]
whole = litellm.completion(
    model=model, messages=messages, api_base=base, api_key="none", temperature=0
)
stream = litellm.completion(
    model=model, messages=messages, api_base=base, api_key="none", temperature=0, stream=True
)
text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
print(json.dumps([whole.choices[0].message.content, text]))
"""


@pytest.mark.parametrize(
    ("model", "route", "path"),
    [
        ("ollama/demo", "", "/api/generate"),
        ("ollama_chat/demo", "", "/api/chat"),
        ("openai/demo", "/v1", "/v1/chat/completions"),
    ],
)
def test_litellm_providers(recorder: Recorder, model: str, route: str, path: str) -> None:
    """litellm's ollama/, ollama_chat/ and openai/ providers read the digit, whole and
    streamed, each through its own route (ollama/: /api/generate, with the picture in
    ``images`` and no Content-Type)."""
    mark = len(recorder.seen)
    # In a process of its own: litellm leaves an event loop to the garbage collector,
    # whose ResourceWarning then failed whichever later test the collector ran in.
    proc = subprocess.run(
        [sys.executable, "-c", LITELLM, model, recorder.url + route, json.dumps(CONTENT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole, text = json.loads(proc.stdout.strip().splitlines()[-1])
    assert whole == ANSWER
    assert text == ANSWER
    bodies = recorder.posts(mark, path)
    assert len(bodies) == 2
    assert [body.get("stream", False) for body in bodies] == [False, True]
    if path == "/api/generate":
        assert bodies[0]["images"]
        assert QUESTION in bodies[0]["prompt"]
        assert bodies[0]["options"]["temperature"] == 0


# -- langchain-openai -----------------------------------------------------------------------


def test_langchain_openai_invokes_streams_and_structures(recorder: Recorder) -> None:
    """ChatOpenAI reads the digit (invoke and stream), and its structured output works
    with both of its methods: a forced function call and a JSON schema."""
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    mark = len(recorder.seen)
    chat = ChatOpenAI(base_url=f"{recorder.url}/v1", api_key="none", model="demo", temperature=0)  # type: ignore[arg-type]
    message = [HumanMessage(content=CONTENT)]
    assert chat.invoke(message).content == ANSWER
    assert "".join(str(c.content) for c in chat.stream(message)) == ANSWER
    by_tool = chat.with_structured_output(Digit, method="function_calling").invoke(message)
    assert by_tool == Digit(digit=7)
    by_schema = chat.with_structured_output(Digit, method="json_schema").invoke(message)
    assert by_schema == Digit(digit=7)
    bodies = recorder.posts(mark, "/v1/chat/completions")
    assert bodies[0]["messages"][0]["content"][1]["type"] == "image_url"
    assert bodies[2]["tool_choice"]["function"]["name"] == "Digit"
    assert bodies[3]["response_format"]["type"] == "json_schema"


# -- instructor --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_gets_a_digit(recorder: Recorder, mode: str) -> None:
    """instructor's default mode (TOOLS: a forced function call) and its JSON-schema
    mode get a Digit back, in one request (nothing to retry)."""
    import instructor
    import openai

    mark = len(recorder.seen)
    raw = openai.OpenAI(base_url=f"{recorder.url}/v1", api_key="none")
    client = instructor.from_openai(raw, mode=getattr(instructor.Mode, mode))
    digit = client.chat.completions.create(
        model="demo",
        response_model=Digit,
        messages=[{"role": "user", "content": CONTENT}],
        temperature=0,
    )
    assert isinstance(digit, Digit)
    assert digit.digit == 7
    (body,) = recorder.posts(mark, "/v1/chat/completions")
    if mode == "TOOLS":
        assert body["tools"][0]["function"]["name"] == "Digit"
        assert body["tool_choice"] == {"type": "function", "function": {"name": "Digit"}}
    else:
        assert body["response_format"]["type"] == "json_schema"


def test_instructor_answer_cut_by_max_tokens_is_not_a_server_error(recorder: Recorder) -> None:
    """An answer cut by max_tokens inside its JSON is a 200 with finish_reason "length":
    instructor says the output is incomplete after one request (a 500 would have had
    the openai client retry it, for minutes)."""
    import instructor
    import openai
    from instructor.core.exceptions import IncompleteOutputException

    class Caption(BaseModel):
        text: str

    mark = len(recorder.seen)
    raw = openai.OpenAI(base_url=f"{recorder.url}/v1", api_key="none")
    client = instructor.from_openai(raw, mode=instructor.Mode.JSON_SCHEMA)
    with pytest.raises(IncompleteOutputException):
        client.chat.completions.create(
            model="demo",
            response_model=Caption,
            messages=[{"role": "user", "content": CONTENT}],
            temperature=0,
            max_tokens=6,
            max_retries=0,
        )
    assert len(recorder.posts(mark, "/v1/chat/completions")) == 1
