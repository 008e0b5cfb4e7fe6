"""Rotary position embedding, interleaved-pair variant used by Moshi-family checkpoints."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Rotation(NamedTuple):
    """Unit complex numbers cos + i sin of the rotation angles: [B, 1, T, head_dim / 2] complex64."""

    phase: torch.Tensor


def rotation_for(positions: torch.Tensor, head_dim: int, max_period: float) -> Rotation:
    """Angles ``position * max_period**(-2i/head_dim)`` for positions [B, T]; computed once per forward
    and shared by every layer and by q and k."""
    pair = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
    # exp(-log(P) * 2i / D) rather than P ** (-2i/D): same value up to rounding, matches the reference's
    # operation order so float32 results agree to the last bits.
    freqs = torch.exp(pair * (-math.log(max_period) * 2 / head_dim))
    angles = positions.to(torch.float32)[:, None, :, None] * freqs
    return Rotation(torch.polar(torch.ones_like(angles), angles))


def apply_rope(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])`` of x [B, H, T, head_dim] (in float32; x's dtype out).

    As a complex product (pair = real + i imag, times cos + i sin): the same arithmetic as the
    reference's explicit formulas, in a few kernels instead of a dozen.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2))
    rotated = torch.view_as_real(pairs * rotation.phase)
    return rotated.reshape(x.shape).to(x.dtype)
