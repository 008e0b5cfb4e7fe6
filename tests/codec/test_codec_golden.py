"""Mimi against the reference's recorded streaming run (golden_mimi.*) and the real checkpoint layout.

Configs come from the fixture directory (``tiny_config.json``), so any fixture set in the same format
runs through these tests. Tolerances follow the fixtures' README: codes exact, floats within 1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from personaplex.checkpoint import build_mimi
from personaplex.codec import Mimi
from personaplex.config import MimiConfig
from personaplex.loading import load_mimi

FLOAT_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def mimi_config(golden_config: dict) -> MimiConfig:
    return MimiConfig.from_reference_kwargs(golden_config["mimi"])


@pytest.fixture(scope="module")
def tiny_mimi(golden: Path, mimi_config: MimiConfig) -> Mimi:
    return load_mimi(golden / "tiny_mimi.safetensors", mimi_config)


@pytest.fixture(scope="module")
def recorded(golden: Path) -> dict[str, torch.Tensor]:
    return load_file(golden / "golden_mimi.safetensors")


def time_major(frames: list[torch.Tensor]) -> torch.Tensor:
    """Per-call [1, C, T] conv-layout tensors -> [total T, C], the fixtures' layout."""
    return torch.cat([frame[0].T for frame in frames])


@pytest.fixture(scope="module")
def encode_run(tiny_mimi: Mimi, recorded) -> dict[str, torch.Tensor]:
    """Streaming encode of the recorded waveform, one frame (1920 samples at 24 kHz) per call."""
    torch.set_num_threads(2)
    state = tiny_mimi.new_encoder_state(1, "cpu")
    frames = recorded["waveform"].view(-1, tiny_mimi.frame_size)
    traces = [tiny_mimi.encode_frame_traced(frame[None], state) for frame in frames]
    return {
        "stream_codes": torch.cat([t.codes for t in traces]),
        "stream_enc_seanet_out": time_major([t.seanet_out for t in traces]),
        "stream_enc_transformer_out": time_major([t.transformer_out for t in traces]),
        "stream_latent": time_major([t.latent for t in traces]),
    }


@pytest.fixture(scope="module")
def decode_run(tiny_mimi: Mimi, recorded) -> dict[str, torch.Tensor]:
    """Streaming decode of the recorded codes, one code frame per call."""
    torch.set_num_threads(2)
    state = tiny_mimi.new_decoder_state(1, "cpu")
    traces = [tiny_mimi.decode_frame_traced(codes[None], state) for codes in recorded["stream_codes"]]
    return {
        "decode_latent": time_major([t.latent for t in traces]),
        "stream_dec_upsampled": time_major([t.upsampled for t in traces]),
        "stream_dec_transformer_out": time_major([t.transformer_out for t in traces]),
        "stream_decoded_pcm": torch.cat([t.pcm[0] for t in traces]),
    }


def test_tiny_mimi_preset_is_the_reference_fixture_layout(reference_fixture_config):
    """The built-in "tiny" Mimi is the reference fixtures' (not necessarily the fixture set under test)."""
    from personaplex.config import TINY_MIMI

    assert MimiConfig.from_reference_kwargs(reference_fixture_config["mimi"]) == TINY_MIMI


def test_codec_checkpoint_loads_strictly(golden, mimi_config):
    model = Mimi(mimi_config)
    result = model.load_state_dict(load_file(golden / "tiny_mimi.safetensors"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_codec_stream_codes_exact(encode_run, recorded):
    assert torch.equal(encode_run["stream_codes"], recorded["stream_codes"])


@pytest.mark.parametrize("key", ["stream_enc_seanet_out", "stream_enc_transformer_out", "stream_latent"])
def test_codec_encoder_intermediates(encode_run, recorded, key):
    assert encode_run[key].shape == recorded[key].shape
    assert (encode_run[key] - recorded[key]).abs().max().item() <= FLOAT_TOLERANCE


@pytest.mark.parametrize(
    "key", ["decode_latent", "stream_dec_upsampled", "stream_dec_transformer_out", "stream_decoded_pcm"]
)
def test_codec_decoder_outputs(decode_run, recorded, key):
    assert decode_run[key].shape == recorded[key].shape
    assert (decode_run[key] - recorded[key]).abs().max().item() <= FLOAT_TOLERANCE


def test_codec_real_size_layout_matches_manifest(golden):
    from personaplex.config import MIMI

    manifest = json.loads((golden / "manifest_mimi.json").read_text())
    model = build_mimi(MIMI, "meta")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    state = model.state_dict()
    assert list(state) == [entry["key"] for entry in manifest["keys"]]  # same keys, same order
    for entry in manifest["keys"]:
        key = entry["key"]
        assert list(state[key].shape) == entry["shape"], key
        assert state[key].dtype == torch.float32, key
        assert key in (params if entry["kind"] == "parameter" else buffers), f"{key} should be a {entry['kind']}"
    assert sum(t.numel() for t in state.values()) == manifest["num_elements"]
