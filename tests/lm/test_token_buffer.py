"""The token buffer's block update (prompt prefill) equals the same steps taken one by one."""

from __future__ import annotations

import pytest
import torch

from personaplex.lm.token_buffer import cache_columns, column_index, commit, prefill_block, write_given


def stepwise(cache, provided, offset, frames, delays, initial):
    """The definition: per step, read the model input, store the forced tokens, commit the target."""
    inputs = []
    for t in range(frames.shape[1]):
        inputs.append(cache.gather(2, column_index(offset - 1, *cache.shape[1:]))[..., 0])
        target, _ = write_given(cache, provided, offset, frames[:, t], delays, initial)
        commit(cache, provided, offset, target, delays, int(delays.max()))
    return torch.stack(inputs, dim=1) if inputs else frames.clone()


def random_state(seed: int, batch: int, delays: torch.Tensor, initial: torch.Tensor):
    """Buffers after a reset and a few steps with partly forced frames and arbitrary chosen tokens."""
    g = torch.Generator().manual_seed(seed)
    channels, columns = delays.numel(), cache_columns(int(delays.max()))
    cache = torch.zeros(batch, channels, columns, dtype=torch.long)
    provided = torch.zeros(batch, channels, columns, dtype=torch.bool)
    cache[:, :, 0], provided[:, :, 0] = initial, True
    offset = torch.ones(batch, dtype=torch.long)
    for b in range(batch):  # slots at different points of their conversations
        for _ in range(int(torch.randint(0, 9, (1,), generator=g))):
            one = (cache[b : b + 1], provided[b : b + 1], offset[b : b + 1])
            forced = torch.randint(-1, 50, (1, channels), generator=g)
            target, given = write_given(*one, forced, delays, initial)
            chosen = torch.randint(100, 150, (1, channels), generator=g)
            commit(*one, torch.where(given, target, chosen), delays, int(delays.max()))
    return cache, provided, offset


@pytest.mark.parametrize("delays", [[0, 0] + [1] * 7 + [0] + [1] * 7, [0, 1, 2, 0, 2], [0, 0, 0], [0, 3, 1, 0, 2]])
@pytest.mark.parametrize("steps", [0, 1, 2, 3, 4, 5, 7, 64])
def test_block_update_equals_steps(delays, steps):
    delays = torch.tensor(delays)
    initial = torch.arange(1000, 1000 + delays.numel())
    for seed in range(6):
        state = random_state(seed, 3, delays, initial)
        frames = torch.randint(0, 90, (3, steps, delays.numel()), generator=torch.Generator().manual_seed(seed))
        expected_state = [t.clone() for t in state]
        expected = stepwise(*expected_state, frames, delays, initial)
        got = prefill_block(*state, frames, delays, initial)
        assert torch.equal(got, expected)
        for mine, reference in zip(state, expected_state):
            assert torch.equal(mine, reference)
