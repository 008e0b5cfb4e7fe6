"""The LM's temporal layer as functions of tensors, and the kernel sets that run them.

There is one implementation of a temporal layer (``TemporalTransformer.forward`` calls the functions
here for every layer, whatever the number of frames); what varies is *which* version of each function
runs, given explicitly as a ``StepKernels`` by whoever builds the step (``Generator(model, kernels)``,
``Engine(..., kernels=)``). Nothing is stored as a mode on the shared model.

Kernel sets (``step_kernels``):
- "eager": the functions as written, run by PyTorch op by op (CPU, tests, the reference arithmetic).
- "triton": the same functions over hand-written Triton kernels: the single-frame ring update and
  attention is the split-K kernel of ``personaplex.layers.decode_attention`` (it stores this frame's key
  and value in the same launch, reads FP8 bytes and their scales directly, and each slot only up to its
  own filled length), and the layers' element-wise groups (norms, residual adds, RoPE and FP8
  quantisation, the gated activation, the depth transformer's attention) are the kernels of
  ``personaplex.layers.fused_ops`` (``TRITON_OPS``), a few launches a layer instead of dozens, and the
  depth transformer's token choice and the input embedding are one kernel each
  (``personaplex.lm.sampling_kernel``, ``fused_ops.EmbeddingSum``). On a CPU
  they run in Triton's interpreter. Nothing is compiled by Inductor: a GPU engine starts in seconds
  (each kernel JIT-compiles in about a second), its CUDA graphs remove the launch overhead that is left.
- "compile": the eager functions torch.compile'd, with the Triton decode attention (Inductor fuses
  norms, RoPE, residual adds, the gated activation, FP8 quantisation, the sampling hash and the token
  buffer's updates into a few kernels). Compiles at first use, which costs start-up time.

Run eagerly, every function computes what the reference computes, which the tests check.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..compiled import compile_step_function
from ..layers.attention import merge_heads, pinned_math_attention
from ..layers.decode_attention import decode_attention, decode_attention_available
from ..layers.fused_ops import EAGER_OPS, TRITON_OPS, EmbeddingSum, LayerOps, rms_norm_reference
from ..layers.kv_ring import read_ring, write_quantized, write_ring
from .token_buffer import commit, write_given


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm`` as a function (weight: the [1, 1, dim] ``alpha``)."""
    return rms_norm_reference(x, weight, eps)


def attention_input(
    x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, in_proj_weight: torch.Tensor,
    num_heads: int, cos_sin: torch.Tensor, fp8_scale_dtype: torch.dtype | None, *, ops: LayerOps = EAGER_OPS,
) -> tuple[torch.Tensor, ...]:
    """The previous layer's pending residual add, then norm, fused q/k/v projection and RoPE of x [B, T, dim].

    ``delta``: the previous layer's feed-forward output, added to x here (in one kernel with the norm), or
    None for the first layer. Returns (x, q, k, v) with q, k, v [B, H, T, head_dim]; with ``fp8_scale_dtype``
    k and v come back quantised for an FP8 ring: (x, q, k8, k_scale, v8, v_scale).
    ``ops``: the element-wise groups' implementation (``personaplex.layers.fused_ops``).
    """
    if delta is None:
        h = ops.rms_norm(x, norm_weight, eps)
    else:
        x, h = ops.add_rms_norm(x, delta, norm_weight, eps)
    return (x, *ops.qkv_heads(F.linear(h, in_proj_weight), num_heads, cos_sin, fp8_scale_dtype))


