"""GGUF pairs written by llava_local_dev.gguf_writer, checked with llama.cpp itself.

The fixtures (``tiny_pair``, ``tiny_pair_q4``, ``tiny_mtmd``) live in tests/gguf_fixtures.py.
The reference tests pin down, with numbers from this llama.cpp build, the facts the
module docstring states for the demo-model trainer (RoPE pairing, vision graph,
preprocessing).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llava_local_dev import gguf_writer as gw
from llava_local_dev.mtmd import MtmdRunner
from PIL import Image

from ..gguf_fixtures import GgufPair, png_bytes

GGML_TYPE_F32 = 0
PROMPT = "USER: {m}\nWhat is this?\nASSISTANT:"


def _llama(path: Path, **kw: Any) -> Any:
    import llama_cpp

    return llama_cpp.Llama(str(path), n_gpu_layers=0, verbose=False, **kw)


# ------------------------------------------------------------------ numpy LM reference


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return np.asarray(x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w)


def _rope(x: np.ndarray, theta: float, pairing: str) -> np.ndarray:
    """Rotate (tokens, heads, d) by position; "adjacent" pairs (2i, 2i+1), else (i, i+d/2)."""
    d = x.shape[-1]
    angle = np.arange(x.shape[0])[:, None] * theta ** (-2 * np.arange(d // 2) / d)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    if pairing == "adjacent":
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)


def lm_reference_logits(
    cfg: gw.TextConfig, w: dict[str, np.ndarray], x: np.ndarray, pairing: str = "adjacent"
) -> np.ndarray:
    """Next-token logits of the llama graph for input embeddings ``x`` (tokens, n_embd)."""
    n, h, hkv, d = x.shape[0], cfg.n_head, cfg.kv_heads, cfg.head_dim
    x = x.astype(np.float64)
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        y = _rms(x, w[b + "attn_norm.weight"], cfg.rms_eps)
        q = _rope((y @ w[b + "attn_q.weight"].T).reshape(n, h, d), cfg.rope_theta, pairing)
        k = _rope((y @ w[b + "attn_k.weight"].T).reshape(n, hkv, d), cfg.rope_theta, pairing)
        v = (y @ w[b + "attn_v.weight"].T).reshape(n, hkv, d)
        k, v = np.repeat(k, h // hkv, axis=1), np.repeat(v, h // hkv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", scores, v).reshape(n, -1) @ w[b + "attn_output.weight"].T
        y = _rms(x, w[b + "ffn_norm.weight"], cfg.rms_eps)
        gate = y @ w[b + "ffn_gate.weight"].T
        x = (
            x
            + (gate / (1 + np.exp(-gate)) * (y @ w[b + "ffn_up.weight"].T))
            @ w[b + "ffn_down.weight"].T
        )
    return np.asarray(_rms(x, w["output_norm.weight"], cfg.rms_eps)[-1] @ w["output.weight"].T)


def _last_logits(llama: Any) -> np.ndarray:
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llama.ctx, -1)
    return np.array(np.ctypeslib.as_array(ptr, shape=(llama.n_vocab(),)), dtype=np.float32)


# --------------------------------------------------------------------------- fixtures


VISION_SEED = 7  # the f32 projector gets explicit weights, to exercise the given-weights path


@pytest.fixture(scope="module")
def f32_runner(
    tiny_pair: GgufPair, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MtmdRunner]:
    """The tiny LM with an f32 projector (explicit weights) and an f32 KV cache."""
    weights = gw.random_vision_weights(tiny_pair.vision, VISION_SEED)
    mmproj = tmp_path_factory.mktemp("f32_projector") / "mmproj-f32.gguf"
    gw.write_projector(mmproj, tiny_pair.vision, weights=weights, dtype="f32")
    with MtmdRunner(tiny_pair.lm, mmproj, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) as runner:
        yield runner


# ------------------------------------------------------------------ loading and turns


def test_tiny_pair_loads(tiny_pair: GgufPair, tiny_mtmd: MtmdRunner) -> None:
    """The tiny pair loads in llama.cpp and mtmd reports a vision projector."""
    from llama_cpp import mtmd_cpp

    assert mtmd_cpp.mtmd_support_vision(tiny_mtmd.ctx)
    assert tiny_mtmd.llama.n_embd() == tiny_pair.text.n_embd
    assert tiny_mtmd.llama.n_vocab() == len(tiny_pair.vocab.tokens) == gw.FIRST_EXTRA_ID


def test_image_chunk_has_n_image_tokens(tiny_pair: GgufPair, tiny_mtmd: MtmdRunner) -> None:
    """One picture becomes exactly n_image_tokens (16) tokens between two text chunks."""
    chunks = tiny_mtmd.chunk_token_counts(PROMPT.format(m=tiny_mtmd.marker), [png_bytes()])
    assert [kind for kind, _ in chunks] == ["text", "image", "text"]
    assert chunks[1][1] == tiny_pair.vision.n_image_tokens == 16


def test_different_pictures_give_different_logits(tiny_mtmd: MtmdRunner) -> None:
    """The picture reaches the language model: two pictures, two sets of logits."""
    prompt = PROMPT.format(m=tiny_mtmd.marker)
    red = tiny_mtmd.logits(prompt, png_bytes(color=(220, 20, 20), seed=1))
    green = tiny_mtmd.logits(prompt, png_bytes(color=(20, 220, 20), seed=2))
    assert np.isfinite(red).all()
    assert np.abs(red - green).max() > 1e-2


def test_same_picture_twice_gives_identical_logits(tiny_mtmd: MtmdRunner) -> None:
    """A turn is deterministic: the same picture and prompt give bit-identical logits."""
    prompt, picture = PROMPT.format(m=tiny_mtmd.marker), png_bytes(seed=3)
    np.testing.assert_array_equal(
        tiny_mtmd.logits(prompt, picture), tiny_mtmd.logits(prompt, picture)
    )


def test_logits_refuse_a_prompt_ending_with_the_picture(tiny_mtmd: MtmdRunner) -> None:
    """mtmd decodes image chunks without output rows, so the helper says so instead of crashing."""
    with pytest.raises(ValueError, match="end with text"):
        tiny_mtmd.logits(tiny_mtmd.marker, png_bytes())


def test_encode_chunk_returns_one_embedding_per_image_token(
    tiny_pair: GgufPair, tiny_mtmd: MtmdRunner
) -> None:
    """mtmd_encode_chunk + mtmd_get_output_embd give n_image_tokens x n_embd floats."""
    embd = tiny_mtmd.image_embeddings(png_bytes())
    assert embd.shape == (tiny_pair.vision.n_image_tokens, tiny_pair.text.n_embd)
    assert np.isfinite(embd).all()
    assert 0.1 < embd.std() < 10  # random weights keep activations near unit scale


def test_llama_cpp_q4_0_quantized_lm_evaluates(tiny_pair_q4: GgufPair) -> None:
    """A Q4_0 model runs (the default -march=native build dies here with SIGSEGV on AMX VMs)."""
    with MtmdRunner(tiny_pair_q4.lm, tiny_pair_q4.mmproj) as runner:
        prompt = PROMPT.format(m=runner.marker)
        a = runner.logits(prompt, png_bytes(seed=1))
        b = runner.logits(prompt, png_bytes(color=(10, 10, 240), seed=2))
    assert np.isfinite(a).all()
    assert np.abs(a - b).max() > 1e-2


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
def test_directly_written_lm_dtypes_evaluate(
    dtype: gw.LmDtype, tiny_pair: GgufPair, tmp_path: Path
) -> None:
    """f16, Q8_0 and Q4_0 files written by gguf_writer itself load and give finite logits."""
    lm = gw.write_language_model(tmp_path / f"lm-{dtype}.gguf", tiny_pair.text, dtype=dtype)
    with MtmdRunner(lm, tiny_pair.mmproj) as runner:
        logits = runner.logits(PROMPT.format(m=runner.marker), png_bytes())
    assert np.isfinite(logits).all()


# --------------------------------------------------------------------- vocabulary


@pytest.fixture(scope="module")
def vocab_llama(tiny_pair: GgufPair) -> Any:
    """The tiny LM's tokenizer only."""
    return _llama(tiny_pair.lm, vocab_only=True)


