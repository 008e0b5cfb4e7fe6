"""RMS normalisation as the Moshi-family LMs compute it."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``x * alpha / sqrt(mean(x^2) + eps)`` over the last dim, computed in float32 whatever the dtype.

    The parameter is named ``alpha`` with shape [1, 1, dim], as in the published checkpoints.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        variance = self.eps + torch.mean(x32 * x32, dim=-1, keepdim=True)
        # alpha * rsqrt(var) first, then the product with x: the reference's operation order.
        return (x32 * (self.alpha.float() * torch.rsqrt(variance))).to(x.dtype)
