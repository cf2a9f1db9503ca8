"""Train the demo model and export it as the GGUF pair shipped in llava_local/data/demo/.

Run from the repository root (needs torch and scikit-learn, see training/README.md)::

    python -m training.train_demo

It renders its own data (sklearn digits 0-1399 and Pillow shapes), trains a LLaVA-1.5
architecture model from scratch on the CPU, checks the PyTorch graph against the numpy
reference (``llava_local_dev.reference``, which tests/core/test_demo_parity.py checks against
llama.cpp) on the exported files, and writes ``demo-lm.gguf``, ``demo-mmproj.gguf`` and
``demo.json``. Then run
``python -m training.evaluate_demo --write`` to measure it through llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

# PyTorch's OpenMP threads spin while they wait; on a machine shared with other work two
# spinning threads made a step 25 times slower. Waiting passively changes no result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # after the OpenMP setting above
import torch.nn.functional as F
from llava_local_dev import gguf_writer as gw
from llava_local_dev import reference

from training import data, prompts
from training.model import LlamaBlock, TextShape, TinyLlava, VisionShape, scale_residual_outputs

REPO = Path(__file__).resolve().parents[1]

OUT_DIR = REPO / "llava_local" / "data" / "demo"

VISION = VisionShape(image_size=32, patch_size=8, n_embd=128, n_ff=512, n_head=4, n_layer=5)
TEXT = TextShape(n_vocab=gw.FIRST_EXTRA_ID, n_embd=128, n_layer=4, n_ff=352, n_head=4)
#: The probes' classes: the ten digits, then the shapes, then the colours.
PROBE_CLASSES = 10 + len(data.SHAPES) + len(data.COLOUR_NAMES)
CONTEXT_LENGTH = 2048  # Open WebUI's task templates with their chat history fit
# Declared in the GGUF (general.sampling.*), which llama.cpp's own tools take as their
# defaults: greedy, since the model reads pictures rather than writes. It is trained to be
# right at llama.cpp's and Ollama's default sampling as well.
RECOMMENDED_SAMPLING = {"temp": 0.0}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the training run (recorded in demo.json)."""

    seed: int = 0
    steps: int = 1600
    batch_size: int = 48
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 60
    weight_decay: float = 0.05
    pretrain_weight_decay: float = 0.3  # stage 1 (0.05: higher held-out loss, README)
    aux_weight: float = 0.5
    # a second probe, on the projector's class-token row (what the LM reads), stages 2-3:
    # run 33's projector made that row small and colourless (training/README.md)
    projected_probe: float = 0.5
    key_weight: float = 4.0  # loss weight of the digit / shape / colour words
    pretrain_steps: int = 5000  # vision tower alone on the auxiliary classes first (runs 33-36)
    pretrain_batch: int = 128
    pretrain_p_digit: float = 0.45
    pretrain_ema: float = 0.998  # stage 2 starts from the tower's moving average (README)
    vision_lr_scale: float = 0.1  # stage 2: the encoder learns slowly (see training/README.md)
    digit_renders: int = 40  # augmented pictures per training digit (16: 0.945 on fold 0-199)
    whole_blocks: float = 0.0  # share of crisp whole-factor renders (0.25: run 11, README)
    consistency: float = 1.0  # weight of the blocky-to-smooth feature loss (README)
    consistency_pairs: int = 8  # blocky/smooth pairs per training digit
    consistency_batch: int = 32  # pairs per step, both stages
    shape_renders: int = 24000
    p_digit: float = 0.55
    p_default_system: float = 0.7
    p_no_system: float = 0.15
    p_second_turn: float = 0.25
    # stage 2's conversations (the 2nd edition): batch kinds, then first-turn variants
    p_schema_batch: float = 0.3  # a JSON schema in the system prompt (instructor, ...)
    p_task_batch: float = 0.08  # Open WebUI's title / tags / follow-up tasks, no picture
    task_batch_size: int = 16  # their prompts are long and their answers few
    p_chat_system: float = 0.25  # chat batches: a client's system prompt
    p_wrapped: float = 0.15  # the question inside a client's text
    p_json_asked: float = 0.1  # the question asks for JSON
    p_json_forced: float = 0.1  # a grammar forces JSON on a plain question
    p_schema_asked: float = 0.05  # a JSON schema in the user's text, before or after
    # stage 3, the polish: a short pass at a low rate, from stage 2's weights, on what
    # run 19 missed (training/README.md)
    polish_steps: int = 600
    polish_lr: float = 6e-4
    polish_warmup: int = 20
    p_polish_schema: float = 0.3  # a schema in the system prompt
    p_polish_task: float = 0.04  # an Open WebUI task
    polish_key_weight: float = 2.0  # the JSON keys the model writes itself
    polish_vision_lr_scale: float = 0.1  # the tower's share of stage 3's rate (0: frozen)
    polish_probe_kd: float = 0.0  # the answer's digit learns the tower probe's distribution
    # run 26's stage 3 (``--asked-polish`` before run 36 shipped, training/README.md):
    polish_filler: float = 0.7  # openings and closings made of random words
    p_polish_composed: float = 0.5  # first questions inside an opening and closing
    p_polish_follow_composed: float = 0.3  # a follow-up question inside them too
    polish_decision_weight: float = 1.0  # the byte that says shape or colour ("It is a")
    polish_asked_weight: float = 2.0  # what was asked, known at every byte after the question
    # run 36: a worked example of another schema before the task's (share of the framed
    # schemas); run 34 answered digits with a colour key after LangChain's (README)
    polish_examples: float = 0.25
    threads: int = 2


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    """One training conversation: a picture (index into a pool) and its turns."""

    pool: str  # "digit", "shape", or "text" (no picture: an Open WebUI task)
    index: int
    turns: tuple[tuple[str, prompts.Reply], ...]
    # stage 3: what the first question asks (ASKED) and where in its text it ends
    asked: str = ""
    asked_end: int = -1


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def digit_turns(digit: int, rng: np.random.Generator, p_second: float) -> list[tuple[str, str]]:
    """Questions about a digit picture; every answer is ``This digit is N.``."""

    def question() -> str:
        r = rng.random()
        if r < 0.2:
            return data.PRIMARY_DIGIT_QUESTION
        if r < 0.75:
            return _pick(rng, data.DIGIT_QUESTIONS_TRAIN)
        return _pick(rng, data.GENERIC_QUESTIONS_TRAIN)

    answer = data.digit_answer(digit)
    turns = [(question(), answer)]
    if rng.random() < p_second:
        turns.append((question(), answer))
    return turns


def shape_turns(
    spec: data.ShapeSpec, rng: np.random.Generator, p_second: float
) -> list[tuple[str, str]]:
    """Questions about a shape picture; the answer depends on what is asked."""

    def turn() -> tuple[str, str]:
        r = rng.random()
        if r < 0.3:
            kind, q = "shape", _pick(rng, data.SHAPE_QUESTIONS_TRAIN)
        elif r < 0.6:
            kind, q = "colour", _pick(rng, data.COLOUR_QUESTIONS_TRAIN)
        else:
            kind = "both"
            q = _pick(rng, data.GENERIC_QUESTIONS_TRAIN + data.DESCRIBE_SHAPE_QUESTIONS_TRAIN)
        return q, data.shape_answer(kind, spec.shape, spec.colour)

    turns = [turn()]
    if rng.random() < p_second:
        if rng.random() < 0.5:
            q = data.FOLLOW_UP_COLOUR_QUESTION
            turns.append((q, data.shape_answer("colour", spec.shape, spec.colour)))
        else:
            turns.append(turn())
    return turns


LABEL_WORDS = re.compile(
    rb"\b(" + "|".join([*map(str, range(10)), *data.SHAPES, *data.COLOUR_NAMES]).encode() + rb")\b"
)


def encode_suffix(
    turns: Sequence[tuple[str, prompts.Reply]], key_weight: float = 1.0, *, picture: bool = True
) -> tuple[list[int], list[float]]:
    """Token ids after the picture (or after the shared prefix) and their loss weights.

    Question tokens weigh 0, answer tokens (and their ``</s>``) their segment's weight
    (1, or 0 for what a grammar wrote), and the bytes of the words that carry the
    picture's content (digit, shape, colour) in a learnt segment ``key_weight``.
    ``picture=False``: the first turn's text follows the prefix directly (no picture).
    """
    ids: list[int] = []
    weights: list[float] = []
    for i, (question, reply) in enumerate(turns):
        if i == 0:
            text = data.first_turn_after_image(question) if picture else f"{question} ASSISTANT:"
        else:
            text = data.later_turn(question)
        q_ids = list(text.encode())
        ids += q_ids
        weights += [0.0] * len(q_ids)
        for seg_text, seg_weight in reply.segments:
            raw = seg_text.encode()
            w = [seg_weight] * len(raw)
            if seg_weight:
                for match in LABEL_WORDS.finditer(raw):
                    w[match.start() : match.end()] = [key_weight] * (match.end() - match.start())
            ids += list(raw)
            weights += w
        ids.append(gw.EOS_ID)
        weights.append(1.0)
    return ids, weights


def prefix_ids(system: str) -> list[int]:
    """BOS, then the text before the picture."""
    return [gw.BOS_ID, *data.prompt_prefix(system).encode()]


# ----------------------------------------------------------------------------- pools


@dataclass
class Pools:
    """Pre-rendered pictures, already as clip.cpp's (S, S, 3) uint8 squares."""

    digit_pixels: np.ndarray
    digit_labels: np.ndarray
    shape_pixels: np.ndarray
    shape_specs: list[data.ShapeSpec]
    # the same digits drawn blocky and smooth (empty unless Recipe.consistency)
    pair_blocky: np.ndarray
    pair_smooth: np.ndarray
    pair_labels: np.ndarray
    pair_rng: np.random.Generator  # drew the pairs; goes on to pick each step's pairs


