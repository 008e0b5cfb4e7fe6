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


# --- context policies: sliding (the reference) and pin-persona ---------------------------------------------

def step_by_step_views(capacity: int, pinned: int, frames: int):
    """Write positions 0..frames-1 one per call into a ring that records which position each index holds;
    for each query, yield (q, positions it sees, the pinned positions among them, ring contents)."""
    from personaplex.layers.kv_ring import lowest_visible, ring_index, ring_positions, ring_visibility

    held = torch.full((capacity,), -1)
    pin = torch.tensor([pinned])
    for q in range(frames):
        index = int(ring_index(torch.tensor([q]), 1, capacity, pin).view(-1))
        held[index] = q
        positions = ring_positions(torch.tensor([q]), capacity, pin)
        assert torch.equal(positions[0], held), f"ring_positions disagrees with the writes at q={q}"
        query = torch.tensor([[q]])
        mask = ring_visibility(positions, query, lowest_visible(query, capacity, pin), pin)[0, 0, 0]
        yield q, sorted(held[mask].tolist()), held.clone()


def test_no_pinned_positions_is_the_reference_sliding_window():
    from personaplex.layers.kv_ring import ring_index, ring_positions

    capacity = 6
    for q, seen, _ in step_by_step_views(capacity, pinned=0, frames=4 * capacity):
        assert seen == list(range(max(0, q - capacity + 2), q + 1))
    start = torch.tensor([0, 5, 17])
    assert torch.equal(ring_index(start, 3, capacity, torch.zeros(3, dtype=torch.long)), ring_index(start, 3, capacity))
    unwritten_as_minus_one = ring_positions(start, capacity).clamp(min=-1)  # any negative means "never written"
    assert torch.equal(ring_positions(start, capacity, torch.zeros(3, dtype=torch.long)), unwritten_as_minus_one)


def test_pinned_positions_stay_visible_and_the_rest_slides_with_c_minus_1_keys():
    capacity, pinned = 10, 4
    for q, seen, held in step_by_step_views(capacity, pinned, frames=5 * capacity):
        if q < pinned:
            assert seen == list(range(q + 1))
            continue
        assert held[:pinned].tolist() == list(range(pinned)), "a pinned position was overwritten"
        recent = list(range(max(pinned, q - (capacity - pinned) + 2), q + 1))
        assert seen == list(range(pinned)) + recent
        assert len(seen) == min(q + 1, capacity - 1)  # as many keys as the reference sees


def test_both_policies_agree_until_the_context_is_full():
    capacity = 12
    sliding = list(step_by_step_views(capacity, pinned=0, frames=capacity))
    pinned = list(step_by_step_views(capacity, pinned=5, frames=capacity))
    for (q, seen_a, held_a), (_, seen_b, held_b) in zip(sliding, pinned):
        assert torch.equal(held_a, held_b)  # same ring layout: positions below C sit at their own index
        if q <= capacity - 2:
            assert seen_a == seen_b
    # At q = C-1 the context is full: the reference drops position 0, pin-persona drops the oldest
    # conversation position instead.
    assert 0 not in sliding[-1][1] and 0 in pinned[-1][1] and 5 not in pinned[-1][1]


def test_pinned_keys_are_never_farther_than_the_context_from_their_query():
    from personaplex.layers.kv_ring import pinned_query_positions

    capacity, pinned = 10, 4
    for q, seen, _ in step_by_step_views(capacity, pinned, frames=6 * capacity):
        rotated = int(pinned_query_positions(torch.tensor([[q]]), capacity))
        distances = [(rotated if p < pinned else q) - p for p in seen]
        assert min(distances) >= 0 and max(distances) <= capacity - 2
        if q >= capacity - 1:  # the pinned keys sit right before the oldest conversation key seen
            oldest = min(p for p in seen if p >= pinned)
            assert sorted(q - d for d in distances) == list(range(oldest - pinned, q + 1))
        else:
            assert rotated == q
