"""The element-wise parts of a transformer layer as a few Triton kernels, next to their PyTorch references.

Why: without torch.compile, a GPU step runs every small op of a layer as its own kernel (a norm is
four: two casts, the norm, a multiply; RoPE of q and k a dozen), and a one-conversation step is then
bound by kernel launches, not by memory or arithmetic. These kernels do each group in one launch:

- ``rms_norm`` and ``add_rms_norm`` (the residual add fused with the next norm);
- ``silu_mul``: the gated feed-forward's ``silu(gate) * value``;
- ``qkv_heads``: after the fused q/k/v projection, RoPE of q and k, the head layout, and for FP8 rings
  the per-vector quantisation of k and v (``kv_ring.quantize_fp8``);
- ``depth_attention``: the depth transformer's store of this step's key/value and its attention over
  the few entries of the step cache (``attend_few``);
- ``EmbeddingSum``: the LM's input, a sum of 17 embedding lookups (``LMModel.embed``).

Each ``*_reference`` function is the same computation op by op in PyTorch: what the "eager" kernel set
runs (``EAGER_OPS``), the reference arithmetic; ``TRITON_OPS`` holds the kernels. Both compute in float32
and round where the references round, so they agree up to float32 rounding order (FP8 bytes exactly,
but for a value on a rounding boundary). Without a GPU the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests check them on a CPU.

Each kernel compiles once per dtype combination (about a second on a GPU): shapes are runtime
arguments, and the depth step's index is not specialised on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import merge_heads, split_heads
from .kv_ring import FP8, quantize_fp8
from .rope import Rotation, apply_rope

try:  # Triton ships with CUDA builds of torch; CPU-only installs run the references.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def available() -> bool:
    return triton is not None


# ---------------------------------------------------------------------------------------------------
# References (PyTorch, op by op)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm`` of x [..., dim] with weight ([dim] or the [1, 1, dim] ``alpha``): float32 math, x's dtype out."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.view(-1).float(), eps).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm: (x + delta, rms_norm(x + delta)), both [..., dim] in x's dtype."""
    x = x + delta
    return x, rms_norm_reference(x, weight, eps)


def silu_mul_reference(gate_value: torch.Tensor) -> torch.Tensor:
    """[..., 2 * hidden] (gate first, then value) -> silu(gate) * value [..., hidden], in the input's dtype."""
    gate, value = gate_value.chunk(2, dim=-1)
    return F.silu(gate) * value


def qkv_heads_reference(
    qkv: torch.Tensor, num_heads: int, cos_sin: torch.Tensor, fp8_scale_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, ...]:
    """The fused projection's output qkv [B, T, 3 * dim] -> q, k, v [B, H, T, head_dim], q and k rotated
    (``rope.apply_rope``; cos_sin [B, 1, T, head_dim / 2, 2] float32).

    With ``fp8_scale_dtype`` k and v come back quantised for an FP8 ring: (q, k8, k_scale, v8, v_scale),
    scales [B, H, T, 1] in that dtype (``kv_ring.quantize_fp8``).
    """
    q, k, v = qkv.chunk(3, dim=-1)
    rotation = Rotation(cos_sin)
    q = apply_rope(split_heads(q, num_heads), rotation)
    k = apply_rope(split_heads(k, num_heads), rotation)
    v = split_heads(v, num_heads)
    if fp8_scale_dtype is None:
        return q, k, v
    return (q, *quantize_fp8(k, fp8_scale_dtype), *quantize_fp8(v, fp8_scale_dtype))