@pytest.mark.parametrize(
    "text", ["Hello, world!", "  two  spaces\tand\ttabs\n", "</S> <s0> 123 'll", "é ü 漢字 🙂"]
)
def test_byte_vocab_tokenizes_text_to_exactly_its_utf8_bytes(vocab_llama: Any, text: str) -> None:
    """llama.cpp's tokenizer turns text into its UTF-8 bytes, token id = byte value."""
    data = text.encode()
    assert vocab_llama.tokenize(data, add_bos=False, special=True) == list(data)
    assert vocab_llama.tokenize(data, add_bos=True) == [gw.BOS_ID, *data]
    assert vocab_llama.detokenize(list(data)) == data


def test_eos_marker_parses_as_eos_only_with_special_parsing(vocab_llama: Any) -> None:
    """ "</s>" is EOS when special tokens are parsed and plain bytes otherwise."""
    assert vocab_llama.token_eos() == gw.EOS_ID
    assert vocab_llama.token_bos() == gw.BOS_ID
    assert vocab_llama.tokenize(b"a</s>", add_bos=False, special=True) == [97, gw.EOS_ID]
    assert vocab_llama.tokenize(b"a</s>", add_bos=False, special=False) == list(b"a</s>")


def test_extra_tokens_are_single_user_defined_tokens(tmp_path: Path) -> None:
    """byte_vocab's extra tokens get ids from 259 on and tokenize whole, even unparsed."""
    text = gw.PRESETS["tiny"].text
    vocab = gw.byte_vocab(["<image>", "<|user|>"])
    lm = gw.write_language_model(tmp_path / "lm.gguf", text, vocab=vocab)
    llama = _llama(lm, vocab_only=True)
    assert llama.tokenize(b"a<|user|>b<image>", add_bos=False) == [97, 260, 98, 259]
    assert llama.detokenize([260]) == b"<|user|>"


