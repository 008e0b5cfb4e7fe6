"""Turning resolved asset files into a ready model: LM, Mimi and tokenizer on one device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import detect_lm_preset, load_lm, load_mimi
from .codec import Mimi
from .config import get_preset
from .devices import default_device, default_dtype
from .errors import CheckpointError
from .lm.model import LMModel
from .text import TextTokenizer


@dataclass
class LoadedModel:
    name: str  # preset name
    lm: LMModel
    mimi: Mimi
    tokenizer: TextTokenizer
    voices_dir: Path | None
    untrained: bool

    @property
    def device(self) -> torch.device:
        return self.lm.device


def preset_of(assets):
    """The ``ModelPreset`` of ``assets``: named by the assets or, for local files, read from the weights' layout."""
    return get_preset(assets.preset or detect_lm_preset(assets.lm_weights))


def load_model(
    assets, device: str | torch.device | None = None, dtype: torch.dtype | None = None, *,
    quantize: str = "none", offload_layers: int = 0,
) -> LoadedModel:
    """Load everything ``assets`` (a ``model_assets.ModelAssets``) names. The LM preset comes from the assets or,
    for local files, from the weights file's layout. ``quantize`` ("none", "int8", "fp8") and
    ``offload_layers`` (temporal layers kept in host memory): see ``personaplex.deploy``."""
    device = torch.device(device or default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("CUDA is not available on this machine; pass --device cpu")
    dtype = dtype or default_dtype(device)
    name = assets.preset or detect_lm_preset(assets.lm_weights)
    preset = get_preset(name)
    tokenizer = TextTokenizer(assets.tokenizer)
    if tokenizer.vocab_size < preset.lm.text_card:
        raise CheckpointError(
            f"tokenizer {assets.tokenizer} has {tokenizer.vocab_size} pieces but the model emits {preset.lm.text_card} "
            "text ids; pass the tokenizer that belongs to these weights (--tokenizer)"
        )
    if quantize != "none" or offload_layers:
        from .deploy.load import load_lm_deployed

        lm = load_lm_deployed(assets.lm_weights, preset.lm, device=device, dtype=dtype, quantize=quantize,
                              offload_layers=offload_layers, preset_name=f"preset {name!r}")
    else:
        lm = load_lm(assets.lm_weights, preset.lm, device=device, dtype=dtype, preset_name=f"preset {name!r}")
    mimi = load_mimi(assets.mimi_weights, preset.mimi, device=device, preset_name=f"preset {name!r}")
    return LoadedModel(name, lm, mimi, tokenizer, assets.voices_dir, assets.untrained)
