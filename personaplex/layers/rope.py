"""Rotary position embedding, interleaved-pair variant used by Moshi-family checkpoints."""

from __future__ import annotations

import math

import torch


def apply_rope(x: torch.Tensor, positions: torch.Tensor, max_period: float) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])`` by ``position * max_period**(-2i/head_dim)``.

    x: [B, H, T, head_dim]; positions: [B, T] absolute frame indices (any integer dtype).
    The rotation runs in float32 whatever x's dtype (checkpoint parity), the result has x's dtype.
    """
    head_dim = x.shape[-1]
    pair = torch.arange(head_dim // 2, device=x.device, dtype=torch.float32)
    # exp(-log(P) * 2i / D) rather than P ** (-2i/D): same value up to rounding, matches the reference's
    # operation order so float32 results agree to the last bits.
    freqs = torch.exp(pair * (-math.log(max_period) * 2 / head_dim))
    angles = positions.to(torch.float32)[:, None, :, None] * freqs  # [B, 1, T, D/2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    pairs = x.view(*x.shape[:-1], head_dim // 2, 2)
    real, imag = pairs[..., 0].float(), pairs[..., 1].float()
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.view_as(x).to(x.dtype)
