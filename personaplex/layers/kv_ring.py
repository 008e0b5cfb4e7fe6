"""Ring-buffer key/value storage for streaming attention, with explicit per-slot positions.

A ring of capacity C keeps the keys of the last C positions of each slot: position p lives at ring
index ``p % C``. The ring holds no counters of its own: callers pass the absolute positions they
write and query, so one step serves a batch of conversations that started at different times.

Visibility follows the reference exactly, including its quirk: once a ring has wrapped, the oldest
entry still stored is never attended to, so a query sees at most C-1 keys (see ``ring_visibility``).

Two context policies, chosen per slot by its number of *pinned* positions P (``pinned`` [B]):

- sliding (P = 0, the reference): position p lives at index ``p % C``; a query at q sees positions
  ``q-C+2 .. q``. Once the context is full the system prompt slides out, and the persona with it.
- pin-persona (P = the system prompt's frames): positions ``0..P-1`` stay at indices ``0..P-1`` for the
  whole conversation; later positions slide through the other ``C-P`` indices, p at
  ``P + (p-P) % (C-P)``. A query at q sees the P pinned positions and the conversation positions
  ``q-(C-P)+2 .. q``: C-1 keys, as the reference once full. Rotary embeddings are relative, and the
  model never saw a key farther than C-2 frames from its query, so the pinned keys are seen as if they
  sat just before the oldest conversation key: their scores use the query rotated to position
  ``min(q, C-2)`` instead of q (``pinned_query_positions``), which puts pinned key i at distance
  ``min(q, C-2) - i <= C-2``. Before the context fills (q <= C-2) both policies store, see and rotate
  exactly the same, so their tokens are identical.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
FP8_RECIPROCAL = 1.0 / FP8_MAX


def quantize_fp8(x: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (e4m3 values [..., D], scales [..., 1] in ``scale_dtype``, default x's); x ~ values * scale.

    One scale per key/value vector (per slot, head and position): vectors differ in size by orders
    of magnitude across positions, a shared scale would flush the small ones to zero. The scale is
    rounded to its storage dtype first and the values clamped, so that no value overflows e4m3.
    """
    # A product with the reciprocal, not a division: CUDA divides by a Python number that way and a CPU does
    # not, so only the product gives the same last bit on both (and in the fused kernel).
    top = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    scale = (top * FP8_RECIPROCAL).to(scale_dtype or x.dtype)
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Two passes in ``dtype`` (bf16 on GPU): reading the ring back costs few bytes per value."""
    return values.to(dtype) * scale.to(dtype)


def ring_index(start: torch.Tensor, steps: int, capacity: int, pinned: torch.Tensor | None = None) -> torch.Tensor:
    """Ring index [B, 1, T, 1] of positions ``start[b] + t``: shared by every layer's writes of a step.

    pinned: [B] positions kept for the whole conversation (pin-persona; None or 0: sliding)."""
    positions = start[:, None] + torch.arange(steps, device=start.device)
    if pinned is None:
        return (positions % capacity)[:, None, :, None]
    first = pinned[:, None]
    sliding = first + torch.remainder(positions - first, capacity - first)
    return torch.where(positions < first, positions, sliding)[:, None, :, None]


def write_ring(
    ring: torch.Tensor, values: torch.Tensor, start: torch.Tensor, scales: torch.Tensor | None = None,
    *, index: torch.Tensor | None = None,
) -> None:
    """Store ``values`` [B, H, T, D] at positions ``start[b] + t`` of ``ring`` [B, H, C, D], in place.

    With ``scales`` ([B, H, C, 1]) the ring holds FP8 values and their per-vector scales. ``index``: the
    ``ring_index`` of ``start``, when the caller has it already.
    """
    if index is None:
        index = ring_index(start, values.shape[2], ring.shape[2])
    if scales is None:
        ring.scatter_(2, index.expand(values.shape), values)
        return
    write_quantized(ring, scales, *quantize_fp8(values, scales.dtype), start, index=index)


def write_quantized(
    ring: torch.Tensor, scales: torch.Tensor, quantized: torch.Tensor, scale: torch.Tensor, start: torch.Tensor,
    *, index: torch.Tensor | None = None,
) -> None:
    """Store already quantised values [B, H, T, D] (FP8) and their scales [B, H, T, 1] at ``start[b] + t``."""
    if index is None:
        index = ring_index(start, quantized.shape[2], ring.shape[2])
    # Scatter moves bytes: do it on a uint8 view (scatter has no FP8 kernels on some devices).
    ring.view(torch.uint8).scatter_(2, index.expand(quantized.shape), quantized.view(torch.uint8))
    scales.scatter_(2, index.expand(scale.shape), scale)


def read_ring(ring: torch.Tensor, length: int | None, dtype: torch.dtype, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Ring indices [0, length) as [B, H, length, D] in ``dtype`` (dequantized when FP8)."""
    used = ring[:, :, :length]
    if scales is None:
        return used
    return dequantize_fp8(used, scales[:, :, :length], dtype)


