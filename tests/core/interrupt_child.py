"""A process that runs turns on the slow twin for tests/core/test_interrupts.py, which presses
Ctrl-C (a real SIGINT) at the phase it names. Run: python -m tests.core.interrupt_child LM
MMPROJ BIG_PICTURE TARGET[,TARGET...]. Prints one JSON object per line: each status as it
begins, what an interrupted turn left behind, and a last complete turn."""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

import numpy as np
from PIL import Image

from llava_local import ImageSource, VisionChat
from llava_local.backends import Turn
from llava_local.backends.llama_cpp import LlamaCppBackend
from llava_local.types import Options

from ..option_args import OptionArgs

LONG_PROMPT = "Describe every part of this picture in great detail, please. " * 20
GREEDY: OptionArgs = {"temperature": 0}


def say(**data: Any) -> None:
    print(json.dumps(data), flush=True)


def picture(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def main() -> None:
    # Background shells start children with SIGINT ignored; a terminal's child has it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    lm, mmproj, big, targets = sys.argv[1:5]
    chat = VisionChat.llama_cpp(lm, mmproj=mmproj, on_status=lambda s: say(status=s))
    engine = chat.engine
    assert isinstance(engine, LlamaCppBackend)
    for seed, target in enumerate(targets.split(","), start=1):
        chat.reset()
        source: ImageSource = big if target == "preparing pictures" else picture(seed)
        stream = None
        pieces = 0
        try:
            stream = chat.stream(LONG_PROMPT, image=source, max_tokens=400, **GREEDY)
            for _ in stream:
                pieces += 1
            say(error="the turn ended without being interrupted", target=target)
            return
        except KeyboardInterrupt:
            pass
        needed = None
        if stream is not None:
            needed = engine.context_needed(Turn([stream.message], Options(max_tokens=1)))[0]
            stream.close()
        say(
            interrupted=target,
            status=None if stream is None else stream.status,
            history=len(chat.history),
            pieces=pieces,
            clip_nodes=engine.pictures.clip_nodes,
            n_tokens=max(len(keys) for keys in engine.slot_keys()),
            prompt_tokens=None if needed is None else needed - 1,
            cached_pictures=len(engine.embeddings),
        )
    # The same engine answers a whole turn afterwards, as a fresh engine would.
    chat.reset()
    warm = chat.ask("What is this?", image=picture(99), max_tokens=6, **GREEDY)
    full_nodes = engine.pictures.clip_nodes
    chat.close()
    with VisionChat.llama_cpp(lm, mmproj=mmproj) as fresh:
        cold = fresh.ask("What is this?", image=picture(99), max_tokens=6, **GREEDY)
    say(done=warm.text, cold=cold.text, history=2, full_clip_nodes=full_nodes)


if __name__ == "__main__":
    main()
