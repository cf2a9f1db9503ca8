"""Measure a model on a labelled picture set: accuracy per prompt, confusions, time.

:func:`evaluate` asks every picture each prompt, each time in a fresh conversation and
greedily unless told otherwise, so that answers do not depend on order or luck. The
answer is read from the reply the way published evaluations read it:

- digits (every label a single digit): the first digit in the reply, as the Llava-mnist
  evaluation does ("This digit is 7." and "7" are both 7);
- anything else: the class name the reply mentions, as a whole word and in any case
  (``_``, ``-`` and spaces in a class name match each other). A reply that mentions no
  class name, or two, has no answer: it is counted wrong, in the ``unparsed`` column.

Sets whose pictures have several labels (the built-in ``shapes``: shape and colour) score
each prompt against the kind of label it asks about: the kind the prompt names first
("What colour is this shape?" asks about colour), or the one given explicitly with a
mapping of prompt to kind.

Three ways of asking test what other software needs from a model:

- ``structured=True`` asks for JSON as structured-output clients do: each question with
  the schema of its task (``{"digit": int}`` for digits, ``{"<kind>": str}`` for class
  names, as pydantic writes a one-field model), the engine's grammar on, and only the
  exact value of that field counts (``{"digit": 7}`` is 7; ``{"digit": 70}`` and an
  answer that is not JSON are wrong, the latter in ``unparsed``);
- ``samples=N`` asks every question N times, each in a fresh conversation, for sampled
  decoding: ``temperature`` above 0, or ``None`` for the engine's own default sampling
  (what a client that sends no temperature gets); with ``seed`` given, sample ``i`` uses
  ``seed + i``, so a run can be repeated;
- ``wrappers`` asks through client software's system prompts and text around the
  question (:mod:`llava_local.apps.wrappers`; ``HELD_OUT`` are the ones the demo model
  never saw), each as a whole conversation the way the client sends it.

A picture that cannot be read is recorded as an error (counted wrong, in an ``error``
column) and the run goes on; an engine failure stops it.

The progress bar counts answers (one per picture and prompt), and its rate and ETA
come from the answers the model gave and the time they took: an unreadable picture's
error answers move the count, not the rate.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, Field
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .. import images as _images
from ..chat import VisionChat
from ..errors import ImageError, InvalidRequestError, SchemaError
from ..progress import RunProgress
from ..types import Message, PreparedImage, Reply
from ..wording import count
from .datasets import LabelledPicture, default_prompts, load_set
from .wrappers import Wrapper, names, task_schema

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Answer",
    "EvalReport",
    "PromptResult",
    "Task",
    "evaluate",
    "first_digit",
    "match_class",
]

Task = Literal["auto", "digit", "classes"]

#: Answers are cut here unless ``max_tokens`` is given: a class name or a digit comes
#: early in any useful answer, and a rambling model must not cost minutes per picture.
DEFAULT_MAX_TOKENS = 64
UNPARSED = "unparsed"
ERROR = "error"
#: Other spellings of a kind of label, for finding the kind a prompt asks about.
_KIND_SPELLINGS = {"colour": ("colour", "color"), "color": ("colour", "color")}
_DIGITS = frozenset("0123456789")


class Answer(BaseModel):
    """One question about one picture: the reply, what was read from it, and the time."""

    picture: str
    prompt: str
    label: str
    wrapper: str | None = None
    sample: int = 0
    reply: str | None = None
    predicted: str | None = None
    correct: bool = False
    seconds: float = 0.0
    error: str | None = None


class PromptResult(BaseModel):
    """How one prompt did over the whole set.

    ``confusion[true][answered]`` counts answers, with the columns ``unparsed`` (no
    answer found in the reply) and, if any picture failed, ``error``.
    """

    prompt: str
    kind: str | None = None
    wrapper: str | None = None
    answers: int = 0
    correct: int = 0
    unparsed: int = 0
    errors: int = 0
    accuracy: float = 0.0
    seconds_total: float = 0.0
    seconds_mean: float = 0.0
    confusion: dict[str, dict[str, int]] = Field(default_factory=dict)

    @property
    def name(self) -> str:
        """The prompt, with the wrapper it was asked through in brackets."""
        return self.prompt if self.wrapper is None else f"{self.prompt} [{self.wrapper}]"


class EvalReport(BaseModel):
    """The outcome of :func:`evaluate`; ``render()`` draws it, ``model_dump()`` is for
    machines. ``answers`` holds every reply."""

    dataset: str
    model: str
    backend: str
    task: dict[str, Literal["digit", "classes"]]
    classes: dict[str, list[str]]
    pictures: int
    options: dict[str, Any]
    structured: bool = False
    samples: int = 1
    wrappers: list[str] = Field(default_factory=list)
    results: list[PromptResult]
    accuracy: float
    seconds_total: float
    seconds_per_answer: float
    seconds_per_picture: float
    answers: list[Answer] = Field(default_factory=list, repr=False)

    def confusion(self, kind: str) -> dict[str, dict[str, int]]:
        """The confusion matrix of every prompt about ``kind`` (``"label"``: the main
        label), added up."""
        total: dict[str, dict[str, int]] = {}
        for result in self.results:
            if (result.kind or "label") == kind:
                for true, row in result.confusion.items():
                    into = total.setdefault(true, {})
                    for answered, count in row.items():
                        into[answered] = into.get(answered, 0) + count
        return total

    def __str__(self) -> str:
        lines = [f"{r.accuracy:.3f}  {r.name}" for r in self.results]
        lines.append(
            f"{self.accuracy:.3f}  overall: {count(len(self.answers), 'answer')} about "
            f"{count(self.pictures, 'picture')} in {self.seconds_total:.1f} s"
        )
        return "\n".join(lines)

    def render(self) -> RenderableType:
        """Tables for a terminal: accuracy per prompt, then a confusion matrix per kind."""
        title = f"{self.dataset}: {count(self.pictures, 'picture')}, {self.model} ({self.backend})"
        how = [
            *(["JSON with the task's schema and the grammar, exact values"] * self.structured),
            *([f"{self.samples} samples per question"] * (self.samples > 1)),
            _sampling(self.options),
        ]
        title += "\n" + "; ".join(how)
        table = Table(title=title, title_justify="left")
        table.add_column("prompt", overflow="fold")
        if self.wrappers:
            table.add_column("wrapper", overflow="fold")
        several_kinds = len(self.classes) > 1
        if several_kinds:
            table.add_column("scores")
        for column in ("accuracy", "right", "unparsed", "errors", "s/answer"):
            table.add_column(column, justify="right", no_wrap=True)
        for r in self.results:
            kind = [r.kind or "label"] if several_kinds else []
            table.add_row(
                r.prompt,
                *([r.wrapper or "(none)"] if self.wrappers else []),
                *kind,
                f"{r.accuracy:.3f}",
                f"{r.correct}/{r.answers}",
                str(r.unparsed),
                str(r.errors),
                f"{r.seconds_mean:.3f}",
            )
        if len(self.results) > 1:
            table.add_section()
            right = sum(r.correct for r in self.results)
            table.add_row(
                "all prompts",
                *([""] if self.wrappers else []),
                *([""] if several_kinds else []),
                f"{self.accuracy:.3f}",
                f"{right}/{len(self.answers)}",
                str(sum(r.unparsed for r in self.results)),
                str(sum(r.errors for r in self.results)),
                f"{self.seconds_per_answer:.3f}",
            )
        parts: list[RenderableType] = [table]
        parts += [_confusion_table(kind, self.confusion(kind)) for kind in self.classes]
        parts.append(
            Text(
                f"{count(len(self.answers), 'answer')} in {self.seconds_total:.1f} s: "
                f"{self.seconds_per_answer:.3f} s per answer, "
                f"{self.seconds_per_picture:.3f} s per picture (all prompts)"
            )
        )
        return Group(*parts)


def _sampling(options: Mapping[str, Any]) -> str:
    temperature = options.get("temperature")
    if temperature is None:
        return "the engine's default sampling"
    return "greedy" if temperature == 0 else f"temperature {temperature}"


def _confusion_table(kind: str, matrix: dict[str, dict[str, int]]) -> Table:
    columns = _order({a for row in matrix.values() for a in row} - {UNPARSED, ERROR})
    columns += [UNPARSED] + [ERROR] * any(row.get(ERROR) for row in matrix.values())
    about = "" if kind == "label" else f" ({kind})"
    title = f"confusion{about}: rows true, columns answered"
    table = Table(title=title, title_justify="left")
    table.add_column("", no_wrap=True)
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for true in _order(matrix):
        row = matrix[true]
        cells = []
        for column in columns:
            count = row.get(column, 0)
            style = "green" if column == true else "red" if count else "dim"
            cells.append(Text(str(count), style=style))
        table.add_row(true, *cells)
    return table


# --- reading answers -----------------------------------------------------------------


def first_digit(text: str) -> str | None:
    """The first ASCII digit in ``text``, or None (how Llava-mnist reads answers)."""
    match = re.search(r"[0-9]", text)
    return None if match is None else match.group()


def match_class(text: str, classes: Iterable[str]) -> str | None:
    """The one class ``text`` names, or None when it names none or several.

    Whole words, any case; ``_``, ``-`` and spaces within a class name match one
    another. A name found only inside a longer one that also matched ("lion" in "sea
    lion") does not count.
    """
    names = tuple(dict.fromkeys(classes))
    spans: list[tuple[int, int, str]] = []
    for name in names:
        spans += [(m.start(), m.end(), name) for m in _class_pattern(name).finditer(text)]
    found = {
        name
        for start, end, name in spans
        if not any(s <= start and end <= e and (s, e) != (start, end) for s, e, _ in spans)
    }
    return found.pop() if len(found) == 1 else None


@lru_cache(maxsize=4096)
def _class_pattern(name: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in re.split(r"[\s_-]+", name.strip()) if w]
    return re.compile(r"(?<!\w)" + r"[\s_-]+".join(words) + r"(?!\w)", re.IGNORECASE)


def _kind_of(prompt: str, kinds: Sequence[str]) -> str | None:
    """The kind of label ``prompt`` names first, or None."""
    best: tuple[int, str] | None = None
    for kind in kinds:
        for spelling in _KIND_SPELLINGS.get(kind.lower(), (kind,)):
            match = re.search(rf"(?<!\w){re.escape(spelling)}s?(?!\w)", prompt, re.IGNORECASE)
            if match and (best is None or match.start() < best[0]):
                best = (match.start(), kind)
    return None if best is None else best[1]


# --- the run -------------------------------------------------------------------------


def evaluate(
    chat: VisionChat,
    dataset: str | os.PathLike[str] | Sequence[LabelledPicture],
    prompts: Sequence[str] | Mapping[str, str] | None = None,
    *,
    task: Task = "auto",
    limit: int | None = None,
    progress: bool = True,
    name: str | None = None,
    structured: bool = False,
    samples: int = 1,
    wrappers: Sequence[Wrapper] | None = None,
    **options: Any,
) -> EvalReport:
    """Ask every picture of ``dataset`` each of ``prompts`` and score the answers.

    ``dataset`` is a built-in set name, a folder or CSV/JSONL file (see
    :mod:`llava_local.apps.datasets`), or pictures already loaded. ``prompts`` defaults to the
    built-in set's questions (with ``wrappers``, its first question of each kind); a
    mapping gives the kind of label each prompt is scored against (``{"Which colour?":
    "colour"}``). ``task`` chooses how answers are read (``auto``: first digit when every
    label is a digit, else class names). ``limit`` keeps the first pictures. ``name`` is
    how the report calls the set (default: the name or path given; a built-in name also
    chooses the default prompts). ``structured``, ``samples`` and ``wrappers`` are the
    modes of the module docstring. ``options`` are generation options; unless given here
    or on the chat, ``temperature=0`` and ``max_tokens=64`` (``temperature=None``: the
    engine's default sampling). The conversation is reset before each question and after
    the run.
    """
    plan = _plan(
        chat,
        dataset,
        prompts,
        name,
        task=task,
        limit=limit,
        options=options,
        structured=structured,
        samples=samples,
        wrappers=wrappers,
    )
    started = time.monotonic()
    answers: list[list[Answer]] = [[] for _ in plan.questions]
    try:
        total = len(plan.pictures) * len(plan.questions) * plan.samples
        with _Bar(total, plan.name, enabled=progress) as bar:
            for picture in plan.pictures:
                prepared: PreparedImage | ImageError
                try:
                    prepared = _images.prepare(picture.source, max_side=chat.max_image_side)
                except ImageError as exc:
                    prepared = exc
                for question, got in zip(plan.questions, answers, strict=True):
                    for sample in range(plan.samples):
                        got.append(_ask(chat, plan, picture, prepared, (question, sample)))
                        bar.advance(got[-1])
    finally:
        chat.reset()
    return _report(chat, plan, answers, time.monotonic() - started)


@dataclass(frozen=True)
class _Question:
    """A prompt, the kind of label it is scored against, and the client wrapping it."""

    prompt: str
    kind: str | None
    wrapper: Wrapper | None = None


@dataclass(frozen=True)
class _Plan:
    """What a run asks, checked before the first question."""

    name: str
    pictures: list[LabelledPicture]
    questions: list[_Question]
    tasks: dict[str, Literal["digit", "classes"]]
    classes: dict[str, list[str]]
    options: dict[str, Any]
    structured: bool
    samples: int


def _plan(
    chat: VisionChat,
    dataset: str | os.PathLike[str] | Sequence[LabelledPicture],
    prompts: Sequence[str] | Mapping[str, str] | None,
    name: str | None,
    *,
    task: Task,
    limit: int | None,
    options: dict[str, Any],
    structured: bool,
    samples: int,
    wrappers: Sequence[Wrapper] | None,
) -> _Plan:
    if task not in ("auto", "digit", "classes"):
        raise InvalidRequestError(f"task must be auto, digit or classes, not {task!r}")
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise InvalidRequestError(f"limit must be a positive number, not {limit!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InvalidRequestError(f"samples must be a positive number, not {samples!r}")
    if wrappers is not None:
        wrappers = list(wrappers)
        if not wrappers or not all(isinstance(w, Wrapper) for w in wrappers):
            raise InvalidRequestError("wrappers must be a non-empty list of Wrapper objects")
        names(wrappers)
    given, pictures = _pictures(dataset)
    name = given if name is None else name
    kinds = _kinds(pictures)
    # class names come from the whole set, so a limited run still recognises them all
    classes = {k or "label": _order({p.label_for(k) for p in pictures}) for k in kinds}
    run_options = _with_defaults(chat, options)
    if samples > 1 and _greedy(chat, run_options):
        raise InvalidRequestError(
            f"{samples} samples of a greedy answer are {samples} copies of one answer: give "
            "a temperature above 0, or temperature=None for the engine's default sampling"
        )
    asked = _questions(prompts, name, kinds, wrapped=wrappers is not None)
    return _Plan(
        name=name,
        pictures=pictures[:limit],
        questions=[
            _Question(prompt, kind, wrapper)
            for prompt, kind in asked
            for wrapper in (wrappers if wrappers is not None else [None])
        ],
        tasks={kind: _task(task, kind, names_) for kind, names_ in classes.items()},
        classes=classes,
        options=run_options,
        structured=structured,
        samples=samples,
    )


def _greedy(chat: VisionChat, options: Mapping[str, Any]) -> bool:
    temperature = options.get("temperature", chat.options.temperature)
    return temperature is not None and temperature <= 0


def _pictures(
    dataset: str | os.PathLike[str] | Sequence[LabelledPicture],
) -> tuple[str, list[LabelledPicture]]:
    if isinstance(dataset, str | os.PathLike):
        return os.fspath(dataset), load_set(dataset)
    pictures = list(dataset)
    if not all(isinstance(p, LabelledPicture) for p in pictures):
        raise InvalidRequestError("dataset must be a set name, a path, or LabelledPicture items")
    return "pictures", pictures


def _kinds(pictures: Sequence[LabelledPicture]) -> list[str | None]:
    """The kinds of label every picture has, or ``[None]`` (the main label only)."""
    if not pictures:
        raise InvalidRequestError("the set has no pictures")
    common = [k for k in pictures[0].labels if all(k in p.labels for p in pictures)]
    return list(common) or [None]


def _questions(
    prompts: Sequence[str] | Mapping[str, str] | None,
    name: str,
    kinds: Sequence[str | None],
    *,
    wrapped: bool = False,
) -> list[tuple[str, str | None]]:
    """Each prompt with the kind of label it is scored against."""
    if prompts is None:
        prompts = default_prompts(name, wrapped=wrapped) if name in ("digits", "shapes") else ()
        if not prompts:
            raise InvalidRequestError(f"give at least one prompt to ask about {name}")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise InvalidRequestError("give at least one prompt")
    named = [k for k in kinds if k is not None]
    questions: list[tuple[str, str | None]] = []
    for prompt in dict.fromkeys(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError("each prompt must be a non-empty string")
        if isinstance(prompts, Mapping):
            kind: str | None = prompts[prompt]
            if kind not in named and not (kind in ("label", None) and not named):
                raise InvalidRequestError(
                    f"the pictures have no {kind!r} label to score {prompt!r} against; "
                    f"they have: {', '.join(named) or 'label'}"
                )
            kind = None if kind == "label" else kind
        else:
            kind = (_kind_of(prompt, named) or named[0]) if named else None
        questions.append((prompt, kind))
    return questions


def _task(task: Task, kind: str, classes: Sequence[str]) -> Literal["digit", "classes"]:
    all_digits = all(len(c) == 1 and c in _DIGITS for c in classes)
    if task == "digit" and not all_digits:
        raise InvalidRequestError(
            f"task='digit' needs single-digit labels; the {kind} labels include "
            f"{next(c for c in classes if not (len(c) == 1 and c in _DIGITS))!r}"
        )
    if task == "auto":
        return "digit" if all_digits else "classes"
    return task


def _with_defaults(chat: VisionChat, options: dict[str, Any]) -> dict[str, Any]:
    """Greedy and bounded unless the caller or the chat says otherwise."""
    out = dict(options)
    if chat.options.temperature is None:
        out.setdefault("temperature", 0.0)
    if chat.options.max_tokens is None:
        out.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    return out


def _field(plan: _Plan, kind: str | None) -> tuple[str, dict[str, Any]]:
    """The JSON key a structured answer about ``kind`` has, and its schema."""
    key = kind or "label"
    digit = plan.tasks[key] == "digit"
    if digit and kind is None:
        key = "digit"
    return key, task_schema(key, integer=digit)


def _ask(
    chat: VisionChat,
    plan: _Plan,
    picture: LabelledPicture,
    prepared: PreparedImage | ImageError,
    asked: tuple[_Question, int],
) -> Answer:
    """One question (and which sample of it) in a fresh conversation; an unreadable
    picture is an error answer."""
    question, sample = asked
    kind, wrapper = question.kind, question.wrapper
    label = picture.label_for(kind)
    answer = Answer(
        picture=picture.name,
        prompt=question.prompt,
        label=label,
        wrapper=None if wrapper is None else wrapper.name,
        sample=sample,
    )
    if isinstance(prepared, ImageError):
        answer.error = str(prepared)
        return answer
    options = dict(plan.options)
    if plan.samples > 1 and options.get("seed") is not None:
        options["seed"] = int(options["seed"]) + sample
    key, schema = _field(plan, kind)
    grammar: dict[str, Any] | None = schema if plan.structured else None
    if wrapper is not None and grammar is None and wrapper.grammar is not None:
        grammar = schema if wrapper.grammar == "schema" else {"type": "object"}
    started = time.monotonic()
    reply: Reply | None = None
    try:
        reply = _reply(chat, question, prepared, (schema, grammar), options)
        answer.reply = reply.text
    except SchemaError as exc:  # not JSON, or JSON outside the schema: no answer read
        answer.reply = exc.text
    answer.seconds = time.monotonic() - started
    if plan.structured:
        parsed = reply.parsed if reply is not None else None
        value = parsed.get(key) if isinstance(parsed, dict) else None
        answer.predicted = None if value is None or isinstance(value, bool) else str(value)
    elif plan.tasks[kind or "label"] == "digit":
        answer.predicted = first_digit(answer.reply or "")
    else:
        answer.predicted = match_class(answer.reply or "", plan.classes[kind or "label"])
    answer.correct = answer.predicted == label
    return answer


def _reply(
    chat: VisionChat,
    question: _Question,
    prepared: PreparedImage,
    schemas: tuple[dict[str, Any], dict[str, Any] | None],
    options: dict[str, Any],
) -> Reply:
    """The model's reply: asked plainly, or as the wrapper's client sends it (its system
    message, its text around the question) in one stateless turn, as ``serve`` gets it.
    ``schemas``: the one written into the wrapper's text, the one the grammar enforces."""
    schema, grammar = schemas
    if question.wrapper is None:
        chat.reset()
        return chat.ask(question.prompt, image=prepared, schema=grammar, **options)
    system, text = question.wrapper.render(question.prompt, schema)
    messages = [Message(role="system", content=system)] if system is not None else []
    messages.append(Message(role="user", content=text, images=(prepared,)))
    with chat.answer(messages, schema=grammar, **options) as stream:
        for _ in stream:
            pass
    return stream.reply


def _order(labels: Iterable[str]) -> list[str]:
    """Numbers in numeric order first, then names alphabetically."""
    return sorted(labels, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s.casefold()))


def _result(question: _Question, answers: Sequence[Answer], classes: Sequence[str]) -> PromptResult:
    confusion: dict[str, dict[str, int]] = {c: dict.fromkeys(classes, 0) for c in classes}
    for a in answers:
        column = ERROR if a.error else UNPARSED if a.predicted is None else a.predicted
        row = confusion.setdefault(a.label, dict.fromkeys(classes, 0))
        row[column] = row.get(column, 0) + 1
    for row in confusion.values():
        row.setdefault(UNPARSED, 0)
    asked = [a.seconds for a in answers if a.error is None]
    correct = sum(a.correct for a in answers)
    return PromptResult(
        prompt=question.prompt,
        kind=question.kind,
        wrapper=None if question.wrapper is None else question.wrapper.name,
        answers=len(answers),
        correct=correct,
        unparsed=sum(a.error is None and a.predicted is None for a in answers),
        errors=sum(a.error is not None for a in answers),
        accuracy=correct / len(answers) if answers else 0.0,
        seconds_total=sum(asked),
        seconds_mean=sum(asked) / len(asked) if asked else 0.0,
        confusion=confusion,
    )


def _report(
    chat: VisionChat, plan: _Plan, answers: Sequence[Sequence[Answer]], elapsed: float
) -> EvalReport:
    results = [
        _result(question, got, plan.classes[question.kind or "label"])
        for question, got in zip(plan.questions, answers, strict=True)
    ]
    every = [a for got in answers for a in got]
    asked = [a.seconds for a in every if a.error is None]
    return EvalReport(
        dataset=plan.name,
        model=chat.model,
        backend=chat.backend,
        task=plan.tasks,
        classes=plan.classes,
        pictures=len(plan.pictures),
        options=plan.options,
        structured=plan.structured,
        samples=plan.samples,
        wrappers=list(dict.fromkeys(q.wrapper.name for q in plan.questions if q.wrapper)),
        results=results,
        accuracy=sum(a.correct for a in every) / len(every) if every else 0.0,
        seconds_total=elapsed,
        seconds_per_answer=sum(asked) / len(asked) if asked else 0.0,
        seconds_per_picture=elapsed / len(plan.pictures),
        answers=every,
    )


class _Bar(RunProgress):
    """The run's progress over answers, with the running accuracy in its description."""

    def __init__(self, total: int, name: str, *, enabled: bool) -> None:
        super().__init__(name, total=total, unit="answer", enabled=enabled)
        self._name = name
        self._right = 0

    def advance(self, answer: Answer) -> None:
        if answer.error is None:
            self.answered(answer.seconds)
        else:
            self.failed()
        self._right += answer.correct
        self.describe(f"{self._name} (accuracy {self._right / self.completed:.3f})")