SHAPE_CHUNK = 1000  # shape pictures per rendering job


def random_shapes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[data.ShapeSpec]]:
    """``n`` random shapes as clip.cpp's squares, and what each shows."""
    specs = [
        data.ShapeSpec(_pick(rng, data.SHAPES), _pick(rng, data.COLOUR_NAMES)) for _ in range(n)
    ]
    size = VISION.image_size
    pixels = [data.clip_resize(data.random_shape_picture(s, rng), size) for s in specs]
    return np.stack(pixels), specs


def _render_job(recipe: Recipe, grids: np.ndarray, job: tuple[str, int, int]) -> tuple[Any, ...]:
    """One rendering job with its own seed, so the pools do not depend on the worker count.

    ``("digit", seed, _)``: one augmented picture of each 8x8 digit in ``grids``;
    ``("pair", seed, _)``: one blocky/smooth pair of each; ``("shape", seed, n)``: ``n``
    random shapes. Each picture is shrunk as it is drawn (a render can be 512 px).
    """
    kind, seed, n = job
    rng = np.random.default_rng(seed)
    size = VISION.image_size
    if kind == "shape":
        return random_shapes(n, rng)
    if kind == "digit":
        digits = [
            data.clip_resize(data.augment_digit(g, rng, whole_blocks=recipe.whole_blocks), size)
            for g in grids
        ]
        return (np.stack(digits),)
    blocky, smooth = [], []
    for g in grids:
        b, s = data.paired_renders(g, rng)
        blocky.append(data.clip_resize(b, size))
        smooth.append(data.clip_resize(s, size))
    return np.stack(blocky), np.stack(smooth)


def render_pools(recipe: Recipe, train_indices: Sequence[int], rng: np.random.Generator) -> Pools:
    """Augmented renderings of the training digits and random shapes.

    The pictures are drawn in jobs on ``recipe.threads`` processes (rendering is Python and
    Pillow, one core each), each job seeded from ``rng``.
    """
    images, labels = data.load_digits_arrays()
    indices = list(train_indices)
    n_shape_jobs = math.ceil(recipe.shape_renders / SHAPE_CHUNK)
    seeds = rng.integers(2**63, size=recipe.digit_renders + n_shape_jobs)
    jobs = [("digit", int(seed), 0) for seed in seeds[: recipe.digit_renders]]
    for j, seed in enumerate(seeds[recipe.digit_renders :]):
        n = min(SHAPE_CHUNK, recipe.shape_renders - j * SHAPE_CHUNK)
        jobs.append(("shape", int(seed), n))
    pair_rng = np.random.default_rng(recipe.seed + 7)  # its own; goes on to pick the pairs
    if recipe.consistency:
        pair_seeds = pair_rng.integers(2**63, size=recipe.consistency_pairs)
        jobs += [("pair", int(seed), 0) for seed in pair_seeds]
    with multiprocessing.get_context("fork").Pool(recipe.threads) as pool:
        results = pool.map(partial(_render_job, recipe, images[indices]), jobs, chunksize=1)
    digits = [r[0] for job, r in zip(jobs, results, strict=True) if job[0] == "digit"]
    shapes = [r for job, r in zip(jobs, results, strict=True) if job[0] == "shape"]
    pairs = [r for job, r in zip(jobs, results, strict=True) if job[0] == "pair"]
    size = VISION.image_size
    empty = np.zeros((0, size, size, 3), dtype=np.uint8)
    return Pools(
        np.concatenate(digits),
        np.tile(labels[indices], recipe.digit_renders),
        np.concatenate([px for px, _ in shapes]),
        [spec for _, specs in shapes for spec in specs],
        np.concatenate([b for b, _ in pairs]) if pairs else empty,
        np.concatenate([s for _, s in pairs]) if pairs else empty,
        np.tile(labels[indices], len(pairs)).astype(np.int64),
        pair_rng,
    )


# -------------------------------------------------------------------------- training


def make_batch(recipe: Recipe, pools: Pools, rng: np.random.Generator) -> tuple[str, list[Sample]]:
    """One system prompt and a batch of plain conversations using it (the first
    edition's; stage 1 draws its pictures with it, so that the tower is trained as
    before)."""
    r = rng.random()
    if r < recipe.p_default_system:
        system = data.DEFAULT_SYSTEM
    elif r < recipe.p_default_system + recipe.p_no_system:
        system = ""
    else:
        system = _pick(rng, data.OTHER_SYSTEMS)
    samples = []
    for _ in range(recipe.batch_size):
        if rng.random() < recipe.p_digit:
            i = int(rng.integers(len(pools.digit_labels)))
            turns = digit_turns(int(pools.digit_labels[i]), rng, recipe.p_second_turn)
            samples.append(Sample("digit", i, _sentences(turns)))
        else:
            i = int(rng.integers(len(pools.shape_specs)))
            turns = shape_turns(pools.shape_specs[i], rng, recipe.p_second_turn)
            samples.append(Sample("shape", i, _sentences(turns)))
    return system, samples


def _sentences(turns: Sequence[tuple[str, str]]) -> tuple[tuple[str, prompts.Reply], ...]:
    return tuple((q, prompts.sentence(a)) for q, a in turns)


# ------------------------------------------------- stage 2: conversations as clients send them

Turn2 = tuple[str, prompts.Reply]


@dataclass(frozen=True)
class Batch:
    """A batch of conversations after one shared prefix (``<s>``, the system prompt, and
    for a task without a picture the template's text before the chat history)."""

    prefix: str
    samples: list[Sample]
    kind: str  # "chat", "schema" or "task"


def _facts(pools: Pools, sample_pool: str, index: int) -> prompts.Facts:
    if sample_pool == "digit":
        return {"digit": int(pools.digit_labels[index])}
    spec = pools.shape_specs[index]
    return {"shape": spec.shape, "colour": spec.colour}


def _sentence(kind: str, facts: prompts.Facts) -> str:
    if kind == "digit":
        return data.digit_answer(int(facts["digit"]))
    return data.shape_answer(kind, facts["shape"], facts["colour"])


def digit_question(rng: np.random.Generator) -> str:
    """A question about a digit picture, drawn as the first edition draws them."""
    r = rng.random()
    if r < 0.2:
        return data.PRIMARY_DIGIT_QUESTION
    if r < 0.75:
        return str(_pick(rng, data.DIGIT_QUESTIONS_TRAIN))
    return str(_pick(rng, data.GENERIC_QUESTIONS_TRAIN))


def shape_question(rng: np.random.Generator, kind: str | None = None) -> tuple[str, str]:
    """A question about a shape picture and what it asks (shape, colour or both)."""
    if kind is None:
        r = rng.random()
        kind = "shape" if r < 0.3 else "colour" if r < 0.6 else "both"
    if kind == "shape":
        return str(_pick(rng, data.SHAPE_QUESTIONS_TRAIN)), kind
    if kind == "colour":
        return str(_pick(rng, data.COLOUR_QUESTIONS_TRAIN)), kind
    both = data.GENERIC_QUESTIONS_TRAIN + data.DESCRIBE_SHAPE_QUESTIONS_TRAIN
    return str(_pick(rng, both)), kind


def first_turn(
    recipe: Recipe, question: str, kind: str, facts: prompts.Facts, rng: np.random.Generator
) -> Turn2:
    """The first question as a client might send it, and the answer it should get:
    plain, wrapped in a client's text, asking for JSON, or forced into JSON by a grammar."""
    r = rng.random()
    sentence = _sentence(kind, facts)
    if r < recipe.p_wrapped:
        return prompts.wrap(question, rng), prompts.sentence(sentence)
    r -= recipe.p_wrapped
    if r < recipe.p_json_asked:
        if rng.random() < 0.35:
            fields = prompts.random_fields(kind, rng)[:1]
            ask = str(_pick(rng, prompts.JSON_ASKS_WITH_KEY)).format(key=fields[0].key)
            if kind == "both" and fields[0].kind != "shape":
                kind = "colour"
            fields = (fields[0],)
        else:
            fields, ask = prompts.default_fields(kind, question), str(_pick(rng, prompts.JSON_ASKS))
        reply = prompts.json_reply(
            fields, facts, forced=bool(rng.random() < 0.4), keys_known=True, types_known=True
        )
        return question + ask, reply
    r -= recipe.p_json_asked
    if r < recipe.p_schema_asked:
        fields = prompts.random_fields(kind, rng)
        schema = prompts.object_schema(fields, rng, kind)
        ask = prompts.schema_request(schema, rng)
        text = f"{question}\n\n{ask}" if rng.random() < 0.7 else f"{ask}\n\n{question}"
        forced = bool(rng.random() < 0.3)
        reply = prompts.json_reply(fields, facts, forced=forced, keys_known=True, types_known=True)
        return text, reply
    r -= recipe.p_schema_asked
    if r < recipe.p_json_forced:
        if rng.random() < 0.2:
            question = prompts.wrap(question, rng)
        roll = rng.random()
        if roll < 0.45:  # format=json: the model chooses the keys
            fields, known, inside = prompts.default_fields(kind, question), True, None
        elif roll < 0.9:  # a schema's grammar chose them
            fields, known, inside = prompts.random_fields(kind, rng), False, None
        else:  # a string field that holds the whole sentence
            key = str(_pick(rng, prompts.SENTENCE_KEYS))
            fields, known, inside = (prompts.Field(kind, key),), False, sentence
        reply = prompts.json_reply(
            fields, facts, forced=True, keys_known=known, types_known=known, sentence_text=inside
        )
        return question, reply
    return question, prompts.sentence(sentence)


