"""The split-K decode attention kernels against plain PyTorch attention over the same rings.

On a CPU the Triton kernels run in Triton's interpreter; on a CUDA machine, compiled. Skipped (with
the reason) where Triton is not installed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_triton_kernels

from personaplex.layers import decode_attention as decode_attention_module
from personaplex.layers.kv_ring import dequantize_fp8, quantize_fp8, ring_positions, ring_visibility

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kernels():
    require_triton_kernels()
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


@pytest.mark.parametrize("head_dim", [24, 80, 96])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-style", "fp8"])
def test_any_head_dim_works(kernels, head_dim, fp8):
    """Head dims that are not powers of two (24, 80, 96) are padded inside the kernel: same result as SDPA,
    and this frame's write touches only the head's own entries."""
    q, keys, values, mask, lengths = rings(5, 3, 200, head_dim, POSITIONS, seed=4)
    scales = ()
    if fp8:
        keys, key_scales = quantize_fp8(keys, torch.bfloat16)
        values, value_scales = quantize_fp8(values, torch.bfloat16)
        scales = (key_scales, value_scales)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, dequantize_fp8(keys, key_scales, torch.float32), dequantize_fp8(values, value_scales, torch.float32),
            attn_mask=mask,
        )
    else:
        expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    got = kernels.decode_attention(*on(DEVICE, q, keys, values, mask, lengths, *scales), splits=3)
    torch.testing.assert_close(got.cpu(), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-style", "fp8"])
def test_pinned_entries_are_scored_with_their_own_query(kernels, fp8, splits):
    """Pin-persona: entries below each slot's pinned count are scored with the second query, the others
    with the first; slots with a count of 0 slide as usual. Compared with the pinned attention written
    in PyTorch (``attention.pinned_math_attention``)."""
    from personaplex.layers.attention import pinned_math_attention

    q, keys, values, mask, lengths = rings(5, 3, 200, 32, POSITIONS, seed=5)
    q_pinned = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
    counts = torch.tensor([0, 10, 40, 0, 57], dtype=torch.int32)
    pinned_keys = (torch.arange(200)[None, :] < counts[:, None])[:, None, None, :]
    scales = ()
    if fp8:
        keys, key_scales = quantize_fp8(keys, torch.bfloat16)
        values, value_scales = quantize_fp8(values, torch.bfloat16)
        scales = (key_scales, value_scales)
        seen_keys = dequantize_fp8(keys, key_scales, torch.float32)
        seen_values = dequantize_fp8(values, value_scales, torch.float32)
    else:
        seen_keys, seen_values = keys, values
    expected = pinned_math_attention(q, q_pinned, seen_keys, seen_values, mask, pinned_keys)
    got = kernels.decode_attention(
        *on(DEVICE, q, keys, values, mask, lengths, *scales), splits=splits,
        pinned=tuple(on(DEVICE, q_pinned, counts)),
    )
    torch.testing.assert_close(got.cpu(), expected, atol=2e-5, rtol=2e-5)
    sliding = kernels.decode_attention(*on(DEVICE, q, keys, values, mask, lengths, *scales), splits=splits)
    assert torch.equal(got[[0, 3]].cpu(), sliding[[0, 3]].cpu())  # count 0: exactly the sliding result
    assert not torch.allclose(got[[1, 2, 4]].cpu(), sliding[[1, 2, 4]].cpu())  # the second query mattered


@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-style", "fp8"])
def test_writing_this_frame_in_the_same_launch_equals_writing_first(kernels, fp8, splits):
    """Store this frame's key/value and attend over the ring including it, in one launch: same ring
    afterwards and same output as a scatter into the ring followed by attention."""
    from personaplex.layers.kv_ring import write_quantized, write_ring

    positions = torch.tensor(POSITIONS)
    capacity = 200
    q, keys, values, mask, lengths = rings(5, 3, capacity, 32, POSITIONS, seed=2)
    generator = torch.Generator().manual_seed(3)
    k = torch.randn(5, 3, 1, 32, generator=generator)
    v = torch.randn(5, 3, 1, 32, generator=generator)
    index = (positions % capacity)[:, None, None, None]
    write_at = (positions % capacity).to(torch.int32)
    if fp8:
        keys, key_scales = quantize_fp8(keys, torch.bfloat16)
        values, value_scales = quantize_fp8(values, torch.bfloat16)
        k8, ks = quantize_fp8(k, torch.bfloat16)
        v8, vs = quantize_fp8(v, torch.bfloat16)
        expected_keys, expected_values = keys.clone(), values.clone()
        expected_ks, expected_vs = key_scales.clone(), value_scales.clone()
        write_quantized(expected_keys, expected_ks, k8, ks, positions, index=index)
        write_quantized(expected_values, expected_vs, v8, vs, positions, index=index)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, dequantize_fp8(expected_keys, expected_ks, torch.float32),
            dequantize_fp8(expected_values, expected_vs, torch.float32), attn_mask=mask,
        )
        rings_on = on(DEVICE, keys, values, key_scales, value_scales)
        got = kernels.decode_attention(
            *on(DEVICE, q), rings_on[0], rings_on[1], *on(DEVICE, mask, lengths), rings_on[2], rings_on[3],
            splits=splits, new=tuple(on(DEVICE, k8, ks, v8, vs)), write_at=write_at.to(DEVICE),
        )
        for ring, want in zip(rings_on, (expected_keys, expected_values, expected_ks, expected_vs)):
            assert torch.equal(ring.cpu().view(torch.uint8) if fp8 and ring.dtype != torch.bfloat16 else ring.cpu(),
                               want.view(torch.uint8) if want.dtype != torch.bfloat16 else want)
    else:
        expected_keys, expected_values = keys.clone(), values.clone()
        write_ring(expected_keys, k, positions, index=index)
        write_ring(expected_values, v, positions, index=index)
        expected = torch.nn.functional.scaled_dot_product_attention(q, expected_keys, expected_values, attn_mask=mask)
        rings_on = on(DEVICE, keys, values)
        got = kernels.decode_attention(
            *on(DEVICE, q), rings_on[0], rings_on[1], *on(DEVICE, mask, lengths), splits=splits,
            new=tuple(on(DEVICE, k, v)), write_at=write_at.to(DEVICE),
        )
        assert torch.equal(rings_on[0].cpu(), expected_keys) and torch.equal(rings_on[1].cpu(), expected_values)
    torch.testing.assert_close(got.cpu(), expected, atol=2e-5, rtol=2e-5)


def test_a_write_past_the_viewed_entries_lands_in_the_ring_unread(kernels):
    """Slots stepping along outside the length the batch reads (idle or joining) still store their entry."""
    q, keys, values, mask, lengths = rings(2, 2, 64, 16, [10, 20])
    ring_k, ring_v = torch.zeros(2, 2, 128, 16), torch.zeros(2, 2, 128, 16)
    ring_k[:, :, :64], ring_v[:, :, :64] = keys, values
    new_k, new_v = torch.ones(2, 2, 1, 16), torch.ones(2, 2, 1, 16)
    write_at = torch.tensor([10, 100], dtype=torch.int32)  # slot 1 writes beyond the 64 entries viewed
    ring_k, ring_v = on(DEVICE, ring_k, ring_v)
    kernels.decode_attention(
        *on(DEVICE, q), ring_k[:, :, :64], ring_v[:, :, :64], *on(DEVICE, mask, lengths),
        new=tuple(on(DEVICE, new_k, new_v)), write_at=write_at.to(DEVICE),
    )
    assert torch.equal(ring_k[1, :, 100].cpu(), torch.ones(2, 16)) and torch.equal(ring_k[0, :, 10].cpu(), torch.ones(2, 16))
