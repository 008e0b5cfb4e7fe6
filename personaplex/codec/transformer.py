"""The small causal transformers Mimi runs on its 25 Hz latent frames (one after the SEANet encoder,
one before the SEANet decoder).

Pre-norm layers: LayerNorm (weight and bias), multi-head self-attention with RoPE over a per-slot KV
ring, an exact-erf GELU MLP, and LayerScale on both residual branches; no biases in the linear layers.
The reference feeds 2 frames per 1920-sample call and its ring labels the oldest stored key with a
future position, so that key is never seen (``reference_lowest_visible``); this is reproduced.

``TransformerStack.prefill`` runs many such 2-frame calls in one pass (a voice prompt): same outputs and
same final rings as calling ``forward`` two frames at a time, under the equivalent mask of the fixtures'
README section 5 (key ``p`` is visible to both queries of call ``j`` iff ``p <= q`` and ``p >= 2j + 3 - C``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..compiled import compile_step_function
from ..config import MimiTransformerConfig
from ..layers.attention import additive_mask, math_attention, merge_heads, ring_attention
from ..layers.fused_ops import EAGER_OPS, TRITON_OPS, LayerOps
from ..layers.kv_ring import reference_lowest_visible, ring_positions, ring_visibility
from ..layers.rope import Rotation, rotation_for


@dataclass
class TransformerState:
    """KV rings and frame counter of one transformer, one row per slot.

    keys, values: one [B, heads, context, head_dim] ring per layer (post-RoPE keys); position [B]: frames
    seen so far by each slot, i.e. the absolute position of its next frame. Zeros are a fresh stream.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    position: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, self.position]

    def slots(self, first: int, stop: int) -> "TransformerState":
        """A view of slots ``first..stop-1``: writes through it change this state."""
        return TransformerState(
            [k[first:stop] for k in self.keys], [v[first:stop] for v in self.values], self.position[first:stop]
        )


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (``scale`` [dim])."""

    def __init__(self, dim: int, init: float = 0.01):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class AttentionWeights(nn.Module):
    """Fused q/k/v projection ``in_proj_weight`` [3*dim, dim] and ``out_proj``, under the checkpoint's names."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)
        nn.init.xavier_uniform_(self.in_proj_weight)


class TransformerLayer(nn.Module):
    def __init__(self, config: MimiTransformerConfig):
        super().__init__()
        dim = config.d_model
        self.config = config
        self.self_attn = AttentionWeights(dim)
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.linear1 = nn.Linear(dim, config.dim_feedforward, bias=False)
        self.linear2 = nn.Linear(config.dim_feedforward, dim, bias=False)
        self.layer_scale_1 = LayerScale(dim)
        self.layer_scale_2 = LayerScale(dim)

    def forward(
        self,
        x: torch.Tensor,
        start: torch.Tensor,
        rotation: Rotation,
        mask: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        prefill: bool = False,
        attend=F.scaled_dot_product_attention,
        ops: LayerOps = EAGER_OPS,
    ) -> torch.Tensor:
        """x: [B, T, dim] at positions ``start[b] + t`` (start: [B]); rings updated in place.

        Streaming: mask [B, 1, T, context]; ``prefill``: mask [B, 1, T, context + T], a block attending
        over the old ring plus its own keys (see ``layers.attention.ring_attention``). ``ops``: the
        element-wise groups (RoPE and head layout, the scaled residual adds; ``layers.fused_ops``).
        """
        qkv = F.linear(self.norm1(x), self.self_attn.in_proj_weight)
        q, k, v = ops.qkv_heads(qkv, self.config.num_heads, rotation.cos_sin, None)
        attended = merge_heads(ring_attention(q, k, v, start, keys, values, mask, prefill=prefill, attend=attend))
        x = ops.scaled_add(x, self.layer_scale_1.scale, self.self_attn.out_proj(attended))
        update = self.linear2(F.gelu(self.linear1(self.norm2(x))))
        return ops.scaled_add(x, self.layer_scale_2.scale, update)


