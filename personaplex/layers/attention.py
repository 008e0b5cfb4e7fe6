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


def ring_self_attention(
    h: torch.Tensor,
    in_proj_weight: torch.Tensor,
    num_heads: int,
    rotation: Rotation,
    start: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Attention of the T new frames h [B, T, dim] (at positions ``start[b] + t``) over the ring.

    The fused projection gives q, k, v (rows [0, D), [D, 2D), [2D, 3D)); k and v are rotated/written to
    the rings [B, H, C, head_dim] in place, then q attends under ``mask`` [B, 1, T, C]. Returns the
    merged heads [B, T, dim], before the output projection.
    """
    q, k, v = F.linear(h, in_proj_weight).chunk(3, dim=-1)
    write_ring(keys, apply_rope(split_heads(k, num_heads), rotation), start)
    write_ring(values, split_heads(v, num_heads), start)
    q = apply_rope(split_heads(q, num_heads), rotation)
    return merge_heads(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))