def picture_conversation(
    recipe: Recipe, pools: Pools, rng: np.random.Generator, pool: str
) -> Sample:
    """A conversation about one picture: a first turn as a client sends it and, a
    quarter of the time, a plain follow-up."""
    if pool == "digit":
        index = int(rng.integers(len(pools.digit_labels)))
        question, kind = digit_question(rng), "digit"
    else:
        index = int(rng.integers(len(pools.shape_specs)))
        question, kind = shape_question(rng)
    facts = _facts(pools, pool, index)
    turns = [first_turn(recipe, question, kind, facts, rng)]
    if rng.random() < recipe.p_second_turn:
        if pool == "digit":
            follow, follow_kind = digit_question(rng), "digit"
        elif rng.random() < 0.5:
            follow, follow_kind = data.FOLLOW_UP_COLOUR_QUESTION, "colour"
        else:
            follow, follow_kind = shape_question(rng)
        turns.append((follow, prompts.sentence(_sentence(follow_kind, facts))))
    return Sample(pool, index, tuple(turns))


def _system(recipe: Recipe, rng: np.random.Generator) -> str:
    """The system prompt of a chat batch: LLaVA's, none, or another one."""
    r = rng.random()
    if r < recipe.p_chat_system:
        return str(_pick(rng, prompts.CHAT_SYSTEMS))
    r = rng.random()
    if r < recipe.p_default_system:
        return data.DEFAULT_SYSTEM
    if r < recipe.p_default_system + recipe.p_no_system:
        return ""
    return str(_pick(rng, data.OTHER_SYSTEMS))


def chat_batch(recipe: Recipe, pools: Pools, rng: np.random.Generator) -> Batch:
    """Conversations about pictures after one system prompt."""
    system = _system(recipe, rng)
    samples = [
        picture_conversation(
            recipe, pools, rng, "digit" if rng.random() < recipe.p_digit else "shape"
        )
        for _ in range(recipe.batch_size)
    ]
    return Batch(data.prompt_prefix(system), samples, "chat")


SCHEMA_KINDS = (("digit", 0.5), ("shape", 0.2), ("colour", 0.15), ("both", 0.15))
NEUTRAL_ASKS = (
    "Extract the information from the image.", "Describe the picture.", "Analyse this image.",
    "What is in the image?", "Extract.", "Read the picture.", "Fill in the fields.",
)  # fmt: skip


def schema_batch(recipe: Recipe, pools: Pools, rng: np.random.Generator) -> Batch:
    """A JSON schema in the system prompt (instructor's JSON modes, the Vercel AI SDK or
    a hand-written instruction) and pictures of what it asks about, answered in JSON."""
    r, kind = rng.random(), "both"
    for name, share in SCHEMA_KINDS:
        if r < share:
            kind = name
            break
        r -= share
    generic = rng.random() < 0.1  # "You MUST answer with JSON." with no schema
    if generic:
        fields = prompts.default_fields(kind)
        text, who = prompts.vercel_instruction(None), "vercel"
    else:
        fields = prompts.random_fields(kind, rng)
        text, who = prompts.schema_system(prompts.object_schema(fields, rng, kind), rng)
    if who != "generic" and rng.random() < 0.3:  # added to the system prompt already there
        text = f"{_system(recipe, rng) or data.DEFAULT_SYSTEM}\n\n{text}"
    md_json = who == "instructor" and rng.random() < 0.3
    pool = "digit" if kind == "digit" else "shape"
    samples = []
    for _ in range(recipe.batch_size):
        if pool == "digit":
            index = int(rng.integers(len(pools.digit_labels)))
            question = digit_question(rng)
        else:
            index = int(rng.integers(len(pools.shape_specs)))
            question, _ = shape_question(rng, kind)
        if rng.random() < 0.2:
            question = str(_pick(rng, NEUTRAL_ASKS))
        if rng.random() < 0.15:
            question = prompts.wrap(question, rng)
        facts = _facts(pools, pool, index)
        forced = not md_json and rng.random() < 0.4
        reply = prompts.json_reply(fields, facts, forced=forced, keys_known=True, types_known=True)
        if md_json:
            sep = "\n\n" if rng.random() < 0.5 else "\n"
            question, reply = question + sep + prompts.INSTRUCTOR_MD_JSON, prompts.fenced(reply)
        samples.append(Sample(pool, index, ((question, reply),)))
    return Batch(data.prompt_prefix(text), samples, "schema")


def task_batch(recipe: Recipe, pools: Pools, rng: np.random.Generator) -> Batch:
    """One of Open WebUI's background tasks (title, tags, follow-ups) about chats with
    the demo, with no picture: the template's text before the history is the prefix."""
    task = str(_pick(rng, tuple(prompts.OPEN_WEBUI_TASKS)))
    head, keep, tail = prompts.task_parts(prompts.OPEN_WEBUI_TASKS[task])
    r = rng.random()
    system = "" if r < 0.3 else data.DEFAULT_SYSTEM if r < 0.85 else _system(recipe, rng)
    samples = []
    for _ in range(recipe.task_batch_size):
        pool = "digit" if rng.random() < recipe.p_digit else "shape"
        if pool == "digit":
            index = int(rng.integers(len(pools.digit_labels)))
        else:
            index = int(rng.integers(len(pools.shape_specs)))
        facts = _facts(pools, pool, index)
        chat, asked = [], []
        for _ in range(1 + int(rng.integers(3))):
            if pool == "digit":
                question, kind = digit_question(rng), "digit"
            else:
                question, kind = shape_question(rng)
            chat.append((question, _sentence(kind, facts)))
            asked.append(kind)
        text = prompts.history_lines(chat, keep) + tail
        reply = prompts.sentence(prompts.task_answer(task, asked))
        samples.append(Sample("text", -1, ((text, reply),)))
    return Batch(data.prompt_prefix(system) + head, samples, "task")


def conversation_batch(recipe: Recipe, pools: Pools, rng: np.random.Generator) -> Batch:
    """Stage 2's batches: chats, JSON schemas in the system prompt, Open WebUI tasks."""
    r = rng.random()
    if r < recipe.p_task_batch:
        return task_batch(recipe, pools, rng)
    if r < recipe.p_task_batch + recipe.p_schema_batch:
        return schema_batch(recipe, pools, rng)
    return chat_batch(recipe, pools, rng)


# ------------------------------------------------------------------- stage 3: polish


def polish_question(
    rng: np.random.Generator, pool: str, kind: str | None = None
) -> tuple[str, str]:
    """Stage 3's questions: stage 2's, and shape or colour questions that name the other
    word as well ("Which colour is this shape?")."""
    if pool == "digit":
        return digit_question(rng), "digit"
    if kind is None:
        r = rng.random()
        kind = "shape" if r < 0.35 else "colour" if r < 0.75 else "both"
    if kind == "shape" and rng.random() < 0.25:
        return str(_pick(rng, data.SHAPE_QUESTIONS_NAMING_COLOUR)), kind
    if kind == "colour" and rng.random() < 0.3:
        return str(_pick(rng, data.COLOUR_QUESTIONS_NAMING_SHAPE)), kind
    return shape_question(rng, kind)


def task_fields(kind: str, question: str, rng: np.random.Generator) -> tuple[prompts.Field, ...]:
    """A schema's keys: the task's own name most of the time (``class Shape(BaseModel):
    shape: str``), else any of the names a request may use."""
    if rng.random() < 0.6:
        return prompts.default_fields(kind, question)
    return prompts.random_fields(kind, rng)


def polish_answer(recipe: Recipe, kind: str, facts: prompts.Facts) -> prompts.Reply:
    """The sentence answer, its first byte after "It is" weighted as the label words: it
    decides between a shape ("It is a star.") and a colour ("It is red."), the choice
    run 20 got wrong after closings it had not seen."""
    text = _sentence(kind, facts)
    weight = recipe.polish_decision_weight
    if weight == 1.0 or kind not in ("shape", "both") or not text.startswith("It is a "):
        return prompts.sentence(text)
    return prompts.Reply(((" It is ", 1.0), ("a", weight), (text[7:], 1.0)))


def polish_first_turn(
    recipe: Recipe, question: str, kind: str, facts: prompts.Facts, rng: np.random.Generator
) -> Turn2:
    """A first question in a composed wrapper, with a schema in the user's text, as
    stage 2 draws it, or plain."""
    r = rng.random()
    if r < recipe.p_polish_composed:
        if rng.random() < 0.7:
            text = prompts.compose(question, rng, recipe.polish_filler)
        else:
            text = prompts.wrap(question, rng)
        return text, polish_answer(recipe, kind, facts)
    r -= recipe.p_polish_composed - 0.25  # the shares after it as before
    if r < 0.4:
        fields = task_fields(kind, question, rng)
        ask = prompts.framed_schema(prompts.object_schema(fields, rng, kind), rng)
        if recipe.polish_examples and rng.random() < recipe.polish_examples:
            ask = prompts.with_example(ask, rng)
        text = f"{question}\n\n{ask}" if rng.random() < 0.6 else f"{ask}\n\n{question}"
        reply = prompts.json_reply(
            fields,
            facts,
            forced=bool(rng.random() < 0.3),
            keys_known=True,
            types_known=True,
            key_learnt=recipe.polish_key_weight,
        )
        return text, reply
    if r < 0.55:
        return first_turn(recipe, question, kind, facts, rng)
    return question, polish_answer(recipe, kind, facts)


