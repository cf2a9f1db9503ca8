"""The evaluation harness: reading answers, scoring, reports, and ``llava-local eval``.

Scores are checked exactly against the stand-in Ollama daemon, which answers each
picture with a scripted reply (right, wrong or unreadable) chosen from the picture it
receives; the tiny random GGUF pair checks that a run goes end to end through llama.cpp.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from llava_local import BackendError, InvalidRequestError, VisionChat
from llava_local import images as images_module
from llava_local.apps.datasets import (
    DIGIT_PROMPT,
    DIGIT_PROMPTS_HELD_OUT,
    LabelledPicture,
    load_set,
)
from llava_local.apps.eval import (
    Answer,
    EvalReport,
    _Bar,
    _kind_of,
    evaluate,
    first_digit,
    match_class,
)
from llava_local.apps.wrappers import HELD_OUT, Wrapper, load_wrappers, task_schema
from llava_local.cli.eval import eval_command

from ..gguf_fixtures import GgufPair, png_bytes
from ..ollama_server import OllamaServer, RecordedRequest, Script

# the first eight pictures of the digits test split are these digits
FIRST_DIGITS = ["2", "8", "2", "2", "5", "7", "9", "5"]


# --- reading answers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "digit"),
    [
        ("This digit is 7.", "7"),
        ("7", "7"),
        ("It is 3, or maybe 8", "3"),
        ("I see the number seven.", None),
        ("", None),
        ("٣ then 4", "4"),  # ASCII digits only, like the Llava-mnist evaluation
    ],
)
def test_first_digit(reply: str, digit: str | None) -> None:
    """The answer to a digit question is the first ASCII digit of the reply."""
    assert first_digit(reply) == digit


@given(
    st.text().map(lambda s: re.sub("[0-9]", "", s)),
    st.sampled_from("0123456789"),
    st.text(),
)
def test_first_digit_finds_the_first_digit_in_any_text(before: str, digit: str, after: str) -> None:
    """Whatever surrounds it, the first digit of the reply is the answer."""
    assert first_digit(before + digit + after) == digit


CLASSES = ("cat", "dog", "sea lion", "lion", "golden_retriever")


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        ("It is a cat.", "cat"),
        ("CAT!", "cat"),
        ("a scattered dogma", None),  # whole words only
        ("a cat or a dog", None),  # two classes: no answer
        ("A sea lion on a rock.", "sea lion"),  # "lion" inside "sea lion" does not count
        ("A sea  lion and a lion.", None),
        ("a golden retriever puppy", "golden_retriever"),
        ("a golden-retriever", "golden_retriever"),
        ("The cat. The cat again.", "cat"),
        ("nothing I know", None),
    ],
)
def test_match_class(reply: str, answer: str | None) -> None:
    """A reply answers with the one class it names as a whole word, in any case."""
    assert match_class(reply, CLASSES) == answer


FILLER = st.lists(st.sampled_from(["it", "is", "a", "the", "picture", "of", "maybe", "."]))


@given(FILLER, st.sampled_from(CLASSES), FILLER, st.booleans())
def test_match_class_finds_one_class_among_any_words(
    before: list[str], name: str, after: list[str], upper: bool
) -> None:
    """One class name among words that are no class names is found, in any case."""
    said = name.upper() if upper else name
    assert match_class(" ".join([*before, said, *after]), CLASSES) == name


@given(st.sampled_from(["cat", "dog", "lion"]), st.sampled_from(["cat", "dog", "lion"]))
def test_two_different_classes_are_no_answer(first: str, second: str) -> None:
    """A reply naming two different classes has no answer; the same one twice does."""
    expected = first if first == second else None
    assert match_class(f"either a {first} or a {second}", CLASSES) == expected


@pytest.mark.parametrize(
    ("prompt", "kind"),
    [
        ("What shape is this?", "shape"),
        ("What colour is this shape?", "colour"),
        ("Which color is shown?", "colour"),
        ("Name the colours.", "colour"),
        ("Describe the shape and its colour.", "shape"),
        ("What is this?", None),
    ],
)
def test_a_prompt_asks_about_the_kind_it_names_first(prompt: str, kind: str | None) -> None:
    """The kind of label a prompt is scored against is the one it names first."""
    assert _kind_of(prompt, ["shape", "colour"]) == kind


# --- scoring against the stand-in daemon -----------------------------------------------


def answer_by_picture(
    pictures: list[LabelledPicture], reply: Callable[[int, LabelledPicture, str], str]
) -> Callable[[RecordedRequest], Script]:
    """A script that answers ``reply(index, picture, prompt)`` for the picture it is sent."""
    index = {
        images_module.prepare(p.source, max_side=1344).sha256: (i, p)
        for i, p in enumerate(pictures)
    }

    def script(request: RecordedRequest) -> Script:
        (message,) = request.json["messages"]
        (image,) = message["images"]
        i, picture = index[hashlib.sha256(base64.b64decode(image)).hexdigest()]
        return Script(pieces=[reply(i, picture, message["content"])])

    return script


def digit_reply(i: int, picture: LabelledPicture, prompt: str) -> str:
    """Right, wrong (the next digit first), unreadable, right: in turn."""
    label = int(picture.label)
    return [
        f"This digit is {label}.",
        f"It is {(label + 1) % 10}, or maybe {label}.",
        "I cannot read it.",
        str(label),
    ][i % 4]


def test_digit_answers_are_scored_exactly(
    ollama_server: OllamaServer, ollama_chat: VisionChat
) -> None:
    """Accuracy, unparsed counts and the confusion matrix follow the replies exactly."""
    digits = load_set("digits", limit=8)
    assert [p.label for p in digits] == FIRST_DIGITS
    ollama_server.script(answer_by_picture(digits, digit_reply))
    prompts = [DIGIT_PROMPT, DIGIT_PROMPTS_HELD_OUT[0]]
    report = evaluate(ollama_chat, "digits", prompts, limit=8, progress=False)

    assert report.task == {"label": "digit"}
    assert report.classes == {"label": [str(d) for d in range(10)]}
    assert report.pictures == 8
    assert [r.prompt for r in report.results] == prompts
    for result in report.results:
        assert (result.answers, result.correct, result.unparsed, result.errors) == (8, 4, 2, 0)
        assert result.accuracy == 0.5
        nonzero = {
            true: {k: v for k, v in row.items() if v} for true, row in result.confusion.items()
        }
        assert nonzero == {
            "0": {}, "1": {}, "3": {}, "4": {}, "6": {},
            "2": {"2": 2, "unparsed": 1},
            "5": {"5": 2},
            "7": {"8": 1},
            "8": {"9": 1},
            "9": {"unparsed": 1},
        }  # fmt: skip
        assert set(result.confusion["0"]) == {*"0123456789", "unparsed"}
    assert report.accuracy == 0.5
    assert report.confusion("label")["2"]["2"] == 4  # both prompts added up
    assert len(report.answers) == 16
    wrong = report.answers[1]
    assert (wrong.picture, wrong.label, wrong.predicted, wrong.correct) == (
        "digits/1401",
        "8",
        "9",
        False,
    )
    assert wrong.reply == "It is 9, or maybe 8."


def test_each_question_is_a_fresh_greedy_conversation(
    ollama_server: OllamaServer, ollama_chat: VisionChat
) -> None:
    """Every question goes alone with its picture, at temperature 0 and bounded length,
    and the chat is left empty."""
    ollama_server.script(pieces=["It is 1."])
    report = evaluate(ollama_chat, "digits", [DIGIT_PROMPT, "Which digit?"], limit=3, progress=True)
    bodies = [r.json for r in ollama_server.requests_to("/api/chat")]
    assert len(bodies) == 6
    assert all(len(b["messages"]) == 1 and len(b["messages"][0]["images"]) == 1 for b in bodies)
    assert [b["messages"][0]["content"] for b in bodies[:2]] == [DIGIT_PROMPT, "Which digit?"]
    assert all(b["options"] == {"temperature": 0.0, "num_predict": 64} for b in bodies)
    assert report.options == {"temperature": 0.0, "max_tokens": 64}
    assert ollama_chat.history == []


def test_given_and_chat_options_win_over_the_defaults(ollama_server: OllamaServer) -> None:
    """Options passed to evaluate or set on the chat replace the greedy defaults."""
    with VisionChat.ollama(host=ollama_server.url, max_tokens=5) as chat:
        evaluate(chat, "digits", [DIGIT_PROMPT], limit=1, progress=False, temperature=0.7)
    (body,) = [r.json for r in ollama_server.requests_to("/api/chat")]
    assert body["options"] == {"temperature": 0.7, "num_predict": 5}


def shape_reply(i: int, picture: LabelledPicture, prompt: str) -> str:
    """The truth as "It is a red star.", except the first picture's colour."""
    colour = "green" if i == 0 else picture.labels["colour"]
    return f"It is a {colour} {picture.labels['shape']}."


