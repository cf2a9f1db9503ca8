"""What other software puts around a question, and JSON answers (the demo's 2nd edition).

Real clients rarely send a bare question. The conversations this module draws for the
demo model's training come the way such clients send them:

* **system prompts** of chat clients and libraries (``CHAT_SYSTEMS``), written like the
  ones in their published sources, or none at all;
* **wrappers** around the question (``WRAPPERS``): a prefix, a suffix, both;
* **requests for JSON**: in the question ("Answer in JSON."), or a JSON schema in the
  system prompt, as instructor (modes JSON, JSON_SCHEMA, MD_JSON) and the Vercel AI
  SDK send it, or only a grammar that forces the answer to be JSON (instructor's TOOLS
  mode, LangChain's ``with_structured_output``, ``llm --schema``, Ollama's ``format``).
  A grammar forces the first ``{`` and every key and quote the schema fixes, so those
  bytes are in the training text with weight 0: the model learns to go on from them,
  not to write them unasked;
* **Open WebUI's background tasks** (a title, tags, follow-up questions), which come as
  one long text-only message with the chat history inside.

The client prompts that ``llava-local eval --wrapped`` measures
(``llava_local.apps.wrappers``) are other ones, never drawn here (a test checks).
"""

# Client templates are kept as their clients send them: long lines, typographic quotes.
# ruff: noqa: E501, RUF001

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from textwrap import dedent
from typing import Any

import numpy as np

from training import data

# --- replies as weighted segments ----------------------------------------------------------

#: A piece of the answer text and its loss weight: 1 learnt, 0 forced by a grammar (the
#: model reads it but is not taught to write it unasked).
Segment = tuple[str, float]


@dataclass(frozen=True)
class Reply:
    """An answer: its text as weighted segments (the ``</s>`` after it weighs 1)."""

    segments: tuple[Segment, ...]

    @property
    def text(self) -> str:
        """The answer as the model writes it (with the leading space, if any)."""
        return "".join(text for text, _ in self.segments)


def sentence(text: str) -> Reply:
    """A plain answer, as the vicuna format writes it after ``ASSISTANT:``."""
    return Reply(((f" {text}", 1.0),))


# --- what a picture shows, and JSON about it ----------------------------------------------

Facts = dict[str, Any]  # {"digit": 7} or {"shape": "star", "colour": "red"}


@dataclass(frozen=True)
class Field:
    """One key of a JSON answer: what it holds (``digit``, ``shape``, ``colour``), its
    name, its JSON type (``integer`` or ``string``), and whether the enum of its values
    is given in the schema."""

    kind: str
    key: str
    type: str = "string"
    enum: bool = False

    def value(self, facts: Facts) -> Any:
        """The field's value for a picture."""
        value = facts[self.kind]
        return int(value) if self.type == "integer" else str(value)

    def schema(self, title: bool) -> dict[str, Any]:
        """This property as a JSON schema (pydantic's style with ``title``)."""
        out: dict[str, Any] = {"title": _title(self.key)} if title else {}
        if self.enum:
            values: list[Any] = list(_ENUMS[self.kind])
            out |= {"enum": values if self.type == "string" else [int(v) for v in values]}
            out["type"] = self.type
        else:
            out["type"] = self.type
        return out


_ENUMS: dict[str, tuple[str, ...]] = {
    "digit": tuple("0123456789"),
    "shape": data.SHAPES,
    "colour": data.COLOUR_NAMES,
}