def polish_chat_batch(recipe: Recipe, pools: Pools, rng: np.random.Generator) -> Batch:
    """Conversations after one system prompt, their first questions as stage 3 draws them."""
    system = _system(recipe, rng)
    samples = []
    for _ in range(recipe.batch_size):
        pool = "digit" if rng.random() < recipe.p_digit else "shape"
        index = int(rng.integers(len(pools.digit_labels if pool == "digit" else pools.shape_specs)))
        facts = _facts(pools, pool, index)
        question, kind = polish_question(rng, pool)
        turns = [polish_first_turn(recipe, question, kind, facts, rng)]
        found = turns[0][0].find(question)
        end = found + len(question) if found >= 0 else -1
        if rng.random() < recipe.p_second_turn:
            follow, follow_kind = polish_question(rng, pool)
            if recipe.p_polish_follow_composed and rng.random() < recipe.p_polish_follow_composed:
                follow = prompts.compose(follow, rng, recipe.polish_filler)
            turns.append((follow, polish_answer(recipe, follow_kind, facts)))
        samples.append(Sample(pool, index, tuple(turns), asked=kind, asked_end=end))
    return Batch(data.prompt_prefix(system), samples, "chat")


POLISH_SCHEMA_KINDS = (("digit", 0.35), ("shape", 0.25), ("colour", 0.2), ("both", 0.2))


def polish_schema_batch(recipe: Recipe, pools: Pools, rng: np.random.Generator) -> Batch:
    """A schema in the system prompt, as stage 2's batches, with the task's own keys more
    often, stage 3's frames and wrappers, and more shapes and colours."""
    r, kind = rng.random(), "both"
    for name, share in POLISH_SCHEMA_KINDS:
        if r < share:
            kind = name
            break
        r -= share
    fields = task_fields(kind, "", rng)
    schema = prompts.object_schema(fields, rng, kind)
    if rng.random() < 0.4:
        text, who = prompts.schema_system(schema, rng)
    else:
        text, who = prompts.framed_schema(schema, rng), "framed"
        if recipe.polish_examples and rng.random() < recipe.polish_examples:
            text = prompts.with_example(text, rng)
    if rng.random() < 0.25:
        text = f"{_system(recipe, rng) or data.DEFAULT_SYSTEM}\n\n{text}"
    md_json = who == "instructor" and rng.random() < 0.3
    pool = "digit" if kind == "digit" else "shape"
    samples = []
    for _ in range(recipe.batch_size):
        index = int(rng.integers(len(pools.digit_labels if pool == "digit" else pools.shape_specs)))
        question, _ = polish_question(rng, pool, None if pool == "digit" else kind)
        if rng.random() < 0.15:
            question = str(_pick(rng, NEUTRAL_ASKS))
        if rng.random() < 0.25:
            question = prompts.compose(question, rng, recipe.polish_filler)
        facts = _facts(pools, pool, index)
        reply = prompts.json_reply(
            fields,
            facts,
            forced=not md_json and bool(rng.random() < 0.3),
            keys_known=True,
            types_known=True,
            key_learnt=recipe.polish_key_weight,
        )
        if md_json:
            question, reply = question + "\n\n" + prompts.INSTRUCTOR_MD_JSON, prompts.fenced(reply)
        samples.append(Sample(pool, index, ((question, reply),)))
    return Batch(data.prompt_prefix(text), samples, "schema")


def polish_batch(recipe: Recipe, pools: Pools, rng: np.random.Generator) -> Batch:
    """Stage 3's batches: chats (most), schemas in the system prompt, a few tasks."""
    r = rng.random()
    if r < recipe.p_polish_task:
        return task_batch(recipe, pools, rng)
    if r < recipe.p_polish_task + recipe.p_polish_schema:
        return polish_schema_batch(recipe, pools, rng)
    return polish_chat_batch(recipe, pools, rng)


def _pixels(pools: Pools, samples: Sequence[Sample]) -> torch.Tensor:
    pixels = np.stack(
        [
            pools.digit_pixels[s.index] if s.pool == "digit" else pools.shape_pixels[s.index]
            for s in samples
        ]
    )
    return torch.from_numpy(data.normalize(pixels))


def aux_loss(
    model: TinyLlava, pools: Pools, samples: Sequence[Sample], features: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the auxiliary probe (digit, or shape and colour) and its accuracy."""
    return class_loss(model.aux_logits(features), pools, samples)


def class_loss(
    aux: torch.Tensor, pools: Pools, samples: Sequence[Sample]
) -> tuple[torch.Tensor, float]:
    """Cross-entropy of a probe's logits (digit, or shape and colour) and its accuracy."""
    losses, hits = [], []
    digit_rows = [i for i, s in enumerate(samples) if s.pool == "digit"]
    shape_rows = [i for i, s in enumerate(samples) if s.pool == "shape"]
    if digit_rows:
        target = torch.tensor([int(pools.digit_labels[samples[i].index]) for i in digit_rows])
        logits = aux[digit_rows, :10]
        losses.append(F.cross_entropy(logits, target, label_smoothing=0.1))
        hits.append(logits.argmax(-1) == target)
    if shape_rows:
        specs = [pools.shape_specs[samples[i].index] for i in shape_rows]
        shape_t = torch.tensor([data.SHAPES.index(s.shape) for s in specs])
        colour_t = torch.tensor([data.COLOUR_NAMES.index(s.colour) for s in specs])
        losses.append(F.cross_entropy(aux[shape_rows, 10:15], shape_t))
        losses.append(F.cross_entropy(aux[shape_rows, 15:21], colour_t))
        hits.append(aux[shape_rows, 10:15].argmax(-1) == shape_t)
        hits.append(aux[shape_rows, 15:21].argmax(-1) == colour_t)
    return torch.stack(losses).mean(), torch.cat(hits).float().mean().item()


def consistency_loss(model: TinyLlava, pools: Pools, recipe: Recipe) -> tuple[torch.Tensor, float]:
    """Blocky pictures pulled to the tower features of the same digit drawn smooth.

    The tower reads smooth renders of held-out digits better than the task's blocky ones
    (fold 0-199: 0.97 and 0.93); the smooth side is the fixed target. Plus the probe's
    cross-entropy on the blocky side. Returns the loss and the feature term alone.
    """
    j = pools.pair_rng.integers(len(pools.pair_labels), size=recipe.consistency_batch)
    blocky = model.vision.features(torch.from_numpy(data.normalize(pools.pair_blocky[j])))
    with torch.no_grad():
        smooth = model.vision.features(torch.from_numpy(data.normalize(pools.pair_smooth[j])))
    feature = ((blocky - smooth) ** 2).mean() / (smooth.var(dim=(0, 1)).mean() + 1e-6)
    target = torch.from_numpy(pools.pair_labels[j])
    probe = F.cross_entropy(model.aux_logits(blocky)[:, :10], target, label_smoothing=0.1)
    return recipe.consistency * feature + 0.5 * probe, feature.item()


def batch_loss(
    model: TinyLlava,
    pools: Pools,
    batch: Batch,
    *,
    aux_weight: float,
    key_weight: float,
    group_rows: int = 16,
    asked_head: torch.nn.Linear | None = None,
    asked_weight: float = 0.0,
    probe_kd: float = 0.0,
    projected_head: torch.nn.Linear | None = None,
    projected_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted answer-token cross-entropy plus the auxiliary picture-class loss, and
    with ``asked_head`` (stage 3) the asked-kind loss (:func:`asked_targets`); with
    ``probe_kd`` (stage 3) the digit an answer writes is also taught the tower probe's
    distribution over the ten digits (:func:`_probe_kd`); with ``projected_head`` a probe
    on the projector's class-token row learns the picture's classes too.

    The LM reads the conversations in groups of ``group_rows`` sorted by length, each
    padded to its own longest: one padded batch spent 40% of its positions on padding
    (a quarter of the conversations have a second turn). A batch without pictures (an
    Open WebUI task) skips the tower and the probe.
    """
    samples = batch.samples
    pictures = samples[0].pool != "text"
    if pictures:
        features = model.vision.features(_pixels(pools, samples))
        image = model.vision.project(features)
    else:
        image = torch.zeros(len(samples), 0, model.lm.s.n_embd)
    n_img = image.shape[1]
    prefix = torch.tensor([gw.BOS_ID, *batch.prefix.encode()])
    encoded = [encode_suffix(s.turns, key_weight, picture=pictures) for s in samples]
    order = sorted(range(len(samples)), key=lambda row: len(encoded[row][0]))
    ce_sum = torch.zeros(())
    weight_sum = 0.0
    hit_parts: list[torch.Tensor] = []
    key_parts: list[torch.Tensor] = []
    asked_parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    kd_parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    teacher = (
        F.softmax(model.aux_logits(features)[:, :10].detach(), dim=-1)
        if probe_kd and pictures
        else None
    )
    for start in range(0, len(order), group_rows):
        rows = order[start : start + group_rows]
        ids, weight = _padded([encoded[row] for row in rows])
        suffix = torch.cat([image[rows], model.lm.token_embd(ids)], dim=1)
        hidden = model.lm.hidden_shared_prefix(prefix, suffix)
        logits = model.lm.output(hidden)
        if asked_head is not None and n_img:
            at, kinds = asked_targets([samples[row] for row in rows], n_img)
            if len(kinds):
                asked_parts.append((asked_head(hidden[at[:, 0], at[:, 1]]), kinds))
        if n_img:
            pred = logits[:, n_img - 1 : n_img - 1 + ids.shape[1]]
        else:  # the first suffix byte is question text (weight 0): nothing predicts it
            pred, ids, weight = logits[:, :-1], ids[:, 1:], weight[:, 1:]
        if teacher is not None:
            kd_parts += _digit_positions(
                pred, ids, weight, samples=samples, rows=rows, teacher=teacher
            )
        ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids.reshape(-1), reduction="none")
        ce_sum = ce_sum + (ce * weight.reshape(-1)).sum()
        weight_sum += float(weight.sum())
        hits = pred.argmax(-1) == ids
        hit_parts.append(hits[weight > 0])
        key_parts.append(hits[weight > 1])
    lm_loss = ce_sum / weight_sum
    key_hits = torch.cat(key_parts)
    stats = {
        "lm": lm_loss.item(),
        "token_acc": torch.cat(hit_parts).float().mean().item(),
        "key_acc": key_hits.float().mean().item() if len(key_hits) else 1.0,
    }
    if asked_parts:
        lm_loss = lm_loss + asked_weight * _asked_loss(asked_parts, stats)
    if kd_parts:
        lm_loss = lm_loss + probe_kd * _probe_kd(kd_parts, stats)
    if not pictures:
        return lm_loss, stats
    picture_loss = _picture_loss(
        model, pools, batch, features, image, stats=stats,
        aux_weight=aux_weight, head=projected_head, head_weight=projected_weight,
    )  # fmt: skip
    return lm_loss + picture_loss, stats


def _picture_loss(
    model: TinyLlava,
    pools: Pools,
    batch: Batch,
    features: torch.Tensor,
    image: torch.Tensor,
    *,
    stats: dict[str, float],
    aux_weight: float,
    head: torch.nn.Linear | None,
    head_weight: float,
) -> torch.Tensor:
    """The tower probe's loss, and with ``head`` the probe's on the projector's class-token
    row; their accuracies into ``stats``."""
    probe_loss, probe_acc = aux_loss(model, pools, batch.samples, features)
    stats |= {"aux": probe_loss.item(), "probe_acc": probe_acc}
    loss = aux_weight * probe_loss
    if head is not None:
        projected, stats["projected_acc"] = class_loss(head(image[:, -1]), pools, batch.samples)
        loss = loss + head_weight * projected
    return loss


DIGIT_BYTES = slice(ord("0"), ord("9") + 1)  # byte tokens 48-57, the probe's classes 0-9


def _padded(encoded: Sequence[tuple[list[int], list[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's token ids and loss weights, padded with zeros to its longest."""
    t_max = max(len(tok) for tok, _ in encoded)
    ids = torch.zeros(len(encoded), t_max, dtype=torch.long)
    weight = torch.zeros(len(encoded), t_max)
    for i, (tok, w) in enumerate(encoded):
        ids[i, : len(tok)] = torch.tensor(tok)
        weight[i, : len(w)] = torch.tensor(w)
    return ids, weight


def _digit_positions(
    pred: torch.Tensor,
    ids: torch.Tensor,
    weight: torch.Tensor,
    *,
    samples: Sequence[Sample],
    rows: Sequence[int],
    teacher: torch.Tensor,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The LM's logits over the ten digit bytes where a digit picture's answer (the
    group's row i is sample ``rows[i]``) writes its digit (a weighted key byte), each with
    the probe's distribution for that picture."""
    parts = []
    for i, row in enumerate(rows):
        if samples[row].pool != "digit":
            continue
        at = (
            (ids[i] >= DIGIT_BYTES.start) & (ids[i] < DIGIT_BYTES.stop) & (weight[i] > 1)
        ).nonzero()
        if len(at):
            student = pred[i, at[:, 0], DIGIT_BYTES]
            parts.append((student, teacher[row].expand(len(at), -1)))
    return parts


def _probe_kd(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]], stats: dict[str, float]
) -> torch.Tensor:
    """KL(probe || LM) over the ten digits, averaged over the answers' digit bytes (its
    value into ``stats``): on held-out digits the probe reads what the LM's answer misses
    (training/README.md)."""
    student = torch.cat([s for s, _ in parts])
    target = torch.cat([t for _, t in parts])
    kd = F.kl_div(F.log_softmax(student, dim=-1), target, reduction="batchmean")
    stats["kd"] = kd.item()
    return kd


ASKED = ("digit", "shape", "colour", "both")


def _asked_loss(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]], stats: dict[str, float]
) -> torch.Tensor:
    """The asked-kind cross-entropy over a batch's groups (its value and accuracy into
    ``stats``)."""
    logits = torch.cat([a for a, _ in parts])
    kinds = torch.cat([k for _, k in parts])
    loss = F.cross_entropy(logits, kinds)
    stats |= {"asked": loss.item(), "asked_acc": (logits.argmax(-1) == kinds).float().mean().item()}
    return loss


