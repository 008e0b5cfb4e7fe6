"""The depth transformer ("depformer"): predicts a frame's audio codebooks one after another.

It restarts from an empty state at every frame. Depth step ``t`` has its own weights: a slice of the
stacked attention projections, its own feed-forward, input projection and output head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LMConfig
from ..layers.attention import merge_heads, split_heads
from ..layers.norm import RMSNorm
from .layers import GatedFeedForward, SelfAttentionWeights


def attend_few(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention of q [B, H, 1, D] over a few (<= dep_q) keys/values [B, H, S, D], in float32.

    Written as element-wise products and sums rather than scaled_dot_product_attention: compiled, it
    fuses with the key/value store around it into a couple of kernels, where an attention kernel per
    layer and depth step (48 a frame) cost more to launch than to run.
    """
    scores = (q.float() * keys.float()).sum(-1, keepdim=True) * q.shape[-1] ** -0.5  # [B, H, S, 1]
    weights = torch.softmax(scores, dim=2)
    return (weights * values.float()).sum(2, keepdim=True).to(q.dtype)


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

    def forward(self, x: torch.Tensor, step: int, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Run depth step ``step`` on x [B, 1, dim]; keys/values from ``new_cache``, written in place."""
        cfg = self.config
        dim = cfg.depformer_dim
        # The reference keeps a ring of dep_q entries and never attends to its oldest one once full:
        # the last depth step cannot see the first (kept for checkpoint parity).
        first_visible = max(0, step - cfg.dep_q + 2)
        for index, layer in enumerate(self.layers):
            h = layer.norm1(x)
            qkv_weight = layer.self_attn.in_proj_weight[step * 3 * dim : (step + 1) * 3 * dim]
            q, k, v = F.linear(h, qkv_weight).chunk(3, dim=-1)
            keys[index, :, :, step] = split_heads(k, cfg.depformer_num_heads)[:, :, 0]
            values[index, :, :, step] = split_heads(v, cfg.depformer_num_heads)[:, :, 0]
            attended = attend_few(
                split_heads(q, cfg.depformer_num_heads),
                keys[index, :, :, first_visible : step + 1],
                values[index, :, :, first_visible : step + 1],
            )
            out_weight = layer.self_attn.out_proj.weight[step * dim : (step + 1) * dim]
            x = x + F.linear(merge_heads(attended), out_weight)
            x = x + layer.gating[step](layer.norm2(x))
        return x