def attend_few(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention of q [B, H, 1, D] over a few keys/values [B, H, S, D], in float32; q's dtype out.

    Written as element-wise products and sums rather than scaled_dot_product_attention: compiled, it
    fuses with the key/value store around it into a couple of kernels, where an attention kernel per
    layer and depth step cost more to launch than to run.
    """
    scores = (q.float() * keys.float()).sum(-1, keepdim=True) * q.shape[-1] ** -0.5  # [B, H, S, 1]
    weights = torch.softmax(scores, dim=2)
    return (weights * values.float()).sum(2, keepdim=True).to(q.dtype)


def depth_attention_reference(
    qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: int, first_visible: int, num_heads: int,
) -> torch.Tensor:
    """One depth step's attention in one layer: qkv [B, 1, 3 * dim] (the fused projection's output) ->
    merged heads [B, 1, dim].

    This step's key and value are stored at entry ``step`` of the layer's cache keys/values [B, H, S, D]
    (in place), then q attends over entries ``first_visible .. step``.
    """
    q, k, v = qkv.chunk(3, dim=-1)
    keys[:, :, step] = split_heads(k, num_heads)[:, :, 0]
    values[:, :, step] = split_heads(v, num_heads)[:, :, 0]
    attended = attend_few(
        split_heads(q, num_heads), keys[:, :, first_visible : step + 1], values[:, :, first_visible : step + 1],
    )
    return merge_heads(attended)


# ---------------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    @triton.jit
    def _cast(x, dtype: tl.constexpr):
        """float32 x to ``dtype``, rounded to nearest even: GPUs cast so, Triton's interpreter truncates to
        bfloat16, so bfloat16 is rounded here first (on a GPU a few integer ops, then an exact cast)."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, delta_ptr, weight_ptr, sum_ptr, out_ptr, dim, eps,
        BLOCK: tl.constexpr, ADD: tl.constexpr,
    ):
        # One program per row of ``dim`` contiguous values (rows contiguous too).
        row = tl.program_id(0).to(tl.int64) * dim
        cols = tl.arange(0, BLOCK)
        inside = cols < dim
        x = tl.load(x_ptr + row + cols, mask=inside, other=0.0)
        if ADD:
            # The residual sum is rounded to x's dtype first, as the reference's separate add does.
            x = (x.to(tl.float32) + tl.load(delta_ptr + row + cols, mask=inside, other=0.0).to(tl.float32))
            x = _cast(x, sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row + cols, x, mask=inside)
        x = x.to(tl.float32)
        inverse_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row + cols, _cast(x * inverse_rms * weight, out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _silu_mul_kernel(gv_ptr, out_ptr, hidden, BLOCK: tl.constexpr):
        # Program (row, block of ``hidden``): gate at [0, hidden), value at [hidden, 2 * hidden) of the row.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < hidden
        gate = tl.load(gv_ptr + row * 2 * hidden + cols, mask=inside, other=0.0).to(tl.float32)
        value = tl.load(gv_ptr + row * 2 * hidden + hidden + cols, mask=inside, other=0.0).to(tl.float32)
        # Rounded after the activation as the reference (silu, then the product, each in the input's dtype).
        silu = _cast(gate / (1.0 + tl.exp(-gate)), out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * hidden + cols, _cast(silu * value, out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _e4m3_bytes(y):
        """The e4m3 bytes (int32 0..255) of float32 y (|y| <= 448), rounded to nearest, ties to even.

        Integer arithmetic, bit for bit the conversion torch uses, so that the bytes do not depend on how
        a backend casts to FP8 (Triton's interpreter truncates, GPUs differed from torch for float32)."""
        bits = y.to(tl.int32, bitcast=True)
        magnitude = bits & 0x7FFFFFFF
        # Normal (|y| >= 2**-6): rebias the exponent (127 -> 7), round the mantissa to 3 bits.
        normal = (magnitude - (120 << 23) + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20
        # Subnormal: adding 2**14 rounds |y| to a multiple of 2**-9 (e4m3's step there); the low bits count them.
        tiny = (tl.abs(y) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
        code = tl.where(magnitude < (121 << 23), tiny, normal)
        code = tl.where(magnitude > 0x7F800000, 0x7F, code)  # NaN stays NaN
        return tl.where(bits < 0, code | 0x80, code)

    @triton.jit
    def _store_pairs(real, imag, inside, out_ptr, scale_ptr, dst, FP8: tl.constexpr):
        """Store interleaved pairs (float32 values of the model dtype) at ``dst``, ``dst + 1``; for FP8 (out_ptr
        then a uint8 view) as ``kv_ring.quantize_fp8`` does: one scale per vector (rounded to its dtype first),
        values clamped."""
        if FP8:
            top = tl.maximum(tl.max(tl.where(inside, tl.abs(real), 0.0), axis=0),
                             tl.max(tl.where(inside, tl.abs(imag), 0.0), axis=0))
            scale = _cast(tl.maximum(top, 1e-12) * (1.0 / 448.0), scale_ptr.dtype.element_ty)  # as quantize_fp8
            tl.store(scale_ptr, scale)
            scale = tl.zeros_like(real) + scale.to(tl.float32)
            real = _e4m3_bytes(tl.minimum(tl.maximum(tl.math.div_rn(real, scale), -448.0), 448.0))
            imag = _e4m3_bytes(tl.minimum(tl.maximum(tl.math.div_rn(imag, scale), -448.0), 448.0))
        tl.store(out_ptr + dst, real.to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(out_ptr + dst + 1, imag.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _qkv_heads_kernel(
        qkv_ptr, cs_ptr, q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, steps, heads, head_dim,
        cs_sb, cs_st,
        PAIRS: tl.constexpr, FP8: tl.constexpr,
    ):
        # Program (b * steps + t, head): one head's q, k and v of one frame. Rows of qkv: [q | k | v],
        # each heads * head_dim; interleaved pairs (2i, 2i + 1) of q and k are rotated by (cos, sin)[t, i].
        row = tl.program_id(0)
        head = tl.program_id(1)
        batch = row // steps
        t = row % steps
        dim = heads * head_dim
        pair = tl.arange(0, PAIRS)
        inside = pair < head_dim // 2
        src = qkv_ptr + row.to(tl.int64) * 3 * dim + head * head_dim + 2 * pair
        cs = cs_ptr + batch * cs_sb + t * cs_st + 2 * pair
        cos = tl.load(cs, mask=inside, other=0.0)
        sin = tl.load(cs + 1, mask=inside, other=0.0)
        vector = (batch * heads + head).to(tl.int64) * steps + t  # [B, H, T] index of this head's vector
        dst = vector * head_dim + 2 * pair
        dtype = q_ptr.dtype.element_ty
        # q and k: RoPE in float32, rounded to the model dtype as the reference's apply_rope.
        real = tl.load(src, mask=inside, other=0.0).to(tl.float32)
        imag = tl.load(src + 1, mask=inside, other=0.0).to(tl.float32)
        tl.store(q_ptr + dst, _cast(real * cos - imag * sin, dtype), mask=inside)
        tl.store(q_ptr + dst + 1, _cast(real * sin + imag * cos, dtype), mask=inside)
        real = tl.load(src + dim, mask=inside, other=0.0).to(tl.float32)
        imag = tl.load(src + dim + 1, mask=inside, other=0.0).to(tl.float32)
        rotated_real = _cast(real * cos - imag * sin, dtype).to(tl.float32)
        rotated_imag = _cast(real * sin + imag * cos, dtype).to(tl.float32)
        _store_pairs(rotated_real, rotated_imag, inside, k_ptr, ks_ptr + vector, dst, FP8)
        real = tl.load(src + 2 * dim, mask=inside, other=0.0).to(tl.float32)
        imag = tl.load(src + 2 * dim + 1, mask=inside, other=0.0).to(tl.float32)
        _store_pairs(real, imag, inside, v_ptr, vs_ptr + vector, dst, FP8)

    @triton.jit(do_not_specialize=["step", "first_visible"])
    def _depth_attention_kernel(
        qkv_ptr, k_ptr, v_ptr, out_ptr, step, first_visible, heads, head_dim, sm_scale,
        k_sb, k_sh, k_ss, v_sb, v_sh, v_ss,
        DIMS: tl.constexpr, ENTRIES: tl.constexpr,
    ):
        # Program (slot, head): store this step's key/value at entry ``step``, attend over
        # [first_visible, step]. The new entry is used from registers, not re-read from the cache.
        slot = tl.program_id(0)
        head = tl.program_id(1)
        dim = heads * head_dim
        dims = tl.arange(0, DIMS)
        in_head = dims < head_dim
        src = qkv_ptr + slot.to(tl.int64) * 3 * dim + head * head_dim + dims
        q = tl.load(src, mask=in_head, other=0.0).to(tl.float32)
        new_k = tl.load(src + dim, mask=in_head, other=0.0)
        new_v = tl.load(src + 2 * dim, mask=in_head, other=0.0)
        k_base = k_ptr + slot.to(tl.int64) * k_sb + head * k_sh
        v_base = v_ptr + slot.to(tl.int64) * v_sb + head * v_sh
        tl.store(k_base + step * k_ss + dims, new_k.to(k_ptr.dtype.element_ty), mask=in_head)
        tl.store(v_base + step * v_ss + dims, new_v.to(v_ptr.dtype.element_ty), mask=in_head)
        entries = tl.arange(0, ENTRIES)
        seen = (entries >= first_visible) & (entries < step)  # older entries, from the cache
        both = seen[:, None] & in_head[None, :]
        keys = tl.load(k_base + entries[:, None] * k_ss + dims[None, :], mask=both, other=0.0).to(tl.float32)
        values = tl.load(v_base + entries[:, None] * v_ss + dims[None, :], mask=both, other=0.0).to(tl.float32)
        current = (entries == step)[:, None]
        keys = tl.where(current, new_k.to(k_ptr.dtype.element_ty).to(tl.float32)[None, :], keys)
        values = tl.where(current, new_v.to(v_ptr.dtype.element_ty).to(tl.float32)[None, :], values)
        scores = tl.sum(keys * q[None, :], axis=1) * sm_scale
        scores = tl.where(seen | (entries == step), scores, float("-inf"))
        weights = tl.exp(scores - tl.max(scores, axis=0))
        weights = weights / tl.sum(weights, axis=0)
        out = tl.sum(weights[:, None] * values, axis=0)
        tl.store(out_ptr + slot.to(tl.int64) * dim + head * head_dim + dims, _cast(out, out_ptr.dtype.element_ty),
                 mask=in_head)

    @triton.jit
    def _embedding_sum_kernel(
        tokens_ptr, tables_ptr, columns_ptr, rows_ptr, out_ptr, tables, dim, token_stride,
        BLOCK: tl.constexpr,
    ):
        # Program (frame, block of dim): the sum over tables of table[token], tables given by address.
        frame = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < dim
        dtype = out_ptr.dtype.element_ty
        total = tl.zeros((BLOCK,), tl.float32)
        for table in range(tables):
            ids = tl.load(tokens_ptr + frame * token_stride + tl.load(columns_ptr + table))
            rows = tl.load(rows_ptr + table)
            weights = tl.load(tables_ptr + table).to(tl.pointer_type(dtype))
            row = tl.minimum(tl.maximum(ids, 0), rows - 1)  # clamped into the table, as the reference
            present = inside & ((tl.zeros_like(cols) + ids) != -1)  # a token of -1 contributes nothing
            found = tl.load(weights + row * dim + cols, mask=present, other=0.0).to(tl.float32)
            total = _cast(total + found, dtype).to(tl.float32)  # each add rounded, as the reference's adds
        tl.store(out_ptr + frame * dim + cols, total.to(dtype), mask=inside)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with contiguous rows, as the kernels read them (layer outputs are; anything else is copied)."""
    return x if x.is_contiguous() else x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm_reference`` in one kernel. x [..., dim]; weight [dim] or [1, 1, dim]."""
    x = _rows(x)
    dim = x.shape[-1]
    out = torch.empty_like(x)
    block = triton.next_power_of_2(dim)
    _rms_norm_kernel[(x.numel() // dim,)](x, x, weight, out, out, dim, eps, BLOCK=block, ADD=False)
    return out


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rms_norm_reference`` in one kernel: (x + delta, rms_norm(x + delta)); x, delta [..., dim]."""
    if delta.shape != x.shape:
        raise ValueError(f"delta {tuple(delta.shape)} must have x's shape {tuple(x.shape)}")
    x, delta = _rows(x), _rows(delta)
    dim = x.shape[-1]
    total, out = torch.empty_like(x), torch.empty_like(x)
    _rms_norm_kernel[(x.numel() // dim,)](
        x, delta, weight, total, out, dim, eps, BLOCK=triton.next_power_of_2(dim), ADD=True,
    )
    return total, out


SILU_BLOCK = 1024  # hidden units per program


def silu_mul(gate_value: torch.Tensor) -> torch.Tensor:
    """``silu_mul_reference`` in one kernel: gate_value [..., 2 * hidden] -> [..., hidden]."""
    gate_value = _rows(gate_value)
    hidden = gate_value.shape[-1] // 2
    out = gate_value.new_empty(*gate_value.shape[:-1], hidden)
    rows = gate_value.numel() // (2 * hidden)
    block = min(SILU_BLOCK, triton.next_power_of_2(hidden))
    _silu_mul_kernel[(rows, triton.cdiv(hidden, block))](gate_value, out, hidden, BLOCK=block)
    return out


def qkv_heads(
    qkv: torch.Tensor, num_heads: int, cos_sin: torch.Tensor, fp8_scale_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, ...]:
    """``qkv_heads_reference`` in one kernel; q, k, v (or k8, v8 and scales) come back contiguous."""
    qkv = _rows(qkv)
    batch, steps, width = qkv.shape
    head_dim = width // 3 // num_heads
    if cos_sin.shape[-2:] != (head_dim // 2, 2) or cos_sin.stride(-1) != 1 or cos_sin.stride(-2) != 2:
        raise ValueError("cos_sin must be [B, 1, T, head_dim / 2, 2] with contiguous last two dimensions")
    shape = (batch, num_heads, steps, head_dim)
    q = qkv.new_empty(shape)
    if fp8_scale_dtype is None:
        k, v = qkv.new_empty(shape), qkv.new_empty(shape)
        k_scale = v_scale = q  # not written
    else:
        k, v = torch.empty(shape, device=qkv.device, dtype=FP8), torch.empty(shape, device=qkv.device, dtype=FP8)
        scale_shape = (batch, num_heads, steps, 1)
        k_scale = torch.empty(scale_shape, device=qkv.device, dtype=fp8_scale_dtype)
        v_scale = torch.empty(scale_shape, device=qkv.device, dtype=fp8_scale_dtype)
    cs_sb = cos_sin.stride(0) if cos_sin.shape[0] > 1 else 0  # one rotation may serve the whole batch
    stored = (k, v) if fp8_scale_dtype is None else (k.view(torch.uint8), v.view(torch.uint8))
    _qkv_heads_kernel[(batch * steps, num_heads)](
        qkv, cos_sin, q, *stored, k_scale, v_scale, steps, num_heads, head_dim, cs_sb, cos_sin.stride(2),
        PAIRS=triton.next_power_of_2(head_dim // 2), FP8=fp8_scale_dtype is not None,
    )
    if fp8_scale_dtype is None:
        return q, k, v
    return q, k, k_scale, v, v_scale


def depth_attention(
    qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: int, first_visible: int, num_heads: int,
) -> torch.Tensor:
    """``depth_attention_reference`` in one kernel. keys/values [B, H, S, D] with a contiguous last dimension."""
    qkv = _rows(qkv)
    batch, _, width = qkv.shape
    head_dim = width // 3 // num_heads
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("the cache's last dimension must be contiguous")
    if not 0 <= first_visible <= step < keys.shape[2]:
        raise ValueError(f"need 0 <= first_visible ({first_visible}) <= step ({step}) < {keys.shape[2]}")
    out = qkv.new_empty(batch, 1, num_heads * head_dim)
    _depth_attention_kernel[(batch, num_heads)](
        qkv, keys, values, out, step, first_visible, num_heads, head_dim, head_dim ** -0.5,
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        DIMS=triton.next_power_of_2(head_dim), ENTRIES=triton.next_power_of_2(keys.shape[2]),
    )
    return out


EMBED_BLOCK = 1024  # model dims per program


class EmbeddingSum:
    """The sum of embedding lookups over several tables in one kernel: ``LMModel.embed``'s work.

    tables: embedding weights [rows_i, dim], all of one dtype and device, in the order the reference adds
    them; columns: which token column feeds each table. A token of -1 contributes nothing, other ids are
    clamped into their table. The kernel reads the tables by address (no copy of the weights); the
    addresses are taken again if a table's storage moves.
    """

    def __init__(self, tables: list[torch.Tensor], columns: list[int]):
        if len(tables) != len(columns) or not tables:
            raise ValueError("one token column per table, at least one table")
        if any(t.dtype != tables[0].dtype or t.shape[1] != tables[0].shape[1] or not t.is_contiguous() for t in tables):
            raise ValueError("the tables must be contiguous, of one dtype and width")
        self.tables = tables
        device = tables[0].device
        self.columns = torch.tensor(columns, dtype=torch.int32, device=device)
        self.rows = torch.tensor([t.shape[0] for t in tables], dtype=torch.int64, device=device)
        self._addresses: tuple[int, ...] = ()
        self._pointers = None

    def _table_pointers(self) -> torch.Tensor:
        addresses = tuple(t.data_ptr() for t in self.tables)
        if addresses != self._addresses:
            self._pointers = torch.tensor(addresses, dtype=torch.int64, device=self.tables[0].device)
            self._addresses = addresses
        return self._pointers

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [..., channels] int64 -> [..., dim] in the tables' dtype."""
        tokens = _rows(tokens)
        dim = self.tables[0].shape[1]
        frames = tokens.numel() // tokens.shape[-1]
        out = torch.empty(*tokens.shape[:-1], dim, device=tokens.device, dtype=self.tables[0].dtype)
        block = min(EMBED_BLOCK, triton.next_power_of_2(dim))
        _embedding_sum_kernel[(frames, triton.cdiv(dim, block))](
            tokens, self._table_pointers(), self.columns, self.rows, out, len(self.tables), dim, tokens.shape[-1],
            BLOCK=block,
        )
        return out


# ---------------------------------------------------------------------------------------------------
# The two sets


@dataclass(frozen=True)
class LayerOps:
    """The element-wise groups a layer runs, by role; the layer code (``personaplex.lm.fused``,
    ``DepthTransformer.forward``) is written once over them and given a set explicitly."""

    name: str
    rms_norm: Callable  # (x, weight, eps) -> normed
    add_rms_norm: Callable  # (x, delta, weight, eps) -> (x + delta, normed)
    silu_mul: Callable  # (gate_value) -> hidden
    qkv_heads: Callable  # (qkv, num_heads, cos_sin, fp8_scale_dtype) -> q, k, v (or quantised k, v)
    depth_attention: Callable  # (qkv, keys, values, step, first_visible, num_heads) -> merged heads
    scaled_add: Callable  # (x, scale, y) -> x + scale * y (Mimi's LayerScale'd residual branches)


def scaled_add_reference(x: torch.Tensor, scale: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + scale * y, as the reference writes it (two kernels)."""
    return x + scale * y


EAGER_OPS = LayerOps(
    "eager", rms_norm_reference, add_rms_norm_reference, silu_mul_reference, qkv_heads_reference,
    depth_attention_reference, scaled_add_reference,
)
# ``torch.addcmul`` is one ATen kernel for x + scale * y (the product may be fused into the sum: rounding).
TRITON_OPS = LayerOps("triton", rms_norm, add_rms_norm, silu_mul, qkv_heads, depth_attention, torch.addcmul)
