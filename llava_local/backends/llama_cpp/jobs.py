"""One turn on the llama.cpp engine as the driver thread sees it (:class:`Job`), and
what the driver tells the turn's caller (:class:`Message`)."""

from __future__ import annotations

import codecs
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ...control import TurnControl
from ...types import Options, Stats, TokenLogprob
from .prompt import Prompt
from .sampling import Sampler, StopScanner
from .slots import Slot

#: How often a waiting caller looks at its turn's stop flag.
POLL_S = 0.05

Embeddings = npt.NDArray[np.float32]

JobState = Literal["waiting", "parked", "encoding", "reading", "answering", "done"]


@dataclass
class Message:
    """What the driver tells the turn's caller."""

    kind: Literal["encode", "status", "piece", "finish", "error", "cancelled", "logits"]
    value: Any = None


class Job:
    """One turn on the engine, from submission to its :class:`Finish` (or its stop)."""

    def __init__(
        self,
        prompt: Prompt,
        options: Options,
        grammar: str | None,
        seed: int,
        control: TurnControl,
        *,
        started: float,
        logits_only: bool = False,
        prefetch: bool = False,
    ) -> None:
        self.prompt = prompt
        self.keys = prompt.keys
        self.options = options
        self.grammar = grammar
        self.seed = seed
        self.control = control
        self.logits_only = logits_only or prefetch
        #: Reads a prompt ahead of its question (a picture given before it is asked
        #: about): a turn that would reuse it waits for it rather than read it again.
        self.prefetch = prefetch
        self.thread = threading.current_thread()
        self.state: JobState = "waiting"
        self.slot: Slot | None = None
        #: While "parked": the turn reading the prefix this one shares, its slot, and
        #: how many positions will be copied from it once read.
        self.donor: tuple[Job, Slot, int] | None = None
        self.part = 0  # the prompt part being read
        self.pos = 0  # positions of the prompt (then the answer) the slot holds
        self.embeddings: dict[str, Embeddings] = {}
        self.sampler: Sampler | None = None
        self.stopper = StopScanner(options.stop or ())
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.leading = True
        self.next_token: int | None = None
        self.count = 0
        #: Each answer token's log-probability, when ``options.logprobs`` asks.
        self.logprobs: list[TokenLogprob] = []
        self.stats = Stats()
        self.started = started
        self.decode_started = 0.0
        self.abandoned = False  # the caller stopped reading
        self.status = ""  # the last status sent
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.done = threading.Event()

    @property
    def stopped(self) -> bool:
        return self.abandoned or self.control.cancelled

    def send(self, kind: Any, value: Any = None) -> None:
        self.inbox.put(Message(kind, value))

    def receive(self, wake: Callable[[], None]) -> Message:
        """The next message from the driver; a stopped turn's last one is "cancelled"."""
        told = False
        while True:
            try:
                return self.inbox.get(timeout=POLL_S)
            except queue.Empty:
                if self.stopped and not told:
                    wake()  # the driver may be waiting for work
                    told = True
