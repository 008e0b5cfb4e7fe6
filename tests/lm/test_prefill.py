"""Prefill (many forced frames in one pass) leaves exactly the state that stepping frame by frame does."""

from __future__ import annotations

import pytest
import torch

from personaplex.config import LMConfig
from personaplex.lm.generator import Generator
from personaplex.loading import load_lm


@pytest.fixture(scope="module")
def lm(golden, golden_config):
    config = LMConfig.from_reference_kwargs(golden_config["lm"]["config"])
    return load_lm(golden / golden_config["lm"]["file"], config, dtype=torch.float32)


def random_frames(seed: int, batch: int, steps: int, text_card: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 2048, (batch, steps, 17), generator=generator)
    frames[..., 0] = torch.randint(0, text_card, (batch, steps), generator=generator)
    return frames


def determined(state, slot: int) -> torch.Tensor:
    """Token-buffer entries whose value can ever be read again (provided or last two columns)."""
    offset = int(state.offset[slot])
    keep = state.provided[slot].clone()
    columns = state.cache.shape[2]
    keep[:, (offset - 1) % columns] = True
    keep[:, (offset - 2) % columns] = True
    return torch.where(keep, state.cache[slot], -100)


@pytest.mark.parametrize("kv_dtype", ["model", "fp8"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 22, 23, 24, 25, 60])
def test_prefill_equals_stepping(lm, steps, kv_dtype):
    """Random fully forced prompts of many lengths (the tiny ring holds 24 frames), 2 slots with different
    prompts, then 30 free-running steps: everything must match."""
    batch = 2
    prompt = random_frames(steps, batch, steps + 1, lm.config.text_card)
    users = random_frames(1000 + steps, batch, 30, lm.config.text_card)
    users[..., :9] = -1
    runs = []
    for mode in ("step", "prefill"):
        generator = Generator(lm)
        gen_state, lm_state = generator.new_state(batch), lm.new_state(batch, kv_dtype=kv_dtype)
        generator.reset(gen_state, torch.ones(batch, dtype=torch.bool), prompt[:, 0])
        if mode == "step":
            for t in range(1, steps + 1):
                generator.step(gen_state, lm_state, prompt[:, t], depth_steps=0)
        else:
            generator.prefill(gen_state, lm_state, prompt[:, 1:])
        snapshot = (gen_state.offset.clone(), [determined(gen_state, b) for b in range(batch)],
                    gen_state.provided.clone(), lm_state.keys.float(), lm_state.values.float())
        outputs = [generator.step(gen_state, lm_state, users[:, t]) for t in range(users.shape[1])]
        runs.append((snapshot, outputs))
    (step_snap, step_out), (pre_snap, pre_out) = runs
    assert torch.equal(step_snap[0], pre_snap[0])
    for b in range(batch):
        assert torch.equal(step_snap[1][b], pre_snap[1][b])
    assert torch.equal(step_snap[2], pre_snap[2])
    # FP8 rings may round a value to the neighbouring e4m3 code where the float32 inputs differ in the
    # last bits; the tolerance is one e4m3 step at the largest magnitude (448 * 2**-3 = 56) for FP8.
    tolerance = 1e-5 if kv_dtype == "model" else 56.0
    torch.testing.assert_close(pre_snap[3], step_snap[3], atol=tolerance, rtol=0)
    torch.testing.assert_close(pre_snap[4], step_snap[4], atol=tolerance, rtol=0)
    for a, b in zip(step_out, pre_out):
        assert torch.equal(a.tokens, b.tokens)
        torch.testing.assert_close(b.text_logits, a.text_logits, atol=1e-5 if kv_dtype == "model" else 1e-3, rtol=0)


def test_block_longer_than_the_ring_is_refused(lm):
    state = lm.new_state(1)
    with pytest.raises(ValueError, match="exceeds the KV ring"):
        lm.forward_temporal(torch.zeros(1, lm.config.context + 1, lm.config.dim), torch.zeros(1, dtype=torch.long), state)
