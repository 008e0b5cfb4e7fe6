"""Slots of one batch are independent: joining, leaving and resetting never changes another slot."""

from __future__ import annotations

import torch

from personaplex.config import LMConfig
from personaplex.lm.generator import Generator
from personaplex.loading import load_lm


def user_frames(seed: int, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    frames = torch.full((n, 17), -1)
    frames[:, 9:] = torch.randint(0, 2048, (n, 8), generator=generator)
    return frames


def run_alone(model, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    generator = Generator(model)
    gen_state, lm_state = generator.new_state(1), model.new_state(1)
    tokens, logits = [], []
    for frame in frames:
        result = generator.step(gen_state, lm_state, frame[None])
        tokens.append(torch.where(result.valid[:, None], result.tokens, -100)[0])
        logits.append(result.text_logits[0])
    return torch.stack(tokens), torch.stack(logits)


def test_slots_joining_and_resetting_at_different_times(golden, golden_config):
    config = LMConfig.from_reference_kwargs(golden_config["lm"]["config"])
    model = load_lm(golden / golden_config["lm"]["file"], config, dtype=torch.float32)
    total = 60  # longer than the tiny context (24): rings wrap at different times per slot
    # slot -> (first tick, frames); slot 2 is reset at tick 20 and starts a new conversation.
    plan = {0: (0, user_frames(0, total)), 1: (7, user_frames(1, total - 7)), 2: (3, user_frames(2, 17))}
    second_conversation = user_frames(3, total - 20)

    generator = Generator(model)
    gen_state, lm_state = generator.new_state(3), model.new_state(3)
    recorded = {0: [], 1: [], 2: [], "2b": []}
    for tick in range(total):
        forced = torch.full((3, 17), -1)
        joining = torch.zeros(3, dtype=torch.bool)
        for slot, (start, frames) in plan.items():
            if tick == start:
                joining[slot] = True
            if start <= tick < start + len(frames):
                forced[slot] = frames[tick - start]
        if tick == 20:
            joining[2] = True
        if tick >= 20:
            forced[2] = second_conversation[tick - 20]
        if joining.any():
            generator.reset(gen_state, joining)
        # Slots with nothing to do this tick still step (with free channels); their results are ignored.
        result = generator.step(gen_state, lm_state, forced)
        for slot, (start, frames) in plan.items():
            if start <= tick < start + len(frames):
                recorded[slot].append((torch.where(result.valid[slot], result.tokens[slot], -100), result.text_logits[slot]))
        if tick >= 20:
            recorded["2b"].append((torch.where(result.valid[2], result.tokens[2], -100), result.text_logits[2]))

    for key, frames in ((0, plan[0][1]), (1, plan[1][1]), (2, plan[2][1]), ("2b", second_conversation)):
        tokens, logits = run_alone(model, frames)
        assert torch.equal(torch.stack([t for t, _ in recorded[key]]), tokens), key
        torch.testing.assert_close(torch.stack([l for _, l in recorded[key]]), logits, atol=1e-5, rtol=0)


def test_bfloat16_on_cpu_follows_float32(golden, golden_config):
    """bf16 weights run on the CPU (norms and RoPE stay float32) and track the float32 logits."""
    config = LMConfig.from_reference_kwargs(golden_config["lm"]["config"])
    path = golden / golden_config["lm"]["file"]
    frames = user_frames(0, 20)
    # Force the agent side too, so that both runs see identical inputs and only precision differs.
    frames[:, :9] = user_frames(1, 20)[:, 9:].repeat(1, 2)[:, :9] % 128
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_lm(path, config, dtype=dtype)
        assert model.text_linear.weight.dtype == dtype
        generator = Generator(model)
        gen_state, lm_state = generator.new_state(1), model.new_state(1)
        logits[dtype] = torch.stack([generator.step(gen_state, lm_state, f[None]).text_logits[0].float() for f in frames])
    error = (logits[torch.bfloat16] - logits[torch.float32]).norm() / logits[torch.float32].norm()
    assert 0 < error < 0.05, error