def asked_targets(samples: Sequence[Sample], n_img: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) pairs and their asked kind (an index into :data:`ASKED`): every
    byte from the question's last one to the ``:`` of ``ASSISTANT:``, opening and
    closing included. A closing the model has not seen then cannot change what it knows
    was asked: it must already know at the question's end, which comes before it."""
    at: list[tuple[int, int]] = []
    kinds: list[int] = []
    for row, sample in enumerate(samples):
        if sample.asked_end < 0:
            continue
        text = sample.turns[0][0]
        first = len(data.first_turn_after_image(text).encode())
        end = 1 + len(text[: sample.asked_end].encode())  # after the "\n" before it
        for j in range(end - 1, first):
            at.append((row, n_img + j))
            kinds.append(ASKED.index(sample.asked))
    return torch.tensor(at, dtype=torch.long).reshape(-1, 2), torch.tensor(kinds)


def lr_at(step: int, steps: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to ``min_lr``."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, steps - recipe.warmup)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * progress))


def _optimizer(
    params: Sequence[tuple[str, torch.nn.Parameter]],
    recipe: Recipe,
    *,
    weight_decay: float,
    slow: float = 1.0,
) -> Any:
    """AdamW; the vision encoder (not the projector) runs at ``slow`` times the rate."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in params:
        is_slow = name.startswith("vision.") and not name.startswith(("vision.mm0", "vision.mm2"))
        decays = p.ndim >= 2 and "embd" not in name
        groups.setdefault((is_slow, decays), []).append(p)
    return torch.optim.AdamW(
        [
            {
                "params": ps,
                "weight_decay": weight_decay if decays else 0.0,
                "lr_scale": slow if is_slow else 1.0,
            }
            for (is_slow, decays), ps in groups.items()
        ],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )


def _set_lr(opt: Any, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_scale"]


def _log(step: int, running: dict[str, float], stats: dict[str, float], start: float) -> None:
    for k, v in stats.items():
        running[k] = 0.9 * running.get(k, v) + 0.1 * v
    shown = " ".join(f"{k} {v:.3f}" for k, v in running.items())
    print(f"step {step:5d}  {shown}  {time.monotonic() - start:6.0f}s", flush=True)


EMA_START = 200  # stage-1 steps before the average starts (until then it copies)


def _update_average(
    average: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float
) -> None:
    """``average = decay * average + (1 - decay) * params``, in place (0: a copy).

    The average of the last few hundred stage-1 steps gives held-out digits a lower loss
    than the last step's weights (fold 0-199, every rendering, four runs; the accuracy
    moved within noise, training/README.md)."""
    with torch.no_grad():
        for a, p in zip(average, params, strict=True):
            a.mul_(decay).add_(p, alpha=1.0 - decay)


def new_model() -> TinyLlava:
    """The demo's model, untrained, its probe on :data:`PROBE_CLASSES` (the one place that
    builds it: training and the checkpoint readers call this)."""
    return TinyLlava(VISION, TEXT, n_aux=PROBE_CLASSES)


def train(
    recipe: Recipe,
    pools: Pools,
    rng: np.random.Generator,
    *,
    log_every: int = 50,
    stage1: Path | None = None,
    stage2: Path | None = None,
) -> TinyLlava:
    """Stage 1: the vision tower alone on the probe classes. Stage 2: everything together.

    ``stage1``: a file for the state after stage 1 (the weights and the random
    generators' states). If it exists, stage 1 is read from it instead of trained, and
    the run goes on exactly as if it had been trained here; else it is written there.
    Stage 1 depends only on the seed, the digits and the stage-1 fields of the recipe,
    which the file records and checks. ``stage2``: the same for the weights after stage 2
    (stage 3 draws from its own generators, so the weights are all it needs).
    Stage 3: a short pass at a low rate on stage 3's conversations.
    """
    model = new_model()
    scale_residual_outputs(model)
    head = projected_head(recipe)
    if stage2 is not None and stage2.exists():
        _load_stage2(stage2, recipe, model, pools, head)
        return _stage3(recipe, pools, model, log_every, head)
    if stage1 is not None and stage1.exists():
        _load_stage1(stage1, recipe, model, pools, rng)
    else:
        _stage1(recipe, pools, rng, model, log_every)
        if stage1 is not None:
            _save_stage1(stage1, recipe, model, pools, rng)
    _stage2(recipe, pools, rng, model, log_every, head=head)
    if stage2 is not None:
        state = {"key": _stage2_key(recipe, pools), "model": model.state_dict()}
        if head is not None:
            state["projected_head"] = head.state_dict()
        torch.save(state, stage2)
        print(f"stage 2 saved to {stage2}", flush=True)
    return _stage3(recipe, pools, model, log_every, head)


def projected_head(recipe: Recipe) -> torch.nn.Linear | None:
    """The probe on the projector's class-token row (not exported), or None when off.

    Its first weights come from a generator of their own: the run's other draws stay as
    they were without it."""
    if not recipe.projected_probe:
        return None
    with torch.random.fork_rng(devices=[]):
        head = torch.nn.Linear(TEXT.n_embd, PROBE_CLASSES)
    gen = torch.Generator().manual_seed(recipe.seed + 2)
    with torch.no_grad():
        bound = 1 / math.sqrt(TEXT.n_embd)
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.zero_()
    return head


STAGE1_FIELDS = (
    "seed", "lr", "min_lr", "warmup", "pretrain_weight_decay", "pretrain_steps",
    "pretrain_batch", "pretrain_p_digit", "pretrain_ema", "digit_renders", "whole_blocks",
    "consistency", "consistency_pairs", "consistency_batch", "shape_renders", "p_digit",
    "p_default_system", "p_no_system", "threads",
)  # fmt: skip


def _stage1_key(recipe: Recipe, pools: Pools) -> dict[str, Any]:
    fields = {name: getattr(recipe, name) for name in STAGE1_FIELDS}
    return fields | {"digits": len(pools.digit_labels), "torch": str(torch.__version__)}


def _save_stage1(
    path: Path, recipe: Recipe, model: TinyLlava, pools: Pools, rng: np.random.Generator
) -> None:
    state = {
        "key": _stage1_key(recipe, pools),
        "model": model.state_dict(),
        "rng": rng.bit_generator.state,
        "pair_rng": pools.pair_rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, path)
    print(f"stage 1 saved to {path}", flush=True)


def load_state(path: Path) -> Any:
    """A file this script saved (a stage file, ``--checkpoint``'s weights), read as data
    only: tensors, numbers, strings and the torch version earlier stage files keep."""
    from torch.torch_version import TorchVersion

    with torch.serialization.safe_globals([TorchVersion]):
        return torch.load(path, weights_only=True)


def _load_stage1(
    path: Path, recipe: Recipe, model: TinyLlava, pools: Pools, rng: np.random.Generator
) -> None:
    state = load_state(path)
    if state["key"] != _stage1_key(recipe, pools):
        raise SystemExit(
            f"{path} holds stage 1 of another run ({state['key']}); this run's is "
            f"{_stage1_key(recipe, pools)}: delete it or give another --stage1 file"
        )
    model.load_state_dict(state["model"])
    rng.bit_generator.state = state["rng"]
    pools.pair_rng.bit_generator.state = state["pair_rng"]
    torch.set_rng_state(state["torch_rng"])
    print(f"stage 1 read from {path}", flush=True)


def _stage2_key(recipe: Recipe, pools: Pools) -> dict[str, Any]:
    stage2 = {k: v for k, v in asdict(recipe).items() if "polish" not in k}
    return _stage1_key(recipe, pools) | stage2


def _load_stage2(
    path: Path, recipe: Recipe, model: TinyLlava, pools: Pools, head: torch.nn.Linear | None
) -> None:
    state = load_state(path)
    if state["key"] != _stage2_key(recipe, pools):
        raise SystemExit(
            f"{path} holds stage 2 of another run: delete it or give another --stage2 file"
        )
    model.load_state_dict(state["model"])
    if head is not None:
        head.load_state_dict(state["projected_head"])
    print(f"stage 2 read from {path}", flush=True)


def _stage1(
    recipe: Recipe, pools: Pools, rng: np.random.Generator, model: TinyLlava, log_every: int
) -> None:
    """The vision tower and the probe alone, then the tower's moving average."""
    start = time.monotonic()

    vision_params = [
        (n, p) for n, p in model.named_parameters() if n.startswith(("vision.", "aux_head."))
    ]
    opt = _optimizer(vision_params, recipe, weight_decay=recipe.pretrain_weight_decay)
    running: dict[str, float] = {}
    pretrain = replace(
        recipe,
        batch_size=recipe.pretrain_batch,
        p_digit=recipe.pretrain_p_digit,
        p_second_turn=0.0,
    )
    tower = [p for _, p in vision_params]
    average = [p.detach().clone() for p in tower] if recipe.pretrain_ema else []
    for step in range(recipe.pretrain_steps):
        _set_lr(opt, lr_at(step, recipe.pretrain_steps, recipe))
        _, samples = make_batch(pretrain, pools, rng)
        loss, acc = aux_loss(model, pools, samples, model.vision.features(_pixels(pools, samples)))
        stats = {"aux": loss.item(), "probe_acc": acc}
        if recipe.consistency:
            extra, stats["consistency"] = consistency_loss(model, pools, recipe)
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if recipe.pretrain_ema:
            decay = recipe.pretrain_ema if step > EMA_START else 0.0
            _update_average(average, tower, decay)
        running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in stats.items()}
        if step % log_every == 0 or step == recipe.pretrain_steps - 1:
            _log(step, running, {}, start)
    if recipe.pretrain_ema:
        _update_average(tower, average, 0.0)  # stage 2 starts from the average


def _stage2(
    recipe: Recipe,
    pools: Pools,
    rng: np.random.Generator,
    model: TinyLlava,
    log_every: int,
    *,
    head: torch.nn.Linear | None,
) -> None:
    """Everything together on the conversations, the tower at a fraction of the rate."""
    _conversations(
        recipe, recipe, recipe.steps, lambda: conversation_batch(recipe, pools, rng),
        pools=pools, model=model, log_every=log_every, projected_head=head,
    )  # fmt: skip


def _stage3(
    recipe: Recipe, pools: Pools, model: TinyLlava, log_every: int, head: torch.nn.Linear | None
) -> TinyLlava:
    """The polish: everything at a tenth of stage 2's rate, decaying to a hundredth, on
    stage 3's conversations, from generators of its own (seeded from the run's seed)."""
    if not recipe.polish_steps:
        return model
    rng = np.random.default_rng([recipe.seed, 3])
    pools.pair_rng = np.random.default_rng([recipe.seed, 3, 1])
    torch.manual_seed(recipe.seed + 3)
    schedule = replace(
        recipe, lr=recipe.polish_lr, min_lr=recipe.polish_lr / 10, warmup=recipe.polish_warmup
    )
    asked_head = (
        torch.nn.Linear(model.lm.s.n_embd, len(ASKED)) if recipe.polish_asked_weight else None
    )
    _conversations(
        recipe, schedule, recipe.polish_steps, lambda: polish_batch(recipe, pools, rng),
        pools=pools, model=model, log_every=log_every, asked_head=asked_head,
        slow=recipe.polish_vision_lr_scale, probe_kd=recipe.polish_probe_kd,
        projected_head=head,
    )  # fmt: skip
    return model


def _conversations(
    recipe: Recipe,
    schedule: Recipe,
    steps: int,
    draw: Callable[[], Batch],
    *,
    pools: Pools,
    model: TinyLlava,
    log_every: int,
    asked_head: torch.nn.Linear | None = None,
    slow: float | None = None,
    probe_kd: float = 0.0,
    projected_head: torch.nn.Linear | None = None,
) -> None:
    """``steps`` steps on the batches ``draw`` makes, with a fresh AdamW whose rate
    follows ``schedule`` (its lr, min_lr and warmup), the tower at ``slow`` times it
    (default ``vision_lr_scale``);
    ``asked_head`` (stage 3) and ``projected_head`` (not exported) learn beside them."""
    start = time.monotonic()
    head = [
        (f"{name}.{n}", p)
        for name, module in (("asked_head", asked_head), ("projected_head", projected_head))
        if module is not None
        for n, p in module.named_parameters()
    ]
    opt = _optimizer(
        list(model.named_parameters()) + head,
        schedule,
        weight_decay=recipe.weight_decay,
        slow=recipe.vision_lr_scale if slow is None else slow,
    )
    running: dict[str, float] = {}
    for step in range(steps):
        _set_lr(opt, lr_at(step, steps, schedule))
        batch = draw()
        loss, stats = batch_loss(
            model, pools, batch, aux_weight=recipe.aux_weight, key_weight=recipe.key_weight,
            asked_head=asked_head, asked_weight=recipe.polish_asked_weight, probe_kd=probe_kd,
            projected_head=projected_head, projected_weight=recipe.projected_probe,
        )  # fmt: skip
        if recipe.consistency:
            extra, stats["consistency"] = consistency_loss(model, pools, recipe)
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            _log(step, running, stats, start)
        else:
            running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in stats.items()}


