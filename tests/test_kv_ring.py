"""The ring visibility rule, including the reference quirk that hides the oldest stored key."""

from __future__ import annotations

import torch

from personaplex.layers.kv_ring import reference_lowest_visible, ring_positions, ring_visibility, write_ring


def visible_positions(last: int, capacity: int, steps: int) -> list[list[int]]:
    """For each query of a call that wrote positions last-steps+1..last: the positions it may attend."""
    last_t = torch.tensor([last])
    keys = ring_positions(last_t, capacity)
    queries = torch.arange(last - steps + 1, last + 1)[None]
    mask = ring_visibility(keys, queries, reference_lowest_visible(last_t, steps, capacity))[0, 0]
    return [sorted(keys[0][row].tolist()) for row in mask]


def test_before_the_ring_fills_everything_written_is_visible():
    assert visible_positions(last=2, capacity=4, steps=1) == [[0, 1, 2]]


def test_full_ring_shows_only_capacity_minus_one_keys():
    # 4 slots hold positions 0..3 after the 4th write, but position 0 is masked: the reference's quirk.
    assert visible_positions(last=3, capacity=4, steps=1) == [[1, 2, 3]]
    assert visible_positions(last=10, capacity=4, steps=1) == [[8, 9, 10]]


def test_two_frames_per_call_first_query_sees_one_key_less():
    # Mimi's pattern: positions 8, 9 written together into a ring of 4; both queries see from 7 on.
    assert visible_positions(last=9, capacity=4, steps=2) == [[7, 8], [7, 8, 9]]


def test_write_ring_places_positions_modulo_capacity_per_slot():
    ring = torch.zeros(2, 1, 4, 1)
    values = torch.tensor([1.0, 2.0]).view(1, 1, 2, 1).expand(2, 1, 2, 1).contiguous()
    write_ring(ring, values, torch.tensor([3, 6]))
    assert ring[0, 0, :, 0].tolist() == [2.0, 0.0, 0.0, 1.0]  # positions 3, 4 -> slots 3, 0
    assert ring[1, 0, :, 0].tolist() == [0.0, 0.0, 1.0, 2.0]  # positions 6, 7 -> slots 2, 3


def test_fp8_ring_attention_equals_attention_over_the_dequantised_ring():
    from personaplex.layers.kv_ring import dequantize_fp8, quantize_fp8
    from personaplex.lm.fused import fp8_ring_attention

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 1, 16, generator=generator)
    # Vectors of very different sizes, as real keys are: per-vector scales keep the small ones.
    keys, key_scales = quantize_fp8(torch.randn(3, 4, 40, 16, generator=generator) * torch.logspace(-3, 1, 40)[:, None])
    values, value_scales = quantize_fp8(torch.randn(3, 4, 40, 16, generator=generator))
    mask = torch.rand(3, 1, 1, 40, generator=generator) < 0.7
    mask[..., 0] = True
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, dequantize_fp8(keys, key_scales, torch.float32), dequantize_fp8(values, value_scales, torch.float32),
        attn_mask=mask,
    )
    torch.testing.assert_close(fp8_ring_attention(q, keys, key_scales, values, value_scales, mask), expected)
