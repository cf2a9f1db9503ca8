"""The benchmark's word-answer twins behave as a trained model with a real tokenizer does.

``benchmarks/followup.py`` measures the KV cache on copies of random twins
(``llava_local_dev.twins``) whose answers are space-led word tokens and whose vocabulary
knows the prompts' words. These tests check, with llama.cpp's own tokenizer, the two
properties the benchmark relies on: an answer written back into the next prompt tokenizes
to the tokens the model wrote, and the prompts' words are one token each.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llava_local_dev import gguf_writer, twins

from llava_local.chat_formats import LLAVA_SYSTEM_PROMPT

PROMPT = f"{LLAVA_SYSTEM_PROMPT} USER: What is in this picture? ASSISTANT:"


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random language model with a byte vocabulary padded to 2048 tokens."""
    path = tmp_path_factory.mktemp("twin") / "model.gguf"
    cfg = gguf_writer.PRESETS["tiny"].text
    return gguf_writer.write_language_model(path, cfg, vocab=gguf_writer.padded_vocab(2048))


@pytest.fixture(scope="module")
def words_llama(twin: Path) -> Iterator[Any]:
    from llama_cpp import Llama

    llama = Llama(str(twins.word_answers(twin)), n_ctx=512, n_threads=1, verbose=False)
    yield llama
    llama.close()


def greedy(llama: Any, prompt: str, n: int) -> list[int]:
    llama.reset()
    out: list[int] = []
    for token in llama.generate(llama.tokenize(prompt.encode(), special=True), temp=0.0):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def test_answers_round_trip_through_the_template(words_llama: Any) -> None:
    """The answer, stripped and written back as ``ASSISTANT: {answer}``, is the same tokens."""
    written = greedy(words_llama, PROMPT, 12)
    pieces = [bytes(words_llama.detokenize([t])).decode() for t in written]
    assert all(len(p) == 2 and p[0] == " " and p[1].isalpha() for p in pieces), pieces
    answer = "".join(pieces).strip()
    prompt_ids = words_llama.tokenize(PROMPT.encode(), special=True)
    again = words_llama.tokenize(f"{PROMPT} {answer}".encode(), special=True)
    assert again == prompt_ids + written


def test_prompt_words_are_one_token_each(words_llama: Any) -> None:
    for word in twins.prompt_words():
        assert len(words_llama.tokenize(f" {word}".encode(), add_bos=False)) == 1, word
    question = " What colours stand out in it?"
    assert len(words_llama.tokenize(question.encode(), add_bos=False)) == 7  # 6 words + "?"


def test_letters_only_copy_has_no_whole_words(twin: Path) -> None:
    from llama_cpp import Llama

    path = twins.word_answers(twin, whole_words=False)
    llama = Llama(str(path), n_ctx=128, n_threads=1, vocab_only=True, verbose=False)
    try:
        pieces = [bytes(llama.detokenize([t])) for t in llama.tokenize(b" What", add_bos=False)]
    finally:
        llama.close()
    assert pieces == [b" W", b"h", b"a", b"t"]


def test_only_word_tokens_can_be_written(twin: Path) -> None:
    """Every output-matrix row but the word tokens' is zero; the matrix keeps its shape."""
    from gguf import GGUFReader

    before = next(t for t in GGUFReader(twin).tensors if t.name == "output.weight")
    after = next(
        t for t in GGUFReader(twins.word_answers(twin)).tensors if t.name == "output.weight"
    )
    assert after.data.shape == before.data.shape
    assert after.tensor_type == before.tensor_type
    live = np.flatnonzero(np.abs(np.asarray(after.data)).sum(axis=1))
    first = gguf_writer.FIRST_EXTRA_ID
    assert live.tolist() == list(range(first, first + len(twins.WORD_LETTERS)))
