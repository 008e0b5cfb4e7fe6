"""Mimi's caller-owned streaming state: slots are independent, resets are local, caches stay correct.

These tests use random weights (no fixtures needed): what they check is that batching and resetting do
not change any slot's result, which holds for any weights.

"Not change" means: codes exactly, audio to float32 rounding. Bit-for-bit equality across batch sizes is
not available from the CPU kernels: GEMM and conv results depend on the batch size and even on a row's
position in the batch (different blocking), at the 1e-7 relative level; GPU kernels behave alike.
"""

from __future__ import annotations

import math

import pytest
import torch

from personaplex.codec import Mimi
from personaplex.config import TINY_MIMI

FRAMES = 14  # the tiny transformers' KV rings (20 frames, 2 per call) wrap after 10 calls
RESET_AT = 5
AUDIO_TOLERANCE = 1e-6


def randomised_mimi(seed: int = 0) -> Mimi:
    """Tiny Mimi with random weights, including non-trivial LayerNorms, LayerScales and codebooks."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Mimi(TINY_MIMI).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("norm1.weight", "norm2.weight", "layer_scale_1.scale", "layer_scale_2.scale")):
                tensor.uniform_(0.5, 1.5, generator=generator)
            elif name.endswith(("norm1.bias", "norm2.bias")):
                tensor.normal_(0, 0.1, generator=generator)
            elif name.endswith("cluster_usage"):
                tensor.uniform_(0.5, 2.0, generator=generator)
            elif name.endswith("embedding_sum"):
                tensor.normal_(0, 0.3, generator=generator)  # near the latents' scale
    return model


def signal(seed: int, frames: int = FRAMES) -> torch.Tensor:
    """[frames, 1920] chirp plus noise at 24 kHz."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(frames * TINY_MIMI.frame_size, dtype=torch.float64) / TINY_MIMI.sample_rate
    f0, f1 = 200.0 + 50 * seed, 4000.0
    phase = 2 * math.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1]))
    wave = 0.3 * torch.sin(phase) + 0.02 * torch.randn(t.shape, generator=generator, dtype=torch.float64)
    return wave.float().view(frames, -1)


@pytest.fixture(scope="module")
def mimi() -> Mimi:
    return randomised_mimi()


def solo_encode(mimi: Mimi, frames: torch.Tensor) -> torch.Tensor:
    state = mimi.new_encoder_state(1, "cpu")
    return torch.cat([mimi.encode_frame(frame[None], state) for frame in frames])


def solo_decode(mimi: Mimi, codes: torch.Tensor) -> torch.Tensor:
    state = mimi.new_decoder_state(1, "cpu")
    return torch.cat([mimi.decode_frame(frame[None], state)[0] for frame in codes])


def test_codec_batched_slots_with_midway_reset_match_solo_runs(mimi):
    a, b = signal(1), signal(2)
    solo_a, solo_b = solo_encode(mimi, a), solo_encode(mimi, b)
    assert solo_a.unique().numel() > 2 * FRAMES, "random codebooks should give diverse codes"

    # Slot 0 streams a, slot 1 streams b; slot 2 streams a, is reset at RESET_AT, then streams b afresh.
    slot2_input = torch.cat([a[:RESET_AT], b[: FRAMES - RESET_AT]])
    encoder = mimi.new_encoder_state(3, "cpu")
    codes = []
    for step in range(FRAMES):
        if step == RESET_AT:
            mimi.reset_encoder_state(encoder, torch.tensor([2]))
        codes.append(mimi.encode_frame(torch.stack([a[step], b[step], slot2_input[step]]), encoder))
    codes = torch.stack(codes, dim=1)  # [3, FRAMES, 8]
    assert torch.equal(codes[0], solo_a)
    assert torch.equal(codes[1], solo_b)
    assert torch.equal(codes[2, :RESET_AT], solo_a[:RESET_AT])
    assert torch.equal(codes[2, RESET_AT:], solo_b[: FRAMES - RESET_AT])

    decoder = mimi.new_decoder_state(3, "cpu")
    pcm = []
    for step in range(FRAMES):
        if step == RESET_AT:
            mimi.reset_decoder_state(decoder, torch.tensor([False, False, True]))
        pcm.append(mimi.decode_frame(codes[:, step], decoder))
    pcm = torch.cat(pcm, dim=1)  # [3, FRAMES * 1920]
    size = mimi.frame_size
    assert_close_audio(pcm[0], solo_decode(mimi, solo_a))
    assert_close_audio(pcm[1], solo_decode(mimi, solo_b))
    assert_close_audio(pcm[2, : RESET_AT * size], solo_decode(mimi, solo_a[:RESET_AT]))
    assert_close_audio(pcm[2, RESET_AT * size :], solo_decode(mimi, solo_b[: FRAMES - RESET_AT]))


