"""Measure the demo model through llama.cpp (libmtmd, greedy) on the held-out test data.

Run from the repository root (needs llama-cpp-python and scikit-learn; not torch)::

    python -m training.evaluate_demo            # print the table
    python -m training.evaluate_demo --write    # also record it in demo.json
    python -m training.evaluate_demo --write --processes 3   # the same, sooner

Pictures go the way the library sends them: ``llava_local.images.prepare`` (RGB, at most
1344 px, PNG or JPEG), then libmtmd decodes and preprocesses them itself. Prompts are the
LLaVA-1.5 vicuna format the library renders. Digits are the test split (sklearn indices
1400-1796, never used in training); shapes are freshly drawn with a seed the trainer never
uses. An answer is right when it is exactly the trained sentence ("This digit is 7.");
for digits the first digit in the reply is also scored, as the Llava-mnist evaluation does.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from llava_local_dev.mtmd import MtmdRunner
from PIL import Image

from llava_local.images import prepare
from training import data, prompts, validation_prompts

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "llava_local" / "data" / "demo"
SHAPE_SEED = 20_251_122  # the shape "test set"; training draws from seed 0 and 1000


class DemoEngine:
    """llama.cpp + libmtmd on a GGUF pair (``llava_local_dev.mtmd``), decoding greedily."""

    def __init__(self, lm: Path, mmproj: Path, n_ctx: int = 1024, n_threads: int = 1) -> None:
        # llama.cpp's default CLIP attention, as the library's engine runs it
        self.runner = MtmdRunner(lm, mmproj, n_ctx=n_ctx, exact_clip=False, n_threads=n_threads)

    def close(self) -> None:
        """Free the mtmd context."""
        self.runner.close()

    def __enter__(self) -> DemoEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompt: str, images: Sequence[bytes], max_tokens: int = 32) -> str:
        """Greedy continuation of ``prompt`` from an empty context, up to EOS."""
        tokens = self.runner.greedy(prompt, images, max_tokens)
        return bytes(t for t in tokens if t < 256).decode(errors="replace")

    def ask(
        self,
        png: bytes,
        turns: Sequence[tuple[str, str | None]],
        system: str = data.DEFAULT_SYSTEM,
    ) -> str:
        """The model's answer to the last turn (whose answer is None)."""
        return self.generate(data.render_prompt(system, turns, self.runner.marker), [png])


# ------------------------------------------------------------------------ test sets


def prepared(image: Image.Image) -> bytes:
    """The bytes the library hands llama.cpp for ``image`` (llava_local.images.prepare)."""
    return prepare(image, max_side=1344, cache=None).data


@dataclass(frozen=True)
class Rendering:
    """How test digits are drawn."""

    size: int
    resample: Image.Resampling

    @property
    def name(self) -> str:
        return f"{self.size}px-{self.resample.name.lower()}"


CANONICAL = Rendering(64, Image.Resampling.NEAREST)
OTHER_RENDERINGS = (
    Rendering(8, Image.Resampling.NEAREST),
    Rendering(28, Image.Resampling.NEAREST),
    Rendering(28, Image.Resampling.BILINEAR),
    Rendering(224, Image.Resampling.BICUBIC),
    Rendering(512, Image.Resampling.NEAREST),
)


def digit_pictures(rendering: Rendering, indices: Sequence[int]) -> tuple[list[Any], list[int]]:
    """The digits at ``indices`` drawn with ``rendering`` (images) and their labels."""
    images, labels = data.load_digits_arrays()
    drawn = [data.render_digit(images[i], rendering.size, rendering.resample) for i in indices]
    return drawn, [int(labels[i]) for i in indices]


def digit_set(
    rendering: Rendering, indices: Sequence[int] = data.TEST_INDICES
) -> tuple[list[bytes], list[int]]:
    """The test split (indices 1400-1796), or other ``indices``, drawn with ``rendering``."""
    drawn, labels = digit_pictures(rendering, indices)
    return [prepared(picture) for picture in drawn], labels


def shape_set(n: int) -> tuple[list[bytes], list[data.ShapeSpec]]:
    """``n`` freshly drawn shapes (every shape/colour pair equally often)."""
    rng = np.random.default_rng(SHAPE_SEED)
    pairs = [data.ShapeSpec(s, c) for s in data.SHAPES for c in data.COLOUR_NAMES]
    specs = [pairs[i % len(pairs)] for i in range(n)]
    return [prepared(data.random_shape_picture(s, rng)) for s in specs], specs