def test_shape_and_colour_prompts_score_their_own_label(
    ollama_server: OllamaServer, ollama_chat: VisionChat
) -> None:
    """On shapes, a shape question is scored on the shape, a colour question on the colour."""
    shapes = load_set("shapes", limit=30)
    ollama_server.script(answer_by_picture(shapes, shape_reply))
    report = evaluate(ollama_chat, "shapes", limit=30, progress=False)
    shape, colour = report.results
    assert (shape.prompt, shape.kind, shape.correct) == ("What shape is this?", "shape", 30)
    assert (colour.prompt, colour.kind, colour.correct) == ("What colour is it?", "colour", 29)
    assert report.task == {"shape": "classes", "colour": "classes"}
    assert report.classes["shape"] == ["circle", "cross", "square", "star", "triangle"]
    assert colour.confusion["red"] == {
        "blue": 0, "green": 1, "orange": 0, "purple": 0, "red": 4, "yellow": 0, "unparsed": 0
    }  # fmt: skip
    assert shape.confusion["star"]["star"] == 6


def test_a_mapping_chooses_the_label_each_prompt_is_scored_on(
    ollama_server: OllamaServer, ollama_chat: VisionChat
) -> None:
    """prompts={prompt: kind} overrides the kind a prompt names."""
    shapes = load_set("shapes", limit=6)
    ollama_server.script(answer_by_picture(shapes, shape_reply))
    report = evaluate(ollama_chat, shapes, {"Describe it.": "colour"}, progress=False)
    (result,) = report.results
    assert (result.kind, result.correct, result.answers) == ("colour", 5, 6)
    assert report.dataset == "pictures"