# Key names a request may use for each kind of value (the first is the default one).
DIGIT_KEYS = (
    "digit", "number", "value", "label", "answer", "result", "prediction", "class",
    "digit_value", "detected_digit", "recognized_digit", "num", "n", "handwritten_digit",
    "predicted_digit", "output", "figure", "character", "reading", "integer",
)  # fmt: skip
SHAPE_KEYS = (
    "shape", "shape_name", "kind", "type", "form", "geometry", "object", "shape_type",
    "detected_shape", "figure", "name", "category",
)  # fmt: skip
COLOUR_KEYS = (
    "colour", "color", "fill", "fill_color", "fill_colour", "main_color", "main_colour",
    "hue", "color_name", "colour_name", "dominant_color", "paint",
)  # fmt: skip
# Keys whose value is the whole answer sentence ("This digit is 7.").
SENTENCE_KEYS = ("answer", "description", "text", "caption", "reply", "response", "sentence")
MODEL_NAMES = {
    "digit": ("Digit", "Number", "DigitReading", "Answer", "Result", "Prediction", "Output"),
    "shape": ("Shape", "ShapeInfo", "Answer", "Result", "Detection", "Output"),
    "colour": ("Colour", "Color", "ColorInfo", "Answer", "Result", "Output"),
    "both": ("ShapeInfo", "Shape", "Description", "Answer", "Result", "Drawing"),
}


def _title(key: str) -> str:
    return key.replace("_", " ").title()


def default_fields(kind: str, question: str = "") -> tuple[Field, ...]:
    """The JSON keys an answer uses when the request names none: ``digit``, ``shape``,
    ``colour`` (``color`` if the question spells it so), or shape and colour for "what
    is this?" about a shape."""
    if kind == "digit":
        return (Field("digit", "digit", "integer"),)
    colour = Field("colour", "color" if "color" in question.lower() else "colour")
    if kind == "colour":
        return (colour,)
    if kind == "shape":
        return (Field("shape", "shape"),)
    return (Field("shape", "shape"), colour)


def random_fields(kind: str, rng: np.random.Generator) -> tuple[Field, ...]:
    """Keys and types as a schema might ask for them."""

    def one(k: str, keys: Sequence[str]) -> Field:
        key = keys[0] if rng.random() < 0.35 else _pick(rng, keys)
        if k == "digit":
            kind_of_type = rng.random()
            type_ = "integer" if kind_of_type < 0.75 else "string"
            return Field(k, key, type_, enum=bool(rng.random() < 0.15))
        return Field(k, key, "string", enum=bool(rng.random() < 0.25))

    if kind == "digit":
        return (one("digit", DIGIT_KEYS),)
    if kind == "shape":
        return (one("shape", SHAPE_KEYS),)
    if kind == "colour":
        return (one("colour", COLOUR_KEYS),)
    fields = [one("shape", SHAPE_KEYS[:2] + SHAPE_KEYS[4:]), one("colour", COLOUR_KEYS)]
    if fields[0].key == fields[1].key:
        fields[1] = Field("colour", "colour")
    return tuple(fields[::-1] if rng.random() < 0.3 else fields)


def object_schema(fields: Sequence[Field], rng: np.random.Generator, kind: str) -> dict[str, Any]:
    """A JSON schema for ``fields``: pydantic's layout (titles, ``required``) or a plain
    hand-written one."""
    pydantic = rng.random() < 0.6
    properties = {f.key: f.schema(title=pydantic) for f in fields}
    if pydantic:
        name = _pick(rng, MODEL_NAMES[kind])
        return {
            "properties": properties,
            "required": [f.key for f in fields],
            "title": name,
            "type": "object",
        }
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if rng.random() < 0.8:
        schema["required"] = [f.key for f in fields]
    if rng.random() < 0.3:
        schema["additionalProperties"] = False
    return schema