FIRST_DIGIT = re.compile(r"\d")


def score_digits(
    engine: DemoEngine,
    pngs: Sequence[bytes],
    labels: Sequence[int],
    questions: Sequence[str],
    *,
    system: str = data.DEFAULT_SYSTEM,
) -> dict[str, Any]:
    """Exact-sentence and first-digit accuracy over every (picture, question) pair."""
    exact = first = total = 0
    start = time.perf_counter()
    for i, (png, label) in enumerate(zip(pngs, labels, strict=True)):
        # with several questions, each picture gets them in turn (one per picture)
        question = questions[i % len(questions)]
        reply = engine.ask(png, [(question, None)], system)
        exact += reply == f" {data.digit_answer(label)}"
        found = FIRST_DIGIT.search(reply)
        first += found is not None and found.group() == str(label)
        total += 1
    seconds = time.perf_counter() - start
    return {
        "n": total,
        "exact": round(exact / total, 4),
        "first_digit": round(first / total, 4),
        "ms_per_picture": round(1000 * seconds / total, 1),
    }


def score_shapes(
    engine: DemoEngine,
    pngs: Sequence[bytes],
    specs: Sequence[data.ShapeSpec],
    kind: str,
    questions: Sequence[str],
    *,
    follow_up: bool = False,
) -> dict[str, Any]:
    """Exact-sentence accuracy of shape/colour/both answers (optionally as a 2nd turn)."""
    right = 0
    for i, (png, spec) in enumerate(zip(pngs, specs, strict=True)):
        question = questions[i % len(questions)]
        if follow_up:
            first = engine.ask(png, [("What shape is this?", None)])
            turns: list[tuple[str, str | None]] = [
                ("What shape is this?", first.strip()),
                (question, None),
            ]
        else:
            turns = [(question, None)]
        reply = engine.ask(png, turns)
        right += reply == f" {data.shape_answer(kind, spec.shape, spec.colour)}"
    return {"n": len(pngs), "exact": round(right / len(pngs), 4)}


def evaluate(lm: Path, mmproj: Path, n_shapes: int = 300, quick: bool = False) -> dict[str, Any]:
    """Every figure recorded in demo.json's "evaluation"."""
    result: dict[str, Any] = {
        "engine": "llama-cpp-python "
        + __import__("llama_cpp").__version__
        + " (libmtmd), greedy, n_threads=1",
        "picture_path": "llava_local.images.prepare(max_side=1344) -> libmtmd decode -> "
        "clip.cpp preprocessing",
        "digits_test_split": "sklearn load_digits() indices 1400-1796 (397 pictures)",
        "canonical_rendering": "render_digit(): 8x8 values 0-16 as grey 255-v*255/16, "
        f"{CANONICAL.size} px square, nearest neighbour",
    }
    with DemoEngine(lm, mmproj) as engine:
        pngs, labels = digit_set(CANONICAL)
        if quick:
            pngs, labels = pngs[:100], labels[:100]
        result["digits_primary"] = score_digits(
            engine, pngs, labels, [data.PRIMARY_DIGIT_QUESTION]
        ) | {"question": data.PRIMARY_DIGIT_QUESTION}
        per_question = {
            q: score_digits(engine, pngs, labels, [q])["exact"]
            for q in data.DIGIT_QUESTIONS_HELD_OUT
        }
        result["digits_held_out_paraphrases"] = {
            "exact": round(float(np.mean(list(per_question.values()))), 4),
            "n": len(pngs) * len(per_question),
            "per_question": per_question,
        }
        result["digits_no_system_prompt"] = score_digits(
            engine, pngs, labels, [data.PRIMARY_DIGIT_QUESTION], system=""
        )
        if not quick:
            result["digits_other_renderings"] = {
                r.name: score_digits(engine, *digit_set(r), [data.PRIMARY_DIGIT_QUESTION])
                for r in OTHER_RENDERINGS
            }
        shape_pngs, specs = shape_set(60 if quick else n_shapes)
        result["shapes"] = {
            "set": f"{len(specs)} drawn shapes ({len(data.SHAPES)} shapes x "
            f"{len(data.COLOUR_NAMES)} colours), seed {SHAPE_SEED}",
            "shape": score_shapes(engine, shape_pngs, specs, "shape", ["What shape is this?"]),
            "colour": score_shapes(engine, shape_pngs, specs, "colour", ["What colour is it?"]),
            "both": score_shapes(engine, shape_pngs, specs, "both", ["What is in the picture?"]),
            "shape_held_out_paraphrases": score_shapes(
                engine, shape_pngs, specs, "shape", data.SHAPE_QUESTIONS_HELD_OUT
            ),
            "colour_held_out_paraphrases": score_shapes(
                engine, shape_pngs, specs, "colour", data.COLOUR_QUESTIONS_HELD_OUT
            ),
            "colour_follow_up": score_shapes(
                engine,
                shape_pngs,
                specs,
                "colour",
                [data.FOLLOW_UP_COLOUR_QUESTION],
                follow_up=True,
            ),
        }
    return result