class TransformerStack(nn.Module):
    """The layers (``transformer.layers.N``); streams frames through the per-slot KV rings."""

    def __init__(self, config: MimiTransformerConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))

    def new_state(self, batch_size: int, device: torch.device | str) -> TransformerState:
        cfg = self.config
        dtype = self.layers[0].self_attn.in_proj_weight.dtype
        shape = (batch_size, cfg.num_heads, cfg.context, cfg.head_dim)
        return TransformerState(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers],
            position=torch.zeros(batch_size, device=device, dtype=torch.long),
        )

    def forward(self, x: torch.Tensor, state: TransformerState) -> torch.Tensor:
        """x: [B, T, dim], the next T frames of every slot -> [B, T, dim].

        Equals the reference called with these T frames at once (T < context); Mimi always passes the 2
        encoder frames of one 1920-sample call, which fixes which keys are visible (module docstring).
        """
        return self.stream(x, state, F.scaled_dot_product_attention)

    def stream(self, x: torch.Tensor, state: TransformerState, attend=F.scaled_dot_product_attention,
               ops: LayerOps = EAGER_OPS) -> torch.Tensor:
        """``forward`` with the attention function (``scaled_dot_product_attention`` or ``math_attention``)
        and the element-wise groups (``layers.fused_ops``) given; all the same up to rounding."""
        steps = x.shape[1]
        capacity = self.config.context
        query_positions = state.position[:, None] + torch.arange(steps, device=x.device)
        last = query_positions[:, -1]
        # The reference's attention context equals the ring capacity, so the ring alone bounds what a
        # query sees; its mislabelled oldest key makes that C-2 keys for the first query of a call.
        mask = ring_visibility(
            ring_positions(last, capacity), query_positions, reference_lowest_visible(last, steps, capacity)
        )
        rotation = rotation_for(query_positions, self.config.head_dim, self.config.max_period)
        if attend is math_attention:  # the mask as scores to add, made once for every layer
            mask = additive_mask(mask, self.config.num_heads, x.dtype)
        for layer, keys, values in zip(self.layers, state.keys, state.values):
            x = layer(x, state.position, rotation, mask, keys, values, attend=attend, ops=ops)
        state.position.add_(steps)
        return x

    def prefill(self, x: torch.Tensor, state: TransformerState) -> torch.Tensor:
        """x: [B, T, dim] with T even -> [B, T, dim]: ``forward`` called T/2 times with 2 frames each.

        Outputs and final state (rings, position) equal the streaming ones up to float rounding, but the
        frames go through in blocks of up to C (ring capacity) rather than two at a time. Within a block,
        queries attend over [ring before the block ; the block's own keys] (``ring_attention(prefill=True)``),
        under the mask that streaming's call pattern implies: the query at position q, belonging to the
        2-frame call that starts at ``s = q - (q - position) % 2``, sees key p iff
        ``max(0, s + 3 - C) <= p <= q``. Every such p is either in the block or among the C positions
        before it, which the ring still holds (index ``p % C``), so no block needs an older key. The
        block's keys are written after it attends; a block of at most C frames writes distinct ring
        indices, leaving the ring exactly as streaming would.
        """
        steps = x.shape[1]
        if steps % 2:
            raise ValueError(f"Mimi's transformers take frames in pairs (one pair per 1920 samples), got {steps}")
        capacity = self.config.context
        block = capacity - capacity % 2  # even, so blocks never split a 2-frame call
        outputs = []
        for first in range(0, steps, block):
            outputs.append(self._prefill_block(x[:, first : first + block], state))
        return torch.cat(outputs, dim=1)

    def _prefill_block(self, x: torch.Tensor, state: TransformerState) -> torch.Tensor:
        """One block of ``prefill``: x [B, T, dim], T even and <= C."""
        steps = x.shape[1]
        capacity = self.config.context
        start = state.position  # [B]
        offsets = torch.arange(steps, device=x.device)
        query_positions = start[:, None] + offsets  # [B, T]
        call_starts = query_positions - offsets % 2  # first position of each query's 2-frame call
        # Keys: the ring as it is before the block (positions up to start - 1; negative = never written),
        # then the block's own keys, in the prefill concatenation order.
        key_positions = torch.cat([ring_positions(start - 1, capacity), query_positions], dim=1)  # [B, C + T]
        mask = ring_visibility(key_positions, query_positions, call_starts + 3 - capacity)  # [B, 1, T, C + T]
        rotation = rotation_for(query_positions, self.config.head_dim, self.config.max_period)
        for layer, keys, values in zip(self.layers, state.keys, state.values):
            x = layer(x, start, rotation, mask, keys, values, prefill=True)
        state.position.add_(steps)
        return x


class MimiTransformer(nn.Module):
    """Conv-layout wrapper (``<name>.transformer.layers.N``): [B, dim, T] in and out, 25 Hz frames.

    The reference's input/output projections are identities for Mimi (model width = latent width), so
    there are none here.
    """

    def __init__(self, config: MimiTransformerConfig):
        super().__init__()
        self.transformer = TransformerStack(config)

    def new_state(self, batch_size: int, device: torch.device | str) -> TransformerState:
        """Fresh KV rings and zero frame counters for ``batch_size`` slots."""
        return self.transformer.new_state(batch_size, device)

    def forward(self, x: torch.Tensor, state: TransformerState, stream: Callable | None = None) -> torch.Tensor:
        """x: [B, dim, T] -> [B, dim, T]; ``state`` advances by T frames. ``stream``: the function that runs
        the stack ((x [B, T, dim], state) -> [B, T, dim], see ``stream_functions``); its ``forward`` if None."""
        return (stream or self.transformer)(x.transpose(1, 2), state).transpose(1, 2)

    def prefill(self, x: torch.Tensor, state: TransformerState) -> torch.Tensor:
        """x: [B, dim, T] (T even) -> [B, dim, T]: T/2 streaming calls in one pass (``TransformerStack.prefill``)."""
        return self.transformer.prefill(x.transpose(1, 2), state).transpose(1, 2)


STREAM_KINDS = ("eager", "math", "triton", "compile")


def stream_function(stack: TransformerStack, kind: str = "eager") -> Callable:
    """How ``stack`` streams frames: (x [B, T, dim], state) -> [B, T, dim].

    "eager": ``forward`` (scaled-dot-product attention); "math": the attention as plain matmuls and a
    softmax (``math_attention``: on a GPU the generic float32 attention kernel costs ~30 us a call, these
    few kernels less, and a CUDA graph removes their launches); "triton": "math" with the Triton kernels
    of ``layers.fused_ops`` for RoPE and the head layout (one launch instead of about ten) and one kernel
    per scaled residual add; "compile": "math" torch.compile'd (~16 kernels a layer become a few). All
    compute the same up to float rounding.
    """
    if kind == "eager":
        return stack.forward
    if kind not in STREAM_KINDS:
        raise ValueError(f"stream kind must be one of {', '.join(STREAM_KINDS)}, got {kind!r}")

    ops = TRITON_OPS if kind == "triton" else EAGER_OPS

    def with_math_attention(x: torch.Tensor, state: TransformerState) -> torch.Tensor:
        return stack.stream(x, state, math_attention, ops)

    if kind == "compile":
        return compile_step_function(with_math_attention)
    return with_math_attention