def json_reply(
    fields: Sequence[Field],
    facts: Facts,
    *,
    forced: bool,
    keys_known: bool,
    types_known: bool,
    sentence_text: str | None = None,
    key_learnt: float = 1.0,
) -> Reply:
    """``{"key": value, ...}`` as the model should write it.

    ``forced``: a grammar wrote the ``{`` right after ``ASSISTANT:`` (no space; weight
    0). ``keys_known``: the keys can be read from the request (or are the default ones),
    so they are learnt; otherwise the grammar wrote them (weight 0), with the separators
    before them. ``types_known``: likewise for the quote that opens a string value.
    ``sentence_text`` puts the answer sentence into a string field instead of the bare
    value (``{"answer": "This digit is 7."}``). ``key_learnt``: the weight of keys the
    model writes itself (stage 3 weighs them more: run 19 wrote ``"fill"`` where the
    schema said ``"shape"``).
    """
    out: list[Segment] = [("{", 0.0)] if forced else [(" {", 1.0)]
    key_weight = key_learnt if keys_known else 0.0
    for i, f in enumerate(fields):
        out.append(((", " if i else "") + json.dumps(f.key) + ": ", key_weight))
        value = sentence_text if sentence_text is not None else f.value(facts)
        if isinstance(value, str):
            out.append(('"', 1.0 if types_known else 0.0))
            out.append((json.dumps(value, ensure_ascii=False)[1:], 1.0))
        else:
            out.append((json.dumps(value), 1.0))
    out.append(("}", 1.0))
    return Reply(tuple(out))


def fenced(reply: Reply) -> Reply:
    """The JSON in a Markdown code block, as instructor's MD_JSON mode asks."""
    body = reply.text.strip()
    return Reply(((f" ```json\n{body}\n```", 1.0),))


# --- JSON requests ------------------------------------------------------------------------

JSON_ASKS = (
    " Answer in JSON.", " Reply in JSON.", " Respond with JSON.", " Return JSON.",
    " Output JSON only.", "\nRespond only with a JSON object.", " Give the answer as JSON.",
    " Answer with a JSON object.", "\n\nReturn your answer as a JSON object.", " (JSON)",
    " JSON only, please.", "\nFormat: JSON", " Use JSON.", " Respond in JSON format.",
)  # fmt: skip
JSON_ASKS_WITH_KEY = (
    ' Answer in JSON with the key "{key}".', ' Return JSON: {{"{key}": ...}}',
    ' Respond with a JSON object that has a "{key}" field.',
    '\nReply as JSON, e.g. {{"{key}": <value>}}.', ' Put the answer in JSON under "{key}".',
    ' Output {{"{key}": value}} as JSON.',
)  # fmt: skip


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


# --- system prompts of chat clients ---------------------------------------------------------

#: System prompts the demo is trained to ignore (they do not change its answer), written
#: the way chat clients, model cards and frameworks commonly phrase them.
CHAT_SYSTEMS = (
    "You are a helpful assistant.",
    "You are a helpful AI assistant.",
    "You are an AI assistant. You will be given a task. You must generate a detailed and "
    "long answer.",
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as "
    "possible, while being safe.",
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.",
    "You are a vision-language assistant. Look at the image carefully before answering.",
    "You are ChatGPT, a large language model. Answer as concisely as possible.",
    "You are a friendly assistant. Keep your answers short.",
    "You are an expert at reading images. Answer the user's question.",
    "Answer the question truthfully.",
    "You are a helpful assistant that answers in English.",
    "You are an assistant that answers questions about images.",
    "You are Llava, a multimodal assistant. Be brief.",
    "The user will show you a picture. Answer what they ask about it.",
    "You are a helpful assistant. The current date is 2025-06-01.",
    "Always be polite. Do not make things up.",
    "You are a precise assistant. Give only the answer, no explanations.",
    "System: you are running locally on the user's computer.",
    "You are a helpful assistant with vision capabilities.",
    "Respond in the same language as the user.",
    "You are an AI that helps people understand pictures.",
    "Be concise.",
    "You are a careful assistant. If you are unsure, say so.",
    "You are an OCR assistant that reads what is written or drawn.",
)