def harness_figures(
    lm: Path, mmproj: Path, quick: bool = False, only: Sequence[str] | None = None
) -> dict[str, Any]:
    """The 2nd edition's targets, measured with ``llava-local eval``'s harness
    (``llava_local.apps.eval``) on the test split and the built-in shapes: structured
    answers (the task's schema, the grammar on, exact values), the engine's default
    sampling (5 samples a question, seeds 0-4), the held-out client wrappers, and
    instructor's JSON mode (a trained client, for the issue's failing case); and
    ``wrapped_validation``, the clients' prompts of ``validation_prompts`` on shapes
    drawn from another seed and on the validation digits (to choose recipes on; not a
    test figure). ``only``: the names of the runs to measure (all by default), to share
    them among processes."""
    from llava_local import VisionChat
    from llava_local.apps.datasets import COLOUR_PROMPT, DIGIT_PROMPT, SHAPE_PROMPT, load_set
    from llava_local.apps.eval import evaluate
    from llava_local.apps.wrappers import HELD_OUT, Wrapper

    digits = load_set("digits", limit=100 if quick else None)
    shapes = load_set("shapes", limit=60 if quick else None)
    shape_prompts = [SHAPE_PROMPT, COLOUR_PROMPT]
    # the trained message with {schema} where its schema goes (a schema of several lines
    # at column 0, as every task's is, so dedent changes nothing else)
    probe: dict[str, Any] = {"properties": {}}
    written = json.dumps(probe, indent=2, ensure_ascii=False)
    instructor = Wrapper(
        name="instructor-json",
        source="instructor Mode.JSON (trained): its system message, response_format json_object",
        system=prompts.instructor_message(probe).replace(written, "{schema}"),
        schema_style="python-indent",
        grammar="object",
    )
    runs: dict[str, dict[str, Any]] = {
        "structured": {"structured": True},
        "default_sampling": {"samples": 5, "temperature": None, "seed": 0},
        "wrapped_held_out": {"wrappers": list(HELD_OUT)},
        "instructor_json_mode": {"wrappers": [instructor]},
        "wrapped_validation": {"wrappers": list(validation_prompts.VALIDATION)},
    }
    out: dict[str, Any] = {
        "how": "llava_local.apps.eval.evaluate (llava-local eval), llama.cpp engine, "
        "n_threads=1; digits: the test split; shapes: the built-in 300 "
        f"(wrapped_validation: 300 from seed {validation_prompts.SHAPES_SEED} and the "
        f"digits {data.span(data.VALIDATION_INDICES)})"
    }
    with VisionChat.llama_cpp(model=lm, mmproj=mmproj, n_threads=1) as chat:
        for name, kwargs in runs.items():
            if only is not None and name not in only:
                continue
            figures: dict[str, Any] = {}
            if name == "wrapped_validation":  # shapes of their own, the validation digits
                seed, limit = validation_prompts.SHAPES_SEED, 60 if quick else None
                sets = [
                    ("digits", validation_digits(limit), [DIGIT_PROMPT]),
                    ("shapes", load_set("shapes", seed=seed, limit=limit), shape_prompts),
                ]
            else:
                sets = [("digits", digits, [DIGIT_PROMPT]), ("shapes", shapes, shape_prompts)]
            for label, pictures, prompts_ in sets:
                report = evaluate(chat, pictures, prompts_, name=label, progress=False, **kwargs)
                rows = {r.name: round(r.accuracy, 4) for r in report.results}
                figures[label] = {
                    "accuracy": round(report.accuracy, 4),
                    "answers": len(report.answers),
                    "unparsed": sum(r.unparsed for r in report.results),
                    "per_question": rows,
                }
                print(name, label, figures[label]["accuracy"], flush=True)
            figures["options"] = {k: v for k, v in kwargs.items() if k != "wrappers"}
            out[name] = figures
    return out


