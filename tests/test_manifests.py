"""Full-size models built on the meta device have exactly the published checkpoint layouts."""

from __future__ import annotations

import dataclasses
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


def test_gated_feed_forward_width_follows_the_reference_rule():
    """``21 * dim // 8`` when the feed-forward is exactly 4 * dim, else 2/3 of it (the reference's gating)."""
    from personaplex.config import SMALL_LM, gated_hidden
    from personaplex.lm.model import LMModel

    assert gated_hidden(128, 512) == 336 and gated_hidden(256, 1024) == 672 and gated_hidden(100, 400) == 262
    assert gated_hidden(1024, 4224) == 2816 and gated_hidden(4096, 16896) == 11264  # PersonaPlex-7B: 2/3 branch
    assert gated_hidden(16, 66) == 44 and gated_hidden(128, 513) == 342
    config = dataclasses.replace(SMALL_LM, hidden_scale=4.0)  # main and depformer both at exactly 4 * dim
    with torch.device("meta"):
        model = LMModel(config)
    state = model.state_dict()
    assert state["transformer.layers.0.gating.linear_in.weight"].shape == (2 * 672, 256)
    assert state["depformer.layers.0.gating.0.linear_out.weight"].shape == (128, 336)