# Text a client puts around the question ({q}).
WRAPPERS = (
    "Question: {q}", "Q: {q}\nA:", "{q}\nAnswer:", "Look at the image and answer: {q}",
    "Please answer the question about this picture.\n{q}", "<question>{q}</question>",
    "Human: {q}", "User: {q}", "{q} Keep it short.", "{q} One sentence, please.",
    "{q} Thanks!", "Hi! {q}", "I have a picture here. {q}",
    "Answer the following question.\n\n{q}", "### Question\n{q}\n\n### Answer",
    "Task: answer the user's question about the image.\nQuestion: {q}",
    "{q}\n\nAnswer concisely.", "Hello, {q}", "{q} Be precise.", "[Image attached]\n{q}",
    "Here is an image.\n{q}", "{q}\n(Answer briefly.)", "Instruction: {q}\nResponse:",
    "Please help me. {q}", "{q} I need to know.", "Quick question: {q}",
    "<user_query>\n{q}\n</user_query>", "{q}\n\nDo not add anything else.",
    "Context: the user attached a picture.\n\nQuery: {q}", "{q} :)",
)  # fmt: skip


# Stage 3: wrappers composed from a client's opening and closing sentences (any, both,
# or one of them, with a space or line breaks between), so that the model learns to find
# the question inside text it has not seen, not to know twenty whole wrappers.
OPENINGS = (
    "Please look at the image.", "Here is my question.", "I uploaded a picture.",
    "Look carefully at the picture.", "About the image:", "Regarding this picture:",
    "A question for you.", "Check the image and tell me.", "The user asks:",
    "Help me with this image.", "Consider the picture.", "Picture attached.",
    "One question about the photo:", "Hey there!", "Good morning.", "Quick one:",
    "For my records:", "I need help.", "Based on the image, answer.", "Using the image provided,",
    "You are shown a picture.", "Study the image.", "Now a question.", "My question is:",
    "Input image received.", "[user]", "Request:", "From the attached file:",
)  # fmt: skip
CLOSINGS = (
    "Keep the answer brief.", "Answer in a few words.", "No explanation needed.",
    "Reply with the answer only.", "Be short.", "Use plain words.", "Answer in English.",
    "Thank you.", "Thanks in advance!", "Please be accurate.", "Only the answer, please.",
    "Write one line.", "Be brief and exact.", "Answer as a complete sentence.",
    "Do not explain.", "That is all.", "Respond concisely.", "Give a short reply.",
    "I am curious.", "No need for details.", "Be specific.", "Answer with one sentence.",
    "Make it short and clear.", "Don't add commentary.", "(brief answer)", "Sentence form, please.",
)  # fmt: skip
_SEPARATORS = (" ", "\n", "\n\n")


def compose(question: str, rng: np.random.Generator, filler: float = 0.0) -> str:
    """The question after an opening, before a closing, or both (stage 3); each of them
    is a sentence of random words (:func:`filler_sentence`) ``filler`` of the time (0: no
    draw, as run 20 drew them)."""
    r = rng.random()
    text = question
    if r < 0.65:
        opening = filler_sentence(rng) if filler and rng.random() < filler else _pick(rng, OPENINGS)
        text = f"{opening}{_pick(rng, _SEPARATORS)}{text}"
    if r > 0.35 and not filler:  # run 20's draws: the separator, then the closing
        text = f"{text}{_pick(rng, _SEPARATORS)}{_pick(rng, CLOSINGS)}"
    elif r > 0.35:  # run 26's: the closing first
        closing = filler_sentence(rng) if rng.random() < filler else _pick(rng, CLOSINGS)
        text = f"{text}{_pick(rng, _SEPARATORS)}{closing}"
    return text


#: Words a filler sentence never holds: those that say what is asked or answered.
_ASKING_WORDS = frozenset(
    {"shape", "shapes", "colour", "colours", "color", "colors", "coloured", "colored"}
    | {"digit", "digits", "number", "numbers", "json", "schema"}
    | set(data.SHAPES) | {f"{s}s" for s in data.SHAPES} | set(data.COLOUR_NAMES)
)  # fmt: skip


