"""The llama.cpp engine through VisionChat, on tiny GGUF pairs the tests write.

Real inference: the pairs have random weights, so answers are gibberish, but they
are deterministic under greedy decoding and they depend on the pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from llava_local_dev import gguf_writer
from pydantic import BaseModel

from llava_local import (
    ContextOverflowError,
    ImageError,
    InsufficientMemoryError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    VisionChat,
    host,
    memory,
)
from llava_local.backends import Turn
from llava_local.backends.llama_cpp import LlamaCppBackend
from llava_local.images import prepare
from llava_local.types import Message, Options

from ...gguf_fixtures import GgufPair, png_bytes
from ...known import known
from ...option_args import OptionArgs
from ...paths import DIGIT

GREEDY: OptionArgs = {"temperature": 0, "max_tokens": 6}


class Colour(BaseModel):
    colour: Literal["red", "green", "blue"]


def open_chat(pair: GgufPair, **kwargs: object) -> VisionChat:
    return VisionChat.llama_cpp(model=pair.lm, mmproj=pair.mmproj, **kwargs)  # type: ignore[arg-type]


def test_ask_returns_a_full_reply(tiny_pair: GgufPair) -> None:
    """ask() answers with text, model, engine, done reason and stats that add up."""
    with open_chat(tiny_pair) as chat:
        reply = chat.ask("What is in this picture?", image=png_bytes(seed=1), **GREEDY)
    assert reply.backend == "llama_cpp"
    assert reply.model == tiny_pair.lm.name
    assert str(reply) == reply.text
    assert reply.done_reason in ("stop", "length")
    stats = reply.stats
    assert stats.images_encoded == 1
    assert stats.cached_tokens == 0
    assert known(stats.prompt_tokens) > tiny_pair.vision.n_image_tokens
    assert 1 <= known(stats.completion_tokens) <= 6
    assert stats.load_s > 0
    assert stats.image_encode_s is not None
    assert stats.image_encode_s > 0
    assert stats.total_s >= known(stats.prompt_s) > 0


def test_greedy_answers_repeat_exactly(tiny_pair: GgufPair) -> None:
    """Two fresh chats and a reset chat give the same greedy answer, cached or not."""
    picture = png_bytes(seed=2)
    with open_chat(tiny_pair) as first, open_chat(tiny_pair) as second:
        a = first.ask("Describe it.", image=picture, **GREEDY).text
        b = second.ask("Describe it.", image=picture, **GREEDY).text
        second.reset()
        again = second.ask("Describe it.", image=picture, **GREEDY)
    assert a == b == again.text
    assert again.stats.cached_tokens
    assert again.stats.images_encoded == 0


def test_stream_pieces_make_the_reply_and_the_turn_is_kept(tiny_pair: GgufPair) -> None:
    """Streamed pieces join into the reply's text; the turn enters the history at the end."""
    with open_chat(tiny_pair) as chat:
        stream = chat.stream("What is it?", image=png_bytes(seed=3), **GREEDY)
        assert chat.history == []
        pieces = list(stream)
        assert "".join(pieces) == stream.reply.text
        history = chat.history
    assert [m.role for m in history] == ["user", "assistant"]
    assert history[0].images
    assert history[1].content == stream.reply.text


def test_stream_closed_early_is_not_kept(tiny_pair: GgufPair) -> None:
    """Leaving a stream half-read keeps the history as it was, and the next turn works."""
    with open_chat(tiny_pair) as chat:
        with chat.stream("What is it?", image=png_bytes(seed=3), temperature=0) as stream:
            next(stream)
        assert chat.history == []
        with pytest.raises(InvalidRequestError, match="after the stream"):
            _ = stream.reply
        reply = chat.ask("What is it?", image=png_bytes(seed=3), **GREEDY)
    assert reply.text
    assert len(chat.history) == 2


def test_follow_up_evaluates_only_the_new_tokens(tiny_pair: GgufPair) -> None:
    """A follow-up does not encode the picture again and reads only the new text."""
    with open_chat(tiny_pair, chat_format="chatml") as chat:
        first = chat.ask("Pick a colour.", image=png_bytes(seed=4), schema=Colour, temperature=0)
        follow = chat.ask("Why?", **GREEDY)
    # Byte vocabulary: one token per byte of the text that follows the cached answer.
    new_text = "<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
    assert isinstance(first.parsed, Colour)
    assert follow.stats.images_encoded == 0
    assert follow.stats.prompt_tokens == len(new_text.encode())
    cached_before = known(first.stats.prompt_tokens) + len(first.text.encode())
    assert follow.stats.cached_tokens == cached_before


