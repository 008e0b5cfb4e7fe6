"""Full-size models built on the meta device have exactly the published checkpoint layouts."""

from __future__ import annotations

import json

import pytest
import torch

from personaplex.checkpoint import build_lm, build_mimi
from personaplex.config import get_preset

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

CASES = [
    ("personaplex-7b", "lm", "manifest_lm_personaplex_7b.json", torch.bfloat16),
    ("moshi-7b", "lm", "manifest_lm_moshi_7b_depq8.json", torch.bfloat16),
    ("personaplex-7b", "mimi", "manifest_mimi.json", torch.float32),
]


@pytest.mark.parametrize("preset,part,manifest,dtype", CASES)
def test_meta_model_matches_manifest(golden, preset, part, manifest, dtype):
    expected = json.loads((golden / manifest).read_text())
    config = get_preset(preset)
    model = build_lm(config.lm, "meta", dtype) if part == "lm" else build_mimi(config.mimi, "meta")
    state = model.state_dict()
    assert sorted(state) == sorted(entry["key"] for entry in expected["keys"])
    for entry in expected["keys"]:
        tensor = state[entry["key"]]
        assert list(tensor.shape) == entry["shape"], entry["key"]
        assert tensor.dtype == DTYPES[entry["dtype_runtime"]], entry["key"]
        assert tensor.is_meta
    assert sum(t.numel() for t in state.values()) == expected["num_elements"]
