"""The per-slot buffer that realises the channels' delays: where a step's tokens are stored and read.

Each slot keeps ``CACHE_FRAMES`` columns of tokens (``cache`` [B, channels, 4]) with flags saying which
entries the caller forced (``provided``), and its step counter ``offset`` [B]. A step first stores
the caller's tokens at their delayed columns (``write_given``), then, once the model chose the free
channels, stores the completed column and reads the frame complete at every delay (``commit``).

These are functions of tensors that update the buffers in place, so that torch.compile fuses each
into a kernel or two on the GPU (eagerly they are ~40 tiny launches a frame); the generator's host
copy of the buffers (prompt prefill) runs them eagerly.
"""

from __future__ import annotations

import torch

CACHE_FRAMES = 4  # max_delay + 3, as in the reference; enough for any delay pattern used here


def column_index(frame: torch.Tensor, channels: int) -> torch.Tensor:
    """Gather/scatter index [B, K, 1] selecting one buffer column per slot (no host sync)."""
    return (frame % CACHE_FRAMES)[:, None, None].expand(-1, channels, 1)


def write_given(
    cache: torch.Tensor, provided: torch.Tensor, offset: torch.Tensor, forced: torch.Tensor,
    delays: torch.Tensor, initial: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the caller's tokens (forced [B, K], -1 = free) at their delayed columns and the initial
    tokens of channels still inside their delay; returns (target column [B, K], its forced flags [B, K])."""
    channels = forced.shape[1]
    write_at = ((offset[:, None] + delays) % CACHE_FRAMES)[..., None]  # [B, K, 1]
    given = (forced >= 0)[..., None]
    cache.scatter_(2, write_at, torch.where(given, forced[..., None], cache.gather(2, write_at)))
    provided.scatter_(2, write_at, given | provided.gather(2, write_at))
    now = column_index(offset, channels)
    warming = (offset[:, None] <= delays)[..., None]  # [B, K, 1]
    cache.scatter_(2, now, torch.where(warming, initial[:, None], cache.gather(2, now)))
    provided.scatter_(2, now, warming | provided.gather(2, now))
    return cache.gather(2, now)[..., 0], provided.gather(2, now)[..., 0]


def commit(
    cache: torch.Tensor, provided: torch.Tensor, offset: torch.Tensor, column: torch.Tensor,
    delays: torch.Tensor, max_delay: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the completed column [B, K], read the frame that is complete at every delay, advance the
    counters. Returns (tokens [B, K], -1 where not valid yet; valid [B])."""
    channels = column.shape[1]
    provided.scatter_(2, column_index(offset - 1, channels), False)
    cache.scatter_(2, column_index(offset, channels), column[..., None])
    read_at = ((offset[:, None] - 1 + delays) % CACHE_FRAMES)[..., None]
    valid = offset > max_delay
    tokens = torch.where(valid[:, None], cache.gather(2, read_at)[..., 0], -1)
    offset.add_(1)
    return tokens, valid
