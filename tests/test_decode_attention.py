"""The split-K decode attention kernels against plain PyTorch attention over the same rings.

On a CPU the Triton kernels run in Triton's interpreter; on a CUDA machine, compiled. Skipped (with
the reason) where Triton is not installed.
"""

from __future__ import annotations

import pytest
import torch

from personaplex.layers import decode_attention as decode_attention_module
from personaplex.layers.kv_ring import dequantize_fp8, quantize_fp8, ring_positions, ring_visibility

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("triton", reason="the decode attention kernels need Triton")
    return decode_attention_module


def rings(batch, heads, capacity, head_dim, positions, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, head_dim, generator=generator)
    # Vectors of very different sizes, as real keys are (per-vector FP8 scales must keep the small ones).
    keys = torch.randn(batch, heads, capacity, head_dim, generator=generator) * torch.logspace(-2, 1, capacity)[:, None]
    values = torch.randn(batch, heads, capacity, head_dim, generator=generator)
    positions = torch.tensor(positions)
    mask = ring_visibility(ring_positions(positions, capacity), positions[:, None], (positions - capacity + 2)[:, None])
    lengths = (positions + 1).clamp(max=capacity).to(torch.int32)
    return q, keys, values, mask, lengths


def on(device, *tensors):
    return [t.to(device) for t in tensors]


# Positions: a fresh slot, one in its first ring's worth, one exactly full, wrapped ones (the reference's
# hidden oldest entry), in one batch.
POSITIONS = [0, 37, 199, 200, 731]


@pytest.mark.parametrize("splits", [None, 1, 3])
def test_bf16_style_ring_equals_sdpa(kernels, splits):
    q, keys, values, mask, lengths = rings(5, 3, 200, 32, POSITIONS)
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    got = kernels.decode_attention(*on(DEVICE, q, keys, values, mask, lengths), splits=splits)
    torch.testing.assert_close(got.cpu(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("splits", [None, 1, 4])
def test_fp8_ring_equals_attention_over_the_dequantised_ring(kernels, splits):
    q, keys, values, mask, lengths = rings(5, 3, 200, 32, POSITIONS, seed=1)
    k8, key_scales = quantize_fp8(keys, torch.bfloat16)
    v8, value_scales = quantize_fp8(values, torch.bfloat16)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, dequantize_fp8(k8, key_scales, torch.float32), dequantize_fp8(v8, value_scales, torch.float32), attn_mask=mask
    )
    got = kernels.decode_attention(
        *on(DEVICE, q, k8, v8, mask, lengths, key_scales, value_scales)[:5],
        *on(DEVICE, key_scales, value_scales), splits=splits,
    )
    torch.testing.assert_close(got.cpu(), expected, atol=2e-5, rtol=2e-5)


def test_entries_past_a_slots_length_are_never_read(kernels):
    """Short conversations must not pay for long ones: what lies beyond a slot's length is not even
    loaded (garbage there, even NaN, changes nothing)."""
    q, keys, values, mask, lengths = rings(2, 2, 256, 16, [9, 100])
    clean = kernels.decode_attention(*on(DEVICE, q, keys, values, mask, lengths), splits=2)
    keys[0, :, 10:] = float("nan")
    values[0, :, 10:] = float("nan")
    keys[1, :, 101:] = float("inf")
    dirty = kernels.decode_attention(*on(DEVICE, q, keys, values, mask, lengths), splits=2)
    assert torch.equal(clean, dirty)


def test_bfloat16_queries_come_back_in_bfloat16(kernels):
    q, keys, values, mask, lengths = rings(2, 2, 64, 16, [3, 70])
    q, keys, values = q.bfloat16(), keys.bfloat16(), values.bfloat16()
    got = kernels.decode_attention(*on(DEVICE, q, keys, values, mask, lengths))
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float().cpu(), expected, atol=1e-2, rtol=1e-2)


def test_split_count_fills_the_gpu_with_few_slots_and_never_exceeds_the_blocks(kernels):
    assert kernels.split_count(pairs=32, length=3000) == 32  # 1 slot x 32 heads: 32 chunks of the ring each
    assert kernels.split_count(pairs=2048, length=3000) == 1  # 64 slots: one program per (slot, head)
    assert kernels.split_count(pairs=1, length=100) == 2  # never more chunks than blocks of keys


def test_non_power_of_two_head_dim_is_refused(kernels):
    q, keys, values, mask, lengths = rings(1, 1, 8, 24, [3])
    with pytest.raises(ValueError, match="power of two"):
        kernels.decode_attention(q, keys, values, mask, lengths)