@pytest.fixture
def pets(tmp_path: Path) -> Path:
    """A CSV set: three cats, two dogs, a bird, and a "picture" that is not one."""
    rows = ["path,label"]
    for i, label in enumerate(["cat", "cat", "cat", "dog", "dog", "bird"]):
        (tmp_path / f"{i}.png").write_bytes(png_bytes((24, 24), seed=i))
        rows.append(f"{i}.png,{label}")
    (tmp_path / "broken.png").write_bytes(b"<html>not a picture</html>")
    rows.append("broken.png,dog")
    (tmp_path / "pets.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "pets.csv"


PET_REPLIES = ["It is a cat.", "A DOG, clearly", "No idea.", "a dog or a cat", "dog", "A Bird."]


def test_class_answers_and_unreadable_pictures_are_scored_exactly(
    ollama_server: OllamaServer, ollama_chat: VisionChat, pets: Path
) -> None:
    """Class names are read from replies; a picture that cannot be read is an error
    answer, counted wrong, and the run goes on."""
    pictures = load_set(pets)
    ollama_server.script(answer_by_picture(pictures[:6], lambda i, p, q: PET_REPLIES[i]))
    report = evaluate(ollama_chat, pets, ["What animal is this?"], progress=False)
    (result,) = report.results
    assert report.task == {"label": "classes"}
    assert (result.answers, result.correct, result.unparsed, result.errors) == (7, 3, 2, 1)
    assert result.accuracy == 3 / 7
    assert result.confusion == {
        "bird": {"bird": 1, "cat": 0, "dog": 0, "unparsed": 0},
        "cat": {"bird": 0, "cat": 1, "dog": 1, "unparsed": 1},
        "dog": {"bird": 0, "cat": 0, "dog": 1, "unparsed": 1, "error": 1},
    }
    broken = report.answers[-1]
    assert broken.reply is None
    assert broken.error is not None
    assert "broken.png" in broken.error
    assert len(ollama_server.requests_to("/api/chat")) == 6
    text = render(report)
    assert "confusion: rows true, columns answered" in text
    assert "error" in text


def test_an_engine_failure_stops_the_run(
    ollama_server: OllamaServer, ollama_chat: VisionChat
) -> None:
    """An error from the engine is raised, not scored, and the chat is left empty."""
    ollama_server.script(Script(pieces=["7"]), Script(fault="http_error", error="runner died"))
    with pytest.raises(BackendError, match="runner died"):
        evaluate(ollama_chat, "digits", [DIGIT_PROMPT], limit=3, progress=False)
    assert ollama_chat.history == []


def test_the_progress_bar_counts_answers_and_rates_only_the_given_ones() -> None:
    """Eval's bar counts answers, and an unreadable picture's error answers stay out of
    its rate and ETA."""
    bar = _Bar(6, "pets", enabled=False)
    broken = Answer(picture="broken.png", prompt="?", label="dog", error="ImageError: ...")
    bar.advance(broken)
    bar.advance(broken)
    assert (bar.rate, bar.eta_s, bar.rate_text()) == (None, None, "-- s/answer")
    bar.advance(Answer(picture="0.png", prompt="?", label="cat", correct=True, seconds=2.0))
    assert (bar.rate, bar.eta_s) == (0.5, 6.0)
    assert (bar.count_text(), bar.rate_text()) == ("3/6 answers", "2.0 s/answer")


def test_the_progress_bar_says_it_counts_answers(
    ollama_server: OllamaServer,
    ollama_chat: VisionChat,
    pets: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two prompts about seven pictures are fourteen answers, and the bar says so."""
    ollama_server.script(pieces=["It is a cat."])
    evaluate(ollama_chat, pets, ["What animal is this?", "Which animal?"], progress=True)
    err = capsys.readouterr().err
    assert "14/14 answers" in err
    assert "answers/s" in err or "s/answer" in err
    assert "pic" not in err


MISTAKES = [
    ("digits", None, {"samples": 3}, "3 copies of one answer"),
    ("digits", None, {"samples": 0}, "samples must be a positive number"),
    ("digits", None, {"wrappers": []}, "non-empty list of Wrapper"),
    ("digits", None, {"wrappers": [Wrapper(name="a"), Wrapper(name="a")]}, "named 'a'"),
    ("shapes", None, {"task": "digit"}, "single-digit labels"),
    ("shapes", {"What is it?": "size"}, {}, "no 'size' label"),
    ("digits", {"What is it?": "colour"}, {}, "no 'colour' label"),
    ("digits", [], {}, "at least one prompt"),
    ("digits", ["  "], {}, "non-empty"),
    ("digits", None, {"limit": 0}, "positive"),
    ("digits", None, {"task": "words"}, "task must be"),
    ([], ["Hi?"], {}, "no pictures"),
]


@pytest.mark.parametrize("mistake", MISTAKES)
def test_mistakes_are_refused_before_any_question(
    ollama_server: OllamaServer,
    ollama_chat: VisionChat,
    mistake: tuple[object, object, dict[str, object], str],
) -> None:
    """A wrong task, kind, prompt or limit is refused before the engine is asked anything."""
    dataset, prompts, kwargs, message = mistake
    with pytest.raises(InvalidRequestError, match=message):
        evaluate(ollama_chat, dataset, prompts, progress=False, **kwargs)  # type: ignore[arg-type]
    assert ollama_server.requests_to("/api/chat") == []


def test_a_user_set_needs_prompts(ollama_chat: VisionChat, pets: Path) -> None:
    """Only the built-in sets have default prompts."""
    with pytest.raises(InvalidRequestError, match="give at least one prompt to ask about"):
        evaluate(ollama_chat, pets, progress=False)


def render(report: EvalReport) -> str:
    console = Console(record=True, width=140, file=io.StringIO())
    console.print(report.render())
    return console.export_text()


def test_the_report_renders_and_round_trips_as_json(
    ollama_server: OllamaServer, ollama_chat: VisionChat
) -> None:
    """The report draws as tables and comes back whole from its JSON."""
    digits = load_set("digits", limit=8)
    ollama_server.script(answer_by_picture(digits, digit_reply))
    report = evaluate(
        ollama_chat, digits, [DIGIT_PROMPT, "Which digit?"], name="digits", progress=False
    )
    text = render(report)
    assert "digits: 8 pictures, llava (ollama)" in text
    assert re.search(r"What digit is this\?\s+│\s+0\.500\s+│\s+4/8\s+│\s+2\s+│\s+0", text)
    assert re.search(r"all prompts\s+│\s+0\.500\s+│\s+8/16", text)
    assert "16 answers in" in text
    assert EvalReport.model_validate_json(report.model_dump_json()) == report
    assert str(report).splitlines()[0] == "0.500  What digit is this?"


# --- structured answers, samples, wrapped questions ------------------------------------


def last_user(request: RecordedRequest) -> dict[str, object]:
    message: dict[str, object] = request.json["messages"][-1]
    return message


def by_picture(
    pictures: list[LabelledPicture], reply: Callable[[int, LabelledPicture, str], str]
) -> Callable[[RecordedRequest], Script]:
    """Like answer_by_picture, for conversations that may start with a system message."""
    index = {
        images_module.prepare(p.source, max_side=1344).sha256: (i, p)
        for i, p in enumerate(pictures)
    }

    def script(request: RecordedRequest) -> Script:
        message = last_user(request)
        images = message["images"]
        assert isinstance(images, list)
        assert len(images) == 1
        i, picture = index[hashlib.sha256(base64.b64decode(str(images[0]))).hexdigest()]
        return Script(pieces=[reply(i, picture, str(message["content"]))])

    return script


def json_digit_reply(i: int, picture: LabelledPicture, prompt: str) -> str:
    """Right, a wrong value, not JSON, right (with spaces): in turn."""
    label = int(picture.label)
    replies = [f'{{"digit": {label}}}', f'{{"digit": {label}0}}', '{"digit": ']
    return [*replies, f'{{ "digit":{label} }}'][i % 4]


def test_structured_answers_score_the_exact_value(
    ollama_server: OllamaServer, ollama_chat: VisionChat
) -> None:
    """With structured=True every question carries the task's schema as the format, and
    only the exact value of its field counts: 70 for 7 is wrong, a cut answer unparsed."""
    digits = load_set("digits", limit=8)
    ollama_server.script(by_picture(digits, json_digit_reply))
    report = evaluate(
        ollama_chat, digits, [DIGIT_PROMPT], name="digits", structured=True, progress=False
    )
    (result,) = report.results
    assert (result.correct, result.unparsed, result.answers) == (4, 2, 8)
    assert report.structured is True
    bodies = [r.json for r in ollama_server.requests_to("/api/chat")]
    assert all(b["format"] == task_schema("digit", integer=True) for b in bodies)
    assert bodies[0]["format"]["properties"] == {"digit": {"title": "Digit", "type": "integer"}}
    wrong = report.answers[1]
    assert (wrong.reply, wrong.predicted, wrong.correct) == ('{"digit": 80}', "80", False)
    assert report.answers[2].reply == '{"digit": '
    assert "JSON with the task's schema and the grammar" in render(report)


def test_structured_shape_questions_ask_for_their_own_key(
    ollama_server: OllamaServer, ollama_chat: VisionChat
) -> None:
    """On shapes, the shape question's schema has a "shape" string and the colour
    question's a "colour" one, each scored on its own label."""
    shapes = load_set("shapes", limit=6)

    def reply(i: int, picture: LabelledPicture, prompt: str) -> str:
        kind = "colour" if "colour" in prompt else "shape"
        return json.dumps({kind: picture.labels[kind] if i else "blue"})

    ollama_server.script(by_picture(shapes, reply))
    report = evaluate(ollama_chat, "shapes", limit=6, structured=True, progress=False)
    assert [(r.kind, r.correct) for r in report.results] == [("shape", 5), ("colour", 5)]
    formats = [r.json["format"] for r in ollama_server.requests_to("/api/chat")]
    shape, colour = (task_schema(key, integer=False) for key in ("shape", "colour"))
    assert formats[:2] == [shape, colour]


def test_samples_ask_each_question_again_with_the_next_seed(
    ollama_server: OllamaServer, ollama_chat: VisionChat
) -> None:
    """samples=3 asks every question three times, sample i with seed + i, and scores
    every answer."""
    ollama_server.script(pieces=["This digit is 2."])
    report = evaluate(
        ollama_chat,
        "digits",
        [DIGIT_PROMPT],
        limit=2,
        samples=3,
        temperature=0.8,
        seed=5,
        progress=False,
    )
    options = [r.json["options"] for r in ollama_server.requests_to("/api/chat")]
    assert [o["seed"] for o in options] == [5, 6, 7, 5, 6, 7]
    assert all(o["temperature"] == 0.8 for o in options)
    assert [a.sample for a in report.answers] == [0, 1, 2, 0, 1, 2]
    (result,) = report.results
    assert (result.answers, result.correct) == (6, 3)  # the first picture is a 2, then an 8
    assert report.samples == 3
    assert "3 samples per question" in render(report)


def test_default_sampling_sends_no_temperature(
    ollama_server: OllamaServer, ollama_chat: VisionChat
) -> None:
    """temperature=None leaves sampling to the engine, as a client that sends none."""
    ollama_server.script(pieces=["7"])
    report = evaluate(ollama_chat, "digits", [DIGIT_PROMPT], limit=1, samples=2, temperature=None)
    options = [r.json["options"] for r in ollama_server.requests_to("/api/chat")]
    assert options == [{"num_predict": 64}, {"num_predict": 64}]
    assert "the engine's default sampling" in render(report)


def test_wrapped_questions_go_as_the_client_sends_them(
    ollama_server: OllamaServer, ollama_chat: VisionChat
) -> None:
    """Each wrapper sends its system message and its text around the question, with the
    schema written into them and, where the client asks, enforced; one row each."""
    ollama_server.script(pieces=["This digit is 2."])
    wrappers = [
        Wrapper(name="sys", system="Reply per {schema}", grammar="object"),
        Wrapper(name="around", user="Q: {question}\nA:", schema_style="javascript"),
        Wrapper(name="enforced", user="{question} {schema}", grammar="schema"),
    ]
    report = evaluate(ollama_chat, "digits", limit=1, wrappers=wrappers, progress=False)
    bodies = [r.json for r in ollama_server.requests_to("/api/chat")]
    schema = task_schema("digit", integer=True)
    written = json.dumps(schema)
    assert [[m["role"] for m in b["messages"]] for b in bodies] == [
        ["system", "user"],
        ["user"],
        ["user"],
    ]
    assert bodies[0]["messages"][0]["content"] == f"Reply per {written}"
    assert bodies[0]["format"] == {"type": "object"}
    assert bodies[1]["messages"][0]["content"] == f"{DIGIT_PROMPT}\nA:".replace(
        DIGIT_PROMPT, "Q: " + DIGIT_PROMPT
    )
    assert "format" not in bodies[1]
    assert bodies[2]["messages"][0]["content"] == f"{DIGIT_PROMPT} {written}"
    assert bodies[2]["format"] == schema
    assert [(r.prompt, r.wrapper, r.correct) for r in report.results] == [
        (DIGIT_PROMPT, "sys", 1),
        (DIGIT_PROMPT, "around", 1),
        (DIGIT_PROMPT, "enforced", 1),
    ]
    assert report.wrappers == ["sys", "around", "enforced"]
    assert str(report).splitlines()[0] == f"1.000  {DIGIT_PROMPT} [sys]"
    assert ollama_chat.history == []


def test_the_held_out_wrappers_write_their_schema_as_their_client_does() -> None:
    """LangChain's text drops the schema's top title and type; JavaScript clients write
    it without spaces; each held-out wrapper puts the question in."""
    schema = task_schema("digit", integer=True)
    langchain = next(w for w in HELD_OUT if w.name == "langchain-format-instructions")
    _, text = langchain.render("Which?", schema)
    assert '```\n{"properties": {"digit": {"title": "Digit", "type": "integer"}}, ' in text
    assert '"required": ["digit"]}\n```\nWhich?\n' in text
    javascript = Wrapper(name="js", system="{schema}", schema_style="javascript")
    assert javascript.render("Q", schema)[0] == json.dumps(schema, separators=(",", ":"))
    for wrapper in HELD_OUT:
        system, user = wrapper.render("QUESTION-HERE", schema)
        assert "QUESTION-HERE" in user
        assert "{schema}" not in (system or "") + user


def test_wrappers_load_from_a_json_file(tmp_path: Path) -> None:
    """A JSON list of wrappers loads; a bad one is refused naming its place and field."""
    good = tmp_path / "w.json"
    good.write_text(json.dumps([{"name": "mine", "user": "Hey. {question}"}]))
    assert load_wrappers(good) == [Wrapper(name="mine", user="Hey. {question}")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "mine", "user": "no question"}]))
    with pytest.raises(InvalidRequestError, match=r"bad.json, wrapper 1: user: .*\{question\}"):
        load_wrappers(bad)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(InvalidRequestError, match="non-empty JSON list"):
        load_wrappers(tmp_path / "empty.json")