# ------------------------------------------------------------------------ validation


def greedy_answers(
    model: TinyLlava,
    pixels: np.ndarray,
    question: str,
    *,
    system: str = data.DEFAULT_SYSTEM,
    answer_prefix: str = "",
    max_tokens: int = 24,
    batch: int = 128,
) -> list[str]:
    """Greedy first-turn answers in PyTorch (no KV cache; fine for short answers).

    ``answer_prefix`` is written after ``ASSISTANT:`` first, as a grammar would force it
    (``{"digit": ``); the answer returned goes on from there."""
    with torch.no_grad():
        answers: list[str] = []
        prefix = torch.tensor(prefix_ids(system))
        start_text = data.first_turn_after_image(question) + answer_prefix
        for start in range(0, len(pixels), batch):
            x = torch.from_numpy(data.normalize(pixels[start : start + batch]))
            image = model.vision(x)
            ids = torch.tensor([list(start_text.encode())] * len(x))
            done = torch.zeros(len(x), dtype=torch.bool)
            out: list[list[int]] = [[] for _ in range(len(x))]
            for _ in range(max_tokens):
                suffix = torch.cat([image, model.lm.token_embd(ids)], dim=1)
                nxt = model.lm.forward_shared_prefix(prefix, suffix)[:, -1].argmax(-1)
                for row in range(len(x)):
                    if not done[row]:
                        if int(nxt[row]) == gw.EOS_ID:
                            done[row] = True
                        else:
                            out[row].append(int(nxt[row]))
                if bool(done.all()):
                    break
                ids = torch.cat([ids, nxt[:, None]], dim=1)
            answers += [bytes(b for b in o if b < 256).decode(errors="replace") for o in out]
    return answers


