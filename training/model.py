"""The demo model in PyTorch: exactly the graph llama.cpp runs for a LLaVA-1.5 GGUF pair.

Vision (clip.cpp ``clip_graph_llava``): a patch Conv2d without bias, the class token
appended *after* the patches (this llama.cpp build's order), learned position embeddings
(row ``i`` for patch ``i``, row ``N`` for the class token), pre-LayerNorm, then only the
first ``n_layer - 1`` of the stored pre-norm blocks (quick-GELU MLPs), no post-LayerNorm,
rows ``1..N`` of the sequence (patch 0 dropped, class token last) through the projector
``mm.2(gelu_tanh(mm.0(x)))``.

Language model (llama.cpp ``llama``): RMSNorm pre-norm blocks without biases, causal
attention with "normal" RoPE on adjacent pairs ``(q[2i], q[2i+1])``, SwiGLU FFN, untied
output. The LM can run a batch of suffixes that share one prefix (the system prompt),
which is how training saves most of its time: the prefix is computed once per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VisionShape:
    """Sizes of the vision tower; ``n_layer`` blocks are stored, ``n_layer - 1`` run."""

    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_head: int
    n_layer: int
    eps: float = 1e-5

    @property
    def n_patches(self) -> int:
        """Patches (= image tokens) per picture."""
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextShape:
    """Sizes of the llama language model."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head


# ------------------------------------------------------------------------------ vision


class VisionBlock(nn.Module):
    """A CLIP encoder block: pre-norm attention and quick-GELU MLP, with biases."""

    def __init__(self, s: VisionShape) -> None:
        super().__init__()
        self.n_head = s.n_head
        self.ln1 = nn.LayerNorm(s.n_embd, eps=s.eps)
        self.attn_q = nn.Linear(s.n_embd, s.n_embd)
        self.attn_k = nn.Linear(s.n_embd, s.n_embd)
        self.attn_v = nn.Linear(s.n_embd, s.n_embd)
        self.attn_out = nn.Linear(s.n_embd, s.n_embd)
        self.ln2 = nn.LayerNorm(s.n_embd, eps=s.eps)
        self.ffn_up = nn.Linear(s.n_embd, s.n_ff)
        self.ffn_down = nn.Linear(s.n_ff, s.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, e = x.shape
        h = self.ln1(x)
        q, k, v = (
            proj(h).view(b, n, self.n_head, e // self.n_head).transpose(1, 2)
            for proj in (self.attn_q, self.attn_k, self.attn_v)
        )
        att = F.scaled_dot_product_attention(q, k, v)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, n, e))
        h = self.ffn_up(self.ln2(x))
        h = h * torch.sigmoid(1.702 * h)  # quick GELU (clip.use_gelu = false)
        down: torch.Tensor = self.ffn_down(h)
        return x + down


class VisionTower(nn.Module):
    """CLIP ViT + LLaVA-1.5 projector, as clip.cpp computes it (see the module docstring)."""

    def __init__(self, s: VisionShape, projection_dim: int) -> None:
        super().__init__()
        self.shape = s
        self.patch_embd = nn.Conv2d(3, s.n_embd, s.patch_size, stride=s.patch_size, bias=False)
        self.class_embd = nn.Parameter(torch.randn(s.n_embd) * 0.02)
        self.position_embd = nn.Parameter(torch.randn(s.n_patches + 1, s.n_embd) * 0.02)
        self.pre_ln = nn.LayerNorm(s.n_embd, eps=s.eps)
        self.blocks = nn.ModuleList(VisionBlock(s) for _ in range(s.n_layer))
        self.mm0 = nn.Linear(s.n_embd, projection_dim)
        self.mm2 = nn.Linear(projection_dim, projection_dim)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels to the (B, N, E) rows the projector receives."""
        x: torch.Tensor = self.patch_embd(pixels)
        x = x.flatten(2).transpose(1, 2)  # (B, N, E), raster order
        cls = self.class_embd.expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.position_embd  # class token LAST
        x = self.pre_ln(x)
        for block in self.blocks[: self.shape.n_layer - 1]:  # the "penultimate layer"
            x = block(x)
        return x[:, 1:]  # patches 1..N-1, then the class token

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The LLaVA-1.5 MLP projector: linear, tanh-GELU, linear."""
        projected: torch.Tensor = self.mm2(F.gelu(self.mm0(features), approximate="tanh"))
        return projected

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(pixels))


# --------------------------------------------------------------------------- language


