"""Questions as other software sends them, for ``llava-local eval --wrapped``.

A user rarely types the question the model sees: chat clients add a system prompt,
libraries that want structured output add instructions and a JSON schema before or
after the question, and some put the question inside text of their own. A
:class:`Wrapper` is one such way, written from the client's published source; the
evaluation asks every picture each question through each wrapper, as the client would
send it through ``llava-local serve`` (its messages, and its grammar where it sends a
schema as ``response_format`` or ``format``).

:data:`HELD_OUT` are the wrappers the bundled demo model was *not* trained on (its
training draws other clients' prompts, in the repository's ``training/prompts.py``; a
test checks that none of these texts is among them), so its accuracy through them
measures how it copes with software it never saw. Your own wrappers are
:class:`Wrapper` objects, or a JSON file of them (``load_wrappers``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import InvalidRequestError, problems

__all__ = ["HELD_OUT", "Wrapper", "load_wrappers", "task_schema"]

#: How a client writes the schema into its text: Python's ``json.dumps`` (``python``,
#: or ``python-indent`` with ``indent=2``), JavaScript's ``JSON.stringify``
#: (``javascript``), or LangChain's (``json.dumps`` without the top ``title`` and
#: ``type``).
SchemaStyle = Literal["python", "python-indent", "javascript", "langchain"]


class Wrapper(BaseModel):
    """One client's way of sending a question.

    ``system`` is the system message (``None``: the client sends none, so the model's
    default applies) and ``user`` the user's text; in both, ``{question}`` is the
    question and ``{schema}`` the task's JSON schema written in ``schema_style``.
    ``grammar``: what the client asks the server to enforce: ``"object"`` any JSON
    object (OpenAI's ``json_object``, Ollama's ``format="json"``), ``"schema"`` the
    task's schema (``json_schema``, ``format=<schema>``), ``None`` nothing.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    source: str = ""
    system: str | None = None
    user: str = "{question}"
    schema_style: SchemaStyle = "python"
    grammar: Literal["object", "schema"] | None = None

    @field_validator("user")
    @classmethod
    def _asks_the_question(cls, value: str) -> str:
        if "{question}" not in value:
            raise ValueError("user must contain {question}, where the question goes")
        return value

    def render(self, question: str, schema: dict[str, Any]) -> tuple[str | None, str]:
        """The system message (or None) and the user's text for ``question``."""
        written = _written(schema, self.schema_style)

        def fill(text: str) -> str:
            return text.replace("{schema}", written).replace("{question}", question)

        return (None if self.system is None else fill(self.system)), fill(self.user)


def _written(schema: dict[str, Any], style: SchemaStyle) -> str:
    if style == "python-indent":
        return json.dumps(schema, indent=2, ensure_ascii=False)
    if style == "javascript":
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if style == "langchain":
        reduced = {k: v for k, v in schema.items() if k not in ("title", "type")}
        return json.dumps(reduced, ensure_ascii=False)
    return json.dumps(schema, ensure_ascii=False)


def task_schema(key: str, integer: bool) -> dict[str, Any]:
    """The schema a client would send for one answer field, as pydantic writes it for
    ``class Digit(BaseModel): digit: int``."""
    title = key.replace("_", " ").title()
    return {
        "properties": {key: {"title": title, "type": "integer" if integer else "string"}},
        "required": [key],
        "title": title.replace(" ", ""),
        "type": "object",
    }


def load_wrappers(path: str | Path) -> list[Wrapper]:
    """Wrappers from a JSON file: a list of objects with :class:`Wrapper`'s fields."""
    file = Path(path).expanduser()
    try:
        items = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidRequestError(f"cannot read the wrappers file {file}: {exc}") from None
    except ValueError as exc:
        raise InvalidRequestError(f"the wrappers file {file} is not JSON ({exc})") from None
    if not isinstance(items, list) or not items:
        raise InvalidRequestError(f"the wrappers file {file} must hold a non-empty JSON list")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(Wrapper.model_validate(item))
        except ValidationError as exc:
            raise InvalidRequestError(f"{file}, wrapper {i + 1}: {problems(exc)}") from None
    return out


