"""Transformer pieces of the LM: gated feed-forward and the temporal (per-frame) transformer stack."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LMConfig
from ..layers.attention import ring_attention, ring_self_attention
from ..layers.kv_ring import lowest_visible, pinned_query_positions, ring_index, ring_positions, ring_visibility
from ..layers.norm import RMSNorm
from ..layers.rope import rotation_for
from .fused import StepKernels


class GatedFeedForward(nn.Module):
    """``linear_out(silu(a) * b)`` with ``[a, b] = linear_in(x)``; no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.linear_in(x).chunk(2, dim=-1)
        return self.linear_out(F.silu(gate) * value)


class SelfAttentionWeights(nn.Module):
    """Holds the fused q/k/v projection and the output projection under the checkpoint's names."""

    def __init__(self, dim: int, qkv_rows: int, out_rows: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(qkv_rows, dim))
        # Same initialisation as nn.Linear (only matters for random weights: demos, benchmarks).
        nn.init.kaiming_uniform_(self.in_proj_weight, a=math.sqrt(5))
        # For the depformer, rows of every depth step are stacked: [steps * dim, dim].
        self.out_proj = nn.Linear(dim, out_rows, bias=False)


class TemporalLayer(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.norm1 = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = SelfAttentionWeights(config.dim, 3 * config.dim, config.dim)
        self.norm2 = RMSNorm(config.dim, config.norm_eps)
        self.gating = GatedFeedForward(config.dim, config.ffn_hidden)


class TemporalTransformer(nn.Module):
    """The main transformer: one pass per frame over the summed token embeddings.

    Stateless: the KV rings are passed in (``keys``/``values`` [layers, B, H, C, head_dim]) and written
    in place at the given positions.
    """

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(TemporalLayer(config) for _ in range(config.num_layers))

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
        used_length: int | None = None, key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None,
        kernels: StepKernels | None = None, pinned: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, T, dim] frames at absolute positions ``positions[b] + t`` (positions: [B]).

        Each query attends to the C-1 most recent positions up to itself (C = ring capacity), exactly
        what the reference computes when it feeds one frame per call, whatever T is. One or two frames
        are written to the rings before attending; longer blocks (prefill, T <= C) attend over the old
        ring plus their own keys and are written after. ``used_length`` (<= C) may bound the ring
        entries read when every position written so far, this block's included, is below it.
        ``key_scales``/``value_scales`` ([layers, B, H, C, 1]): the rings are FP8 with per-vector scales.
        ``kernels``: compiled functions for single-frame steps and prefill blocks (``personaplex.lm.fused``).
        ``pinned`` [B]: positions kept for the whole conversation per slot (pin-persona; 0: sliding), or None
        when every slot slides; the rule is in ``personaplex.layers.kv_ring``.
        """
        cfg = self.config
        steps = x.shape[1]
        capacity = keys.shape[3]
        if steps > capacity:
            raise ValueError(f"a block of {steps} frames exceeds the KV ring ({capacity}); split it")
        query_positions = positions[:, None] + torch.arange(steps, device=x.device)
        lowest = lowest_visible(query_positions, capacity, pinned)
        prefill = steps > 2
        used = capacity if used_length is None else min(used_length, capacity)
        if prefill:
            key_positions = torch.cat([ring_positions(positions - 1, capacity, pinned)[:, :used], query_positions], dim=1)
        else:
            key_positions = ring_positions(query_positions[:, -1], capacity, pinned)[:, :used]
        mask = ring_visibility(key_positions, query_positions, lowest, pinned)
        rotation = rotation_for(query_positions, cfg.head_dim, cfg.max_period)
        if pinned is not None:  # pin-persona: pinned keys are scored with the query at min(q, C-2)
            return self._pinned_layers(x, positions, keys, values, used, key_scales, value_scales, mask, rotation,
                                       key_positions, query_positions, pinned, prefill)
        if kernels is not None and steps == 1:
            return self._fused_step(kernels, x, positions, keys, values, used, key_scales, value_scales, mask, rotation)
        if kernels is not None and prefill:
            return self._fused_prefill(kernels, x, positions, keys, values, used, key_scales, value_scales, mask, rotation)
        for index, layer in enumerate(self.layers):
            attended = ring_self_attention(
                layer.norm1(x), layer.self_attn.in_proj_weight, cfg.num_heads, rotation, positions,
                keys[index], values[index], mask, prefill=prefill, used_length=used,
                key_scales=None if key_scales is None else key_scales[index],
                value_scales=None if value_scales is None else value_scales[index],
            )
            x = x + layer.self_attn.out_proj(attended)
            x = x + layer.gating(layer.norm2(x))
        return x

    def _pinned_layers(
        self, x: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, used: int,
        key_scales: torch.Tensor | None, value_scales: torch.Tensor | None, mask: torch.Tensor, rotation,
        key_positions: torch.Tensor, query_positions: torch.Tensor, pinned: torch.Tensor, prefill: bool,
    ) -> torch.Tensor:
        """Every layer with some slots' prompt positions pinned in their rings (module code)."""
        cfg = self.config
        capacity = keys.shape[3]
        pinned_rotation = rotation_for(pinned_query_positions(query_positions, capacity), cfg.head_dim, cfg.max_period)
        pinned_keys = ((key_positions >= 0) & (key_positions < pinned[:, None]))[:, None, None, :]  # [B, 1, 1, K]
        index = ring_index(positions, x.shape[1], capacity, pinned)
        for layer_index, layer in enumerate(self.layers):
            attended = ring_self_attention(
                layer.norm1(x), layer.self_attn.in_proj_weight, cfg.num_heads, rotation, positions,
                keys[layer_index], values[layer_index], mask, prefill=prefill, used_length=used,
                key_scales=None if key_scales is None else key_scales[layer_index],
                value_scales=None if value_scales is None else value_scales[layer_index],
                pinned=(pinned_rotation, pinned_keys), write_index=index,
            )
            x = x + layer.self_attn.out_proj(attended)
            x = x + layer.gating(layer.norm2(x))
        return x

    def _fused_step(
        self, kernels: StepKernels, x: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
        used: int, key_scales: torch.Tensor | None, value_scales: torch.Tensor | None, mask: torch.Tensor,
        rotation,
    ) -> torch.Tensor:
        """One frame through every layer with the compiled kernels: same arithmetic as the loop above."""
        cfg = self.config
        fp8 = key_scales is not None
        slots = ring_index(positions, 1, keys.shape[3])  # where this frame goes in every layer's rings
        write_at = slots.view(-1).to(torch.int32)
        # Ring entries each slot has filled (its own part is all it reads); the mask does the rest.
        lengths = (positions + 1).clamp(max=used).to(torch.int32)
        for index, layer in enumerate(self.layers):
            new = kernels.attention_input(
                x, layer.norm1.alpha, cfg.norm_eps, layer.self_attn.in_proj_weight, cfg.num_heads, rotation.cos_sin,
                key_scales.dtype if fp8 else None,
            )
            rings = (keys[index], values[index]) + ((key_scales[index], value_scales[index]) if fp8 else ())
            attended = kernels.write_and_attend(new[0], new[1:], rings, slots, write_at, mask, lengths, used)
            x = kernels.attention_output_and_ffn(
                x, attended, layer.self_attn.out_proj.weight, layer.norm2.alpha, cfg.norm_eps,
                layer.gating.linear_in.weight, layer.gating.linear_out.weight,
            )
        return x

    def _fused_prefill(
        self, kernels: StepKernels, x: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
        values: torch.Tensor, used: int, key_scales: torch.Tensor | None, value_scales: torch.Tensor | None,
        mask: torch.Tensor, rotation,
    ) -> torch.Tensor:
        """A prefill block with the compiled layer functions around the (eager) block attention: a join's
        prefill blocks run between live ticks, and their cost is mostly kernel launches."""
        cfg = self.config
        for index, layer in enumerate(self.layers):
            q, k, v = kernels.attention_input(
                x, layer.norm1.alpha, cfg.norm_eps, layer.self_attn.in_proj_weight, cfg.num_heads, rotation.cos_sin, None
            )
            attended = ring_attention(
                q, k, v, positions, keys[index], values[index], mask, prefill=True, used_length=used,
                key_scales=None if key_scales is None else key_scales[index],
                value_scales=None if value_scales is None else value_scales[index],
            )
            x = kernels.attention_output_and_ffn(
                x, attended, layer.self_attn.out_proj.weight, layer.norm2.alpha, cfg.norm_eps,
                layer.gating.linear_in.weight, layer.gating.linear_out.weight,
            )
        return x
