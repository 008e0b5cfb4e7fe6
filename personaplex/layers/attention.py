"""Streaming self-attention over a KV ring, shared by the LM's temporal transformer and Mimi's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_ring import write_ring
from .rope import Rotation, apply_rope


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H*D] -> [B, H, T, D]"""
    batch, steps, _ = x.shape
    return x.view(batch, steps, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H*D]"""
    batch, _, steps, _ = x.shape
    return x.transpose(1, 2).reshape(batch, steps, -1)


def _project(h: torch.Tensor, in_proj_weight: torch.Tensor, num_heads: int, rotation: Rotation):
    # The fused projection gives q, k, v as rows [0, D), [D, 2D), [2D, 3D); q and k get RoPE.
    q, k, v = F.linear(h, in_proj_weight).chunk(3, dim=-1)
    q = apply_rope(split_heads(q, num_heads), rotation)
    k = apply_rope(split_heads(k, num_heads), rotation)
    return q, k, split_heads(v, num_heads)


def ring_self_attention(
    h: torch.Tensor,
    in_proj_weight: torch.Tensor,
    num_heads: int,
    rotation: Rotation,
    start: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    prefill: bool = False,
    used_length: int | None = None,
) -> torch.Tensor:
    """Attention of the T new frames h [B, T, dim] (at positions ``start[b] + t``) over the ring.

    Streaming (the reference's order): k and v are written to the rings [B, H, C, head_dim] in place,
    then q attends under ``mask`` [B, 1, T, C]. ``prefill`` for a long block of T <= C frames: queries
    attend over the ring as it was *before* the block plus the block's own keys (``mask`` [B, 1, T, C+T])
    and only then are the new keys written, since a block longer than two frames would otherwise
    overwrite keys its first queries still see when frames come one at a time.
    ``used_length``: attend only over ring indices [0, used_length), valid when no slot has written a
    position beyond it (short conversations need not read a 3000-frame ring); the mask covers those.
    Returns merged heads [B, T, dim] (before the output projection).
    """
    q, k, v = _project(h, in_proj_weight, num_heads, rotation)
    used_keys, used_values = keys[:, :, :used_length], values[:, :, :used_length]
    if prefill:
        attended = F.scaled_dot_product_attention(
            q, torch.cat([used_keys, k], dim=2), torch.cat([used_values, v], dim=2), attn_mask=mask
        )
    write_ring(keys, k, start)
    write_ring(values, v, start)
    if not prefill:
        attended = F.scaled_dot_product_attention(q, used_keys, used_values, attn_mask=mask)
    return merge_heads(attended)
