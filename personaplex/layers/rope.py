"""Rotary position embedding, interleaved-pair variant used by Moshi-family checkpoints."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Rotation(NamedTuple):
    """cos/sin of the rotation angles for a block of positions: [B, 1, T, head_dim / 2] float32 each."""

    cos: torch.Tensor
    sin: torch.Tensor


def rotation_for(positions: torch.Tensor, head_dim: int, max_period: float) -> Rotation:
    """Angles ``position * max_period**(-2i/head_dim)`` for positions [B, T]; computed once per forward
    and shared by every layer and by q and k."""
    pair = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
    # exp(-log(P) * 2i / D) rather than P ** (-2i/D): same value up to rounding, matches the reference's
    # operation order so float32 results agree to the last bits.
    freqs = torch.exp(pair * (-math.log(max_period) * 2 / head_dim))
    angles = positions.to(torch.float32)[:, None, :, None] * freqs
    return Rotation(torch.cos(angles), torch.sin(angles))


def apply_rope(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])`` of x [B, H, T, head_dim] (in float32; x's dtype out)."""
    pairs = x.view(*x.shape[:-1], x.shape[-1] // 2, 2).float()
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = rotation
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.view_as(x).to(x.dtype)
