"""Split-K ("flash-decoding") attention of one query per slot over its KV ring, as Triton kernels.

Why a hand-written kernel: at the end of a long conversation a step's attention reads the whole
3000-frame ring of every slot (47 GB per step for 64 FP8 slots), which must run near the GPU's
memory bandwidth. Generic attention kernels either need bf16 keys (a dequantised copy of an FP8
ring costs more than it saves) or parallelise over queries, of which a decode step has one per head.
Here every (slot, head) pair is cut into chunks of the ring read by separate programs, each
keeping a running maximum and sum (online softmax) in float32; a second kernel merges the chunks.

Each slot reads only its own filled part of the ring (``lengths``): a 10-second conversation next to
a 4-minute one costs 10 seconds of reading, not 4 minutes. Visibility inside that part comes from the
same boolean mask as the other attention paths, so the reference's ring quirks carry over unchanged.

The arithmetic is that of ``personaplex.lm.fused.fp8_ring_attention`` (and of scaled-dot-product
attention for bf16 rings), up to float32 summation order. Without a GPU the kernels run in Triton's
interpreter (``TRITON_INTERPRET=1``), which is how the tests check them on a CPU.
"""

from __future__ import annotations

import math

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs use the other attention paths.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_KEYS = 64  # ring entries per loop iteration of one program
TARGET_PROGRAMS = 1024  # enough programs to fill an H100 (132 SMs) several times over


def decode_attention_available() -> bool:
    return triton is not None


def split_count(pairs: int, length: int, target_programs: int = TARGET_PROGRAMS) -> int:
    """Chunks per (slot, head) pair: few slots need many chunks to keep every SM reading."""
    blocks = max(1, math.ceil(length / BLOCK_KEYS))
    return max(1, min(blocks, math.ceil(target_programs / max(pairs, 1))))