def assert_close_audio(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Float32 rounding differences only (see module docstring); a state leak would be orders larger.
    assert (actual - expected).abs().max().item() <= AUDIO_TOLERANCE * max(1.0, expected.abs().max().item())


def state_tensors(state) -> list[torch.Tensor]:
    """Every tensor of an EncoderState / DecoderState, in a fixed order."""
    out = []
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, list):
            out.extend(value)
        else:
            out.extend(value.tensors())
    return out


@pytest.mark.parametrize("slots", [torch.tensor([1]), torch.tensor([False, True, False])], ids=["indices", "mask"])
def test_codec_reset_touches_only_selected_slots(mimi, slots):
    frames = torch.stack([signal(1, 3), signal(2, 3), signal(3, 3)], dim=1)  # [3 steps, 3 slots, 1920]
    encoder, decoder = mimi.new_encoder_state(3, "cpu"), mimi.new_decoder_state(3, "cpu")
    for step in frames:
        mimi.decode_frame(mimi.encode_frame(step, encoder), decoder)
    for state, reset, fresh in [
        (encoder, mimi.reset_encoder_state, mimi.new_encoder_state(3, "cpu")),
        (decoder, mimi.reset_decoder_state, mimi.new_decoder_state(3, "cpu")),
    ]:
        before = [t.clone() for t in state_tensors(state)]
        assert any(not torch.equal(b[1], f[1]) for b, f in zip(before, state_tensors(fresh)))
        reset(state, slots)
        for after, old, new in zip(state_tensors(state), before, state_tensors(fresh)):
            assert torch.equal(after[[0, 2]], old[[0, 2]])
            assert torch.equal(after[1], new[1])


def test_codec_codebook_follows_reloaded_weights():
    model = randomised_mimi(seed=3)
    codes = torch.randint(0, TINY_MIMI.quantizer_bins, (2, TINY_MIMI.num_codebooks, 1))
    before = model.quantizer.decode(codes)  # builds the cached centroids
    weights = {k: v.clone() for k, v in randomised_mimi(seed=4).state_dict().items()}
    expected = randomised_mimi(seed=4).quantizer.decode(codes)
    assert not torch.equal(before, expected)

    model.load_state_dict(weights)  # copies into the existing buffers
    assert torch.equal(model.quantizer.decode(codes), expected)

    model = randomised_mimi(seed=3)
    model.quantizer.decode(codes)
    model.load_state_dict(weights, assign=True)  # replaces the buffers
    assert torch.equal(model.quantizer.decode(codes), expected)


def test_codec_meta_construction_allocates_nothing():
    with torch.device("meta"):
        model = Mimi(TINY_MIMI)
    assert all(t.is_meta for t in model.state_dict().values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync check needs CUDA")
def test_codec_steps_do_not_synchronise_with_host():
    model = randomised_mimi().cuda()
    encoder, decoder = model.new_encoder_state(2, "cuda"), model.new_decoder_state(2, "cuda")
    frames = torch.stack([signal(1, 3), signal(2, 3)], dim=1).cuda()
    model.decode_frame(model.encode_frame(frames[0], encoder), decoder)  # warm caches outside the check
    mask, index = torch.tensor([True, False], device="cuda"), torch.tensor([1], device="cuda")  # host copies
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in frames[1:]:
            model.decode_frame(model.encode_frame(step, encoder), decoder)
        model.reset_encoder_state(encoder, mask)
        model.reset_decoder_state(decoder, index)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