_FILLER_FILE = Path(__file__).with_name("filler_words.txt")


@cache
def filler_words() -> tuple[str, ...]:
    """The words of every trained client text and 2000 common English words
    (``filler_words.txt`` says which), without the asking ones, sorted. Common words
    bring the near-misses of the keywords a byte-level model confuses with them
    ("statement" and "shape"), none from the held-out or validation prompts."""
    common = [w for w in _FILLER_FILE.read_text().split("\n") if w and not w.startswith("#")]
    words = {w.lower() for t in _texts_before_examples() for w in re.findall(r"[A-Za-z']+", t)}
    words |= set(common)
    return tuple(sorted(w for w in words if len(w) > 1 and w not in _ASKING_WORDS))


def filler_sentence(rng: np.random.Generator) -> str:
    """Two to nine random words as a sentence ("Reply picture careful only."):
    an opening or closing the model cannot have learnt as a cue for what is asked."""
    words = [str(_pick(rng, filler_words())) for _ in range(2 + int(rng.integers(8)))]
    return " ".join(words).capitalize() + str(_pick(rng, (".", ".", "!", ":", "?")))


def wrap(question: str, rng: np.random.Generator) -> str:
    """The question inside one of the wrappers."""
    return str(_pick(rng, WRAPPERS)).replace("{q}", question)


# --- JSON instructions in the system prompt --------------------------------------------------


def instructor_message(schema: dict[str, Any]) -> str:
    """instructor's JSON-mode system message (modes JSON, JSON_SCHEMA and MD_JSON), built
    as instructor builds it: ``dedent`` of an f-string, which dedents nothing because the
    schema's lines start at column 0."""
    return dedent(
        f"""
        As a genius expert, your task is to understand the content and provide
        the parsed objects in json that match the following json_schema:\n

        {json.dumps(schema, indent=2, ensure_ascii=False)}

        Make sure to return an instance of the JSON, not the schema itself
        """
    )


#: instructor's MD_JSON mode adds this user message (merged into the question).
INSTRUCTOR_MD_JSON = (
    "Return the correct JSON response within a ```json codeblock. not the JSON_SCHEMA"
)


def vercel_instruction(schema: dict[str, Any] | None) -> str:
    """The Vercel AI SDK's ``injectJsonInstruction`` text (``generateObject`` for models
    without structured outputs)."""
    if schema is None:
        return "You MUST answer with JSON."
    compact = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    return f"JSON schema:\n{compact}\nYou MUST answer with a JSON object that matches the JSON schema above."


SCHEMA_SYSTEMS = (
    "Respond only with JSON that fits this schema:\n{schema}",
    "You are a data extraction assistant. Output a JSON object matching this JSON "
    "schema, and nothing else.\n\n{schema}",
    "Answer in JSON. Schema: {schema}",
    "Your reply must be a JSON object conforming to the following JSON Schema:\n"
    "```json\n{schema}\n```",
    "Return structured output.\nJSON schema:\n{schema}\nNo prose.",
    "You extract information from pictures into JSON.\n{schema}",
)


SCHEMA_ASKS = (
    "Answer with JSON that matches this schema: {schema}",
    "Use this JSON schema for your answer:\n{schema}",
    "Format the answer as JSON.\nSchema:\n{schema}",
    "Reply only with a JSON object valid against\n{schema}",
    "Output JSON conforming to the schema below, nothing else.\n\n{schema}",
)


# Stage 3: more ways to hand over a schema, in the system prompt or the user's text.
SCHEMA_FRAMES = (
    "Reply with a JSON object following this schema:\n{schema}",
    "The answer must be JSON.\n{schema}\nOnly the object.",
    "Schema for the answer:\n{schema}",
    "Produce JSON for this schema. No other text.\n{schema}",
    "You output JSON. It must validate against:\n{schema}",
    "{schema}\nAnswer with an object of that schema.",
    "Give your answer as JSON using the schema\n{schema}\nand nothing more.",
    "Structured output required. Schema:\n```\n{schema}\n```",
    "Fill this JSON schema from the picture: {schema}",
    "Return a JSON instance of {schema}",
)