# --- with llama.cpp in-process ---------------------------------------------------------


def test_a_run_goes_end_to_end_through_llama_cpp(tiny_pair: GgufPair, tmp_path: Path) -> None:
    """The tiny random pair answers every question; whatever it says is scored."""
    for label in ("cat", "dog"):
        (tmp_path / "set" / label).mkdir(parents=True)
        (tmp_path / "set" / label / "a.png").write_bytes(png_bytes((32, 32), seed=len(label)))
    with VisionChat.llama_cpp(model=tiny_pair.lm, mmproj=tiny_pair.mmproj, n_threads=1) as chat:
        report = evaluate(chat, tmp_path / "set", ["What is it?"], progress=False, max_tokens=4)
        digits = evaluate(chat, "digits", [DIGIT_PROMPT], limit=2, progress=False, max_tokens=4)
    for run, pictures in ((report, 2), (digits, 2)):
        (result,) = run.results
        assert run.backend == "llama_cpp"
        assert result.answers == pictures
        assert result.errors == 0
        assert all(isinstance(a.reply, str) and a.seconds > 0 for a in run.answers)
        assert sum(sum(row.values()) for row in result.confusion.values()) == pictures
    assert digits.task == {"label": "digit"}


# --- the command -----------------------------------------------------------------------


def ollama_args(server: OllamaServer) -> list[str]:
    return ["--backend", "ollama", "--host", server.url]


