"""The engine's public path (join with a persona, then batched frame steps) reproduces the reference session."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from personaplex.config import LMConfig, MimiConfig
from personaplex.engine import Engine
from personaplex.loading import load_lm, load_mimi


@pytest.fixture(scope="module")
def models(golden, golden_config):
    lm = load_lm(golden / golden_config["lm"]["file"], LMConfig.from_reference_kwargs(golden_config["lm"]["config"]), dtype=torch.float32)
    mimi = load_mimi(golden / golden_config["mimi"]["file"], MimiConfig.from_reference_kwargs(golden_config["mimi"]))
    return lm, mimi


@pytest.mark.parametrize("voice_file,prefix", [("voice_prompt.wav", "step"), ("voice_prompt.pt", "replay_step"),
                                               ("voice_prompt_embeddings.safetensors", "replay_step")])
def test_golden_session_through_the_engine(golden, models, voice_file, prefix, run_golden_through_engine):
    lm, mimi = models
    session = load_file(golden / "golden_lm_session.safetensors")
    # The engine forces the user's codes every frame, so its depth transformer computes only the agent's
    # codebooks (the reference's user predictions would be overridden): record the depth steps that ran.
    depth_steps = set()
    hook = lm.depformer.register_forward_hook(lambda module, args, out: depth_steps.add(args[1]))
    try:
        tokens, pcm = run_golden_through_engine(Engine(lm, mimi, max_slots=2), lm, mimi, voice_file)
    finally:
        hook.remove()
    assert depth_steps == set(range(lm.config.agent_codebooks))
    assert torch.equal(tokens, session[f"{prefix}_out_tokens"][-len(tokens):])
    agent_pcm = session["agent_pcm"] if prefix == "step" else session["replay_agent_pcm"]
    np.testing.assert_allclose(pcm.numpy(), agent_pcm.numpy(), atol=1e-6, rtol=0)


def test_out_of_range_forced_tokens_never_index_outside_the_tables():
    """Forced ids beyond the vocabularies are clamped before every embedding lookup (on a GPU an
    out-of-range gather is a device assert that kills the process, not an exception)."""
    from personaplex.config import TINY_LM
    from personaplex.lm.generator import Generator
    from personaplex.lm.model import LMModel
    from personaplex.random_weights import randomize_

    lm = randomize_(LMModel(TINY_LM), seed=0).eval()
    generator = Generator(lm)
    gen_state, lm_state = generator.new_state(1), lm.new_state(1)
    forced = torch.full((1, TINY_LM.num_channels), 10**6)
    with torch.inference_mode():
        for _ in range(4):
            result = generator.step(gen_state, lm_state, forced)
    assert torch.isfinite(result.text_logits).all()
