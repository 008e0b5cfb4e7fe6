"""Strict checkpoint loading: exact layouts load, anything else fails with a useful message."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from personaplex.checkpoint import build_lm, detect_lm_preset, model_layout
from personaplex.config import LMConfig, get_preset
from personaplex.errors import CheckpointError
from personaplex.lm.generator import Generator
from personaplex.loading import load_lm


@pytest.fixture(scope="module")
def tiny_config(golden_config) -> LMConfig:
    return LMConfig.from_reference_kwargs(golden_config["lm"]["config"])


@pytest.fixture(scope="module")
def tiny_file(golden, golden_config) -> Path:
    return golden / golden_config["lm"]["file"]


def depq8_from(state: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    """The same weights in Kyutai's original 8-step depformer layout."""
    out = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if parts[0] in ("linears", "depformer_in") and int(parts[1]) >= 8:
            continue
        if parts[0] == "depformer_emb" and int(parts[1]) >= 7:
            continue
        if parts[0] == "depformer" and "gating" in parts and int(parts[parts.index("gating") + 1]) >= 8:
            continue
        if name.endswith("in_proj_weight") and name.startswith("depformer."):
            tensor = tensor[: 8 * 3 * dim]
        if name.endswith("out_proj.weight") and name.startswith("depformer."):
            tensor = tensor[: 8 * dim]
        out[name] = tensor.contiguous()
    return out


def test_loads_every_tensor_exactly(tiny_file, tiny_config):
    model = load_lm(tiny_file, tiny_config, dtype=torch.float32)
    expected = load_file(tiny_file)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    assert not any(p.is_meta or p.requires_grad for p in model.parameters())


def test_depq8_checkpoint_runs_natively(tmp_path, tiny_file, tiny_config):
    path = tmp_path / "moshi_depq8.safetensors"
    save_file(depq8_from(load_file(tiny_file), tiny_config.depformer_dim), str(path))
    config8 = dataclasses.replace(tiny_config, dep_q=8)
    model8 = load_lm(path, config8, dtype=torch.float32)
    model16 = load_lm(tiny_file, tiny_config, dtype=torch.float32)
    # The same forced frames through both: the 8-step depformer computes the agent codebooks with the
    # same weights. Its 8-entry ring hides step 0 from step 7 (the reference quirk), so codebooks
    # 0..6 must agree with the 16-step model and the last one differs.
    torch.manual_seed(0)
    frames = torch.randint(0, 2048, (12, 17))
    frames[:, 0] = torch.randint(0, 128, (12,))
    outputs = {}
    for name, model in (("8", model8), ("16", model16)):
        generator = Generator(model)
        gen_state, lm_state = generator.new_state(1), model.new_state(1)
        logits = []
        for step in range(12):
            result = generator.step(
                gen_state, lm_state, frames[step : step + 1], depth_steps=8, return_audio_logits=True
            )
            assert result.audio_logits.shape[1] == 8
            logits.append(result.audio_logits)
        outputs[name] = torch.cat(logits)
    torch.testing.assert_close(outputs["8"][:, :7], outputs["16"][:, :7], atol=1e-6, rtol=0)
    assert not torch.allclose(outputs["8"][:, 7], outputs["16"][:, 7])


def test_depq8_file_into_depq16_config_names_the_problem(tmp_path, tiny_file, tiny_config):
    path = tmp_path / "moshi_depq8.safetensors"
    save_file(depq8_from(load_file(tiny_file), tiny_config.depformer_dim), str(path))
    with pytest.raises(CheckpointError) as error:
        load_lm(path, tiny_config, dtype=torch.float32, preset_name="preset 'tiny'")
    message = str(error.value)
    assert "missing: depformer.layers.0.gating.10.linear_in.weight" in message or "missing" in message
    assert "linears.15.weight" in message or "more" in message
    assert "wrong shape" in message and "depformer.layers.0.self_attn.in_proj_weight" in message
    assert "dep_q 8" in message


def test_wrong_shape_is_listed(tmp_path, tiny_file, tiny_config):
    state = load_file(tiny_file)
    state["text_linear.weight"] = state["text_linear.weight"][:100].contiguous()
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"1 wrong shape: text_linear.weight expected \[128, 32\] found \[100, 32\]"):
        load_lm(path, tiny_config, dtype=torch.float32)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", struct.pack("<Q", 10**9) + b"{}"])
def test_corrupt_or_missing_files(tmp_path, tiny_config, content):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_lm(path, tiny_config)
    with pytest.raises(CheckpointError, match="not found"):
        load_lm(tmp_path / "absent.safetensors", tiny_config)


def write_sparse_checkpoint(path: Path, layout: dict[str, tuple[int, ...]]) -> Path:
    """A safetensors file with the given layout whose data is a hole: full size on paper, no disk used."""
    header, offset = {}, 0
    for name, shape in sorted(layout.items()):
        size = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return path


@pytest.mark.parametrize("file_preset,load_preset", [("moshi-7b", "personaplex-7b"), ("personaplex-7b", "moshi-7b")])
def test_full_size_layout_mismatch_suggests_the_right_preset(tmp_path, file_preset, load_preset):
    layout = model_layout(build_lm(get_preset(file_preset).lm))
    path = write_sparse_checkpoint(tmp_path / f"{file_preset}.safetensors", layout)
    assert detect_lm_preset(path) == file_preset
    with pytest.raises(CheckpointError, match=f"layout of preset '{file_preset}'"):
        load_lm(path, get_preset(load_preset).lm, device="meta", preset_name=f"preset '{load_preset}'")
