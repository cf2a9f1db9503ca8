"""Read a ``--hold-out`` model's held-out digits drawn as training draws its digits.

The 150 canonical held-out pictures (``evaluate_demo --choose --hold-out``) tell two
recipes apart only by a lot. Here each held-out digit is drawn ``--renders`` times by the
training renderer (warps, sizes, filters, JPEG; seeds of its own, never a training
picture's) and read in PyTorch by the LM ("What digit is this?", greedy, the exact
sentence) and by the tower's probe, the linear head on the class token's row::

    python -m training.held_out_digits RUN/model.pt [OTHER/model.pt ...] [--renders 20]

A checkpoint is ``train_demo --checkpoint`` (or a ``--stage2`` file). Needs torch.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from training import data
from training import train_demo as td
from training.model import TinyLlava

SEED = 123_456  # the renders' own seeds come from here (training's come from the run's seed)


def held_out_renders(indices: range, renders: int) -> tuple[np.ndarray, np.ndarray]:
    """``renders`` augmented pictures of each digit in ``indices``, and their labels."""
    images, labels = data.load_digits_arrays()
    grids = images[list(indices)]
    seeds = np.random.default_rng(SEED).integers(2**63, size=renders)
    pixels = [td._render_job(td.Recipe(), grids, ("digit", int(s), 0))[0] for s in seeds]
    return np.concatenate(pixels), np.tile(labels[list(indices)], renders)


def read(model: TinyLlava, pixels: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The LM's and the probe's accuracy, and the pictures only one of them reads."""
    model.eval()
    got = td.greedy_answers(model, pixels, data.PRIMARY_DIGIT_QUESTION)
    lm = np.array([g == f" {data.digit_answer(int(d))}" for g, d in zip(got, labels, strict=True)])
    with torch.no_grad():
        aux = model.aux_logits(model.vision.features(torch.from_numpy(data.normalize(pixels))))
    probe = aux[:, :10].argmax(-1).numpy() == labels
    return {
        "n": len(labels),
        "lm": round(float(lm.mean()), 4),
        "probe": round(float(probe.mean()), 4),
        "lm_wrong_probe_right": int((~lm & probe).sum()),
        "probe_wrong_lm_right": int((lm & ~probe).sum()),
    }


def load(path: Path) -> TinyLlava:
    """A checkpoint's model (``--checkpoint`` weights, or a ``--stage2`` file's)."""
    state = td.load_state(path)
    model = td.new_model()
    model.load_state_dict(state.get("model", state))
    return model


def main(argv: Sequence[str] | None = None) -> int:
    """Print one line of figures per checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--renders", type=int, default=20, help="pictures of each digit")
    parser.add_argument(
        "--hold-out", type=data.parse_span, default=data.VALIDATION_INDICES, metavar="START-END",
        help="the digits the models were trained without "
        f"(default {data.span(data.VALIDATION_INDICES)})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(td.Recipe.threads)
    pixels, labels = held_out_renders(args.hold_out, args.renders)
    for path in args.checkpoints:
        print(path, json.dumps(read(load(path), pixels, labels)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