def attention_output_and_ffn(
    x: torch.Tensor, attended: torch.Tensor, out_weight: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    ffn_in: torch.Tensor, ffn_out: torch.Tensor, *, ops: LayerOps = EAGER_OPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rest of a transformer layer: output projection and residual, then the gated feed-forward.

    Returns (x, delta): the feed-forward's output ``delta`` is not added to x here but by the next layer's
    ``attention_input`` (with its norm) or the caller after the last layer.
    """
    x, h = ops.add_rms_norm(x, F.linear(merge_heads(attended), out_weight), norm_weight, eps)
    return x, F.linear(ops.silu_mul(F.linear(h, ffn_in)), ffn_out)


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
    pinned: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Store this frame's key/value in one layer's rings, then attend over their first ``used`` entries.

    new: (k, v) [B, H, 1, D], or (k8, k_scale, v8, v_scale) quantised for FP8 rings; rings: (keys, values)
    [B, H, C, D], plus (key_scales, value_scales) for FP8; slots: the ``ring_index`` [B, 1, 1, 1] of this
    frame; write_at: the same as [B] int32; lengths: entries each slot has filled (only saves reading).
    FP8 rings are read as a dequantised copy in q's dtype, as the reference attention over them.
    ``pinned`` = (q_pinned [B, H, 1, D], counts [B] int32): pin-persona slots' ring entries below their
    count are scored with ``q_pinned`` (``personaplex.layers.kv_ring``).
    """
    if len(rings) == 2:
        (keys, values), (k, v) = rings, new
        write_ring(keys, k, None, index=slots)
        write_ring(values, v, None, index=slots)
        seen_keys, seen_values = keys[:, :, :used], values[:, :, :used]
    else:
        (keys, values, key_scales, value_scales), (k8, k_scale, v8, v_scale) = rings, new
        write_quantized(keys, key_scales, k8, k_scale, None, index=slots)
        write_quantized(values, value_scales, v8, v_scale, None, index=slots)
        seen_keys, seen_values = read_ring(keys, used, q.dtype, key_scales), read_ring(values, used, q.dtype, value_scales)
    if pinned is None:
        return F.scaled_dot_product_attention(q, seen_keys, seen_values, attn_mask=mask)
    q_pinned, counts = pinned
    pinned_keys = (torch.arange(used, device=q.device) < counts[:, None])[:, None, None, :]
    return pinned_math_attention(q, q_pinned, seen_keys, seen_values, mask, pinned_keys)


TRITON_BF16_MAX_BATCH = 2  # bf16 rings: the Triton kernel beats SDPA only for one or two conversations


def gpu_write_and_attend(
    q: torch.Tensor, new: tuple[torch.Tensor, ...], rings: tuple[torch.Tensor, ...], slots: torch.Tensor,
    write_at: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, used: int,
    pinned: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``write_and_attend_reference`` through the Triton kernel (store and attention in one launch) for
    FP8 rings, for bf16 rings of few conversations and for pinned ones (SDPA has no second query); SDPA
    after a scatter for larger bf16 batches."""
    if len(rings) == 2 and q.shape[0] > TRITON_BF16_MAX_BATCH and pinned is None:
        return write_and_attend_reference(q, new, rings, slots, write_at, mask, lengths, used)
    keys, values, *scales = (ring[:, :, :used] for ring in rings)
    return decode_attention(q, keys, values, mask, lengths, *scales, new=new, write_at=write_at, pinned=pinned)


@dataclass(frozen=True)
class StepKernels:
    """The functions one model's steps run, by role; see the module docstring for the sets."""

    name: str  # "eager", "triton" or "compile"
    embed: Callable  # ``LMModel.embed``: the sum of the 17 channel embeddings (~100 tiny kernels eagerly)
    attention_input: Callable  # ``attention_input`` (given its ``ops``)
    attention_output_and_ffn: Callable  # ``attention_output_and_ffn`` (given its ``ops``)
    write_and_attend: Callable  # one frame's ring update and attention: ``write_and_attend_reference``
    forward_depth: Callable  # ``LMModel.forward_depth`` (given its ``ops``)
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
    from .sampling_kernel import choose_tokens_fused

    if name not in KERNEL_SETS:
        raise ValueError(f"kernel set must be one of {', '.join(KERNEL_SETS)}, got {name!r}")
    if name != "eager" and not decode_attention_available():
        raise ValueError(f"the {name!r} kernels need Triton, which is not installed")
    attend = write_and_attend_reference if name == "eager" else gpu_write_and_attend
    if name == "eager":
        return StepKernels(
            name, model.embed, attention_input, attention_output_and_ffn, attend, model.forward_depth,
            choose_tokens, write_given, commit,
        )
    if name == "triton":
        # The same layer functions over the Triton kernels of ``fused_ops``.
        def triton_ops(fn: Callable) -> Callable:
            return functools.partial(fn, ops=TRITON_OPS)

        # ``LMModel.embed``'s lookups, in its order of addition.
        embed = EmbeddingSum([table.weight for table in model.emb] + [model.text_emb.weight],
                             [1 + codebook for codebook in range(len(model.emb))] + [0])
        return StepKernels(
            name, embed, triton_ops(attention_input), triton_ops(attention_output_and_ffn), attend,
            functools.partial(model.forward_depth, ops=TRITON_OPS, choose=choose_tokens_fused), choose_tokens,
            write_given, commit,
        )
    if model.device.type != "cuda":
        raise ValueError("the 'compile' kernels need a CUDA device (Inductor's CPU code differs in rounding)")
    if model not in _compiled:
        fused = compile_step_function
        _compiled[model] = StepKernels(
            name, fused(model.embed), fused(attention_input), fused(attention_output_and_ffn), attend,
            fused(model.forward_depth), fused(choose_tokens), fused(write_given), fused(commit),
        )
    return _compiled[model]