def test_eval_prints_json(ollama_server: OllamaServer) -> None:
    """`eval digits --json` prints the whole report for machines."""
    ollama_server.script(answer_by_picture(load_set("digits", limit=8), digit_reply))
    args = ["digits", "--limit", "8", "-p", DIGIT_PROMPT, "--json", "--no-progress"]
    result = CliRunner().invoke(eval_command, [*args, *ollama_args(ollama_server)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["dataset"] == "digits"
    assert data["accuracy"] == 0.5
    assert [r["correct"] for r in data["results"]] == [4]
    assert len(data["answers"]) == 8


def test_eval_prints_tables_for_the_default_shape_prompts(ollama_server: OllamaServer) -> None:
    """`eval shapes` asks the shape and colour questions and prints both confusions."""
    ollama_server.script(answer_by_picture(load_set("shapes", limit=30), shape_reply))
    args = ["shapes", "--limit", "30", "--max-tokens", "20", *ollama_args(ollama_server)]
    result = CliRunner().invoke(eval_command, args, env={"COLUMNS": "140"})
    assert result.exit_code == 0, result.output
    for text in ("What shape is this?", "1.000", "What colour is it?", "0.967"):
        assert text in result.stdout
    assert "confusion (shape)" in result.stdout
    assert "confusion (colour)" in result.stdout
    bodies = [r.json for r in ollama_server.requests_to("/api/chat")]
    assert {b["options"]["num_predict"] for b in bodies} == {20}


def test_eval_label_scores_every_prompt_on_one_kind(ollama_server: OllamaServer) -> None:
    """--label colour scores a prompt that names no kind on the colour."""
    ollama_server.script(answer_by_picture(load_set("shapes", limit=6), shape_reply))
    args = ["shapes", "--limit", "6", "-p", "Describe it.", "--label", "colour", "--json"]
    result = CliRunner().invoke(eval_command, [*args, *ollama_args(ollama_server)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["results"]
    assert (row["kind"], row["correct"]) == ("colour", 5)


def test_eval_refuses_a_user_set_without_prompt(pets: Path) -> None:
    """A folder or file set needs --prompt: a usage error, before any model is loaded."""
    result = CliRunner().invoke(eval_command, [str(pets), "--backend", "llama_cpp"])
    assert result.exit_code == 2
    assert "--prompt" in result.output


def test_eval_reports_a_missing_set_as_one_line(
    ollama_server: OllamaServer, tmp_path: Path
) -> None:
    """A set that does not exist is a clean error exit naming it."""
    args = [str(tmp_path / "nope"), "-p", "What?", *ollama_args(ollama_server)]
    result = CliRunner().invoke(eval_command, args)
    assert result.exit_code == 1
    assert "no such file or folder" in result.output


def test_eval_renders_digits_another_way(ollama_server: OllamaServer) -> None:
    """--size and --resample draw the digits differently (another picture is sent)."""
    ollama_server.script(pieces=["5"])
    for extra in ([], ["--size", "28", "--resample", "bilinear"]):
        args = ["digits", "--limit", "1", "-p", DIGIT_PROMPT, "--json", *extra]
        result = CliRunner().invoke(eval_command, [*args, *ollama_args(ollama_server)])
        assert result.exit_code == 0, result.output
    first, second = (
        r.json["messages"][0]["images"][0] for r in ollama_server.requests_to("/api/chat")
    )
    assert first != second


def test_eval_structured_wrapped_and_sampled_from_the_command_line(
    ollama_server: OllamaServer, tmp_path: Path
) -> None:
    """--structured sends the schema, --wrapped held-out asks through every held-out
    wrapper, --temperature default with --samples and --seed samples each question again."""
    ollama_server.script(pieces=['{"digit": 2}'])
    base = ["digits", "--limit", "1", "--json", "--no-progress", *ollama_args(ollama_server)]
    result = CliRunner().invoke(eval_command, [*base, "--structured", "-p", DIGIT_PROMPT])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["correct"] == 1
    result = CliRunner().invoke(eval_command, [*base, "--wrapped"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [r["wrapper"] for r in rows] == [w.name for w in HELD_OUT]
    assert {r["prompt"] for r in rows} == {DIGIT_PROMPT}
    sampled = [*base, "-p", DIGIT_PROMPT, "--temperature", "default", "--samples", "2"]
    result = CliRunner().invoke(eval_command, [*sampled, "--seed", "3"])
    assert result.exit_code == 0, result.output
    options = [r.json["options"] for r in ollama_server.requests_to("/api/chat")][-2:]
    assert options == [{"num_predict": 64, "seed": 3}, {"num_predict": 64, "seed": 4}]
    wrappers = tmp_path / "w.json"
    wrappers.write_text(json.dumps([{"name": "mine", "user": "Hey. {question}"}]))
    mine = [*base, "-p", DIGIT_PROMPT, "--wrapped", str(wrappers)]
    result = CliRunner().invoke(eval_command, mine)
    assert result.exit_code == 0, result.output
    assert ollama_server.requests_to("/api/chat")[-1].json["messages"][0]["content"] == (
        f"Hey. {DIGIT_PROMPT}"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "warm"], "neither a number nor 'default'"),
        (["--temperature", "-1"], "below 0"),
        (["--samples", "2"], "copies of one answer"),
    ],
)
def test_eval_refuses_sampling_mistakes(
    ollama_server: OllamaServer, args: list[str], message: str
) -> None:
    """A temperature that is no number, or samples of a greedy answer, are refused."""
    base = ["digits", "--limit", "1", *ollama_args(ollama_server)]
    result = CliRunner().invoke(eval_command, [*base, *args])
    assert result.exit_code != 0
    assert message in result.output
    assert ollama_server.requests_to("/api/chat") == []
