"""Persona prefix cache: the state a system prompt leaves, computed once, copied into later slots.

After a persona's prompt, a slot holds KV entries for the prompt positions (ring indices 0..P-1, the
prompt is shorter than the ring) and a small token buffer. Both depend only on the persona and the
model, so the next conversation with the same persona copies them instead of running the prefill.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class PromptSnapshot:
    kv: list[torch.Tensor]  # keys, values (and their FP8 scales): [layers, 1, heads, P, ...]
    cache: torch.Tensor  # [1, channels, max_delay + 3] token buffer
    provided: torch.Tensor
    offset: torch.Tensor  # [1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.kv, self.cache, self.provided, self.offset))


class PrefixCache:
    """Least-recently-used snapshots, bounded in device memory."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, PromptSnapshot] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def get(self, key: tuple) -> PromptSnapshot | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: tuple, snapshot: PromptSnapshot) -> None:
        if snapshot.nbytes > self.max_bytes:
            return
        self._entries[key] = snapshot
        self._entries.move_to_end(key)
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)


def take_snapshot(gen_state, lm_state, slot: int, prompt_positions: int, kv_slot: int | None = None) -> PromptSnapshot:
    """Copy what slot ``slot`` holds after its prompt (KV ring indices [0, prompt_positions)); the KV
    entries come from ``lm_state``'s slot ``kv_slot`` when given (a prompt prefilled elsewhere)."""
    kv_slot = slot if kv_slot is None else kv_slot
    return PromptSnapshot(
        kv=[t[:, kv_slot : kv_slot + 1, :, :prompt_positions].clone() for t in lm_state.tensors()],
        cache=gen_state.cache[slot : slot + 1].clone(),
        provided=gen_state.provided[slot : slot + 1].clone(),
        offset=gen_state.offset[slot : slot + 1].clone(),
    )


def restore_snapshot(snapshot: PromptSnapshot, gen_state, lm_state, first: int, stop: int) -> None:
    """Write a snapshot into slots ``first..stop-1`` (other ring entries stay, masked as unwritten)."""
    for ring, saved in zip(lm_state.tensors(), snapshot.kv):
        ring[:, first:stop, :, : saved.shape[3]] = saved
    gen_state.cache[first:stop] = snapshot.cache
    gen_state.provided[first:stop] = snapshot.provided
    gen_state.offset[first:stop] = snapshot.offset