def test_answers_are_the_same_with_and_without_the_cache(tiny_pair: GgufPair) -> None:
    """A second turn answered from the cache equals the same turn computed from scratch."""
    picture = png_bytes(seed=5)
    with open_chat(tiny_pair, chat_format="chatml") as cached:
        cached.ask("Pick a colour.", image=picture, schema=Colour, temperature=0)
        warm = cached.ask("Again?", **GREEDY)
        history = cached.history
    engine = LlamaCppBackend(tiny_pair.lm, tiny_pair.mmproj, chat_format="chatml")
    try:
        turn = Turn([*history[:2], Message(role="user", content="Again?")], Options(**GREEDY))
        cold = "".join(p for p in engine.generate(turn) if isinstance(p, str))
    finally:
        engine.close()
    assert warm.stats.cached_tokens
    assert cold == warm.text


def test_reset_starts_a_new_conversation(tiny_pair: GgufPair) -> None:
    """reset() empties the history; the next turn is answered as a first turn."""
    with open_chat(tiny_pair) as chat:
        first = chat.ask("What?", image=png_bytes(seed=6), **GREEDY)
        chat.ask("More?", **GREEDY)
        chat.reset()
        assert chat.history == []
        assert chat.last_reply is None
        again = chat.ask("What?", image=png_bytes(seed=6), **GREEDY)
    assert again.text == first.text
    assert len(chat.history) == 2


def test_several_pictures_in_one_turn(tiny_pair: GgufPair) -> None:
    """images=[...] sends every picture; each takes its image tokens in the prompt."""
    with open_chat(tiny_pair) as chat:
        one = chat.ask("Compare.", image=png_bytes(seed=7), **GREEDY)
        chat.reset()
        two = chat.ask("Compare.", images=[png_bytes(seed=7), png_bytes(seed=8)], **GREEDY)
    assert two.stats.images_encoded == 1  # the first picture is still in the cache
    assert two.stats.cached_tokens is not None  # the engine reports what it reused
    n = tiny_pair.vision.n_image_tokens  # plus the "\n" the format writes after each picture
    assert (
        known(two.stats.prompt_tokens) + two.stats.cached_tokens
        == known(one.stats.prompt_tokens) + n + 1
    )


def test_pixels_reach_the_model(tiny_pair: GgufPair) -> None:
    """Two different pictures give different next-token logits; the same one, the same."""
    # no kept KV states: a restored prompt reads its last token alone, a few ulps apart
    engine = LlamaCppBackend(tiny_pair.lm, tiny_pair.mmproj, kv_cache_mb=0)

    def logits(seed: int) -> np.ndarray:
        picture = prepare(png_bytes(seed=seed), max_side=engine.max_image_side)
        message = Message(role="user", content="What is it?", images=(picture,))
        return np.asarray(engine.next_token_logits(Turn([message], Options())))

    try:
        a, b, a_again = logits(10), logits(11), logits(10)
    finally:
        engine.close()
    assert a.shape == (engine.n_vocab,)
    assert np.array_equal(a, a_again)
    assert np.abs(a - b).max() > 1e-3


def test_schema_answer_is_validated(tiny_pair: GgufPair) -> None:
    """schema= constrains the answer with a grammar; reply.parsed is the pydantic object."""
    with open_chat(tiny_pair) as chat:
        reply = chat.ask("Colour?", image=png_bytes(seed=12), schema=Colour, temperature=0)
        raw = chat.ask("Again?", schema=Colour.model_json_schema(), temperature=0)
    assert isinstance(reply.parsed, Colour)
    assert Colour.model_validate_json(reply.text) == reply.parsed
    assert raw.parsed["colour"] in ("red", "green", "blue")


def test_stop_strings_cut_the_answer(tiny_pair: GgufPair) -> None:
    """The answer ends before the first stop string, which is not part of the text."""
    picture = png_bytes(seed=13)
    with open_chat(tiny_pair) as chat:
        full = chat.ask("Say something.", image=picture, temperature=0, max_tokens=12).text
        stop = full[3:5]
        chat.reset()
        cut = chat.ask("Say something.", image=picture, temperature=0, max_tokens=12, stop=stop)
    assert len(full) >= 5
    assert cut.text == full[: full.index(stop)]
    assert cut.done_reason == "stop"