if triton is not None:

    @triton.jit
    def _chunk_kernel(
        q_ptr, k_ptr, ks_ptr, v_ptr, vs_ptr, mask_ptr, len_ptr, acc_ptr, max_ptr, sum_ptr,
        nk_ptr, nks_ptr, nv_ptr, nvs_ptr, at_ptr, qp_ptr, pin_ptr,
        q_sb, q_sh, qp_sb, qp_sh, k_sb, k_sh, k_sl, ks_sb, ks_sh, ks_sl, v_sb, v_sh, v_sl, vs_sb, vs_sh, vs_sl, mask_sb,
        nk_sb, nk_sh, nv_sb, nv_sh, ns_sb, ns_sh,
        heads, chunk_len, splits, sm_scale, head_dim,
        DIMS: tl.constexpr, BLOCK: tl.constexpr, SCALED: tl.constexpr, WRITE: tl.constexpr, PINNED: tl.constexpr,
    ):
        pair = tl.program_id(0)
        split = tl.program_id(1)
        slot = pair // heads
        head = pair % heads
        length = tl.load(len_ptr + slot)
        start = split * chunk_len
        stop = tl.minimum(start + chunk_len, length)
        dims = tl.arange(0, DIMS)  # head_dim padded to a power of two; the padding reads and writes nothing
        in_head = dims < head_dim
        q = tl.load(q_ptr + slot * q_sb + head * q_sh + dims, mask=in_head, other=0.0).to(tl.float32) * sm_scale
        if PINNED:
            # Pin-persona: ring entries [0, pinned) hold the system prompt, scored with the query as rotated
            # for them (``kv_ring.pinned_query_positions``).
            pinned = tl.load(pin_ptr + slot)
            q_pinned = tl.load(qp_ptr + slot * qp_sb + head * qp_sh + dims, mask=in_head, other=0.0)
            q_pinned = q_pinned.to(tl.float32) * sm_scale
        k_base = k_ptr + slot * k_sb + head * k_sh
        v_base = v_ptr + slot * v_sb + head * v_sh
        ks_base = ks_ptr + slot * ks_sb + head * ks_sh
        vs_base = vs_ptr + slot * vs_sb + head * vs_sh
        if WRITE:
            # This frame's key and value: stored at ring index ``at`` by the first chunk's program, and
            # used from here (not from the ring) by whichever program reads that index, so that no
            # program depends on another's store.
            at = tl.load(at_ptr + slot)
            new_k = tl.load(nk_ptr + slot * nk_sb + head * nk_sh + dims, mask=in_head, other=0.0)
            new_v = tl.load(nv_ptr + slot * nv_sb + head * nv_sh + dims, mask=in_head, other=0.0)
            if SCALED:
                new_ks = tl.load(nks_ptr + slot * ns_sb + head * ns_sh)
                new_vs = tl.load(nvs_ptr + slot * ns_sb + head * ns_sh)
            if split == 0:
                tl.store(k_base + at * k_sl + dims, new_k, mask=in_head)
                tl.store(v_base + at * v_sl + dims, new_v, mask=in_head)
                if SCALED:
                    tl.store(ks_base + at * ks_sl, new_ks)
                    tl.store(vs_base + at * vs_sl, new_vs)
        running_max = tl.full((), float("-inf"), tl.float32)
        running_sum = tl.zeros((), tl.float32)
        acc = tl.zeros((DIMS,), tl.float32)
        for first in range(start, stop, BLOCK):
            keys_at = first + tl.arange(0, BLOCK)
            inside = keys_at < stop
            visible = tl.load(mask_ptr + slot * mask_sb + keys_at, mask=inside, other=0) != 0
            k = tl.load(k_base + keys_at[:, None] * k_sl + dims[None, :], mask=inside[:, None] & in_head[None, :],
                        other=0.0)
            if WRITE:
                k = tl.where((keys_at == at)[:, None], new_k[None, :], k)
            if PINNED and first < pinned:
                # Only the few blocks that hold prompt entries pay for the choice of query.
                queries = tl.where((keys_at < pinned)[:, None], q_pinned[None, :], q[None, :])
                scores = tl.sum(k.to(tl.float32) * queries, axis=1)
            else:
                scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
            if SCALED:
                key_scale = tl.load(ks_base + keys_at * ks_sl, mask=inside, other=0.0)
                if WRITE:
                    key_scale = tl.where(keys_at == at, new_ks, key_scale)
                scores *= key_scale.to(tl.float32)
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=0))
            # All keys so far masked: keep exp() away from (-inf) - (-inf).
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            weights = tl.exp(scores - safe_max)
            rescale = tl.exp(running_max - safe_max)
            running_sum = running_sum * rescale + tl.sum(weights, axis=0)
            if SCALED:
                value_scale = tl.load(vs_base + keys_at * vs_sl, mask=inside, other=0.0)
                if WRITE:
                    value_scale = tl.where(keys_at == at, new_vs, value_scale)
                weights *= value_scale.to(tl.float32)
            v = tl.load(v_base + keys_at[:, None] * v_sl + dims[None, :], mask=inside[:, None] & in_head[None, :],
                        other=0.0)
            if WRITE:
                v = tl.where((keys_at == at)[:, None], new_v[None, :], v)
            acc = acc * rescale + tl.sum(weights[:, None] * v.to(tl.float32), axis=0)
            running_max = new_max
        out = pair * splits + split
        tl.store(acc_ptr + out * DIMS + dims, acc)
        tl.store(max_ptr + out, running_max)
        tl.store(sum_ptr + out, running_sum)

    @triton.jit
    def _merge_kernel(
        acc_ptr, max_ptr, sum_ptr, out_ptr, out_sb, out_sh, heads, splits, head_dim,
        DIMS: tl.constexpr, SPLITS: tl.constexpr,
    ):
        pair = tl.program_id(0)
        chunks = tl.arange(0, SPLITS)
        used = chunks < splits
        maxima = tl.load(max_ptr + pair * splits + chunks, mask=used, other=float("-inf"))
        top = tl.max(maxima, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)
        factors = tl.where(used, tl.exp(maxima - top), 0.0)
        total = tl.sum(tl.load(sum_ptr + pair * splits + chunks, mask=used, other=0.0) * factors, axis=0)
        dims = tl.arange(0, DIMS)
        acc = tl.load(acc_ptr + (pair * splits + chunks)[:, None] * DIMS + dims[None, :], mask=used[:, None], other=0.0)
        merged = tl.sum(acc * factors[:, None], axis=0) / total
        slot = pair // heads
        head = pair % heads
        tl.store(out_ptr + slot * out_sb + head * out_sh + dims, merged.to(out_ptr.dtype.element_ty), mask=dims < head_dim)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor,
    key_scales: torch.Tensor | None = None, value_scales: torch.Tensor | None = None, *, splits: int | None = None,
    new: tuple[torch.Tensor, ...] | None = None, write_at: torch.Tensor | None = None,
    pinned: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One query per slot and head over the first ``lengths[b]`` entries of each slot's ring.

    q [B, H, 1, D]; keys/values [B, H, L, D] (bf16/float32, or e4m3 with ``key_scales``/``value_scales``
    [B, H, L, 1]); mask [B, 1, 1, L] bool (True = visible); lengths [B] int32 (entries at or beyond a
    slot's length are not read: they must be masked for it anyway). Returns [B, H, 1, D] in q's dtype.
    Every slot must see at least one key (a decode query always sees itself). ``splits``: chunks per
    (slot, head), by default enough to fill the GPU (``split_count``).

    ``new`` = (k, v) [B, H, 1, D] in the rings' dtype, or (k, k_scale, v, v_scale) for FP8 rings, with
    ``write_at`` [B] int32 ring indices: this frame's entries are stored there and attended to in the
    same launch (what writing the rings first and then attending computes, without the extra kernels).
    An index may lie past ``keys.shape[2]`` (a view of the first entries of a longer ring): it is
    stored all the same, and not attended to.

    ``pinned`` = (q_pinned [B, H, 1, D], counts [B] int32): under the pin-persona context policy, ring
    entries below ``counts[b]`` (the system prompt) are scored with ``q_pinned``, the others with ``q``.
    Any head dim works (the kernels pad it to a power of two).
    """
    if triton is None:
        raise RuntimeError("decode_attention needs Triton (installed with CUDA builds of torch)")
    batch, heads, _, head_dim = q.shape
    ring = keys.shape[2]
    scaled = key_scales is not None
    dims = triton.next_power_of_2(head_dim)
    if keys.stride(-1) != 1 or values.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the last dimension of q, keys and values must be contiguous")
    splits = splits or split_count(batch * heads, ring)
    chunk_len = math.ceil(math.ceil(ring / splits) / BLOCK_KEYS) * BLOCK_KEYS
    splits = math.ceil(ring / chunk_len)
    pairs = batch * heads
    partial = torch.empty(pairs * splits, dims, device=q.device, dtype=torch.float32)
    maxima = torch.empty(pairs * splits, device=q.device, dtype=torch.float32)
    sums = torch.empty(pairs * splits, device=q.device, dtype=torch.float32)
    visible = mask.reshape(batch, ring)
    if visible.dtype == torch.bool:
        visible = visible.view(torch.uint8)
    key_scales = key_scales if scaled else keys  # unread when not scaled; any pointer will do
    value_scales = value_scales if scaled else values
    write = new is not None
    if write:
        new_k, new_ks, new_v, new_vs = new if scaled else (new[0], new[0], new[1], new[1])
        if new_k.stride(-1) != 1 or new_v.stride(-1) != 1 or (scaled and new_vs.stride() != new_ks.stride()):
            raise ValueError("the new keys and values need a contiguous last dimension (scales: one layout)")
    else:
        new_k = new_ks = new_v = new_vs = q
        write_at = lengths
    q_pinned, pinned_counts = pinned if pinned is not None else (q, lengths)  # unread when not pinned
    if q_pinned.stride(-1) != 1:
        raise ValueError("the pinned query needs a contiguous last dimension")
    _chunk_kernel[(pairs, splits)](
        q, keys, key_scales, values, value_scales, visible, lengths, partial, maxima, sums,
        new_k, new_ks, new_v, new_vs, write_at, q_pinned, pinned_counts,
        q.stride(0), q.stride(1), q_pinned.stride(0), q_pinned.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        key_scales.stride(0), key_scales.stride(1), key_scales.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        value_scales.stride(0), value_scales.stride(1), value_scales.stride(2), visible.stride(0),
        new_k.stride(0), new_k.stride(1), new_v.stride(0), new_v.stride(1), new_ks.stride(0), new_ks.stride(1),
        heads, chunk_len, splits, head_dim ** -0.5, head_dim,
        DIMS=dims, BLOCK=BLOCK_KEYS, SCALED=scaled, WRITE=write, PINNED=pinned is not None,
    )
    out = torch.empty(batch, heads, 1, head_dim, device=q.device, dtype=q.dtype)
    _merge_kernel[(pairs,)](
        partial, maxima, sums, out, out.stride(0), out.stride(1), heads, splits, head_dim,
        DIMS=dims, SPLITS=triton.next_power_of_2(splits),
    )
    return out
