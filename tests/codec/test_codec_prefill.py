"""``Mimi.encode_clip``: N frames in one parallel pass == N streaming ``encode_frame`` calls.

Clip lengths follow the fixture's Mimi: with a transformer context of C frames at the encoder rate (tiny: 20
frames at 25 Hz, i.e. 10 code frames), clips just under, at and just over C/2 code frames put just under, exactly
and just over one prefill block through, and 2.5 and 4 blocks wrap the ring several times, which is where the
reference's visibility quirk matters. Every size is read from the fixture set.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from personaplex.codec import EncoderState, Mimi
from personaplex.config import MimiConfig
from personaplex.loading import load_mimi

FLOAT_TOLERANCE = 1e-6
CONTINUE_FRAMES = 5


@pytest.fixture(scope="module")
def tiny_mimi(golden: Path, golden_config: dict) -> Mimi:
    return load_mimi(golden / "tiny_mimi.safetensors", MimiConfig.from_reference_kwargs(golden_config["mimi"]))


def stream(mimi: Mimi, pcm: torch.Tensor, state: EncoderState) -> torch.Tensor:
    """Frame-by-frame encode: pcm [B, N * frame_size] -> codes [B, N, num_codebooks]."""
    frames = pcm.view(pcm.shape[0], -1, mimi.frame_size)
    return torch.stack([mimi.encode_frame(frames[:, i], state) for i in range(frames.shape[1])], dim=1)


def signals(batch: int, frames: int, mimi: Mimi, seed: int) -> torch.Tensor:
    """Different noisy chirp-like signals per slot, amplitude ~0.3: [B, frames * frame_size]."""
    generator = torch.Generator().manual_seed(seed)
    length = frames * mimi.frame_size
    t = torch.arange(length) / mimi.config.sample_rate
    base = torch.stack([0.3 * torch.sin(2 * torch.pi * (200 + 150 * b) * t * (1 + t)) for b in range(batch)])
    return base + 0.05 * torch.randn(batch, length, generator=generator)


def assert_states_equal(clip: EncoderState, streamed: EncoderState) -> None:
    for index, (a, b) in enumerate(zip(clip.tensors(), streamed.tensors(), strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, index
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=0, atol=FLOAT_TOLERANCE, msg=f"state tensor {index}")
        else:
            assert torch.equal(a, b), f"state tensor {index}"


def test_codec_clip_matches_golden_stream_codes(tiny_mimi: Mimi, golden: Path):
    recorded = load_file(golden / "golden_mimi.safetensors")
    frames = recorded["waveform"].numel() // tiny_mimi.frame_size
    transformer_frames = recorded["stream_enc_transformer_out"].shape[0]  # at the encoder's rate
    state = tiny_mimi.new_encoder_state(1, "cpu")
    trace = tiny_mimi.encode_clip_traced(recorded["waveform"][None], state)
    assert trace.codes.shape == (1, frames, tiny_mimi.config.num_codebooks) and trace.codes.dtype == torch.int64
    assert torch.equal(trace.codes[0], recorded["stream_codes"].long())
    for name, value in (
        ("stream_enc_seanet_out", trace.seanet_out),
        ("stream_enc_transformer_out", trace.transformer_out),
        ("stream_latent", trace.latent),
    ):
        torch.testing.assert_close(value[0].T, recorded[name], rtol=0, atol=FLOAT_TOLERANCE, msg=name)
    assert torch.equal(state.transformer.position, torch.tensor([transformer_frames]))


def clip_frames(mimi: Mimi, case: str) -> int:
    """Code frames of a clip, relative to the transformer context (one prefill block = C/2 code frames)."""
    block = max(1, mimi.config.transformer.context // mimi.config.encoder_frames_per_frame)
    return {"one": 1, "two": 2, "under_block": max(1, block - 1), "block": block, "over_block": block + 1,
            "wraps": int(2.5 * block), "wraps_more": 4 * block}[case]


@pytest.mark.parametrize("case", ["one", "two", "under_block", "block", "over_block", "wraps", "wraps_more"])
@pytest.mark.parametrize("warmup", [0, 3], ids=["fresh", "after3"])
def test_codec_clip_equals_streaming_and_leaves_same_state(tiny_mimi: Mimi, case: str, warmup: int):
    frames = clip_frames(tiny_mimi, case)
    pcm = signals(2, warmup + frames + CONTINUE_FRAMES, tiny_mimi, seed=frames)
    split = [warmup * tiny_mimi.frame_size, (warmup + frames) * tiny_mimi.frame_size]
    before, clip, after = pcm[:, : split[0]], pcm[:, split[0] : split[1]], pcm[:, split[1] :]

    by_clip = tiny_mimi.new_encoder_state(2, "cpu")
    by_stream = tiny_mimi.new_encoder_state(2, "cpu")
    if warmup:
        stream(tiny_mimi, before, by_clip)
        stream(tiny_mimi, before, by_stream)

    codes = tiny_mimi.encode_clip(clip, by_clip)
    expected = stream(tiny_mimi, clip, by_stream)
    assert codes.shape == (2, frames, tiny_mimi.config.num_codebooks) and codes.dtype == torch.int64
    assert torch.equal(codes, expected)
    assert not torch.equal(codes[0], codes[1])  # the slots really carry different signals
    assert_states_equal(by_clip, by_stream)

    # Streaming continues from the state the clip left.
    assert torch.equal(stream(tiny_mimi, after, by_clip), stream(tiny_mimi, after, by_stream))
    assert_states_equal(by_clip, by_stream)


def test_codec_clip_slots_at_different_positions(tiny_mimi: Mimi):
    """One batch whose slots started at different times (slot 1 reset after 4 frames)."""
    pcm = signals(2, 4 + 13, tiny_mimi, seed=7)
    head, clip = pcm[:, : 4 * tiny_mimi.frame_size], pcm[:, 4 * tiny_mimi.frame_size :]
    states = [tiny_mimi.new_encoder_state(2, "cpu") for _ in range(2)]
    for state in states:
        stream(tiny_mimi, head, state)
        tiny_mimi.reset_encoder_state(state, torch.tensor([1]))
    codes = tiny_mimi.encode_clip(clip, states[0])
    assert torch.equal(codes, stream(tiny_mimi, clip, states[1]))
    assert_states_equal(states[0], states[1])


def test_codec_clip_rejects_partial_frames(tiny_mimi: Mimi):
    state = tiny_mimi.new_encoder_state(1, "cpu")
    for length in (0, tiny_mimi.frame_size + 1):
        with pytest.raises(ValueError):
            tiny_mimi.encode_clip(torch.zeros(1, length), state)