# ---------------------------------------------------------- reference computations


def test_lm_uses_adjacent_pair_rope_and_pytorch_layout(tiny_pair: GgufPair) -> None:
    """A numpy llama forward with adjacent-pair RoPE matches llama.cpp; rotate-half does not."""
    llama = _llama(tiny_pair.lm, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    tokens = llama.tokenize(b"Position matters: the quick brown fox.", add_bos=True)
    llama.eval(tokens)
    got = _last_logits(llama)
    weights = gw.random_text_weights(tiny_pair.text, len(tiny_pair.vocab.tokens), seed=0)
    x = weights["token_embd.weight"][tokens]
    adjacent = lm_reference_logits(tiny_pair.text, weights, x, "adjacent")
    rotate_half = lm_reference_logits(tiny_pair.text, weights, x, "rotate_half")
    np.testing.assert_allclose(got, adjacent, atol=1e-4)
    assert np.abs(got - rotate_half).max() > 0.1


def test_vision_graph_matches_numpy_reference(tiny_pair: GgufPair, f32_runner: MtmdRunner) -> None:
    """llama.cpp's projector output equals reference_image_embeddings (CLS last, n-1 blocks)."""
    vision = tiny_pair.vision
    weights = gw.random_vision_weights(vision, VISION_SEED)
    png = png_bytes(seed=4)
    pixels = gw.clip_preprocess(Image.open(io.BytesIO(png)), vision)
    got = f32_runner.image_embeddings(png)
    np.testing.assert_allclose(
        got, gw.reference_image_embeddings(vision, weights, pixels), atol=2e-3
    )

    # The facts that make it match: each alternative is far off.
    cls_first = dict(weights)
    pos = weights["v.position_embd.weight"]
    cls_first["v.position_embd.weight"] = np.concatenate([pos[1:], pos[:1]])
    all_blocks = replace_layers(vision, weights, vision.n_layer + 1)
    for wrong_cfg, wrong in ((vision, cls_first), all_blocks):
        assert np.abs(got - gw.reference_image_embeddings(wrong_cfg, wrong, pixels)).max() > 0.05


def replace_layers(
    vision: gw.VisionConfig, weights: dict[str, np.ndarray], n_layer: int
) -> tuple[gw.VisionConfig, dict[str, np.ndarray]]:
    """A config/weights pair whose reference runs every stored block (HF's last layer)."""
    extra = {
        k.replace(f"v.blk.{vision.n_layer - 1}.", f"v.blk.{n_layer - 1}."): v
        for k, v in weights.items()
        if k.startswith(f"v.blk.{vision.n_layer - 1}.")
    }
    return replace(vision, n_layer=n_layer), {**weights, **extra}


@pytest.mark.parametrize("size", [(56, 56), (112, 56), (40, 90), (300, 200), (13, 57), (500, 7)])
def test_clip_square_reproduces_clip_cpp_preprocessing_exactly(
    size: tuple[int, int], tiny_pair: GgufPair, f32_runner: MtmdRunner
) -> None:
    """A picture and its clip_square() version give bit-identical embeddings in llama.cpp."""
    png = png_bytes(size=size, seed=5)
    square = gw.clip_square(Image.open(io.BytesIO(png)), tiny_pair.vision.image_size)
    buf = io.BytesIO()
    square.save(buf, format="PNG")
    np.testing.assert_array_equal(
        f32_runner.image_embeddings(png), f32_runner.image_embeddings(buf.getvalue())
    )


def test_image_embeddings_enter_the_lm_as_consecutive_tokens(
    tiny_pair: GgufPair, f32_runner: MtmdRunner
) -> None:
    """BOS, the 16 image embeddings, then text: the numpy LM on that sequence matches mtmd."""
    png = png_bytes(seed=6)
    got = f32_runner.logits(f32_runner.marker + "hi", png)
    weights = gw.random_text_weights(tiny_pair.text, len(tiny_pair.vocab.tokens), seed=0)
    embd = weights["token_embd.weight"]
    x = np.concatenate([embd[[gw.BOS_ID]], f32_runner.image_embeddings(png), embd[list(b"hi")]])
    np.testing.assert_allclose(got, lm_reference_logits(tiny_pair.text, weights, x), atol=1e-4)


# ------------------------------------------------------------------- file contents


def test_weights_round_trip_in_pytorch_layout(tmp_path: Path) -> None:
    """Given arrays are stored as-is: GGUFReader returns them with their PyTorch shapes."""
    from gguf import GGUFReader

    preset = gw.PRESETS["tiny"]
    text_w = gw.random_text_weights(preset.text, gw.FIRST_EXTRA_ID, seed=11)
    vision_w = gw.random_vision_weights(preset.vision, seed=12)
    lm, mm = gw.write_pair(
        tmp_path,
        preset.text,
        preset.vision,
        lm_weights=text_w,
        mm_weights=vision_w,
        mm_dtype="f32",
    )
    for path, weights in ((lm, text_w), (mm, vision_w)):
        tensors = {t.name: t for t in GGUFReader(path).tensors}
        assert set(tensors) == set(weights)
        for name, value in weights.items():
            np.testing.assert_array_equal(
                np.asarray(tensors[name].data).reshape(value.shape), value
            )
            assert tuple(reversed(tensors[name].shape.tolist())) == value.shape


def test_recommended_sampling_is_written_as_general_sampling_keys(tmp_path: Path) -> None:
    """sampling= writes llama.cpp's general.sampling.* keys (top_k an integer), which
    llama.cpp reads back from the model; an unknown name is refused."""
    import llama_cpp

    cfg = gw.PRESETS["tiny"].text
    path = gw.write_language_model(
        tmp_path / "lm.gguf", cfg, sampling={"temp": 0.25, "top_k": 1, "top_p": 0.5}
    )
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
    try:
        meta = llm.metadata
    finally:
        llm.close()
    assert float(meta["general.sampling.temp"]) == 0.25
    assert meta["general.sampling.top_k"] == "1"
    assert float(meta["general.sampling.top_p"]) == 0.5
    with pytest.raises(ValueError, match=r"general\.sampling\.warmth"):
        gw.write_language_model(tmp_path / "bad.gguf", cfg, sampling={"warmth": 1.0})


def test_f16_projector_keeps_norms_and_biases_f32(tiny_pair: GgufPair) -> None:
    """As llama.cpp's converter does: matrices and the conv kernel f16, 1-D tensors f32."""
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(tiny_pair.mmproj)
    for t in reader.tensors:
        expected = GGMLQuantizationType.F16 if len(t.shape) >= 2 else GGMLQuantizationType.F32
        assert t.tensor_type == expected, t.name
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["clip.projector_type"].parts[-1]).decode() == "mlp"
    assert fields["clip.vision.block_count"].parts[-1][0] == tiny_pair.vision.n_layer
    assert not fields["clip.use_gelu"].parts[-1][0]


