"""Loading an LM checkpoint quantized and/or partly offloaded, one layer at a time.

The model is built on the meta device as for a plain load; then each unit (one transformer layer, or a
small top-level part) is read from the file straight to the device, quantized there, and moved to host
memory when it is an offloaded layer, before the next unit is read. The device never holds more than
the final weights plus one unit in the model dtype: a 7B model loads int8 on a 12 GB GPU although its
bf16 weights (15.6 GiB) would not fit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint import _check_layout, build_lm, file_layout
from ..config import LMConfig
from ..errors import CheckpointError
from ..lm.model import LMModel
from .offload import enable_offload, move_to_host_, offloaded_indices
from .quantize import check_mode, model_units, quantize_module_


def load_lm_deployed(
    path: str | Path,
    config: LMConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    *,
    quantize: str = "none",
    offload_layers: int = 0,
    preset_name: str = "the requested LM config",
    progress=None,
) -> LMModel:
    """Load an LM checkpoint strictly (as ``checkpoint.load_lm``), quantizing its matmul weights with
    ``quantize`` ("none", "int8", "fp8") and keeping its last ``offload_layers`` temporal layers in host
    memory, streamed to ``device`` at each forward pass. ``progress``: called with (done, total) units."""
    check_mode(quantize)
    path = Path(path)
    device = torch.device(device)
    found = file_layout(path)
    model = build_lm(config, "meta", dtype)
    _check_layout(model, found, path, "lm", preset_name)
    offloaded = offloaded_indices(config.num_layers, offload_layers)
    offloaded_units = {f"transformer.layers.{index}" for index in offloaded}
    units = model_units(model)
    loaded = 0
    with safe_open(str(path), framework="pt", device=str(device)) as weights:
        names = list(weights.keys())
        for done, unit in enumerate(units):
            module = model.get_submodule(unit)
            prefix = f"{unit}."
            tensors = {}
            for name in names:
                if name.startswith(prefix):
                    tensor = weights.get_tensor(name)
                    tensors[name[len(prefix):]] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            module.load_state_dict(tensors, strict=True, assign=True)
            loaded += len(tensors)
            del tensors
            quantize_module_(module, quantize, device)
            if unit in offloaded_units:
                move_to_host_(module, pin=device.type == "cuda")
            if progress is not None:
                progress(done + 1, len(units))
    if loaded != len(names):
        raise CheckpointError(f"{path}: {len(names) - loaded} tensors belong to no part of the model")
    model.requires_grad_(False)
    if offloaded:
        enable_offload(model, offloaded, device)
    return model.eval()
