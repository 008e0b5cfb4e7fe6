"""Rotary position embedding, interleaved-pair variant used by Moshi-family checkpoints."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Rotation(NamedTuple):
    """cos and sin of the rotation angles, stacked last: [B, 1, T, head_dim / 2, 2] float32.

    Laid out as the real view of the unit complex numbers cos + i sin, so that eager code rotates with
    one complex product while compiled code (Inductor has no complex kernels) uses real arithmetic.
    """

    cos_sin: torch.Tensor


def rotation_for(positions: torch.Tensor, head_dim: int, max_period: float) -> Rotation:
    """Angles ``position * max_period**(-2i/head_dim)`` for positions [B, T]; computed once per forward
    and shared by every layer and by q and k."""
    pair = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
    # exp(-log(P) * 2i / D) rather than P ** (-2i/D): same value up to rounding, matches the reference's
    # operation order so float32 results agree to the last bits.
    freqs = torch.exp(pair * (-math.log(max_period) * 2 / head_dim))
    angles = positions.to(torch.float32)[:, None, :, None] * freqs
    return Rotation(torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1))


def apply_rope(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])`` of x [B, H, T, head_dim] (in float32; x's dtype out).

    A complex product (pair = real + i imag, times cos + i sin): the reference's explicit formulas in
    a few kernels instead of a dozen when eager, and the same formulas spelt out when compiled.
    """
    pairs = x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    if torch.compiler.is_compiling():
        cos, sin = rotation.cos_sin[..., 0], rotation.cos_sin[..., 1]
        real, imag = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rotation.cos_sin))
    return rotated.reshape(x.shape).to(x.dtype)