def test_quantized_model_runs(tiny_pair_q4: GgufPair) -> None:
    """A Q4_0 model answers: the build avoids the AMX crash of -march=native."""
    with open_chat(tiny_pair_q4) as chat:
        reply = chat.ask("What?", image=png_bytes(seed=14), **GREEDY)
    assert known(reply.stats.completion_tokens) >= 1


def test_context_overflow_is_refused_and_nothing_is_lost(tiny_pair: GgufPair) -> None:
    """A turn that cannot fit n_ctx raises ContextOverflowError and keeps the history."""
    with open_chat(tiny_pair, n_ctx=256, system="Short.") as chat:
        chat.ask("Hi?", image=png_bytes(seed=15), **GREEDY)
        before = chat.history
        with pytest.raises(ContextOverflowError, match="n_ctx") as info:
            chat.ask("x" * 300, **GREEDY)
        assert info.value.needed > info.value.available == 256
        assert chat.history == before
        reply = chat.ask("Ok?", **GREEDY)
    assert reply.stats.images_encoded == 0


def _overflow(chat: VisionChat, prompt: str, **kwargs: object) -> ContextOverflowError:
    """The ContextOverflowError ``prompt`` raises in ``chat``; the history is checked
    to be exactly as before."""
    before = chat.history
    with pytest.raises(ContextOverflowError) as info:
        chat.ask(prompt, temperature=0, **kwargs)  # type: ignore[arg-type]
    assert chat.history == before
    return info.value


def test_a_context_llama_cpp_pads_is_checked_at_the_size_asked_for() -> None:
    """n_ctx=300 (llama.cpp pads its own to 512, llama-cpp-python keeps 300 positions):
    a first turn and a follow-up are refused with ContextOverflowError when prompt,
    picture and one token of room exceed 300 by one, answered when they make exactly
    300, and a refused turn leaves the conversation and its KV cache as they were."""
    with VisionChat.llama_cpp(n_ctx=300) as chat:
        assert chat.engine.n_ctx == 300  # type: ignore[attr-defined]
        padding = "." * 200
        first = _overflow(chat, "What digit is this?" + padding, image=DIGIT)
        assert (first.available, first.pictures, first.setting) == (300, 16, "n_ctx")
        assert first.needed > 300
        fits = "What digit is this?" + padding[: 200 - (first.needed - 300)]
        reply = chat.ask(fits, image=DIGIT, temperature=0)
        assert reply.done_reason == "length"  # one position of room: one token
        assert reply.stats.prompt_tokens == 299
        assert len(chat.history) == 2
        chat.reset()
        chat.ask("What digit is this?", image=DIGIT, temperature=0)
        follow = _overflow(chat, "Which digit?" + padding)
        assert follow.needed > 300
        assert follow.pictures == 16  # the picture of the first turn is in the prompt
        again = chat.ask("Which digit?", temperature=0)
        assert again.stats.images_encoded == 0  # the refused turn left the KV cache alone
        assert "7" in again.text


def test_a_context_smaller_than_the_picture_says_so() -> None:
    """A context window smaller than the picture's positions is refused before anything
    is read, saying the pictures alone need more positions than it holds."""
    with VisionChat.llama_cpp(n_ctx=10) as chat:
        error = _overflow(chat, "What digit is this?", image=DIGIT)
    assert (error.pictures, error.available) == (16, 10)
    assert "the picture alone needs 16 positions and the context window holds 10" in str(error)


def test_chat_format_can_be_chosen(tiny_pair: GgufPair) -> None:
    """chat_format= overrides the default Vicuna format; a bad name is refused."""
    with open_chat(tiny_pair, chat_format="moondream") as chat:
        assert chat.engine.chat_format.name == "moondream"  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequestError, match="chat_format"):
        open_chat(tiny_pair, chat_format="nope")