class RMSNorm(nn.Module):
    """llama.cpp's RMSNorm: ``x / sqrt(mean(x**2) + eps) * w``."""

    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as llama.cpp's LLAMA_ROPE_TYPE_NORM: rotate adjacent pairs ``(x[2i], x[2i+1])``.

    ``x`` is (..., T, d) with ``positions`` (T,).
    """
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    angles = positions.to(torch.float32)[:, None] * inv[None, :]  # (T, d/2)
    cos, sin = angles.cos(), angles.sin()
    pairs = x.unflatten(-1, (d // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2)


class LlamaBlock(nn.Module):
    """A llama block; attention may prepend a shared prefix's keys and values."""

    def __init__(self, s: TextShape) -> None:
        super().__init__()
        self.s = s
        e = s.n_embd
        self.attn_norm = RMSNorm(e, s.rms_eps)
        self.attn_q = nn.Linear(e, e, bias=False)
        self.attn_k = nn.Linear(e, e, bias=False)
        self.attn_v = nn.Linear(e, e, bias=False)
        self.attn_output = nn.Linear(e, e, bias=False)
        self.ffn_norm = RMSNorm(e, s.rms_eps)
        self.ffn_gate = nn.Linear(e, s.n_ff, bias=False)
        self.ffn_up = nn.Linear(e, s.n_ff, bias=False)
        self.ffn_down = nn.Linear(s.n_ff, e, bias=False)

    def qkv(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        heads = [
            p(h).view(b, t, self.s.n_head, self.s.head_dim).transpose(1, 2)
            for p in (self.attn_q, self.attn_k, self.attn_v)
        ]
        q = rope(heads[0], positions, self.s.rope_theta)
        k = rope(heads[1], positions, self.s.rope_theta)
        return q, k, heads[2]

    def finish(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = att.shape
        x = x + self.attn_output(att.transpose(1, 2).reshape(b, t, self.s.n_embd))
        h = self.ffn_norm(x)
        down: torch.Tensor = self.ffn_down(F.silu(self.ffn_gate(h)) * self.ffn_up(h))
        return x + down


class LlamaLM(nn.Module):
    """The llama language model (untied output)."""

    def __init__(self, s: TextShape) -> None:
        super().__init__()
        self.s = s
        self.token_embd = nn.Embedding(s.n_vocab, s.n_embd)
        self.blocks = nn.ModuleList(LlamaBlock(s) for _ in range(s.n_layer))
        self.output_norm = RMSNorm(s.n_embd, s.rms_eps)
        self.output = nn.Linear(s.n_embd, s.n_vocab, bias=False)

    def forward_shared_prefix(self, prefix_ids: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of suffixes after one shared prefix.

        ``prefix_ids`` (P,) token ids (may be empty); ``suffix`` (B, S, E) input embeddings.
        Returns (B, S, V): the next-token logits at every suffix position.
        """
        logits: torch.Tensor = self.output(self.hidden_shared_prefix(prefix_ids, suffix))
        return logits

    def hidden_shared_prefix(self, prefix_ids: torch.Tensor, suffix: torch.Tensor) -> torch.Tensor:
        """The normed last hidden states (B, S, E) that :meth:`forward_shared_prefix`
        turns into logits (training heads read them too)."""
        p_len = int(prefix_ids.shape[0])
        b, s_len, _ = suffix.shape
        xp = self.token_embd(prefix_ids)[None] if p_len else None
        xs = suffix
        pos_p = torch.arange(p_len)
        pos_s = torch.arange(p_len, p_len + s_len)
        causal = torch.ones(s_len, s_len, dtype=torch.bool).tril()
        mask = torch.cat([torch.ones(s_len, p_len, dtype=torch.bool), causal], dim=1)
        for block in self.blocks:
            assert isinstance(block, LlamaBlock)
            qs, ks, vs = block.qkv(xs, pos_s)
            if xp is not None:
                qp, kp, vp = block.qkv(xp, pos_p)
                att_p = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
                ks = torch.cat([kp.expand(b, -1, -1, -1), ks], dim=2)
                vs = torch.cat([vp.expand(b, -1, -1, -1), vs], dim=2)
                xp = block.finish(xp, att_p)
            att_s = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
            xs = block.finish(xs, att_s)
        hidden: torch.Tensor = self.output_norm(xs)
        return hidden


class TinyLlava(nn.Module):
    """Vision tower + projector + LM, plus training-only auxiliary classification heads."""

    def __init__(self, vision: VisionShape, text: TextShape, n_aux: int) -> None:
        super().__init__()
        self.vision = VisionTower(vision, text.n_embd)
        self.lm = LlamaLM(text)
        # Not exported: a linear probe on the class token's row of the projector's input.
        self.aux_head = nn.Linear(vision.n_embd, n_aux)
        self.apply(_init)

    def aux_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Auxiliary class logits from the class token's row (the last image token)."""
        logits: torch.Tensor = self.aux_head(features[:, -1])
        return logits


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.Conv2d):
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        nn.init.normal_(module.weight, std=1 / math.sqrt(fan_in))


def scale_residual_outputs(model: TinyLlava) -> None:
    """GPT-2 style: shrink the layers that write into the residual stream by depth."""
    with torch.no_grad():
        for blocks in (model.vision.blocks, model.lm.blocks):
            std = 0.02 / math.sqrt(2 * len(blocks))
            for block in blocks:
                for name in ("attn_out", "attn_output", "ffn_down"):
                    layer = getattr(block, name, None)
                    if isinstance(layer, nn.Linear):
                        nn.init.normal_(layer.weight, std=std)
