"""The whole reference session: voice prompt, silences, text prompt, then user audio in, agent audio out.

Voice prompts are given three ways: as a WAV recording, as the reference's ``.pt`` embeddings file, and
as the same tensors in safetensors. Each must reproduce the recorded session exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from personaplex.audio import normalize_loudness, read_audio, split_frames
from personaplex.config import LMConfig, MimiConfig
from personaplex.lm.generator import Generator
from personaplex.loading import load_lm, load_mimi
from personaplex.persona import (
    SILENCE_FRAMES,
    SILENCE_TOKENS,
    SINE_TOKENS,
    apply_system_prompt,
    load_saved_voice,
    system_prompt_frames,
)

PCM_TOL = 1e-6
LOGIT_TOL = 1e-5


@pytest.fixture(scope="module")
def models(golden, golden_config):
    lm_config = LMConfig.from_reference_kwargs(golden_config["lm"]["config"])
    mimi_config = MimiConfig.from_reference_kwargs(golden_config["mimi"])
    lm = load_lm(golden / golden_config["lm"]["file"], lm_config, dtype=torch.float32)
    mimi = load_mimi(golden / golden_config["mimi"]["file"], mimi_config)
    return lm, mimi


@pytest.fixture(scope="module")
def session(golden) -> dict[str, torch.Tensor]:
    return load_file(golden / "golden_lm_session.safetensors")


@pytest.fixture(scope="module")
def session_info(golden) -> dict:
    return json.loads((golden / "golden_lm_session.json").read_text())


def test_fixture_constants_are_ours(golden_config):
    lmgen = golden_config["lmgen"]
    assert tuple(lmgen["SILENCE_TOKENS"]) == SILENCE_TOKENS
    assert tuple(lmgen["SINE_TOKENS"]) == SINE_TOKENS
    assert lmgen["audio_silence_frame_cnt"] == SILENCE_FRAMES


def encode_frames(mimi, frames: np.ndarray) -> torch.Tensor:
    state = mimi.new_encoder_state(1, "cpu")
    return torch.stack([mimi.encode_frame(torch.from_numpy(frame)[None], state)[0] for frame in frames])


def test_voice_prompt_audio_processing(golden, session, session_info):
    samples = read_audio(golden / "voice_prompt.wav")
    np.testing.assert_array_equal(samples, session["voice_prompt_loaded"].numpy())
    normalized = normalize_loudness(samples)
    expected = session["voice_prompt_normalized_f64"].numpy()
    np.testing.assert_allclose(normalized, expected, rtol=1e-6, atol=0)
    frames = split_frames(normalized)
    assert frames.shape == tuple(session["voice_prompt_frames_in"].shape)
    np.testing.assert_allclose(frames, session["voice_prompt_frames_in"].numpy(), rtol=1e-6, atol=0)


def test_voice_prompt_and_user_codes(golden, models, session):
    _, mimi = models
    # Mimi itself is checked on the exact frames the reference encoded (see the fixture notes).
    voice = encode_frames(mimi, session["voice_prompt_frames_in"].numpy())
    assert torch.equal(voice, session["voice_prompt_codes"])
    # ...and on our own processing of the WAV file, which must give the same codes.
    ours = encode_frames(mimi, split_frames(normalize_loudness(read_audio(golden / "voice_prompt.wav"))))
    assert torch.equal(ours, session["voice_prompt_codes"])
    user = encode_frames(mimi, split_frames(read_audio(golden / "user_input.wav")))
    assert torch.equal(user, session["user_codes"])


def run_conversation(lm, mimi, frames, saved_voice, user_audio: np.ndarray, stepwise: bool, kernels=None):
    """Prompt, then the user loop; returns (prompt-end generator state, KV state, per-user-step records).
    kernels: an ``EngineKernels`` (the eager set if None)."""
    generator = Generator(lm, kernels.lm if kernels is not None else None)
    codec = kernels.codec if kernels is not None else None
    gen_state, lm_state = generator.new_state(1), lm.new_state(1)
    apply_system_prompt(generator, gen_state, lm_state, frames, saved_voice, stepwise=stepwise)
    prompt_end = (gen_state.cache.clone(), gen_state.provided.clone(), int(gen_state.offset[0]), lm_state.keys.clone(), lm_state.values.clone())
    encoder, decoder = mimi.new_encoder_state(1, "cpu"), mimi.new_decoder_state(1, "cpu")
    tokens, pcm, text_logits = [], [], []
    for frame in split_frames(user_audio):
        user_codes = mimi.encode_frame(torch.from_numpy(frame)[None], encoder, codec)
        forced = torch.full((1, lm.config.num_channels), -1)
        forced[:, 1 + lm.config.agent_codebooks :] = user_codes
        result = generator.step(gen_state, lm_state, forced)
        assert bool(result.valid[0])
        tokens.append(result.tokens[0])
        pcm.append(mimi.decode_frame(result.tokens[:, 1 : 1 + lm.config.agent_codebooks], decoder, codec)[0])
        text_logits.append(result.text_logits[0])
    return prompt_end, torch.stack(tokens), torch.stack(pcm), torch.stack(text_logits)


def determined(cache: torch.Tensor, provided: torch.Tensor, offset: int) -> torch.Tensor:
    """Buffer entries with a defined value: provided ones and the last two columns written."""
    keep = provided.clone()
    columns = cache.shape[-1]
    keep[:, (offset - 1) % columns] = True
    keep[:, (offset - 2) % columns] = True
    return torch.where(keep, cache, -100)


def user_phase(session_info) -> slice:
    start = session_info["phases"]["user"]["first_step"]
    return slice(start, start + session_info["phases"]["user"]["num_steps"])


@pytest.fixture
def step_kernels(request, models):
    """The engine's kernel sets that run on a CPU: "eager" (the reference arithmetic, checked here against
    the reference's tensors) and "triton" (the Triton decode attention in Triton's interpreter, Mimi's
    attention as plain matmuls)."""
    from personaplex.engine.kernels import engine_kernels

    if request.param == "triton":
        from conftest import require_triton_kernels

        require_triton_kernels()
        from personaplex.lm.fused import TRITON_BF16_MAX_BATCH, gpu_write_and_attend

        assert TRITON_BF16_MAX_BATCH >= 1  # these single-conversation steps take the Triton kernel
    kernels = engine_kernels(*models, request.param)
    assert kernels.name == request.param
    if request.param == "triton":
        assert kernels.lm.write_and_attend is gpu_write_and_attend and kernels.codec.kind == "triton"
    return kernels


# Every voice source and prompt mode with the eager set; the "triton" set (seconds a frame in Triton's
# interpreter) with both prompt modes and both voice paths (codes from a recording, saved embeddings).
SESSION_CASES = [(voice, mode, "eager") for voice in ("wav", "pt", "safetensors") for mode in ("prefill", "stepwise")]
SESSION_CASES += [("wav", "prefill", "triton"), ("pt", "stepwise", "triton")]
TRITON_USER_FRAMES = 8  # of the session's 40: the kernels run in every frame, the prompt's end is checked whole


@pytest.mark.parametrize("voice_source,prompt_mode,step_kernels", SESSION_CASES, indirect=["step_kernels"])
def test_whole_session(golden, models, session, session_info, voice_source, prompt_mode, step_kernels):
    lm, mimi = models
    text_tokens = session["text_prompt_tokens"].tolist()
    if voice_source == "wav":
        voice_codes = encode_frames(mimi, split_frames(normalize_loudness(read_audio(golden / "voice_prompt.wav"))))
        frames, saved_voice = system_prompt_frames(lm.config, voice_codes, text_tokens), None
        expected_tokens, expected_pcm = session["step_out_tokens"], session["agent_pcm"]
        expected_end = (session["prompt_end_cache"], session["prompt_end_provided"])
    else:
        name = "voice_prompt.pt" if voice_source == "pt" else "voice_prompt_embeddings.safetensors"
        saved_voice = load_saved_voice(golden / name, lm.config)
        frames = system_prompt_frames(lm.config, None, text_tokens)
        expected_tokens, expected_pcm = session["replay_step_out_tokens"], session["replay_agent_pcm"]
        expected_end = (session["replay_prompt_end_cache"], session["replay_prompt_end_provided"])
        # The replay path has one step fewer (step 0 is shared); user steps are its last rows.
    users = user_phase(session_info)
    n_user = users.stop - users.start
    user_audio = read_audio(golden / "user_input.wav")
    if step_kernels.name == "triton":
        user_audio = user_audio[: TRITON_USER_FRAMES * 1920]
    prompt_end, tokens, pcm, text_logits = run_conversation(
        lm, mimi, frames, saved_voice, user_audio, stepwise=prompt_mode == "stepwise", kernels=step_kernels,
    )
    steps = len(tokens)  # all the user steps, or the first ones
    assert steps == (TRITON_USER_FRAMES if step_kernels.name == "triton" else n_user)

    cache, provided, offset, keys, values = prompt_end
    assert offset == users.start
    assert torch.equal(provided[0], expected_end[1])
    assert torch.equal(determined(cache[0], provided[0], offset), determined(expected_end[0], expected_end[1], offset))
    for layer in range(lm.config.num_layers):
        torch.testing.assert_close(keys[layer, 0], session[f"prompt_end_kv_layer{layer}_keys"], atol=LOGIT_TOL, rtol=0)
        torch.testing.assert_close(values[layer, 0], session[f"prompt_end_kv_layer{layer}_values"], atol=LOGIT_TOL, rtol=0)

    assert torch.equal(tokens, expected_tokens[-n_user:][:steps])
    torch.testing.assert_close(pcm, expected_pcm[:steps], atol=PCM_TOL, rtol=0)
    torch.testing.assert_close(text_logits, session["step_text_logits"][users][:steps], atol=LOGIT_TOL, rtol=0)


def test_saved_voice_rejects_wrong_model_size(golden, golden_config):
    kwargs = golden_config["lm"]["config"]
    config = LMConfig.from_reference_kwargs({**kwargs, "dim": 2 * kwargs["dim"]})
    from personaplex.persona import VoicePromptError

    with pytest.raises(VoicePromptError, match="another model size"):
        load_saved_voice(golden / "voice_prompt.pt", config)


def test_voice_file_built_from_audio_equals_reference_pt(golden, models, session, tmp_path):
    """``record_voice`` + ``save_voice_file`` produce the tensors of the reference's .pt for this voice."""
    from personaplex.persona import record_voice, save_voice_file

    lm, _ = models
    voice = record_voice(Generator(lm), lm.new_state, session["voice_prompt_codes"])
    reference = load_saved_voice(golden / "voice_prompt.pt", lm.config)
    torch.testing.assert_close(voice.embeddings, reference.embeddings, atol=1e-6, rtol=0)
    assert torch.equal(voice.cache, reference.cache)
    path = save_voice_file(voice, tmp_path / "speaker.safetensors", model_name="tiny", source="voice_prompt.wav")
    again = load_saved_voice(path, lm.config)
    assert torch.equal(again.embeddings, voice.embeddings) and torch.equal(again.cache, voice.cache)