def test_missing_files_name_the_path(tiny_pair: GgufPair, tmp_path: Path) -> None:
    """A missing model or projector file raises ModelNotFoundError naming it."""
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFoundError, match=r"nope\.gguf"):
        VisionChat.llama_cpp(model=missing, mmproj=tiny_pair.mmproj)
    with pytest.raises(ModelNotFoundError, match="projector"):
        VisionChat.llama_cpp(model=tiny_pair.lm, mmproj=missing)
    # without mmproj=, the missing model is what is reported, not the projector search
    with pytest.raises(ModelNotFoundError, match=r"no language model file at .*nope\.gguf"):
        VisionChat.llama_cpp(model=missing)


def test_swapped_or_wrong_files_are_caught_before_llama_cpp(
    tiny_pair: GgufPair, tmp_path: Path
) -> None:
    """Swapped files, a non-GGUF file and a mismatched projector give ModelLoadError."""
    with pytest.raises(ModelLoadError, match="swap"):
        VisionChat.llama_cpp(model=tiny_pair.mmproj, mmproj=tiny_pair.lm)
    with pytest.raises(ModelLoadError, match="not a vision projector"):
        VisionChat.llama_cpp(model=tiny_pair.lm, mmproj=tiny_pair.lm)
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        VisionChat.llama_cpp(model=text, mmproj=tiny_pair.mmproj)
    other = gguf_writer.VisionConfig(
        image_size=56,
        patch_size=14,
        n_embd=32,
        n_ff=64,
        n_head=2,
        n_layer=2,
        projection_dim=tiny_pair.text.n_embd * 2,
    )
    wrong = gguf_writer.write_projector(tmp_path / "wrong-mmproj.gguf", other)
    with pytest.raises(ModelLoadError, match="not a pair"):
        VisionChat.llama_cpp(model=tiny_pair.lm, mmproj=wrong)


def test_projector_beside_the_model_is_found(tiny_pair: GgufPair) -> None:
    """With no mmproj=, the one *mmproj*.gguf file beside the model is used."""
    with VisionChat(backend="llama_cpp", model=str(tiny_pair.lm)) as chat:
        assert chat.engine.mmproj_path == tiny_pair.mmproj  # type: ignore[attr-defined]


def test_bad_picture_fails_before_the_turn(tiny_pair: GgufPair) -> None:
    """A broken picture raises ImageError at the call, and the conversation is untouched."""
    with open_chat(tiny_pair) as chat:
        with pytest.raises(ImageError, match="bytes"):
            chat.ask("What?", image=b"definitely not a picture")
        assert chat.history == []


def test_closed_chat_refuses_new_turns(tiny_pair: GgufPair) -> None:
    """After close(), a turn raises a clear error instead of touching freed memory."""
    chat = open_chat(tiny_pair)
    chat.close()
    chat.close()
    with pytest.raises(InvalidRequestError, match="closed"):
        chat.ask("What?", image=png_bytes(seed=1))


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        (["Hel", "lo EN", "D more"], ["END"], ("Hello ", True)),
        (["a", "b", "c"], ["bd"], ("abc", False)),
        (["x<", "/s", ">y"], ["</s>", "y"], ("x", True)),
        (["no stops"], [], ("no stops", False)),
    ],
)
def test_stop_scanner_holds_back_partial_matches(
    pieces: list[str], stops: list[str], expected: tuple[str, bool]
) -> None:
    """Stop strings split across streamed pieces are still found, and never leak out."""
    from llava_local.backends.llama_cpp.sampling import StopScanner

    scanner, out, hit = StopScanner(stops), "", False
    for piece in pieces:
        text, hit = scanner.feed(piece)
        out += text
        if hit:
            break
    if not hit:
        out += scanner.flush("")
    assert (out, hit) == expected


def test_a_picture_seen_before_skips_clip_elsewhere(tiny_pair: GgufPair) -> None:
    """A picture from an earlier conversation, at a new position, reuses its embeddings."""
    picture = png_bytes(seed=30)
    with open_chat(tiny_pair) as chat:
        chat.ask("What?", image=picture, **GREEDY)
        chat.reset()
        chat.system = "A different system prompt moves the picture."
        warm = chat.ask("What?", image=picture, **GREEDY)
    with open_chat(tiny_pair, system="A different system prompt moves the picture.") as cold:
        fresh = cold.ask("What?", image=picture, **GREEDY)
    assert warm.stats.images_encoded == 0
    assert fresh.stats.images_encoded == 1
    # The picture was read into the KV cache again (it moved), from cached embeddings.
    assert known(warm.stats.prompt_tokens) > tiny_pair.vision.n_image_tokens
    assert known(warm.stats.prompt_tokens) + (warm.stats.cached_tokens or 0) == known(
        fresh.stats.prompt_tokens
    )
    assert warm.text == fresh.text