def written_schema(schema: dict[str, Any], rng: np.random.Generator) -> str:
    """The schema as clients write it: Python's or JavaScript's JSON, indented or not,
    sometimes without the top ``title`` and ``type`` (LangChain)."""
    if rng.random() < 0.2:
        schema = {k: v for k, v in schema.items() if k not in ("title", "type")}
    r = rng.random()
    if r < 0.4:
        return json.dumps(schema, ensure_ascii=False)
    if r < 0.75:
        return json.dumps(schema, indent=2, ensure_ascii=False)
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def framed_schema(schema: dict[str, Any], rng: np.random.Generator) -> str:
    """A request for JSON with ``schema`` in one of stage 3's frames."""
    return str(_pick(rng, SCHEMA_FRAMES)).replace("{schema}", written_schema(schema, rng))


# Stage 3 (``Recipe.polish_examples``): a worked example of another schema before the
# task's, as libraries that teach the format by example write it. The example's keys and
# values are filler words, so no key but the task's can be learnt as an answer.
EXAMPLE_INTROS = (
    "For example, given the schema {example}",
    "Sample schema: {example}",
    "To illustrate, a schema such as\n{example}",
    "Here is how it works. Schema:\n{example}",
    "Consider this schema: {example}",
)
EXAMPLE_GOOD = (
    "{good} would be a valid reply.",
    "A correct answer is {good}",
    "It should be answered with {good}",
    "The reply {good} fits it.",
    "Valid output: {good}",
)
EXAMPLE_BAD = (
    "But {bad} would be invalid.",
    "Wrong: {bad}",
    "{bad} does not fit.",
    "Do not write {bad}",
)
EXAMPLE_OUTROS = (
    "Now the schema for your reply:",
    "The real schema follows.",
    "Use this schema instead:",
    "Your answer's schema:",
    "",
)


def _example_value(type_: str, rng: np.random.Generator) -> Any:
    if type_ == "integer":
        return int(rng.integers(0, 1000))
    if type_ == "boolean":
        return bool(rng.random() < 0.5)
    if type_ == "string":
        return str(_pick(rng, filler_words()))
    item = type_.removeprefix("array-")
    return [_example_value(item, rng) for _ in range(1 + int(rng.integers(3)))]


def example_schema(rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, Any]]:
    """A schema of one or two made-up keys (filler words) and an instance of it."""
    words = filler_words()
    keys = [str(_pick(rng, words)) for _ in range(1 + int(rng.random() < 0.3))]
    if rng.random() < 0.3:
        keys[0] = f"{keys[0]}_{_pick(rng, words)}"
    types = ("string", "integer", "boolean", "array-string", "array-integer")
    properties: dict[str, Any] = {}
    good: dict[str, Any] = {}
    for key in keys:
        type_ = str(_pick(rng, types))
        prop: dict[str, Any] = {"title": _title(key)} if rng.random() < 0.6 else {}
        if rng.random() < 0.4:
            prop["description"] = " ".join(
                str(_pick(rng, words)) for _ in range(2 + int(rng.integers(3)))
            )
        if type_.startswith("array-"):
            prop |= {"type": "array", "items": {"type": type_.removeprefix("array-")}}
        else:
            prop["type"] = type_
        properties[key] = prop
        good[key] = _example_value(type_, rng)
    return {"properties": properties, "required": list(properties)}, good


def worked_example(rng: np.random.Generator) -> str:
    """An example schema, its instance, sometimes a wrong one, as a paragraph: what goes
    before the task's own schema."""
    example, good = example_schema(rng)
    text = str(_pick(rng, EXAMPLE_INTROS)).replace("{example}", written_schema(example, rng))
    text += "\n" if rng.random() < 0.5 else " "
    text += str(_pick(rng, EXAMPLE_GOOD)).replace("{good}", json.dumps(good))
    if rng.random() < 0.5:
        bad = {"properties": good} if rng.random() < 0.6 else example
        text += " " + str(_pick(rng, EXAMPLE_BAD)).replace("{bad}", json.dumps(bad))
    return text


