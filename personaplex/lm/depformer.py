"""The depth transformer ("depformer"): predicts a frame's audio codebooks one after another.

It restarts from an empty state at every frame. Depth step ``t`` has its own weights: a slice of the
stacked attention projections, its own feed-forward, input projection and output head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LMConfig
from ..layers.fused_ops import EAGER_OPS, LayerOps
from ..layers.norm import RMSNorm
from .temporal_transformer import GatedFeedForward, SelfAttentionWeights


class DepthLayer(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        dim, steps = config.depformer_dim, config.dep_q
        self.norm1 = RMSNorm(dim, config.norm_eps)
        self.self_attn = SelfAttentionWeights(dim, steps * 3 * dim, steps * dim)
        self.norm2 = RMSNorm(dim, config.norm_eps)
        self.gating = nn.ModuleList(GatedFeedForward(dim, config.depformer_ffn_hidden) for _ in range(steps))


class DepthTransformer(nn.Module):
    """Layers of the depformer. No positional embedding, no final norm."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(DepthLayer(config) for _ in range(config.depformer_num_layers))

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Scratch keys/values for one frame: [layers, B, H, dep_q, head_dim] each."""
        cfg = self.config
        shape = (cfg.depformer_num_layers, batch_size, cfg.depformer_num_heads, cfg.dep_q, cfg.depformer_head_dim)
        return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

    def forward(
        self, x: torch.Tensor, step: int, keys: torch.Tensor, values: torch.Tensor, *, ops: LayerOps = EAGER_OPS,
    ) -> torch.Tensor:
        """Run depth step ``step`` on x [B, 1, dim]; keys/values from ``new_cache``, written in place.

        ``ops``: the element-wise groups' implementation (``personaplex.layers.fused_ops``: the PyTorch
        references, or the Triton kernels of the "triton" kernel set).
        """
        cfg = self.config
        dim = cfg.depformer_dim
        # The reference keeps a ring of dep_q entries and never attends to its oldest one once full:
        # the last depth step cannot see the first (kept for checkpoint parity).
        first_visible = max(0, step - cfg.dep_q + 2)
        eps = cfg.norm_eps
        h = ops.rms_norm(x, self.layers[0].norm1.alpha, eps)
        for index, layer in enumerate(self.layers):
            qkv = F.linear(h, layer.self_attn.in_proj_weight[step * 3 * dim : (step + 1) * 3 * dim])
            heads = cfg.depformer_num_heads
            attended = ops.depth_attention(qkv, keys[index], values[index], step, first_visible, heads)
            out_weight = layer.self_attn.out_proj.weight[step * dim : (step + 1) * dim]
            x, h = ops.add_rms_norm(x, F.linear(attended, out_weight), layer.norm2.alpha, eps)
            gating = layer.gating[step]
            delta = F.linear(ops.silu_mul(F.linear(h, gating.linear_in.weight)), gating.linear_out.weight)
            if index + 1 < len(self.layers):  # the residual add with the next layer's norm
                x, h = ops.add_rms_norm(x, delta, self.layers[index + 1].norm1.alpha, eps)
            else:
                x = x + delta
        return x