def validation_pictures(indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Validation digits as the evaluator renders them (64 px, nearest)."""
    images, labels = data.load_digits_arrays()
    pixels = [
        data.clip_resize(data.png_round_trip(data.render_digit(images[i])), VISION.image_size)
        for i in indices
    ]
    return np.stack(pixels), labels[list(indices)]


def validate(model: TinyLlava, seed: int, digit_indices: Sequence[int]) -> dict[str, float]:
    """Exact-answer accuracy (PyTorch, greedy) on ``digit_indices`` and on fresh shapes."""
    model.eval()
    pixels, labels = validation_pictures(digit_indices)
    result: dict[str, float] = {}
    for name, question in (
        ("digits_primary", data.PRIMARY_DIGIT_QUESTION),
        ("digits_held_out_0", data.DIGIT_QUESTIONS_HELD_OUT[0]),
    ):
        got = greedy_answers(model, pixels, question)
        want = [f" {data.digit_answer(int(d))}" for d in labels]
        result[name] = float(np.mean([g == w for g, w in zip(got, want, strict=True)]))
    # JSON: instructor's JSON mode (the schema in the system prompt) and a grammar's
    # forced start (what llama.cpp's grammar writes before the value)
    digit_schema = {
        "properties": {"digit": {"title": "Digit", "type": "integer"}},
        "required": ["digit"],
        "title": "Digit",
        "type": "object",
    }
    got = greedy_answers(
        model, pixels, data.PRIMARY_DIGIT_QUESTION, system=prompts.instructor_message(digit_schema)
    )
    result["digits_instructor_json"] = float(
        np.mean([g == f' {{"digit": {int(d)}}}' for g, d in zip(got, labels, strict=True)])
    )
    got = greedy_answers(model, pixels, data.PRIMARY_DIGIT_QUESTION, answer_prefix='{"digit": ')
    result["digits_forced_json"] = float(
        np.mean([g == f"{int(d)}}}" for g, d in zip(got, labels, strict=True)])
    )
    with torch.no_grad():
        probe = model.aux_logits(model.vision.features(torch.from_numpy(data.normalize(pixels))))
    result["digits_probe"] = float((probe[:, :10].argmax(-1).numpy() == labels).mean())
    shape_px, specs = random_shapes(300, np.random.default_rng(seed + 1000))
    asked = [("shape", "shape", "What shape is this?"), ("colour", "colour", "What colour is it?")]
    # run 10 answered "What shape can you see here?" with the colour: watch the worst one
    # run 12 answered "What colour does the shape have?" with the shape
    held_out = {"shape": data.SHAPE_QUESTIONS_HELD_OUT, "colour": data.COLOUR_QUESTIONS_HELD_OUT}
    for kind, questions in held_out.items():
        asked += [(f"{kind}_held_out_{i}", kind, q) for i, q in enumerate(questions)]
    for name, kind, question in asked:
        got = greedy_answers(model, shape_px, question)
        want = [f" {data.shape_answer(kind, s.shape, s.colour)}" for s in specs]
        result[f"shapes_{name}"] = float(np.mean([g == w for g, w in zip(got, want, strict=True)]))
    for kind in held_out:
        held = [v for k, v in result.items() if k.startswith(f"shapes_{kind}_held_out_")]
        result[f"shapes_{kind}_held_out_worst"] = min(held)
    with torch.no_grad():
        probe = model.aux_logits(model.vision.features(torch.from_numpy(data.normalize(shape_px))))
    shape_t = np.array([data.SHAPES.index(s.shape) for s in specs])
    result["shapes_probe"] = float((probe[:, 10:15].argmax(-1).numpy() == shape_t).mean())
    model.train()
    return result


# ---------------------------------------------------------------------------- export


def text_config() -> gw.TextConfig:
    """The writer's config for the LM."""
    return gw.TextConfig(
        n_embd=TEXT.n_embd,
        n_layer=TEXT.n_layer,
        n_ff=TEXT.n_ff,
        n_head=TEXT.n_head,
        context_length=CONTEXT_LENGTH,
        rms_eps=TEXT.rms_eps,
        rope_theta=TEXT.rope_theta,
    )


def vision_config() -> gw.VisionConfig:
    """The writer's config for the projector."""
    return gw.VisionConfig(
        image_size=VISION.image_size,
        patch_size=VISION.patch_size,
        n_embd=VISION.n_embd,
        n_ff=VISION.n_ff,
        n_head=VISION.n_head,
        n_layer=VISION.n_layer,
        projection_dim=TEXT.n_embd,
        eps=VISION.eps,
        image_mean=data.IMAGE_MEAN,
        image_std=data.IMAGE_STD,
        use_gelu=False,
    )


def export_weights(model: TinyLlava) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """GGUF tensor names to float32 arrays in PyTorch layout: (LM, projector)."""

    def arr(t: torch.Tensor) -> np.ndarray:
        return np.array(t.detach().to(torch.float32).numpy(), dtype=np.float32)

    lm = model.lm
    text = {
        "token_embd.weight": arr(lm.token_embd.weight),
        "output_norm.weight": arr(lm.output_norm.weight),
        "output.weight": arr(lm.output.weight),
    }
    for i, block in enumerate(lm.blocks):
        assert isinstance(block, LlamaBlock)
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            text[f"blk.{i}.{name}.weight"] = arr(getattr(block, name).weight)
        text[f"blk.{i}.ffn_down.weight"] = arr(block.ffn_down.weight)
        text[f"blk.{i}.attn_norm.weight"] = arr(block.attn_norm.weight)
        text[f"blk.{i}.ffn_norm.weight"] = arr(block.ffn_norm.weight)

    v = model.vision
    vision = {
        "v.patch_embd.weight": arr(v.patch_embd.weight),
        "v.class_embd": arr(v.class_embd),
        "v.position_embd.weight": arr(v.position_embd),
        "v.pre_ln.weight": arr(v.pre_ln.weight),
        "v.pre_ln.bias": arr(v.pre_ln.bias),
        "mm.0.weight": arr(v.mm0.weight),
        "mm.0.bias": arr(v.mm0.bias),
        "mm.2.weight": arr(v.mm2.weight),
        "mm.2.bias": arr(v.mm2.bias),
    }
    for i, block in enumerate(v.blocks):
        for name in ("ln1", "attn_q", "attn_k", "attn_v", "attn_out", "ln2", "ffn_up", "ffn_down"):
            layer = getattr(block, name)
            vision[f"v.blk.{i}.{name}.weight"] = arr(layer.weight)
            vision[f"v.blk.{i}.{name}.bias"] = arr(layer.bias)
    return text, vision


def check_against_numpy(model: TinyLlava, lm_path: Path, mm_path: Path) -> dict[str, float]:
    """PyTorch vs the numpy reference (llava_local_dev.reference) on the written files."""
    model.eval()
    images, _ = data.load_digits_arrays()
    picture = data.render_digit(images[3], size=VISION.image_size)
    pixels = data.clip_preprocess(picture, VISION.image_size)
    with torch.no_grad():
        torch_img = model.vision(torch.from_numpy(pixels)[None])[0]
        prompt = prefix_ids(data.DEFAULT_SYSTEM)
        suffix_ids = list(data.first_turn_after_image(data.PRIMARY_DIGIT_QUESTION).encode())
        suffix = torch.cat([torch_img[None], model.lm.token_embd(torch.tensor([suffix_ids]))], 1)
        torch_logits = model.lm.forward_shared_prefix(torch.tensor(prompt), suffix)[0, -1]
    pair = reference.read_pair(lm_path, mm_path)
    np_img = reference.image_embeddings(pair, pixels)
    np_logits = reference.next_logits(pair, prompt, np_img, suffix_ids)
    model.train()
    img_diff = float(np.abs(np_img - torch_img.numpy()).max())
    logit_diff = float(np.abs(np_logits - torch_logits.numpy()).max())
    return {
        "embeddings_max_abs_diff": img_diff,
        "embeddings_max_abs": float(np.abs(np_img).max()),
        "logits_max_abs_diff": logit_diff,
        "logits_max_abs": float(np.abs(np_logits).max()),
        "same_next_token": bool(np_logits.argmax() == int(torch_logits.argmax())),
    }


# ------------------------------------------------------------------------------ main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory")
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument(
        "--pretrain-steps", type=int, default=Recipe.pretrain_steps,
        help="stage 1's steps (the tower alone on the probe classes)",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=("f32", "f16"), default="f32")
    parser.add_argument("--checkpoint", type=Path, help="also save the PyTorch weights here")
    parser.add_argument(
        "--stage1", type=Path, metavar="FILE",
        help="read stage 1 from FILE if it exists (same seed, digits and stage-1 recipe), "
        "else write it there: runs that change only stage 2 skip the tower's training",
    )  # fmt: skip
    parser.add_argument(
        "--stage2", type=Path, metavar="FILE",
        help="the same for the weights after stage 2: runs that change only stage 3 "
        "start from them",
    )  # fmt: skip
    parser.add_argument(
        "--polish-steps", type=int, help=f"stage 3's steps (default {Recipe.polish_steps})"
    )
    parser.add_argument(
        "--polish-lr", type=float, help=f"stage 3's peak rate (default {Recipe.polish_lr})"
    )
    parser.add_argument(
        "--polish-vision-scale", type=float, metavar="F",
        help=f"the tower's share of stage 3's rate (default {Recipe.polish_vision_lr_scale}; "
        "0 freezes it)",
    )  # fmt: skip
    parser.add_argument(
        "--polish-probe-kd", type=float, metavar="W",
        help="stage 3: weight of the loss that teaches an answer's digit the tower probe's "
        "distribution (default 0, off)",
    )  # fmt: skip
    parser.add_argument(
        "--projected-probe", type=float, default=Recipe.projected_probe, metavar="W",
        help="stages 2-3: weight of a probe on the projector's class-token row, which "
        "keeps the picture's classes in what the LM reads (0 turns it off)",
    )  # fmt: skip
    parser.add_argument(
        "--polish-examples", type=float, metavar="P",
        help="stage 3: share of the framed schemas that come after a worked example of "
        f"another schema (default {Recipe.polish_examples}; 0 turns them off)",
    )  # fmt: skip
    parser.add_argument(
        "--consistency", type=float, default=Recipe.consistency,
        help="weight of the blocky-to-smooth feature loss (0 turns it off)",
    )  # fmt: skip
    parser.add_argument(
        "--ema", type=float, default=Recipe.pretrain_ema,
        help="decay of the stage-1 weight average stage 2 starts from (0 turns it off)",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny pools, for a quick try")
    parser.add_argument(
        "--hold-out", nargs="?", const=data.VALIDATION_INDICES, type=data.parse_span,
        metavar="START-END",
        help=f"keep these training digits (default {data.span(data.VALIDATION_INDICES)}) out of "
        "training and validate on them (for choosing a recipe; the shipped model trains on "
        "all of 0-1399)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Train, export, check and describe the demo model."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.ema < 1.0:
        parser.error(f"--ema {args.ema}: give a decay from 0 (off) up to, not including, 1")
    recipe = Recipe(
        seed=args.seed,
        steps=args.steps,
        pretrain_steps=args.pretrain_steps,
        consistency=args.consistency,
        pretrain_ema=args.ema,
        projected_probe=args.projected_probe,
    )
    given = {
        "polish_steps": args.polish_steps,
        "polish_lr": args.polish_lr,
        "polish_probe_kd": args.polish_probe_kd,
        "polish_vision_lr_scale": args.polish_vision_scale,
        "polish_examples": args.polish_examples,
    }  # the --polish-* options given
    recipe = replace(recipe, **{k: v for k, v in given.items() if v is not None})
    if args.smoke:
        recipe = replace(
            recipe,
            digit_renders=1,
            shape_renders=500,
            pretrain_steps=20,
            steps=20,
            polish_steps=min(recipe.polish_steps, 10),
            consistency_pairs=1,
        )

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    held_out: range = args.hold_out or range(0)
    train_indices = [i for i in data.TRAIN_INDICES if i not in held_out]

    t0 = time.monotonic()
    pools = render_pools(recipe, train_indices, rng)
    t_render = time.monotonic() - t0
    print(f"rendered {len(pools.digit_labels)} digit and {len(pools.shape_specs)} shape "
          f"pictures in {t_render:.0f}s", flush=True)  # fmt: skip
    model = train(recipe, pools, rng, stage1=args.stage1, stage2=args.stage2)
    t_train = time.monotonic() - t0 - t_render
    if args.checkpoint:
        torch.save(model.state_dict(), args.checkpoint)
    # without a hold-out this re-reads training digits: a check of the export, not a score
    val = validate(model, recipe.seed, held_out or data.VALIDATION_INDICES)
    print("validation (PyTorch, greedy):", json.dumps(val), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    lm_path, mm_path = args.out / "demo-lm.gguf", args.out / "demo-mmproj.gguf"
    text_w, vision_w = export_weights(model)
    gw.write_language_model(
        lm_path,
        text_config(),
        weights=text_w,
        dtype=args.dtype,
        name="llava-local demo",
        sampling=RECOMMENDED_SAMPLING,
    )
    gw.write_projector(
        mm_path, vision_config(), weights=vision_w, dtype=args.dtype,
        name="llava-local demo (projector)",
    )  # fmt: skip
    check = check_against_numpy(model, lm_path, mm_path)
    print("torch vs numpy on the written files:", json.dumps(check), flush=True)
    # numpy copies ggml's f16 im2col and f16 GELU tables, PyTorch does not: ~1e-3 relative
    if (
        check["embeddings_max_abs_diff"] > 1e-2 * check["embeddings_max_abs"]
        or check["logits_max_abs_diff"] > 1e-2 * check["logits_max_abs"]
        or not check["same_next_token"]
    ):
        raise SystemExit("the exported files do not reproduce the PyTorch model")

    meta = {
        "name": "llava-local demo",
        "architecture": "LLaVA-1.5: CLIP ViT (quick GELU) + MLP projector + llama LM",
        "files": {"lm": lm_path.name, "mmproj": mm_path.name, "dtype": args.dtype},
        "vision": asdict(VISION) | {"blocks_run": VISION.n_layer - 1},
        "text": asdict(TEXT) | {"context_length": CONTEXT_LENGTH},
        "image_tokens": VISION.n_patches,
        "parameters": sum(p.numel() for n, p in model.named_parameters() if "aux" not in n),
        "vocabulary": "byte-level: ids 0-255 are bytes, 256 <s> (BOS), 257 </s> (EOS)",
        "chat_format": "vicuna (LLaVA-1.5): '{system} USER: <image>\\n{question} ASSISTANT:'"
        " -> ' {answer}</s>'; follow-ups 'USER: {question} ASSISTANT:' after '</s>'",
        "default_system": data.DEFAULT_SYSTEM,
        "recommended_sampling": {
            f"general.sampling.{k}": v for k, v in RECOMMENDED_SAMPLING.items()
        },
        "other_systems_trained": ["", *data.OTHER_SYSTEMS, *prompts.CHAT_SYSTEMS],
        "client_prompts_trained": {
            "wrappers": list(prompts.WRAPPERS),
            "openings (stage 3)": list(prompts.OPENINGS),
            "closings (stage 3)": list(prompts.CLOSINGS),
            "schema_frames (stage 3)": list(prompts.SCHEMA_FRAMES),
            "json_asks": [*prompts.JSON_ASKS, *prompts.JSON_ASKS_WITH_KEY],
            "schema_asks": list(prompts.SCHEMA_ASKS),
            "schema_systems": [
                "instructor (modes JSON, JSON_SCHEMA, MD_JSON)",
                "Vercel AI SDK injectJsonInstruction",
                *prompts.SCHEMA_SYSTEMS,
            ],
            "grammar_only": "instructor TOOLS, LangChain with_structured_output, llm --schema, "
            "Ollama format: the grammar writes '{' and the keys",
            "open_webui_tasks": list(prompts.OPEN_WEBUI_TASKS),
        },
        "preprocessing": "clip.cpp llava-1.5: aspect-preserving Pillow-bicubic resize to "
        f"{VISION.image_size} px, centred on rgb(122,116,104), CLIP mean/std",
        "training": {
            "recipe": asdict(recipe),
            "render_seconds": round(t_render, 1),
            "train_seconds": round(t_train, 1),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "digits": {
                "source": "sklearn.datasets.load_digits()",
                "train_indices": f"{train_indices[0]}-{train_indices[-1]}"
                if not args.hold_out
                else f"{data.span(data.TRAIN_INDICES)} except {data.span(held_out)}",
                "validation_indices": f"{data.span(held_out)}, held out"
                if args.hold_out
                else "none held out (recipe chosen on held-out runs)",
                "test_indices": "1400-1796 (never used in training or choices)",
                "rendering": "dark ink on light paper, 8-512 px, any Pillow filter, shifts, "
                "zoom, small rotations, contrast, some JPEG",
            },
            "shapes": {"shapes": list(data.SHAPES), "colours": data.COLOURS},
        },
        "questions": {
            "primary_digit_question": data.PRIMARY_DIGIT_QUESTION,
            "digit_train": list(data.DIGIT_QUESTIONS_TRAIN),
            "generic_train": list(data.GENERIC_QUESTIONS_TRAIN),
            "shape_train": list(data.SHAPE_QUESTIONS_TRAIN),
            "colour_train": list(data.COLOUR_QUESTIONS_TRAIN),
            "shape_naming_colour_train (stage 3)": list(data.SHAPE_QUESTIONS_NAMING_COLOUR),
            "colour_naming_shape_train (stage 3)": list(data.COLOUR_QUESTIONS_NAMING_SHAPE),
            "describe_train": list(data.DESCRIBE_SHAPE_QUESTIONS_TRAIN),
            "digit_held_out": list(data.DIGIT_QUESTIONS_HELD_OUT),
            "shape_held_out": list(data.SHAPE_QUESTIONS_HELD_OUT),
            "colour_held_out": list(data.COLOUR_QUESTIONS_HELD_OUT),
        },
        "answers": {
            "digit": "This digit is N.",
            "shape": "It is a SHAPE.",
            "colour": "It is COLOUR.",
            "both": "It is a COLOUR SHAPE.",
            "json": '{"digit": 7}, {"shape": "star", "colour": "red"}: the keys a schema or '
            "the question names, else digit, shape, colour (color if asked so)",
            "open_webui_tasks": '{"title": ...}, {"tags": [...]}, {"follow_ups": [...]}',
        },
        "validation_pytorch" if args.hold_out else "training_digits_pytorch": val,
        "export_check_torch_vs_numpy": check,
    }
    meta_path = args.out / "demo.json"
    old = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if "evaluation" in old and old.get("files") == meta["files"]:
        meta["evaluation_previous_build"] = old["evaluation"]
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {lm_path}, {mm_path}, {meta_path} in {time.monotonic() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