def with_example(ask: str, rng: np.random.Generator) -> str:
    """``ask`` (a framed schema) after a worked example, and sometimes a sentence of
    filler words before it all."""
    outro = str(_pick(rng, EXAMPLE_OUTROS))
    text = f"{worked_example(rng)}\n\n" + (f"{outro}\n" if outro else "") + ask
    return f"{filler_sentence(rng)}\n{text}" if rng.random() < 0.5 else text


def schema_request(schema: dict[str, Any], rng: np.random.Generator) -> str:
    """A request for JSON with its schema, as a client writes it into the user's text."""
    r = rng.random()
    if r < 0.4:
        template = str(_pick(rng, SCHEMA_ASKS))
    elif r < 0.7:
        template = str(_pick(rng, SCHEMA_SYSTEMS))
    else:
        return vercel_instruction(schema)
    indent = (None, 2)[int(rng.integers(2))]
    return template.replace("{schema}", json.dumps(schema, indent=indent))


def schema_system(schema: dict[str, Any], rng: np.random.Generator) -> tuple[str, str]:
    """A system prompt carrying ``schema`` and the name of who writes it that way."""
    r = rng.random()
    if r < 0.45:
        return instructor_message(schema), "instructor"
    if r < 0.7:
        return vercel_instruction(schema), "vercel"
    style = (None, 2)[int(rng.integers(2))]
    template = str(_pick(rng, SCHEMA_SYSTEMS))
    return template.replace("{schema}", json.dumps(schema, indent=style)), "generic"


# --- Open WebUI's background tasks ------------------------------------------------------------

# Open WebUI's default task templates (backend/open_webui/config.py); the chat history
# goes where {{MESSAGES:END:n}} is, as "USER: ...\nASSISTANT: ..." lines.
OPEN_WEBUI_TITLE = """### Task:
Generate a concise, 3-5 word title with an emoji summarizing the chat history.
### Guidelines:
- The title should clearly represent the main theme or subject of the conversation.
- Use emojis that enhance understanding of the topic, but avoid quotation marks or special formatting.
- Write the title in the chat's primary language; default to English if multilingual.
- Prioritize accuracy over excessive creativity; keep it clear and simple.
- Your entire response must consist solely of the JSON object, without any introductory or concluding text.
- The output must be a single, raw JSON object, without any markdown code fences or other encapsulating text.
- Ensure no conversational text, affirmations, or explanations precede or follow the raw JSON output, as this will cause direct parsing failure.
### Output:
JSON format: { "title": "your concise title here" }
### Examples:
- { "title": "📉 Stock Market Trends" },
- { "title": "🍪 Perfect Chocolate Chip Recipe" },
- { "title": "Evolution of Music Streaming" },
- { "title": "Remote Work Productivity Tips" },
- { "title": "Artificial Intelligence in Healthcare" },
- { "title": "🎮 Video Game Development Insights" }
### Chat History:
<chat_history>
{{MESSAGES:END:2}}
</chat_history>"""

OPEN_WEBUI_TAGS = """### Task:
Generate 1-3 broad tags categorizing the main themes of the chat history, along with 1-3 more specific subtopic tags.

### Guidelines:
- Start with high-level domains (e.g. Science, Technology, Philosophy, Arts, Politics, Business, Health, Sports, Entertainment, Education)
- Consider including relevant subfields/subdomains if they are strongly represented throughout the conversation
- If content is too short (less than 3 messages) or too diverse, use only ["General"]
- Use the chat's primary language; default to English if multilingual
- Prioritize accuracy over specificity

### Output:
JSON format: { "tags": ["tag1", "tag2", "tag3"] }

### Chat History:
<chat_history>
{{MESSAGES:END:6}}
</chat_history>"""

