"""Fewer, larger kernels for the real-time step: its hot parts as plain functions that torch.compile fuses.

Inside a CUDA graph a frame is still launch-bound at small batches: eager PyTorch runs one kernel per
operation (~3,900 per frame, most of them tiny element-wise ops around the matmuls). The functions
here are the same arithmetic as the eager modules, written as functions of tensors (not modules) so
that one compiled version serves every layer; Inductor fuses their element-wise work (norms, RoPE,
residual adds, the gated activation, FP8 quantisation, the sampling hash, the delayed token buffer's
updates) into a few kernels.

The step's ring update and attention (``StepKernels.write_and_attend``) is, on a GPU with Triton, the
split-K kernel of ``personaplex.layers.decode_attention``, which also stores this frame's key and
value in the same launch: it reads FP8 bytes and their scales directly (no dequantised bf16 copy of
the ring) and each slot only up to its own filled length; 2-3x faster than ``fp8_ring_attention``
(two reductions over the ring), which computes the same. bf16 rings of more than two conversations
stay with scaled-dot-product attention, faster there (``bench/decode_attention.py``).

Only single-frame steps use these (see ``StepKernels``); prefill and golden-parity paths stay eager.
Run eagerly, each function computes what its module counterpart computes, which the tests check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layers.attention import merge_heads, split_heads
from ..layers.decode_attention import decode_attention, decode_attention_available
from ..layers.kv_ring import quantize_fp8, write_quantized, write_ring
from ..layers.rope import Rotation, apply_rope
from .token_buffer import commit, write_given


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm`` as a function (weight: the [1, 1, dim] ``alpha``)."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.view(-1).float(), eps).to(x.dtype)


def attention_input(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, in_proj_weight: torch.Tensor, num_heads: int,
    cos_sin: torch.Tensor, fp8_scale_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, ...]:
    """Norm, fused q/k/v projection and RoPE of x [B, T, dim] -> q, k, v [B, H, T, head_dim].

    With ``fp8_scale_dtype`` k and v come back quantised for an FP8 ring: (q, k8, k_scale, v8, v_scale).
    """
    q, k, v = F.linear(rms_norm(x, norm_weight, eps), in_proj_weight).chunk(3, dim=-1)
    rotation = Rotation(cos_sin)
    q = apply_rope(split_heads(q, num_heads), rotation)
    k = apply_rope(split_heads(k, num_heads), rotation)
    v = split_heads(v, num_heads)
    if fp8_scale_dtype is None:
        return q, k, v
    return (q, *quantize_fp8(k, fp8_scale_dtype), *quantize_fp8(v, fp8_scale_dtype))


def attention_output_and_ffn(
    x: torch.Tensor, attended: torch.Tensor, out_weight: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    ffn_in: torch.Tensor, ffn_out: torch.Tensor,
) -> torch.Tensor:
    """The rest of a transformer layer: output projection and residual, then the gated feed-forward."""
    x = x + F.linear(merge_heads(attended), out_weight)
    gate, value = F.linear(rms_norm(x, norm_weight, eps), ffn_in).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * value, ffn_out)


def fp8_ring_attention(
    q: torch.Tensor, keys: torch.Tensor, key_scales: torch.Tensor, values: torch.Tensor,
    value_scales: torch.Tensor, mask: torch.Tensor,
) -> torch.Tensor:
    """Attention of one query per slot over an FP8 ring, in float32.

    q [B, H, 1, D]; keys/values [B, H, L, D] e4m3 with per-vector scales [B, H, L, 1]; mask [B, 1, 1, L]
    (True = visible). Returns [B, H, 1, D] in q's dtype. Same result as scaled_dot_product_attention
    over the dequantised ring, up to rounding.
    """
    scores = (q.float() * keys.float()).sum(-1) * (key_scales[..., 0].float() * q.shape[-1] ** -0.5)  # [B, H, L]
    scores = scores.masked_fill(~mask[:, :, 0], float("-inf"))
    weights = torch.softmax(scores, dim=-1) * value_scales[..., 0].float()
    return (weights[..., None] * values.float()).sum(2, keepdim=True).to(q.dtype)


def write_and_attend_reference(
    q: torch.Tensor, new: tuple[torch.Tensor, ...], rings: tuple[torch.Tensor, ...], slots: torch.Tensor,
    write_at: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, used: int,
) -> torch.Tensor:
    """Store this frame's key/value in one layer's rings, then attend over their first ``used`` entries.

    new: (k, v) [B, H, 1, D], or (k8, k_scale, v8, v_scale) quantised for FP8 rings; rings: (keys, values)
    [B, H, C, D], plus (key_scales, value_scales) for FP8; slots: the ``ring_index`` [B, 1, 1, 1] of this
    frame; write_at: the same as [B] int32; lengths: entries each slot has filled (only saves reading).
    """
    if len(rings) == 2:
        (keys, values), (k, v) = rings, new
        write_ring(keys, k, None, index=slots)
        write_ring(values, v, None, index=slots)
        return F.scaled_dot_product_attention(q, keys[:, :, :used], values[:, :, :used], attn_mask=mask)
    (keys, values, key_scales, value_scales), (k8, k_scale, v8, v_scale) = rings, new
    write_quantized(keys, key_scales, k8, k_scale, None, index=slots)
    write_quantized(values, value_scales, v8, v_scale, None, index=slots)
    return fp8_ring_attention(
        q, keys[:, :, :used], key_scales[:, :, :used], values[:, :, :used], value_scales[:, :, :used], mask
    )


TRITON_BF16_MAX_BATCH = 2  # bf16 rings: the Triton kernel beats SDPA only for one or two conversations


def gpu_write_and_attend(
    q: torch.Tensor, new: tuple[torch.Tensor, ...], rings: tuple[torch.Tensor, ...], slots: torch.Tensor,
    write_at: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, used: int,
) -> torch.Tensor:
    """``write_and_attend_reference`` through the Triton kernel (store and attention in one launch) for
    FP8 rings and for bf16 rings of few conversations; SDPA after a scatter for larger bf16 batches."""
    if len(rings) == 2 and q.shape[0] > TRITON_BF16_MAX_BATCH:
        return write_and_attend_reference(q, new, rings, slots, write_at, mask, lengths, used)
    keys, values, *scales = (ring[:, :, :used] for ring in rings)
    return decode_attention(q, keys, values, mask, lengths, *scales, new=new, write_at=write_at)


@dataclass
class StepKernels:
    """The compiled hot functions one model's single-frame steps use (see ``LMModel.use_fused_step``)."""

    embed: Callable  # the sum of the 17 channel embeddings: ~100 tiny kernels eagerly
    attention_input: Callable
    attention_output_and_ffn: Callable
    write_and_attend: Callable  # signature of ``write_and_attend_reference``
    forward_depth: Callable
    choose_tokens: Callable
    write_given: Callable  # the token buffer's updates around the model (``token_buffer``)
    commit: Callable


