"""Ring-buffer key/value storage for streaming attention, with explicit per-slot positions.

A ring of capacity C keeps the keys of the last C positions of each slot: position p lives at ring
index ``p % C``. The ring holds no counters of its own: callers pass the absolute positions they
write and query, so one step serves a batch of conversations that started at different times.

Visibility follows the reference exactly, including its quirk: once a ring has wrapped, the oldest
entry still stored is never attended to, so a query sees at most C-1 keys (see ``ring_visibility``).
"""

from __future__ import annotations

import torch


def write_ring(ring: torch.Tensor, values: torch.Tensor, start: torch.Tensor) -> None:
    """Store ``values`` [B, H, T, D] at positions ``start[b] + t`` of ``ring`` [B, H, C, D], in place."""
    batch, heads, steps, dim = values.shape
    capacity = ring.shape[2]
    index = (start[:, None] + torch.arange(steps, device=start.device)) % capacity  # [B, T]
    ring.scatter_(2, index[:, None, :, None].expand(batch, heads, steps, dim), values)


def ring_positions(last: torch.Tensor, capacity: int) -> torch.Tensor:
    """Absolute position held by each ring index, given the last position written per slot.

    last: [B]; returns [B, C], negative where the index was never written.
    """
    index = torch.arange(capacity, device=last.device)
    return last[:, None] - torch.remainder(last[:, None] - index, capacity)


def ring_visibility(
    key_positions: torch.Tensor, query_positions: torch.Tensor, lowest_visible: torch.Tensor
) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, C]: key p is visible to query q iff 0 <= p <= q and p >= lowest.

    key_positions: [B, C] from ``ring_positions``; query_positions, lowest_visible: [B, T].
    """
    keys = key_positions[:, None, None, :]
    queries = query_positions[:, None, :, None]
    lowest = lowest_visible[:, None, :, None]
    return (keys >= 0) & (keys <= queries) & (keys >= lowest)


def reference_lowest_visible(last: torch.Tensor, steps: int, capacity: int) -> torch.Tensor:
    """Lowest visible position for the queries of a call that just wrote up to ``last`` [B].

    The reference labels the oldest ring entry with a future position once the ring has wrapped, so it
    stays masked: only positions ``>= last - C + 2`` are visible, for every query of the call. With one
    frame per call (the LM) this is a causal window of C-1 frames; with two frames per call (Mimi's
    transformers) the first query of a call sees C-2 keys. Returns [B, T].
    """
    return (last - capacity + 2)[:, None].expand(-1, steps)
