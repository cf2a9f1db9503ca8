"""What the demo model's training puts around questions (training/prompts.py), and the
held-out client wrappers ``llava-local eval --wrapped`` asks through."""

from __future__ import annotations

import argparse
import json
import re
from textwrap import dedent

import numpy as np
import pytest

from llava_local.apps import datasets
from llava_local.apps.wrappers import HELD_OUT, task_schema
from training import data, prompts
from training.validation_prompts import SHAPES_SEED, VALIDATION

FACTS = {"digit": 7}
SHAPE_FACTS = {"shape": "star", "colour": "red"}


def _pieces(text: str) -> list[str]:
    """A client text's fixed pieces: split at its placeholders, whitespace folded."""
    parts = re.split(r"\{question\}|\{schema\}|\{q\}", text)
    return [" ".join(p.split()) for p in parts if len(" ".join(p.split())) >= 12]


def test_held_out_wrappers_share_no_text_with_training() -> None:
    """No fixed piece of a held-out wrapper (12 characters or more) is in any text drawn
    in training, and no training text is inside a held-out one: the eval measures
    software the demo never saw."""
    trained = [" ".join(t.split()) for t in prompts.all_training_texts()]
    held_out = [p for w in HELD_OUT for t in (w.system or "", w.user) for p in _pieces(t)]
    assert held_out
    for piece in held_out:
        assert not any(piece in text for text in trained), piece
    for text in (p for t in prompts.all_training_texts() for p in _pieces(t)):
        assert not any(text in piece for piece in held_out), text


def test_the_instructor_message_is_built_as_instructor_builds_it() -> None:
    """The JSON-mode system message equals instructor's dedent of its f-string (which
    leaves the indentation in, the schema's lines being at column 0)."""
    schema = task_schema("digit", integer=True)
    built = dedent(
        f"""
        As a genius expert, your task is to understand the content and provide
        the parsed objects in json that match the following json_schema:\n

        {json.dumps(schema, indent=2, ensure_ascii=False)}

        Make sure to return an instance of the JSON, not the schema itself
        """
    )
    assert prompts.instructor_message(schema) == built


def test_a_natural_json_answer_is_learnt_whole() -> None:
    """Asked for JSON, the answer is ' {"digit": 7}' and every byte of it is learnt."""
    fields = prompts.default_fields("digit")
    reply = prompts.json_reply(fields, FACTS, forced=False, keys_known=True, types_known=True)
    assert reply.text == ' {"digit": 7}'
    assert all(weight == 1.0 for _, weight in reply.segments)
    assert json.loads(reply.text) == {"digit": 7}


def test_what_a_grammar_writes_is_read_not_learnt() -> None:
    """Forced by a grammar, the '{' (right after 'ASSISTANT:'), keys the request does not
    name and a string's opening quote weigh 0; the values and the closing brace are learnt."""
    fields = (prompts.Field("shape", "kind"), prompts.Field("colour", "fill"))
    reply = prompts.json_reply(
        fields, SHAPE_FACTS, forced=True, keys_known=False, types_known=False
    )
    assert reply.text == '{"kind": "star", "fill": "red"}'
    learnt = "".join(text for text, weight in reply.segments if weight)
    given = "".join(text for text, weight in reply.segments if not weight)
    assert learnt == 'star"red"}'
    assert given == '{"kind": ", "fill": "'


def test_a_sentence_field_holds_the_answer_sentence() -> None:
    """A string field for the whole answer gets the sentence, JSON-escaped."""
    field = (prompts.Field("digit", "answer"),)
    reply = prompts.json_reply(
        field, FACTS, forced=True, keys_known=False, types_known=False, sentence_text="It's 7."
    )
    assert json.loads(reply.text) == {"answer": "It's 7."}


def test_default_keys_follow_the_question() -> None:
    """Unnamed keys are digit, shape, colour, or color when the question spells it so."""
    assert [f.key for f in prompts.default_fields("colour", "What color is it?")] == ["color"]
    assert [f.key for f in prompts.default_fields("both", "What is this?")] == ["shape", "colour"]
    assert prompts.default_fields("digit")[0].type == "integer"


@pytest.mark.parametrize("seed", range(20))
def test_schemas_drawn_for_training_are_valid_and_fit_their_answers(seed: int) -> None:
    """Every drawn schema is a valid JSON schema that the JSON answer drawn with it fits."""
    from llava_local.structured import json_schema, parse

    rng = np.random.default_rng(seed)
    for kind in ("digit", "shape", "colour", "both"):
        fields = prompts.random_fields(kind, rng)
        schema = prompts.object_schema(fields, rng, kind)
        facts = FACTS if kind == "digit" else SHAPE_FACTS
        reply = prompts.json_reply(fields, facts, forced=True, keys_known=True, types_known=True)
        assert parse(reply.text, json_schema(schema)) == json.loads(reply.text)
        assert len({f.key for f in fields}) == len(fields)