def compile_step_kernels(model) -> StepKernels:
    """torch.compile the step's hot functions for ``model``; compilation happens at first use.

    Batch sizes vary between steps (batch buckets), ring lengths too: both are compiled as dynamic
    dimensions, so a handful of compilations serve every bucket. The attention over FP8 rings is the
    Triton split-K kernel when the model lives on a GPU.
    """
    from .sampling import choose_tokens

    def fused(fn: Callable) -> Callable:
        return torch.compile(fn, fullgraph=True, dynamic=True)

    return StepKernels(
        embed=fused(model.embed),
        attention_input=fused(attention_input),
        attention_output_and_ffn=fused(attention_output_and_ffn),
        write_and_attend=gpu_write_and_attend if on_gpu_with_triton(model) else write_and_attend_reference,
        forward_depth=fused(model.forward_depth),
        choose_tokens=fused(choose_tokens),
        write_given=fused(write_given),
        commit=fused(commit),
    )


def eager_step_kernels(model) -> StepKernels:
    """The same functions uncompiled: the fused code path, run eagerly (tests, CPU)."""
    from .sampling import choose_tokens

    return StepKernels(
        model.embed, attention_input, attention_output_and_ffn, write_and_attend_reference, model.forward_depth,
        choose_tokens, write_given, commit,
    )


def on_gpu_with_triton(model) -> bool:
    return model.text_emb.weight.is_cuda and decode_attention_available()