def test_embedding_cache_is_bounded_by_bytes() -> None:
    """The embedding cache evicts least-recently-used pictures to stay under its size."""
    from llava_local.backends.llama_cpp.embedding_cache import EmbeddingCache

    cache = EmbeddingCache(max_bytes=3 * 400)
    arrays = {k: np.full(100, i, np.float32) for i, k in enumerate("abcd")}
    for key in "abc":
        cache.put(key, arrays[key])
    assert cache.get("a") is arrays["a"]  # a is now the most recent
    cache.put("d", arrays["d"])
    assert cache.get("b") is None
    assert {k for k in "acd" if cache.get(k) is not None} == {"a", "c", "d"}
    assert cache.nbytes == 1200
    cache.put("huge", np.zeros(1000, np.float32))
    assert cache.get("huge") is None
    assert len(cache) == 3


def test_drop_oldest_keeps_answering_and_the_picture(tiny_pair: GgufPair) -> None:
    """With on_overflow="drop_oldest", old turns make room and the picture stays in view."""
    with open_chat(tiny_pair, n_ctx=256, system="Short.", on_overflow="drop_oldest") as chat:
        chat.ask("Hi?", image=png_bytes(seed=31), **GREEDY)
        replies = [chat.ask(f"Question {i}: " + "y" * 40, **GREEDY) for i in range(4)]
        keys = chat.engine.slot_keys()[0]  # type: ignore[attr-defined]
    assert replies[0].stats.dropped_turns == 0
    assert replies[-1].stats.dropped_turns >= 1
    assert len(chat.history) == 10  # the history itself keeps every turn
    picture_positions = [k for k in keys if isinstance(k, tuple)]
    assert len(picture_positions) == tiny_pair.vision.n_image_tokens


def test_drop_oldest_moves_pictures_only_while_still_talked_about() -> None:
    """Dropped pictures move to the next question unless a later message has its own."""
    from llava_local.fitting import drop_oldest_turn
    from llava_local.types import PreparedImage

    def pic(n: int) -> PreparedImage:
        return PreparedImage(
            data=b"x", mime="image/png", width=1, height=1, sha256=str(n) * 64, source=str(n)
        )

    a = Message(role="assistant", content="ok")
    history = [
        Message(role="user", content="q1", images=(pic(1),)),
        a,
        Message(role="user", content="q2"),
        a,
    ]
    rest, new = drop_oldest_turn(history, Message(role="user", content="q3"))
    assert [m.content for m in rest] == ["q2", "ok"]
    assert rest[0].images == (pic(1),)
    assert new.images == ()
    rest, new = drop_oldest_turn(history, Message(role="user", content="q3", images=(pic(2),)))
    assert rest[0].images == ()
    assert new.images == (pic(2),)
    rest, new = drop_oldest_turn(history[:2], Message(role="user", content="q3"))
    assert rest == []
    assert new.images == (pic(1),)


def test_unknown_overflow_policy_is_refused(tiny_pair: GgufPair) -> None:
    """A misspelt on_overflow value is an InvalidRequestError."""
    with pytest.raises(InvalidRequestError, match="on_overflow"):
        open_chat(tiny_pair, on_overflow="truncat")


def test_a_model_too_big_for_free_memory_is_refused(tiny_pair: GgufPair) -> None:
    """Loading is refused before llama.cpp runs when the pair would not fit; force=True loads."""
    per_token = memory.estimate(tiny_pair.lm, tiny_pair.mmproj, n_ctx=1024).kv_bytes // 1024
    huge_ctx = 2 * host.available_bytes() // per_token  # a KV cache twice the free memory
    with pytest.raises(InsufficientMemoryError, match="force=True") as info:
        open_chat(tiny_pair, n_ctx=huge_ctx)
    assert info.value.needed > info.value.available
    with open_chat(tiny_pair, n_ctx=512, force=True) as chat:
        assert chat.engine.memory_estimate.kv_bytes > 0  # type: ignore[attr-defined]