def test_open_webui_tasks_split_around_their_history() -> None:
    """Each task template splits at its chat history; the answers are JSON with the key
    the template asks for."""
    for task, template in prompts.OPEN_WEBUI_TASKS.items():
        head, keep, tail = prompts.task_parts(template)
        assert head.endswith("<chat_history>\n")
        assert tail == "\n</chat_history>"
        assert keep in (2, 6)
        answer = json.loads(prompts.task_answer(task, ["digit"]))
        assert list(answer) == [task]
    follow = json.loads(prompts.task_answer("follow_ups", ["shape"]))
    assert follow == {"follow_ups": ["What colour is it?"]}
    lines = prompts.history_lines([("What digit is this?", "This digit is 7.")] * 2, 2)
    assert lines == "USER: What digit is this?\nASSISTANT: This digit is 7."


def test_wrappers_keep_the_question() -> None:
    """Every training wrapper puts the question somewhere in its text."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        assert data.PRIMARY_DIGIT_QUESTION in prompts.wrap(data.PRIMARY_DIGIT_QUESTION, rng)
    assert all("{q}" in w for w in prompts.WRAPPERS)


def test_validation_prompts_are_neither_trained_nor_held_out() -> None:
    """The prompts recipes are chosen on share no text with training or with the held-out
    clients' prompts (12 characters or more either way), and measure shapes from a seed
    of their own."""
    trained = [" ".join(t.split()) for t in prompts.all_training_texts()]
    held_out = [p for w in HELD_OUT for t in (w.system or "", w.user) for p in _pieces(t)]
    pieces = [p for w in VALIDATION for t in (w.system or "", w.user) for p in _pieces(t)]
    assert len(pieces) >= len(VALIDATION)
    for piece in pieces:
        assert not any(piece in text for text in trained + held_out), piece
    for text in (p for t in prompts.all_training_texts() for p in _pieces(t)):
        assert not any(text in piece for piece in pieces), text
    for piece in held_out:
        assert not any(piece in text for text in pieces), piece
    assert SHAPES_SEED not in (0, 1000, datasets.SHAPES_SEED)


def _words(texts: list[str]) -> set[str]:
    return {w.lower() for t in texts for w in re.findall(r"[A-Za-z']+", t)}


def test_filler_sentences_bring_no_word_of_the_measured_prompts() -> None:
    """Stage 3's filler openings and closings use no word that says what is asked, and
    no word of the held-out or validation prompts that training does not have anyway:
    the filler teaches orders of words, not the prompts the model is measured with."""
    words = set(prompts.filler_words())
    assert len(words) > 2000
    asked = {"shape", "colour", "color", "digit", "number", *data.SHAPES, *data.COLOUR_NAMES}
    assert not words & asked
    measured = [t for w in (*HELD_OUT, *VALIDATION) for t in (w.system or "", w.user)]
    measured += [*data.SHAPE_QUESTIONS_HELD_OUT, *data.COLOUR_QUESTIONS_HELD_OUT]
    measured += list(data.DIGIT_QUESTIONS_HELD_OUT)
    only_measured = _words(measured) - _words(prompts.all_training_texts())
    assert {"handful", "statement", "limit"} <= only_measured  # what the check is for
    assert not words & only_measured


def test_composed_questions_keep_the_question_whole() -> None:
    """A composed wrapper (whole or filler openings and closings) keeps the question as
    it is, and filler sentences vary."""
    rng = np.random.default_rng(1)
    question = "What shape is this?"
    texts = [prompts.compose(question, rng, filler=1.0) for _ in range(200)]
    assert all(question in t for t in texts)
    fillers = {prompts.filler_sentence(rng) for _ in range(200)}
    assert len(fillers) == 200
    assert all(f[0].isupper() and f[-1] in ".!:?" for f in fillers)


def test_hold_out_spans_are_training_digits_only() -> None:
    """``--hold-out`` (train_demo, evaluate_demo --choose) takes a span of the training
    digits and refuses one that reaches the test split, which nothing may choose on."""
    assert data.parse_span("1250-1399") == data.VALIDATION_INDICES
    assert data.span(data.parse_span("0-199")) == "0-199"
    for text in ("1300-1500", "1400-1796", "x", "10-5", "-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="within 0-1399"):
            data.parse_span(text)


@pytest.mark.parametrize("seed", range(10))
def test_worked_examples_use_no_answer_key_and_keep_the_task_schema_last(seed: int) -> None:
    """A worked example's schema is valid, its instance fits it, its keys never say
    what is asked, and the task's framed schema stays whole at the end of the request."""
    from llava_local.structured import json_schema, parse

    rng = np.random.default_rng(seed)
    for _ in range(20):
        example, good = prompts.example_schema(rng)
        assert parse(json.dumps(good), json_schema(example)) == good
        assert not {k for key in example["properties"] for k in key.split("_")} & {
            "digit", "shape", "colour", "color", "number"
        }  # fmt: skip
    ask = prompts.framed_schema(task_schema("digit", integer=True), rng)
    texts = [prompts.with_example(ask, rng) for _ in range(30)]
    assert all(t.endswith(ask) and len(t) > len(ask) + 40 for t in texts)
    assert len(set(texts)) == 30