def validation_digits(limit: int | None = None) -> list[Any]:
    """The validation digits (1250-1399, canonical rendering) as ``llava-local eval``'s
    labelled pictures."""
    from llava_local.apps.datasets import LabelledPicture

    indices = data.VALIDATION_INDICES[:limit]
    drawn, labels = digit_pictures(CANONICAL, indices)
    return [
        LabelledPicture(name=f"digit-{i}", source=picture, label=str(label))
        for i, picture, label in zip(indices, drawn, labels, strict=True)
    ]


def choice_figures(lm: Path, mmproj: Path, held_out: range | None) -> dict[str, Any]:
    """The figures a recipe is chosen on, never the test split's: the validation prompts
    (``wrapped_validation``) and, for a pair trained with ``train_demo --hold-out``, its
    held-out training digits read as ``evaluate`` reads the test split."""
    result: dict[str, Any] = {}
    if held_out is not None:
        digits: dict[str, Any] = {"indices": data.span(held_out)}
        with DemoEngine(lm, mmproj) as engine:
            pngs, labels = digit_set(CANONICAL, held_out)
            question = [data.PRIMARY_DIGIT_QUESTION]
            digits["primary"] = score_digits(engine, pngs, labels, question)
            digits["no_system_prompt"] = score_digits(engine, pngs, labels, question, system="")
            per_question = {
                q: score_digits(engine, pngs, labels, [q])["exact"]
                for q in data.DIGIT_QUESTIONS_HELD_OUT
            }
            digits["held_out_paraphrases"] = round(float(np.mean(list(per_question.values()))), 4)
            digits["other_renderings"] = {
                r.name: score_digits(engine, *digit_set(r, held_out), question)["exact"]
                for r in OTHER_RENDERINGS
            }
        print("held-out digits", digits["primary"]["exact"], flush=True)
        result["held_out_digits"] = digits
    return result | harness_figures(lm, mmproj, only=["wrapped_validation"])


HARNESS_JOBS = (
    ("structured", "default_sampling", "instructor_json_mode", "wrapped_validation"),
    ("wrapped_held_out",),
)


def _figures(job: tuple[Path, Path, bool, tuple[str, ...] | None]) -> dict[str, Any]:
    """One process's share: the figures of evaluate() (``only`` None) or harness runs."""
    lm, mmproj, quick, only = job
    if only is None:
        return evaluate(lm, mmproj, quick=quick)
    return harness_figures(lm, mmproj, quick=quick, only=only)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate, print, and optionally record the figures in demo.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=DEMO_DIR, help="directory of the pair")
    parser.add_argument("--write", action="store_true", help="record in <dir>/demo.json")
    parser.add_argument("--quick", action="store_true", help="a subset, for a quick look")
    parser.add_argument(
        "--processes", type=int, default=1, help="measure in this many processes (1 thread each)"
    )
    parser.add_argument(
        "--choose", action="store_true",
        help="only the figures recipes are chosen on (the validation prompts; with "
        "--hold-out, the held-out training digits), into <dir>/choice.json",
    )  # fmt: skip
    parser.add_argument(
        "--hold-out", nargs="?", const=data.VALIDATION_INDICES, type=data.parse_span,
        metavar="START-END",
        help="with --choose: the digits the pair was trained without (train_demo --hold-out; "
        f"default {data.span(data.VALIDATION_INDICES)})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    lm, mmproj = args.dir / "demo-lm.gguf", args.dir / "demo-mmproj.gguf"
    if args.hold_out is not None and not args.choose:
        parser.error("--hold-out goes with --choose (the test split is never held out)")
    if args.choose:
        figures = choice_figures(lm, mmproj, args.hold_out)
        print(json.dumps(figures, indent=2))
        (args.dir / "choice.json").write_text(json.dumps(figures, indent=2) + "\n")
        return 0
    jobs = [(lm, mmproj, args.quick, only) for only in (None, *HARNESS_JOBS)]
    if args.processes > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.processes) as pool:
            parts = list(pool.map(_figures, jobs))
    else:
        parts = [_figures(job) for job in jobs]
    result, second = parts[0], {k: v for part in parts[1:] for k, v in part.items()}
    result["second_edition"] = second  # "how" first, then the runs in HARNESS_JOBS order
    print(json.dumps(result, indent=2))
    if args.write:
        meta_path = args.dir / "demo.json"
        meta = json.loads(meta_path.read_text())
        meta["evaluation"] = result
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
