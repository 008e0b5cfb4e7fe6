"""The LM's temporal layer as functions of tensors, and the kernel sets that run them.

There is one implementation of a temporal layer (``TemporalTransformer.forward`` calls the functions
here for every layer, whatever the number of frames); what varies is *which* version of each function
runs, given explicitly as a ``StepKernels`` by whoever builds the step (``Generator(model, kernels)``,
``Engine(..., kernels=)``). Nothing is stored as a mode on the shared model.

Kernel sets (``step_kernels``):
- "eager": the functions as written, run by PyTorch op by op (CPU, tests, the reference arithmetic).
- "triton": the same, except the single-frame ring update and attention, which is the split-K Triton
  kernel of ``personaplex.layers.decode_attention`` (it stores this frame's key and value in the same
  launch, reads FP8 bytes and their scales directly, and each slot only up to its own filled length;
  on a CPU it runs in Triton's interpreter). Nothing is compiled: a GPU engine starts in seconds, its
  CUDA graphs remove the launch overhead of the many small ops.
- "compile": the "triton" set with the element-wise-heavy functions torch.compile'd (Inductor fuses
  norms, RoPE, residual adds, the gated activation, FP8 quantisation, the sampling hash and the token
  buffer's updates into a few kernels). Compiles at first use, which costs start-up time.

Run eagerly, every function computes what the reference computes, which the tests check.
"""

from __future__ import annotations

from collections.abc import Callable
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layers.attention import merge_heads, split_heads
from ..layers.decode_attention import decode_attention, decode_attention_available
from ..layers.kv_ring import quantize_fp8, read_ring, write_quantized, write_ring
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
    FP8 rings are read as a dequantised copy in q's dtype, as the reference attention over them.
    """
    if len(rings) == 2:
        (keys, values), (k, v) = rings, new
        write_ring(keys, k, None, index=slots)
        write_ring(values, v, None, index=slots)
        return F.scaled_dot_product_attention(q, keys[:, :, :used], values[:, :, :used], attn_mask=mask)
    (keys, values, key_scales, value_scales), (k8, k_scale, v8, v_scale) = rings, new
    write_quantized(keys, key_scales, k8, k_scale, None, index=slots)
    write_quantized(values, value_scales, v8, v_scale, None, index=slots)
    return F.scaled_dot_product_attention(
        q, read_ring(keys, used, q.dtype, key_scales), read_ring(values, used, q.dtype, value_scales), attn_mask=mask
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


@dataclass(frozen=True)
class StepKernels:
    """The functions one model's steps run, by role; see the module docstring for the sets."""

    name: str  # "eager", "triton" or "compile"
    embed: Callable  # ``LMModel.embed``: the sum of the 17 channel embeddings (~100 tiny kernels eagerly)
    attention_input: Callable  # ``attention_input``
    attention_output_and_ffn: Callable  # ``attention_output_and_ffn``
    write_and_attend: Callable  # one frame's ring update and attention: ``write_and_attend_reference``
    forward_depth: Callable  # ``LMModel.forward_depth``
    choose_tokens: Callable  # ``sampling.choose_tokens``
    write_given: Callable  # the token buffer's updates around the model (``token_buffer``)
    commit: Callable

    @property
    def reads_own_lengths(self) -> bool:
        """Whether single-frame attention reads each slot only up to its own filled length (FP8 rings)."""
        return self.write_and_attend is gpu_write_and_attend


KERNEL_SETS = ("eager", "triton", "compile")
_compiled: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def step_kernels(model, name: str = "eager") -> StepKernels:
    """The kernel set ``name`` (``KERNEL_SETS``) for ``model``'s steps.

    "triton" and "compile" need Triton (on a CPU its interpreter, ``TRITON_INTERPRET=1``); "compile"
    needs a CUDA device. The compiled set is made once per model and shared by every engine over it
    (torch.compile's cache is per function, so this only saves re-wrapping).
    """
    from .sampling import choose_tokens

    if name not in KERNEL_SETS:
        raise ValueError(f"kernel set must be one of {', '.join(KERNEL_SETS)}, got {name!r}")
    if name != "eager" and not decode_attention_available():
        raise ValueError(f"the {name!r} kernels need Triton, which is not installed")
    attend = write_and_attend_reference if name == "eager" else gpu_write_and_attend
    if name != "compile":
        return StepKernels(
            name, model.embed, attention_input, attention_output_and_ffn, attend, model.forward_depth,
            choose_tokens, write_given, commit,
        )
    if model.device.type != "cuda":
        raise ValueError("the 'compile' kernels need a CUDA device (Inductor's CPU code differs in rounding)")
    if model not in _compiled:
        def fused(fn: Callable) -> Callable:
            # Batch sizes vary between steps (batch buckets), ring lengths too: dynamic dimensions.
            return torch.compile(fn, fullgraph=True, dynamic=True)

        _compiled[model] = StepKernels(
            name, fused(model.embed), fused(attention_input), fused(attention_output_and_ffn), attend,
            fused(model.forward_depth), fused(choose_tokens), fused(write_given), fused(commit),
        )
    return _compiled[model]