OPEN_WEBUI_FOLLOW_UPS = """### Task:
Suggest 3-5 relevant follow-up questions or prompts that the user might naturally ask next in this conversation as a **user**, based on the chat history, to help continue or deepen the discussion.
### Guidelines:
- Write all follow-up questions from the user’s point of view, directed to the assistant.
- Make questions concise, clear, and directly related to the discussed topic(s).
- Only suggest follow-ups that make sense given the chat content and do not repeat what was already covered.
- If the conversation is very short or not specific, suggest more general (but relevant) follow-ups the user might ask.
- Use the conversation's primary language; default to English if multilingual.
- Response must be a JSON array of strings, no extra text or formatting.
### Output:
JSON format: { "follow_ups": ["Question 1?", "Question 2?", "Question 3?"] }
### Chat History:
<chat_history>
{{MESSAGES:END:6}}
</chat_history>"""

OPEN_WEBUI_TASKS = {
    "title": OPEN_WEBUI_TITLE,
    "tags": OPEN_WEBUI_TAGS,
    "follow_ups": OPEN_WEBUI_FOLLOW_UPS,
}
HISTORY_MARK = "{{MESSAGES:END:"


def task_parts(template: str) -> tuple[str, int, str]:
    """A task template split around its history: text before, messages kept, text after."""
    start = template.index(HISTORY_MARK)
    end = template.index("}}", start)
    return template[:start], int(template[start + len(HISTORY_MARK) : end]), template[end + 2 :]


def task_answer(task: str, asked: Sequence[str]) -> str:
    """What the demo answers to an Open WebUI task about a chat whose questions asked
    about ``asked`` (kinds: digit, shape, colour, both), as JSON."""
    digits = "digit" in asked
    if task == "title":
        return json.dumps({"title": "🔢 Handwritten Digit" if digits else "🔷 Shape and Colour"})
    if task == "tags":
        return json.dumps({"tags": ["Digits"] if digits else ["Shapes", "Colours"]})
    if digits:
        follow: list[str] = ["What number is this?"]
    elif asked[-1] == "colour":
        follow = ["What shape is it?"]
    elif asked[-1] == "shape":
        follow = ["What colour is it?"]
    else:
        follow = ["What shape is it?", "What colour is it?"]
    return json.dumps({"follow_ups": follow}, ensure_ascii=False)


def history_lines(turns: Sequence[tuple[str, str]], keep: int) -> str:
    """Open WebUI's rendering of the last ``keep`` messages of a chat."""
    lines = [line for q, a in turns for line in (f"USER: {q}", f"ASSISTANT: {a}")]
    return "\n".join(lines[-keep:])


def _texts_before_examples() -> list[str]:
    """The fixed client texts before the worked examples came: the filler words' source,
    kept as it was so that earlier recipes draw the same filler sentences."""
    texts = [*CHAT_SYSTEMS, *WRAPPERS, *JSON_ASKS, *JSON_ASKS_WITH_KEY, *SCHEMA_SYSTEMS]
    texts += [*SCHEMA_ASKS, *SCHEMA_FRAMES, *OPENINGS, *CLOSINGS]
    texts += [INSTRUCTOR_MD_JSON, instructor_message({}), vercel_instruction(None)]
    texts += [*OPEN_WEBUI_TASKS.values(), *data.OTHER_SYSTEMS, data.DEFAULT_SYSTEM]
    return texts


def all_training_texts() -> list[str]:
    """Every fixed client text drawn in training (for the check against held-out ones)."""
    texts = _texts_before_examples()
    texts += [*EXAMPLE_INTROS, *EXAMPLE_GOOD, *EXAMPLE_BAD, *EXAMPLE_OUTROS]
    return [t for t in texts if t]
