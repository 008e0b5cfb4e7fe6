"""The per-slot buffer that realises the channels' delays: where a step's tokens are stored and read.

Each slot keeps ``cache_columns(max_delay)`` = max_delay + 3 columns of tokens (``cache`` [B, channels,
columns], 4 for PersonaPlex) with flags saying which entries the caller forced (``provided``), and its
step counter ``offset`` [B]. A step first stores the caller's tokens at their delayed columns
(``write_given``), then, once the model chose the free channels, stores the completed column (step
``s``: column ``s % columns``) and reads the frame complete at every delay, channel k at column
``s - max_delay + delay[k]``, as the reference's ``LMGen`` does (``commit``).

These are functions of tensors that update the buffers in place, so that torch.compile fuses each
into a kernel or two on the GPU (eagerly they are ~40 tiny launches a frame); the generator's host
copy of the buffers (prompt prefill) runs them eagerly.
"""

from __future__ import annotations

import torch

def cache_columns(max_delay: int) -> int:
    """Columns of the token buffer for a delay pattern whose largest delay is ``max_delay``: the
    reference's ``max_delay + 3`` (the forced tokens of a step land up to ``max_delay`` columns ahead of
    the one being completed, the model reads the one before it)."""
    return max_delay + 3


def column_index(frame: torch.Tensor, channels: int, columns: int) -> torch.Tensor:
    """Gather/scatter index [B, K, 1] selecting column ``frame % columns`` per slot (no host sync)."""
    return (frame % columns)[:, None, None].expand(-1, channels, 1)


def write_given(
    cache: torch.Tensor, provided: torch.Tensor, offset: torch.Tensor, forced: torch.Tensor,
    delays: torch.Tensor, initial: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the caller's tokens (forced [B, K], -1 = free) at their delayed columns and the initial
    tokens of channels still inside their delay; returns (target column [B, K], its forced flags [B, K])."""
    channels, columns = forced.shape[1], cache.shape[2]
    write_at = ((offset[:, None] + delays) % columns)[..., None]  # [B, K, 1]
    given = (forced >= 0)[..., None]
    cache.scatter_(2, write_at, torch.where(given, forced[..., None], cache.gather(2, write_at)))
    provided.scatter_(2, write_at, given | provided.gather(2, write_at))
    now = column_index(offset, channels, columns)
    warming = (offset[:, None] <= delays)[..., None]  # [B, K, 1]
    cache.scatter_(2, now, torch.where(warming, initial[:, None], cache.gather(2, now)))
    provided.scatter_(2, now, warming | provided.gather(2, now))
    return cache.gather(2, now)[..., 0], provided.gather(2, now)[..., 0]


def commit(
    cache: torch.Tensor, provided: torch.Tensor, offset: torch.Tensor, column: torch.Tensor,
    delays: torch.Tensor, max_delay: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the completed column [B, K], read the frame that is complete at every delay, advance the
    counters. Returns (tokens [B, K], -1 where not valid yet; valid [B]).

    The frame of step ``s`` is the one whose most delayed channel was just completed: channel k is read
    at column ``s - max_delay + delays[k]``, so it describes frame ``s - max_delay``; the first steps,
    while ``s <= max_delay``, return nothing."""
    channels, columns = column.shape[1], cache.shape[2]
    provided.scatter_(2, column_index(offset - 1, channels, columns), False)
    cache.scatter_(2, column_index(offset, channels, columns), column[..., None])
    read_at = ((offset[:, None] - max_delay + delays) % columns)[..., None]
    valid = offset > max_delay
    tokens = torch.where(valid[:, None], cache.gather(2, read_at)[..., 0], -1)
    offset.add_(1)
    return tokens, valid


def prefill_block(
    cache: torch.Tensor, provided: torch.Tensor, offset: torch.Tensor, frames: torch.Tensor,
    delays: torch.Tensor, initial: torch.Tensor,
) -> torch.Tensor:
    """T steps whose every token is forced (frames [B, T, K], no -1) in one go: the same buffers and
    model inputs as T rounds of "read the model input; ``write_given``; ``commit`` the target column".

    Returns the columns the temporal transformer reads at those steps [B, T, K]. Written in closed
    form, ~30 operations whatever T is (step by step, a 64-frame block was ~1,800 tiny host ops).
    Each buffer entry ends with its last write: a step ``s`` writes forced tokens at column
    ``(s + d) % C`` (C the buffer's columns) and, while ``s <= d`` (the channel's delay), its initial
    token at ``s % C``; its commit clears the provided flags of column ``(s - 1) % C``.
    """
    batch, steps, channels = frames.shape
    columns = cache.shape[2]
    if steps == 0:
        return frames.clone()
    t = torch.arange(steps, device=frames.device)
    step = offset[:, None] + t  # [B, T] each step's counter
    # Model input of step s: column (s - 1) % C as step s - 1 left it: the initial token while s - 1 <= d,
    # else the token forced at step s - 1 - d if that step is in the block, else what was there before
    # (any other write of that column in the block comes earlier, since C > d).
    source = t[:, None] - 1 - delays  # [T, K] the block frame forced there, if in the block
    from_block = frames.gather(1, source.clamp(min=0).expand(batch, -1, -1))
    before = cache.gather(2, ((step - 1) % columns)[:, None, :].expand(-1, channels, -1)).transpose(1, 2)
    warming = (step - 1)[:, :, None] <= delays  # [B, T, K]
    inputs = torch.where(warming, initial, torch.where(source >= 0, from_block, before))

    # Final buffers: for every (column, channel), the last step of the block that wrote it.
    first, last = offset[:, None, None], (offset + steps - 1)[:, None, None]  # [B, 1, 1]
    column = torch.arange(columns, device=frames.device)[None, None, :]  # [1, 1, C]
    d = delays[None, :, None]  # [1, K, 1]

    def latest(congruent_to: torch.Tensor, upto: torch.Tensor) -> torch.Tensor:
        """The largest step <= upto that is congruent to ``congruent_to`` modulo C."""
        return upto - (upto - congruent_to) % columns

    forced_at = latest(column - d, last)  # [B, K, C]
    warm_limit = torch.minimum(last, d)
    warmed_at = latest(column, warm_limit)
    cleared_at = latest(column + 1, last)
    has_forced, has_warmed, has_cleared = forced_at >= first, warmed_at >= first, cleared_at >= first
    never = torch.full_like(forced_at, -1)
    forced_at, warmed_at = torch.where(has_forced, forced_at, never), torch.where(has_warmed, warmed_at, never)
    cleared_at = torch.where(has_cleared, cleared_at, never)
    # Within a step the forced write comes first, then the initial token, then the commit's clearing.
    forced_value = frames.gather(1, (forced_at - first).clamp(min=0).permute(0, 2, 1)).permute(0, 2, 1)  # [B, K, C]
    value = torch.where(has_warmed & (warmed_at >= forced_at), initial[None, :, None].expand_as(forced_value),
                        forced_value)
    cache.copy_(torch.where(has_forced | has_warmed, value, cache))
    set_at = torch.maximum(forced_at, warmed_at)
    flag = torch.where(has_cleared & (cleared_at >= set_at), False, True)
    provided.copy_(torch.where(has_forced | has_warmed | has_cleared, flag, provided))
    offset.add_(steps)
    return inputs