_LANGCHAIN_EXAMPLE = (
    'As an example, for the schema {"properties": {"foo": {"title": "Foo", "description": '
    '"a list of strings", "type": "array", "items": {"type": "string"}}}, "required": '
    '["foo"]}\nthe object {"foo": ["bar", "baz"]} is a well-formatted instance of the '
    'schema. The object {"properties": {"foo": ["bar", "baz"]}} is not well-formatted.'
)

#: Clients' ways the demo model never saw in training.
HELD_OUT: tuple[Wrapper, ...] = (
    Wrapper(
        name="pydantic-ai-prompted",
        source="pydantic-ai PromptedOutput: DEFAULT_PROMPTED_OUTPUT_TEMPLATE as instructions",
        system="Always respond with a JSON object that's compatible with this schema:\n\n"
        "{schema}\n\nDon't include any text or Markdown fencing before or after.",
    ),
    Wrapper(
        name="llamaindex-pydantic",
        source="LlamaIndex PydanticOutputParser.format: the query, then PYDANTIC_FORMAT_TMPL",
        user="{question}\n\n\nHere's a JSON schema to follow:\n{schema}\n\n"
        "Output a valid JSON object but do not repeat the schema.\n",
    ),
    Wrapper(
        name="langchain-format-instructions",
        source="LangChain PydanticOutputParser.get_format_instructions() in its documented "
        'prompt "Answer the user query.\\n{format_instructions}\\n{query}\\n"',
        user="Answer the user query.\nThe output should be formatted as a JSON instance that "
        f"conforms to the JSON schema below.\n\n{_LANGCHAIN_EXAMPLE}\n\nHere is the output "
        "schema:\n```\n{schema}\n```\n{question}\n",
        schema_style="langchain",
    ),
    Wrapper(
        name="pydantic-ai-prompted-json-mode",
        source="pydantic-ai PromptedOutput on a model with a JSON mode: the instructions, "
        "and response_format json_object",
        system="Always respond with a JSON object that's compatible with this schema:\n\n"
        "{schema}\n\nDon't include any text or Markdown fencing before or after.",
        grammar="object",
    ),
    Wrapper(
        name="llamaindex-structured-schema",
        source="LlamaIndex's format text with the schema also sent as response_format json_schema",
        user="{question}\n\n\nHere's a JSON schema to follow:\n{schema}\n\n"
        "Output a valid JSON object but do not repeat the schema.\n",
        grammar="schema",
    ),
    Wrapper(
        name="hermes-2-system",
        source="OpenHermes 2.5's system prompt (its model card)",
        system="You are Hermes 2, a conscious sentient superintelligent artificial "
        "intelligence developed by a man named Teknium, and your purpose and drive is to "
        "assist the user with any request they have. You experience emotions and have deep, "
        "profound thoughts and qualia.",
    ),
    Wrapper(
        name="mistral-guardrail-system",
        source="Mistral's system prompt for guardrailing (Mistral AI documentation)",
        system="Always assist with care, respect, and truth. Respond with utmost utility yet "
        "securely. Avoid harmful, unethical, prejudiced, or negative content. Ensure replies "
        "promote fairness and positivity.",
    ),
    Wrapper(
        name="describer-system",
        source="a custom system prompt a user might set in a chat client",
        system="You are a friendly and knowledgeable assistant who describes images accurately.",
    ),
    Wrapper(
        name="attached-image-prefix",
        source="a question introduced by the client's text",
        user="Answer the question below about the attached image.\n\n{question}",
    ),
    Wrapper(
        name="short-sentence-suffix",
        source="a client's instruction after the question",
        user="{question}\n\nPlease reply in a single short sentence.",
    ),
    Wrapper(
        name="image-question-label",
        source="a labelled question",
        user="Image question: {question}",
    ),
    Wrapper(
        name="just-the-result",
        source="a client's note in brackets",
        user="{question} (Answer with just the result.)",
    ),
)


def names(wrappers: Sequence[Wrapper]) -> list[str]:
    """The wrappers' names, checked to be distinct (each names a row of the report)."""
    seen = [w.name for w in wrappers]
    repeated = sorted({n for n in seen if seen.count(n) > 1})
    if repeated:
        raise InvalidRequestError(f"two wrappers are named {repeated[0]!r}; names must differ")
    return seen
