"""Choosing each answer's tokens: one llama.cpp sampler chain per sequence (options,
grammar, seed), and stop strings cut from the streamed text."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ...sampling import LLAMA_CPP, Sampling
from ...types import Options, TokenLogprob

#: Tokens the repeat penalty looks back over (llama-cpp-python's default).
PENALTY_LAST_N = 64


def sampling_values(opts: Options, defaults: Sampling = LLAMA_CPP) -> dict[str, Any]:
    """The options, with the model's recommended sampling (``defaults``: the GGUF's,
    the catalogue's, else llama.cpp's own) where one is unset."""
    filled = defaults.fill(opts)
    return {
        "temp": filled.temperature,
        "top_k": filled.top_k,
        "top_p": filled.top_p,
        "min_p": defaults.min_p,
        "repeat_penalty": filled.repeat_penalty,
    }


class Sampler:
    """A sampler chain for one answer (llama-cpp-python's order: penalties, grammar,
    then greedy at temperature 0 or top-k, top-p, min-p, temperature and a seeded draw).
    :meth:`sample` also accepts the token into the chain (the grammar moves on)."""

    def __init__(
        self,
        lib: Any,
        vocab: Any,
        n_vocab: int,
        opts: Options,
        *,
        grammar: str | None,
        seed: int,
        defaults: Sampling = LLAMA_CPP,
    ) -> None:
        self.lib = lib
        values = sampling_values(opts, defaults)
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        self.chain = chain

        def add(sampler: Any) -> None:
            lib.llama_sampler_chain_add(chain, sampler)

        if values["repeat_penalty"] != 1.0:
            add(
                lib.llama_sampler_init_penalties(
                    n_vocab, PENALTY_LAST_N, values["repeat_penalty"], 0.0, 0.0
                )
            )
        if grammar is not None:
            add(lib.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root"))
        if values["temp"] <= 0.0:
            add(lib.llama_sampler_init_greedy())
        else:
            add(lib.llama_sampler_init_top_k(values["top_k"]))
            add(lib.llama_sampler_init_top_p(values["top_p"], 1))
            add(lib.llama_sampler_init_min_p(values["min_p"], 1))
            add(lib.llama_sampler_init_temp(values["temp"]))
            add(lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, ctx: Any, row: int) -> int:
        """The next token from the logits of batch row ``row`` (accepted into the chain)."""
        return int(self.lib.llama_sampler_sample(self.chain, ctx, row))

    def close(self) -> None:
        if self.chain:
            self.lib.llama_sampler_free(self.chain)
            self.chain = None


def token_logprob(
    logits: npt.NDArray[np.float32], token: int, top: int, piece: Callable[[int], bytes]
) -> TokenLogprob:
    """``token``'s log-probability under the raw distribution of ``logits`` (their
    log-softmax: what the model said before temperature, top-k/p, penalties or a
    grammar shaped it), with the ``top`` most likely tokens there."""
    values = logits.astype(np.float64)
    peak = float(values.max())
    logsumexp = peak + float(np.log(np.exp(values - peak).sum()))

    def one(tok: int) -> TokenLogprob:
        data = piece(tok)
        text = data.decode("utf-8", "replace")
        return TokenLogprob(token=text, logprob=float(values[tok]) - logsumexp, bytes=tuple(data))

    best: list[int] = []
    if top > 0:
        count = min(top, len(values))
        chosen = np.argpartition(-values, count - 1)[:count]
        best = sorted((int(i) for i in chosen), key=lambda i: -values[i])
    return one(token).model_copy(update={"top_logprobs": tuple(one(i) for i in best)})


class StopScanner:
    """Cuts streamed text at the first stop string, holding back possible prefixes."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        text = self.pending + piece
        if not self.stops:
            self.pending = ""
            return text, False
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            return text[:cut], True
        hold = max((_overlap(text, s) for s in self.stops), default=0)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self, piece: str) -> str:
        out, _ = self.feed(piece)
        rest, self.pending = self.pending, ""
        return out + rest


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that is a start of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
