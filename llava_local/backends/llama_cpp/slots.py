"""The slots of a context: its sequences, what each holds position by position, and
moving KV states in and out of them (kept in the prefix cache, restored from it,
checked first)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import kv_cache, kv_payload
from .kv_cache import Key, KVState
from .model import LoadedModel
from .prompt import usable

#: A slot's old content is kept in the prefix cache before the slot is reused when it
#: holds a picture or at least this many tokens (a follow-up that re-tokenizes the last
#: answer loses a token or two, not worth copying the whole state for).
STASH_MIN_TOKENS = 64


@dataclass
class Slot:
    """One sequence of the context and what it holds, position by position."""

    seq: int
    keys: list[Key] = field(default_factory=list)
    job: Any = None  # the turn (a scheduler Job) holding it
    used: float = 0.0
    #: Forgets the kept state this slot was restored from, should reading on top of it
    #: fail (a state that passed every check but still breaks decoding).
    suspect: Callable[[], None] | None = None
    #: Holds a cell that no removal reaches (a failed restore): emptied, with the whole
    #: KV cache, when no turn is running; never given to a turn meanwhile.
    broken: bool = False

    def has_picture(self) -> bool:
        return any(isinstance(k, tuple) for k in self.keys)


class Slots:
    """The ``n_seq`` slots of ``model``'s context; ``prefix_cache`` keeps what they lose."""

    def __init__(self, model: LoadedModel, prefix_cache: kv_cache.PrefixCache | None) -> None:
        self.model = model
        self.lib = model.lib
        self.prefix_cache = prefix_cache
        self.all = [Slot(seq) for seq in range(model.n_seq)]

    def __iter__(self) -> Iterator[Slot]:
        return iter(self.all)

    def idle(self) -> list[Slot]:
        """Slots no turn holds and that can be given to one."""
        return [s for s in self.all if s.job is None and not s.broken]

    def trim(self, slot: Slot, keep: int) -> None:
        self.lib.llama_memory_seq_rm(self.model.memory, slot.seq, keep, -1)
        del slot.keys[keep:]

    def stash_lost(self, slot: Slot, *, keep_from: int) -> None:
        """Keep ``slot``'s whole state in the prefix cache when what would be lost from
        position ``keep_from`` on is worth it and no kept state holds it yet."""
        cache = self.prefix_cache
        lost = slot.keys[keep_from:]
        if cache is None or not lost:
            return
        if len(lost) < STASH_MIN_TOKENS and not any(isinstance(k, tuple) for k in lost):
            return
        to_memory, to_disk = cache.wants(slot.keys)
        if to_memory or to_disk:
            state = self.get_state(slot)
            if state is not None:
                cache.keep(state)

    def stash(self, slot: Slot) -> None:
        """Keep what ``slot`` holds in the prefix cache before it is replaced."""
        self.stash_lost(slot, keep_from=0)

    def get_state(self, slot: Slot) -> KVState | None:
        """``slot``'s KV state with the key of each position it holds."""
        lib, ctx = self.lib, self.model.ctx
        self.trim(slot, len(slot.keys))  # positions a stopped decode left unrecorded
        if not slot.keys:
            return None
        size = int(lib.llama_state_seq_get_size(ctx, slot.seq))
        if size <= 0:
            return None
        try:
            data = (ctypes.c_uint8 * size)()
        except MemoryError:
            return None
        if int(lib.llama_state_seq_get_data(ctx, data, size, slot.seq)) != size:
            return None
        return KVState(tuple(slot.keys), data)

    def set_state(self, slot: Slot, state: KVState) -> bool:
        """Make ``state`` what ``slot`` holds. A state whose layout, sizes or positions
        do not check out (:mod:`.kv_payload`) is never handed to llama.cpp; on any
        failure the slot is emptied (never half a state) and False returned: the prompt
        is then read from the start."""
        lib, ctx, mem = self.lib, self.model.ctx, self.model.memory
        self.empty(slot)
        n = len(state.keys)
        if n == 0 or kv_payload.problem(state.data, n, self.model.n_ctx) is not None:
            return False
        read = int(lib.llama_state_seq_set_data(ctx, state.data, len(state.data), slot.seq))
        if (
            read != len(state.data)
            or int(lib.llama_memory_seq_pos_min(mem, slot.seq)) != 0
            or int(lib.llama_memory_seq_pos_max(mem, slot.seq)) != n - 1
        ):
            self.empty(slot)
            return False
        slot.keys = list(state.keys)
        return True

    def empty(self, slot: Slot) -> None:
        """Remove every cell of ``slot``. A cell at a position no removal reaches (the
        last one a position can take) makes it broken until the KV cache can be cleared
        whole, with no turn running."""
        lib, mem = self.lib, self.model.memory
        lib.llama_memory_seq_rm(mem, slot.seq, 0, -1)
        slot.keys, slot.suspect = [], None
        if int(lib.llama_memory_seq_pos_max(mem, slot.seq)) >= 0:
            slot.broken = True
            self.mend()

    def mend(self) -> None:
        """Clear the whole KV cache when a slot is broken and no turn is running."""
        if any(s.broken for s in self.all) and not any(s.job for s in self.all):
            self.lib.llama_memory_clear(self.model.memory, True)
            for slot in self.all:
                slot.keys, slot.suspect, slot.broken = [], None, False

    def restore(self, slot: Slot, state: KVState, keys: Sequence[Key]) -> int:
        if not self.set_state(slot, state):
            return 0
        return usable(keys, kv_cache.common_prefix(slot.keys, keys))

    def idle_slot(self) -> Slot | None:
        """The idle slot used least recently (to load a state into)."""
        idle = [s for s in self.all if s.job is None]
        return min(idle, key=lambda s: s.used) if idle else None

    def free_cells(self) -> bool:
        """Empty the idle slot used least recently (kept in the prefix cache first)."""
        idle = [s for s in self.all if s.job is None and s.keys]
        if not idle:
            return False
        slot = min(idle, key=lambda s: s.used)
        self.stash_lost(slot, keep_from=0)
        self.trim(slot, 0)
        return True