def ring_positions(last: torch.Tensor, capacity: int, pinned: torch.Tensor | None = None) -> torch.Tensor:
    """Absolute position held by each ring index, given the last position written per slot.

    last: [B]; pinned: [B] or None (see ``ring_index``); returns [B, C], negative where the index was
    never written.
    """
    index = torch.arange(capacity, device=last.device)
    if pinned is None:
        return last[:, None] - torch.remainder(last[:, None] - index, capacity)
    first, last = pinned[:, None], last[:, None]
    sliding = last - torch.remainder(last - index, capacity - first)
    kept = torch.where(index <= last, index, -1)  # pinned indices hold their own position once written
    return torch.where(index < first, kept, torch.where(sliding >= first, sliding, -1))


def ring_visibility(
    key_positions: torch.Tensor, query_positions: torch.Tensor, lowest_visible: torch.Tensor,
    pinned: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, C]: key p is visible to query q iff 0 <= p <= q and p >= lowest
    (or p is pinned: p < ``pinned[b]``).

    key_positions: [B, C] from ``ring_positions``; query_positions, lowest_visible: [B, T]; pinned: [B].
    """
    keys = key_positions[:, None, None, :]
    queries = query_positions[:, None, :, None]
    recent = keys >= lowest_visible[:, None, :, None]
    if pinned is not None:
        recent = recent | (keys < pinned[:, None, None, None])
    return (keys >= 0) & (keys <= queries) & recent


def lowest_visible(query_positions: torch.Tensor, capacity: int, pinned: torch.Tensor | None = None) -> torch.Tensor:
    """Oldest conversation position [B, T] a query at ``query_positions`` [B, T] sees, one frame per call:
    ``q - C + 2`` (the reference's C-1 keys) or, with P pinned positions, ``q - (C-P) + 2``."""
    if pinned is None:
        return query_positions - capacity + 2
    return query_positions - (capacity - pinned[:, None]) + 2


def pinned_query_positions(query_positions: torch.Tensor, capacity: int) -> torch.Tensor:
    """Positions [B, T] to rotate the queries to for their scores against pinned keys: ``min(q, C-2)``.

    Pinned key i is then seen at distance ``min(q, C-2) - i``, never farther than the model was trained
    on, right before the oldest conversation key a query sees once the context is full (module docstring).
    """
    return query_positions.clamp(max=capacity - 2)


def reference_lowest_visible(last: torch.Tensor, steps: int, capacity: int) -> torch.Tensor:
    """Lowest visible position for the queries of a call that just wrote up to ``last`` [B].

    The reference labels the oldest ring entry with a future position once the ring has wrapped, so it
    stays masked: only positions ``>= last - C + 2`` are visible, for every query of the call. With one
    frame per call (the LM) this is a causal window of C-1 frames; with two frames per call (Mimi's
    transformers) the first query of a call sees C-2 keys. Returns [B, T].
    """
    return (last - capacity + 2)[:, None].expand(-1, steps)