def test_random_quantized_blocks_have_the_requested_scale(tmp_path: Path) -> None:
    """Random Q4_0 / Q6_K blocks dequantize to zero-ish mean and about the spec's std."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    text = gw.TextConfig(n_embd=256, n_layer=1, n_ff=512, n_head=4)
    lm = gw.write_language_model(tmp_path / "q.gguf", text, dtype="q4_0")
    tensors = {t.name: t for t in GGUFReader(lm).tensors}
    assert tensors["output.weight"].tensor_type == GGMLQuantizationType.Q6_K
    assert tensors["blk.0.ffn_down.weight"].tensor_type == GGMLQuantizationType.Q4_0
    for name, std in (("output.weight", 256**-0.5), ("blk.0.ffn_down.weight", 512**-0.5)):
        t = tensors[name]
        values = dequantize(np.asarray(t.data), t.tensor_type)
        assert abs(values.std() / std - 1) < 0.1, name
        assert abs(values.mean()) < 0.15 * std, name


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    """Random weights are a pure function of (seed, tensor name)."""
    vision = gw.PRESETS["tiny"].vision
    a = gw.write_projector(tmp_path / "a.gguf", vision, seed=1).read_bytes()
    b = gw.write_projector(tmp_path / "b.gguf", vision, seed=1).read_bytes()
    c = gw.write_projector(tmp_path / "c.gguf", vision, seed=2).read_bytes()
    assert a == b
    assert a != c


def test_partial_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing removes the temporary file and leaves no half GGUF behind."""

    def boom(spec: object, seed: int) -> np.ndarray:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(gw, "_draw", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        gw.write_projector(tmp_path / "p.gguf", gw.PRESETS["tiny"].vision)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- validation


def test_unknown_names_and_wrong_shapes_are_refused(tmp_path: Path) -> None:
    """A misspelt tensor name or a transposed matrix fails before anything is written."""
    text = gw.PRESETS["tiny"].text
    with pytest.raises(ValueError, match=r"unknown tensor names: blk\.0\.attn_qq\.weight"):
        gw.write_language_model(tmp_path / "a.gguf", text, weights={"blk.0.attn_qq.weight": [0]})
    wrong = np.zeros((text.n_embd, text.n_ff), np.float32)  # ffn_up transposed
    with pytest.raises(
        ValueError, match=r"blk.0.ffn_up.weight: shape \(64, 128\), expected \(128, 64\)"
    ):
        gw.write_language_model(tmp_path / "a.gguf", text, weights={"blk.0.ffn_up.weight": wrong})
    with pytest.raises(ValueError, match="NaN"):
        gw.write_language_model(
            tmp_path / "a.gguf", text, weights={"output_norm.weight": np.full(64, np.nan)}
        )
    assert list(tmp_path.iterdir()) == []


def test_configs_refuse_shapes_llama_cpp_would_misread() -> None:
    """n_ff == n_embd (clip.cpp would swap the FFN) and odd head widths are refused."""
    with pytest.raises(ValueError, match="ambiguous"):
        gw.VisionConfig(
            image_size=28, patch_size=14, n_embd=32, n_ff=32, n_head=4, n_layer=2, projection_dim=64
        )
    with pytest.raises(ValueError, match="even width"):
        gw.TextConfig(n_embd=60, n_layer=1, n_ff=64, n_head=4)
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        gw.TextConfig(n_embd=64, n_layer=1, n_ff=64, n_head=4, n_head_kv=3)


def test_write_pair_refuses_mismatched_projection(tmp_path: Path) -> None:
    """The projector must output the LM's embedding width, as mtmd checks at load."""
    preset = gw.PRESETS["tiny"]
    with pytest.raises(ValueError, match="projection_dim"):
        gw.write_pair(tmp_path, preset.text, replace(preset.vision, projection_dim=32))


# --------------------------------------------------------------------------- twins


def test_llava_7b_preset_has_llama_7b_and_clip_l_shapes() -> None:
    """The 7B twin has LLaMA-7B's exact parameter count and CLIP-L/336's 576 image tokens."""
    preset = gw.PRESETS["llava-1.5-7b"]
    lm = gw._text_specs(preset.text, preset.vocab_size)
    assert sum(int(np.prod(s.shape)) for s in lm) == 6_738_415_616
    assert preset.vision.n_image_tokens == 576
    assert preset.vision.projection_dim == preset.text.n_embd == 4096


def test_shrunk_tinyllava_twin_runs_a_576_token_image_turn(tmp_path: Path) -> None:
    """Real widths (2048 LM, 32000 vocab, CLIP-L at 336 px) with few blocks run one turn."""
    preset = gw.PRESETS["tinyllava-1.1b"].shrunk(text_layers=1, vision_layers=2)
    lm, mm = gw.write_preset(preset, tmp_path)
    with MtmdRunner(lm, mm, n_ctx=1024) as runner:
        prompt = PROMPT.format(m=runner.marker)
        picture = png_bytes(size=(400, 300))
        assert ("image", 576) in runner.chunk_token_counts(prompt, [picture])
        logits = runner.logits(prompt, picture)
    assert logits.shape == (32000,)
    assert np.isfinite(logits).all()


def test_quantize_refuses_a_missing_input(tmp_path: Path) -> None:
    """llama_model_quantize's failure becomes ModelLoadError, with no output file left."""
    from llava_local.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        gw.quantize(tmp_path / "absent.gguf", tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
