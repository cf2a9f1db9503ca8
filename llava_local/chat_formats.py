"""Prompt formats for the in-process engine: a conversation becomes one prompt string.

The wrong template gives fluent garbage (llama-cpp-python issue 1482), so the
choice is explicit: ``chat_format=`` if given, else the GGUF's own
``tokenizer.chat_template``, else a built-in format guessed from the model name,
else LLaVA-1.5's Vicuna format. Each picture is written as the engine's media
marker; libmtmd later swaps it for the image embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidRequestError
from .types import Message

#: LLaVA-1.5's own default system prompt (``conv_vicuna_v1``), used when none is set.
LLAVA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

Renderer = Callable[[Sequence[Message], str], str]


@dataclass(frozen=True)
class ChatFormat:
    """A named way to write a conversation as a prompt that ends where the answer starts."""

    name: str
    render: Renderer
    default_system: str | None = None

    def prompt(self, messages: Sequence[Message], marker: str) -> str:
        """The prompt for ``messages``; pictures become ``marker``."""
        if self.default_system is not None and not any(m.role == "system" for m in messages):
            messages = [Message(role="system", content=self.default_system), *messages]
        return self.render(messages, marker)


def _split_system(messages: Sequence[Message]) -> tuple[str, list[Message]]:
    system = "\n".join(m.content for m in messages if m.role == "system")
    return system, [m for m in messages if m.role != "system"]


def _markers(message: Message, marker: str, sep: str = "\n") -> str:
    return "".join(marker + sep for _ in message.images)


def _vicuna(messages: Sequence[Message], marker: str) -> str:
    # LLaVA conv_vicuna_v1: "{system} USER: <image>\n{q} ASSISTANT: {a}</s>USER: ..."
    system, turns = _split_system(messages)
    out = f"{system} " if system else ""
    for m in turns:
        if m.role == "user":
            out += f"USER: {_markers(m, marker)}{m.content} "
        else:
            out += f"ASSISTANT: {m.content}</s>"
    return out + "ASSISTANT:"


def _mistral(messages: Sequence[Message], marker: str) -> str:
    # LLaVA conv_mistral_instruct (LLaVA-1.6 Mistral): "[INST] <image>\n{q} [/INST] {a}</s>"
    system, turns = _split_system(messages)
    out = ""
    for i, m in enumerate(turns):
        if m.role == "user":
            sys = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system and i == 0 else ""
            out += f"[INST] {sys}{_markers(m, marker)}{m.content} [/INST]"
        else:
            out += f" {m.content}</s>"
    return out


def _chatml(messages: Sequence[Message], marker: str) -> str:
    out = ""
    for m in messages:
        out += f"<|im_start|>{m.role}\n{_markers(m, marker)}{m.content}<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


def _moondream(messages: Sequence[Message], marker: str) -> str:
    # Moondream2: "<image>\n\nQuestion: {q}\n\nAnswer: {a}\n\n"
    _, turns = _split_system(messages)
    out = ""
    for m in turns:
        if m.role == "user":
            out += f"{_markers(m, marker, sep=chr(10) * 2)}Question: {m.content}\n\n"
        else:
            out += f"Answer: {m.content}\n\n"
    return out + "Answer:"


BUILTIN: dict[str, ChatFormat] = {
    "vicuna": ChatFormat("vicuna", _vicuna, default_system=LLAVA_SYSTEM_PROMPT),
    "mistral": ChatFormat("mistral", _mistral),
    "chatml": ChatFormat("chatml", _chatml),
    "moondream": ChatFormat("moondream", _moondream),
}
ALIASES = {
    "llava-1.5": "vicuna",
    "llava-1-5": "vicuna",
    "llava-1.6": "mistral",
    "llava-1-6": "mistral",
    "llava-1.6-mistral": "mistral",
    "mistral-instruct": "mistral",
    "qwen": "chatml",
    "minicpm": "chatml",
    "moondream2": "moondream",
}
# Model-name fragments that identify a format when the GGUF carries no template.
_NAME_HINTS = (("moondream", "moondream"), ("mistral", "mistral"), ("qwen", "chatml"))


def get_format(name: str) -> ChatFormat:
    """A built-in format by name or alias; unknown names list the choices."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BUILTIN:
        choices = ", ".join(sorted([*BUILTIN, *ALIASES]))
        raise InvalidRequestError(f"unknown chat_format {name!r}; choose one of: {choices}")
    return BUILTIN[key]


def jinja_format(template: str, *, bos: str, eos: str) -> ChatFormat:
    """A format from a GGUF's ``tokenizer.chat_template`` (a Jinja template)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise InvalidRequestError(f"the model's chat template refused the conversation: {message}")

    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template)
    except TemplateError as exc:
        raise InvalidRequestError(f"the model's chat template does not compile: {exc}") from exc

    def render(messages: Sequence[Message], marker: str) -> str:
        plain = [{"role": m.role, "content": _markers(m, marker) + m.content} for m in messages]
        try:
            text = compiled.render(
                messages=plain, add_generation_prompt=True, bos_token=bos, eos_token=eos
            )
        except TemplateError as exc:
            raise InvalidRequestError(f"the model's chat template failed: {exc}") from exc
        # libmtmd adds BOS itself; a template that writes it too would double it.
        return text[len(bos) :] if bos and text.startswith(bos) else text

    return ChatFormat("gguf-template", render)


def choose_format(
    requested: str | None, metadata: Mapping[str, Any], *, bos: str, eos: str
) -> ChatFormat:
    """The format for a model: the request, else its GGUF template, else a guess by name."""
    if requested:
        return get_format(requested)
    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str) and template.strip():
        return jinja_format(template, bos=bos, eos=eos)
    name = str(metadata.get("general.name", "")).lower()
    for fragment, fmt in _NAME_HINTS:
        if fragment in name:
            return BUILTIN[fmt]
    return BUILTIN["vicuna"]
