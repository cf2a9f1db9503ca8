"""Prompt formats: exact strings, because a wrong template gives fluent garbage."""

from __future__ import annotations

import pytest

from llava_local.chat_formats import (
    LLAVA_SYSTEM_PROMPT,
    choose_format,
    get_format,
    jinja_format,
)
from llava_local.errors import InvalidRequestError
from llava_local.types import Message, PreparedImage

M = "<__media__>"
PIC = PreparedImage(data=b"x", mime="image/png", width=1, height=1, sha256="0" * 64, source="t")


def conversation() -> list[Message]:
    return [
        Message(role="user", content="What is it?", images=(PIC,)),
        Message(role="assistant", content="A cat."),
        Message(role="user", content="What colour?"),
    ]


def test_vicuna_matches_llava_conv_v1() -> None:
    """The default format is LLaVA-1.5's vicuna_v1 with its default system prompt."""
    text = get_format("llava-1.5").prompt(conversation(), M)
    assert text == (
        f"{LLAVA_SYSTEM_PROMPT} USER: {M}\nWhat is it? ASSISTANT: A cat.</s>"
        "USER: What colour? ASSISTANT:"
    )


def test_vicuna_uses_a_given_system_prompt() -> None:
    """A system message replaces the default one."""
    msgs = [Message(role="system", content="Be brief."), *conversation()[:1]]
    assert get_format("vicuna").prompt(msgs, M) == f"Be brief. USER: {M}\nWhat is it? ASSISTANT:"


def test_mistral_format() -> None:
    """LLaVA-1.6 Mistral wraps user turns in [INST] and ends answers with </s>."""
    text = get_format("llava-1.6").prompt(conversation(), M)
    assert text == f"[INST] {M}\nWhat is it? [/INST] A cat.</s>[INST] What colour? [/INST]"


def test_chatml_and_moondream() -> None:
    """ChatML and Moondream write the picture marker where those models expect it."""
    chatml = get_format("chatml").prompt(conversation()[:1], M)
    assert chatml == f"<|im_start|>user\n{M}\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    moon = get_format("moondream").prompt(conversation()[:1], M)
    assert moon == f"{M}\n\nQuestion: What is it?\n\nAnswer:"


def test_several_pictures_get_one_marker_each() -> None:
    """Every picture of a turn gets its own marker, in order."""
    msg = Message(role="user", content="Compare", images=(PIC, PIC))
    assert get_format("vicuna").prompt([msg], M).count(M) == 2


def test_unknown_format_lists_choices() -> None:
    """A misspelt chat_format says which names exist."""
    with pytest.raises(InvalidRequestError, match="vicuna"):
        get_format("vicunaa")


def test_gguf_template_wins_and_bos_is_not_doubled() -> None:
    """A GGUF chat template is used when present, without a second BOS."""
    template = (
        "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    fmt = choose_format(None, {"tokenizer.chat_template": template}, bos="<s>", eos="</s>")
    text = fmt.prompt(conversation()[:1], M)
    assert text == f"<user>{M}\nWhat is it?<assistant>"


def test_explicit_format_beats_template_and_name_hints() -> None:
    """chat_format= overrides the template; without either, the model name decides."""
    meta = {"tokenizer.chat_template": "{{ 'x' }}", "general.name": "moondream2"}
    assert choose_format("chatml", meta, bos="", eos="").name == "chatml"
    assert choose_format(None, {"general.name": "Moondream2"}, bos="", eos="").name == "moondream"
    assert choose_format(None, {}, bos="", eos="").name == "vicuna"


def test_template_errors_become_library_errors() -> None:
    """A template that raises or does not compile gives InvalidRequestError."""
    with pytest.raises(InvalidRequestError, match="refused"):
        jinja_format("{{ raise_exception('no images') }}", bos="", eos="").prompt([], M)
    with pytest.raises(InvalidRequestError, match="compile"):
        jinja_format("{% for %}", bos="", eos="")
