"""The engine's public path (join with a persona, then batched frame steps) reproduces the reference session."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from personaplex.audio import read_audio, split_frames
from personaplex.checkpoint import load_lm, load_mimi
from personaplex.config import LMConfig, MimiConfig
from personaplex.engine import Engine, SamplingConfig
from personaplex.persona import build_system_prompt, load_voice


@pytest.fixture(scope="module")
def models(golden, golden_config):
    lm = load_lm(golden / golden_config["lm"]["file"], LMConfig.from_reference_kwargs(golden_config["lm"]["config"]), dtype=torch.float32)
    mimi = load_mimi(golden / golden_config["mimi"]["file"], MimiConfig.from_reference_kwargs(golden_config["mimi"]))
    return lm, mimi


@pytest.mark.parametrize("voice_file,prefix", [("voice_prompt.wav", "step"), ("voice_prompt.pt", "replay_step"),
                                               ("voice_prompt_embeddings.safetensors", "replay_step")])
def test_golden_session_through_the_engine(golden, models, voice_file, prefix):
    lm, mimi = models
    session = load_file(golden / "golden_lm_session.safetensors")
    voice = load_voice(golden / voice_file, lm.config, mimi)
    prompt = build_system_prompt(
        LMConfig(**{**lm.config.__dict__, "context": 3000}), voice, session["text_prompt_tokens"].tolist()
    )  # the tiny 24-frame context is too short for the prompt-length guard; the math is unchanged
    engine = Engine(lm, mimi, max_slots=2)
    engine.join(1, 2, prompt, SamplingConfig(greedy=True))
    frames = split_frames(read_audio(golden / "user_input.wav"))
    tokens, pcm = [], []
    for frame in frames:
        batch = torch.zeros(2, frame.shape[0])
        batch[1] = torch.from_numpy(frame)
        out = engine.step(batch)
        tokens.append(out.tokens[1])
        pcm.append(out.pcm[1])
    expected = session[f"{prefix}_out_tokens"][-len(frames):]
    assert torch.equal(torch.stack(tokens), expected)
    agent_pcm = session["agent_pcm"] if prefix == "step" else session["replay_agent_pcm"]
    np.testing.assert_allclose(torch.stack(pcm).numpy(), agent_pcm.numpy(), atol=1e-6, rtol=0)


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
