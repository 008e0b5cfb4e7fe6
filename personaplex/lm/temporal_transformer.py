"""Transformer pieces of the LM: gated feed-forward and the temporal (per-frame) transformer stack."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LMConfig
from ..layers.attention import pinned_math_attention, ring_attention
from ..layers.kv_ring import lowest_visible, pinned_query_positions, ring_index, ring_positions, ring_visibility
from ..layers.norm import RMSNorm
from ..layers.rope import apply_rope, rotation_for
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


def _attend_pinned(q, k, v, attn_mask, *, q_pinned, pinned_keys):
    return pinned_math_attention(q, q_pinned, k, v, attn_mask, pinned_keys)


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
        *, kernels: StepKernels, pinned: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, T, dim] frames at absolute positions ``positions[b] + t`` (positions: [B]).

        Each query attends to the C-1 most recent positions up to itself (C = ring capacity), exactly
        what the reference computes when it feeds one frame per call, whatever T is. One or two frames
        are written to the rings before attending; longer blocks (prefill, T <= C) attend over the old
        ring plus their own keys and are written after. ``used_length`` (<= C) may bound the ring
        entries read when every position written so far, this block's included, is below it.
        ``key_scales``/``value_scales`` ([layers, B, H, C, 1]): the rings are FP8 with per-vector scales.
        ``kernels``: which version of each layer function runs (``personaplex.lm.fused.step_kernels``).
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
        fp8 = key_scales is not None
        single = steps == 1  # one frame: the kernel set's fused ring update and attention
        if single:
            slots = ring_index(positions, 1, capacity, pinned)  # where this frame goes in every layer's rings
            write_at = slots.view(-1).to(torch.int32)
            # Ring entries each slot has filled (its own part is all a kernel need read); the mask does the rest.
            lengths = (positions + 1).clamp(max=used).to(torch.int32)
        write_index = None
        if pinned is not None:
            # Pin-persona: pinned keys (ring entries below a slot's count) are scored with the query rotated
            # to min(q, C-2) (kv_ring's rule); rotating the rotated query back by the difference is that rotation.
            back = rotation_for(pinned_query_positions(query_positions, capacity) - query_positions, cfg.head_dim,
                                cfg.max_period)
            pinned_counts = pinned.to(torch.int32)
            pinned_keys = ((key_positions >= 0) & (key_positions < pinned[:, None]))[:, None, None, :]  # [B, 1, 1, K]
            write_index = ring_index(positions, steps, capacity, pinned)
        delta = None  # the previous layer's feed-forward output, added with the next norm
        for index, layer in enumerate(self.layers):
            layer_scales = (key_scales[index], value_scales[index]) if fp8 else (None, None)
            # A single frame's key and value are quantised with q (one fused kernel when compiled).
            x, *new = kernels.attention_input(
                x, delta, layer.norm1.alpha, cfg.norm_eps, layer.self_attn.in_proj_weight, cfg.num_heads,
                rotation.cos_sin, key_scales.dtype if fp8 and single else None,
            )
            if single:
                rings = (keys[index], values[index]) + (layer_scales if fp8 else ())
                pinning = None if pinned is None else (apply_rope(new[0], back), pinned_counts)
                attended = kernels.write_and_attend(new[0], new[1:], rings, slots, write_at, mask, lengths, used,
                                                    pinning)
            else:
                attend = F.scaled_dot_product_attention
                if pinned is not None:
                    attend = functools.partial(_attend_pinned, q_pinned=apply_rope(new[0], back), pinned_keys=pinned_keys)
                attended = ring_attention(
                    *new, positions, keys[index], values[index], mask, prefill=prefill, used_length=used,
                    key_scales=layer_scales[0], value_scales=layer_scales[1], attend=attend, write_index=write_index,
                )
            x, delta = kernels.attention_output_and_ffn(
                x, attended, layer.self_attn.out_proj.weight, layer.norm2.alpha, cfg.norm_eps,
                layer.gating.linear_in.weight, layer.gating.linear_out.weight,
            )
        return x + delta
