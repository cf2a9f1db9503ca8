"""Copies of benchmark twins whose answers tokenize as a trained model's do.

``benchmarks/followup.py`` measures the KV cache on these copies; ``tests/dev/test_bench_twins.py``
checks them with llama.cpp's own tokenizer.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from llava_local.apps import bench
from llava_local.chat_formats import LLAVA_SYSTEM_PROMPT

from .gguf_writer import FIRST_EXTRA_ID

__all__ = ["WORD_LETTERS", "ascii_answers", "prompt_words", "word_answers"]


def twin_pair(twins: Path, preset: str, maker: Path) -> tuple[Path, Path]:
    """The language model and projector of twin ``preset`` under ``twins``, written
    first by the script ``maker`` (``benchmarks/make_twins.py``) when they are not there."""
    directory = twins / preset
    lm, mm = directory / "model-q4_0.gguf", directory / "mmproj-f16.gguf"
    if not (lm.exists() and mm.exists()):
        command = [sys.executable, str(maker), "--preset", preset, "--out", str(twins)]
        subprocess.run(command, check=True)
    return lm, mm


def ascii_answers(lm: Path) -> Path:
    """A copy of a twin whose answers are printable ASCII: same cost, text that round-trips.

    A twin's byte vocabulary is padded with ``<unusedN>`` tokens to the real size. Random
    weights make the model write those, and their text (``"<unused334>"``) tokenizes
    back into 11 byte tokens, so every answer in the history is 11x longer than it was
    to write, for every engine: nothing like a real tokenizer, where an answer comes back
    as about the tokens it was written with. Zeroing the output-matrix rows of every token
    except the printable ASCII bytes (0x20-0x7e) makes the model write only those, which
    come back token for token. The matrix keeps its shape and type, so every matrix
    multiply costs the same; end-of-sequence becomes impossible too.
    """
    out = lm.with_name(lm.stem + ".ascii-answers.gguf")
    if out.exists():
        return out
    tmp = out.with_suffix(".tmp")
    shutil.copyfile(lm, tmp)
    reader = GGUFReader(tmp, "r+")
    (output,) = [t for t in reader.tensors if t.name == "output.weight"]
    rows = output.data  # (n_vocab, bytes per row), a writable memory map
    drop = np.ones(rows.shape[0], dtype=bool)
    drop[0x20:0x7F] = False  # the byte vocabulary: token id i is byte i
    rows[drop] = 0  # a zero block is zero in every GGUF block type (scale 0)
    reader.data.flush()
    del reader, rows
    tmp.rename(out)
    return out


WORD_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def prompt_words() -> list[str]:
    """The words (letters only) of the benchmark's prompts, in order of first use."""
    text = " ".join([LLAVA_SYSTEM_PROMPT, *bench.QUESTIONS, "USER ASSISTANT"])
    return list(dict.fromkeys(re.findall(r"[A-Za-z]+", text)))


def word_answers(lm: Path, whole_words: bool = True) -> Path:
    """A copy of a twin that answers in space-led word tokens, as a trained model does.

    A real LLaMA tokenizer has word-initial tokens (``"▁The"``), and a model trained on
    LLaVA's ``"ASSISTANT: {answer}"`` starts its answer with one, so the answer written
    back into the next prompt tokenizes to the tokens it was written with and a KV cache
    can reuse it. A random twin with a plain byte vocabulary writes ``"CCCC"`` straight
    after the colon; re-rendered as ``"ASSISTANT: CCCC"`` the answer differs from the cache
    at its first byte, which no trained model would cause. This copy turns 52 of the
    ``<unusedN>`` padding tokens into GPT-2 style word tokens (``"ĠA"`` .. ``"Ġz"``, a space
    and one letter) with the merges that build them, and zeroes every output-matrix row but
    theirs: the model writes " C x Q ...", which round-trips token for token. Prompts
    tokenize a little shorter too (a word's space and first letter become one token), the
    same for every engine. Matrix shapes and types are unchanged, so every step costs the
    same; end-of-sequence becomes impossible.

    With ``whole_words`` the vocabulary also gets every word of the prompts (LLaVA's
    system prompt, the benchmark's questions, ``USER``, ``ASSISTANT``) as one token with
    its leading space, built by BPE merges one letter at a time, as LLaMA's
    32000-token vocabulary has them: a byte vocabulary makes a question 2-3x more tokens
    than a real tokenizer does, and the question is all a cached follow-up evaluates.
    """
    out = lm.with_name(lm.stem + (".word-answers.gguf" if whole_words else ".letter-answers.gguf"))
    if out.exists():
        return out
    reader = GGUFReader(lm)
    tokens = list(_contents(reader, "tokenizer.ggml.tokens"))
    merges = list(_contents(reader, "tokenizer.ggml.merges"))
    space = "\u0120"  # GPT-2's symbol for the byte 0x20
    ids = range(FIRST_EXTRA_ID, FIRST_EXTRA_ID + len(WORD_LETTERS))
    if not all(tokens[i].startswith("<unused") for i in ids):
        raise ValueError(f"{lm} has no <unusedN> padding to turn into word tokens")
    for i, letter in zip(ids, WORD_LETTERS, strict=True):
        tokens[i] = space + letter
    merges += [f"{space} {letter}" for letter in WORD_LETTERS]
    if whole_words:
        free = iter(range(ids.stop, len(tokens)))
        known = set(tokens)
        # after a space, as the prompts use them; "USER" also starts a turn after "</s>"
        for text in [space + w for w in prompt_words()] + ["USER"]:
            for end in range(2, len(text) + 1):
                if text[:end] in known:
                    continue
                i = next(free)
                if not tokens[i].startswith("<unused"):
                    raise ValueError(f"{lm}: not enough <unusedN> padding for words")
                tokens[i] = text[:end]
                known.add(text[:end])
                merges.append(f"{text[: end - 1]} {text[end - 1]}")
    arch = str(_contents(reader, "general.architecture"))
    tmp = out.with_suffix(".tmp")
    writer = GGUFWriter(tmp, arch)
    new = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges}
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        value = new.get(field.name, field.contents())
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    keep = np.zeros(len(tokens), dtype=bool)
    keep[list(ids)] = True
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        data = t.data
        if t.name == "output.weight":  # (n_vocab, bytes per row); zero blocks are zero
            data = np.where(keep[:, None], data, np.zeros_like(data))
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    tmp.rename(out)
    return out


def _contents(reader: GGUFReader, name: str) -> Any:
    field = reader.get_field(name)
    if field is None:
        raise ValueError(f"the GGUF file has no {name}")
    return field.contents()
