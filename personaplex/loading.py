"""Loading weights: the one way a checkpoint becomes a ready model, plain, quantized or partly offloaded.

``load_model`` turns resolved assets into an LM, Mimi and tokenizer on one device; ``load_lm`` and ``load_mimi``
are its two halves for a single checkpoint and a given config (golden files, benchmarks). Loading is strict
(``checkpoint.check_layout``: exactly the model's keys and shapes) and goes one unit at a time (a transformer
layer, or a small top-level part): each unit is read from the file straight to the device in the model dtype,
quantized there, and moved to host memory when it is an offloaded layer, before the next unit is read. Host
memory never holds a second copy of a 7B model, and the device never holds more than the final weights plus one
unit in the model dtype: a 7B model loads int8 on a 12 GB GPU although its bf16 weights (15.6 GiB) would not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .checkpoint import build_lm, build_mimi, check_layout, detect_lm_preset, file_layout
from .codec import Mimi
from .config import LMConfig, MimiConfig, get_preset
from .deploy.offload import enable_offload, move_to_host_, offloaded_indices
from .deploy.quantize import check_mode, model_units, quantize_module_
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
    for local files, from the weights file's layout. ``quantize`` and ``offload_layers``: see ``load_lm``."""
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
    lm = load_lm(assets.lm_weights, preset.lm, device=device, dtype=dtype, quantize=quantize,
                 offload_layers=offload_layers, preset_name=f"preset {name!r}")
    mimi = load_mimi(assets.mimi_weights, preset.mimi, device=device, preset_name=f"preset {name!r}")
    return LoadedModel(name, lm, mimi, tokenizer, assets.voices_dir, assets.untrained)


def load_lm(
    path: str | Path,
    config: LMConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    *,
    quantize: str = "none",
    offload_layers: int = 0,
    preset_name: str = "the requested LM config",
    progress: Callable[[int, int], None] | None = None,
) -> LMModel:
    """Load an LM checkpoint strictly, every floating tensor cast to ``dtype`` (bfloat16 on GPU is the norm).

    ``quantize`` ("none", "int8", "fp8"): the matmul weights' storage (``personaplex.deploy.quantize``).
    ``offload_layers``: the last that many temporal layers stay in host memory and are streamed to ``device`` at
    each forward pass (``personaplex.deploy.offload``). ``preset_name``: what the error names when the file does
    not fit. ``progress``: called with (units done, units in all)."""
    check_mode(quantize)
    path = Path(path)
    device = torch.device(device)
    model = build_lm(config, "meta", dtype)
    check_layout(model, file_layout(path), path, "lm", preset_name)
    offloaded = offloaded_indices(config.num_layers, offload_layers)
    offloaded_units = {f"transformer.layers.{index}" for index in offloaded}
    units = model_units(model)

    def fit_to_hardware(done: int, unit: str, module: nn.Module) -> None:
        quantize_module_(module, quantize, device)
        if unit in offloaded_units:
            move_to_host_(module, pin=device.type == "cuda")
        if progress is not None:
            progress(done + 1, len(units))

    _read_weights(model, path, device, dtype, units, after_unit=fit_to_hardware)
    if offloaded:
        enable_offload(model, offloaded, device)
    return model.eval()


def load_mimi(path: str | Path, config: MimiConfig, device: torch.device | str = "cpu",
              preset_name: str = "the requested Mimi config") -> Mimi:
    """Load a Mimi checkpoint strictly, in float32."""
    path = Path(path)
    model = build_mimi(config, "meta")
    check_layout(model, file_layout(path), path, "mimi", preset_name)
    _read_weights(model, path, torch.device(device), torch.float32, units=[""])
    return model.eval()


def _read_weights(
    model: nn.Module, path: Path, device: torch.device, dtype: torch.dtype, units: list[str],
    after_unit: Callable[[int, str, nn.Module], None] | None = None,
) -> None:
    """Fill ``model`` (built on meta, its layout already checked against the file) from ``path``, one unit (a
    submodule name; "" is the whole model) at a time, floating tensors cast to ``dtype``. ``after_unit`` is
    called with (index, unit, submodule) once a unit holds its weights, before the next one is read."""
    # A meta target (a layout check of a full-size model) reads to the host: safetensors has no meta device.
    read_device = "cpu" if device.type == "meta" else str(device)
    loaded = 0
    with safe_open(str(path), framework="pt", device=read_device) as weights:
        names = list(weights.keys())
        for index, unit in enumerate(units):
            module = model.get_submodule(unit)
            prefix = f"{unit}." if unit else ""
            tensors = {}
            for name in names:
                if name.startswith(prefix):
                    tensor = weights.get_tensor(name)
                    tensors[name[len(prefix):]] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            module.load_state_dict(tensors, strict=True, assign=True)
            loaded += len(tensors)
            del tensors
            if after_unit is not None:
                after_unit(index, unit, module)
    if loaded != len(names):
        raise CheckpointError(f"{path}: {len(names) - loaded} tensors belong to no part of the model")
    model.requires_grad_(False)
