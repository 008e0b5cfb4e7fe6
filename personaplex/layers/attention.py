"""Streaming self-attention over a KV ring, shared by the LM's temporal transformer and Mimi's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_ring import dequantize_fp8, quantize_fp8, read_ring, write_ring


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H*D] -> [B, H, T, D]"""
    batch, steps, _ = x.shape
    return x.view(batch, steps, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H*D]"""
    batch, _, steps, _ = x.shape
    return x.transpose(1, 2).reshape(batch, steps, -1)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention`` as plain matmuls and a softmax.

    For float32 paths with a couple of queries (Mimi's streaming transformers): there the generic float32
    attention kernel costs ~30 us a call on an H100, these few kernels less. ``attn_mask``: the visibility as
    an additive mask from ``additive_mask`` ([B * H, T, K], made once for all layers), with which scaling and
    masking ride in the score matmul.
    """
    batch, heads, steps, dim = q.shape
    keys = k.reshape(batch * heads, -1, dim)
    scores = torch.baddbmm(attn_mask, q.reshape(batch * heads, steps, dim), keys.transpose(1, 2), alpha=dim ** -0.5)
    return (torch.softmax(scores, dim=-1) @ v.reshape(batch * heads, -1, dim)).view(batch, heads, steps, dim)


def additive_mask(mask: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask [B, 1, T, K] as ``math_attention``'s additive one: [B * H, T, K], 0 where visible and
    -inf elsewhere (so that adding it to the scaled scores masks exactly as ``masked_fill``)."""
    batch, _, steps, keys = mask.shape
    bias = torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return bias.expand(batch, num_heads, steps, keys).reshape(batch * num_heads, steps, keys)


def pinned_math_attention(
    q: torch.Tensor, q_pinned: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
    pinned_keys: torch.Tensor,
) -> torch.Tensor:
    """Attention where the keys flagged ``pinned_keys`` [B, 1, 1, K] are scored with ``q_pinned`` (the query
    rotated to another position, see ``kv_ring.pinned_query_positions``) and the others with ``q``."""
    scale = q.shape[-1] ** -0.5
    scores = torch.where(pinned_keys, q_pinned @ k.transpose(-1, -2), q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    prefill: bool = False,
    used_length: int | None = None,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
    attend=F.scaled_dot_product_attention,
    write_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of T new frames' q, k, v [B, H, T, head_dim] (at positions ``start[b] + t``, q and k
    rotated) over a KV ring; returns [B, H, T, head_dim] (heads not merged).

    Streaming (the reference's order): k and v are written to the rings [B, H, C, head_dim] in place,
    then q attends under ``mask`` [B, 1, T, C]. ``prefill`` for a long block of T <= C frames: queries
    attend over the ring as it was *before* the block plus the block's own keys (``mask`` [B, 1, T, C+T])
    and only then are the new keys written, since a block longer than two frames would otherwise
    overwrite keys its first queries still see when frames come one at a time.
    ``used_length``: attend only over ring indices [0, used_length), valid when no slot has written a
    position beyond it (short conversations need not read a 3000-frame ring); the mask covers those.
    ``key_scales``/``value_scales`` [B, H, C, 1]: the rings hold FP8 values with per-vector scales.
    ``attend``: the attention function (``scaled_dot_product_attention`` or ``math_attention``).
    ``write_index``: the ring indices to write instead of ``start``'s (``kv_ring.ring_index``).
    """
    if prefill:
        if key_scales is not None:  # the block sees its own keys as a later step would: through FP8
            scale_dtype = key_scales.dtype
            k_seen = dequantize_fp8(*quantize_fp8(k, scale_dtype), k.dtype)
            v_seen = dequantize_fp8(*quantize_fp8(v, scale_dtype), v.dtype)
        else:
            k_seen, v_seen = k, v
        old_keys = read_ring(keys, used_length, q.dtype, key_scales)
        old_values = read_ring(values, used_length, q.dtype, value_scales)
        attended = attend(
            q, torch.cat([old_keys, k_seen], dim=2), torch.cat([old_values, v_seen], dim=2), attn_mask=mask
        )
    write_ring(keys, k, start, key_scales, index=write_index)
    write_ring(values, v, start, value_scales, index=write_index)
    if not prefill:
        attended = attend(
            q, read_ring(keys, used_length, q.dtype, key_scales), read_ring(values, used_length, q.dtype, value_scales),
            attn_mask=mask,
        )
    return attended
