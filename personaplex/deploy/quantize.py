"""Weight quantization of the LM through torchao: int8 (weight-only) and fp8 (e4m3).

What is quantized: every matrix that multiplies activations, i.e. each ``nn.Linear`` weight and the
fused q/k/v projections (``in_proj_weight``) of the temporal and depth transformers, the text head,
the depformer input projections and its audio heads. Scales are per output row, so the depformer's
per-codebook stacks (rows of every depth step stacked in one matrix, sliced per step) keep exact
per-step scales: a slice of a per-row quantized matrix is the quantized slice. What stays in the model
dtype: the token embeddings (tables that are gathered, not multiplied: 0.33 B values of the 8.4 B of
PersonaPlex-7B) and the norm scales.

- ``int8``: symmetric int8 weights with one scale per row; activations stay bf16 (the matmul reads the
  int8 weight and rescales the result). Works on every device.
- ``fp8``: e4m3 weights with one scale per row. On GPUs with FP8 tensor cores (compute capability
  >= 8.9: Ada, Hopper and later) activations are quantized per row on the fly and the matmul runs in
  FP8 (``torch._scaled_mm``); elsewhere (CPU, older GPUs) the weight is widened to the activation
  dtype for each matmul (weight-only: the memory saving, not the speed).

The quantized weights are torchao tensor subclasses: ``F.linear`` and slicing dispatch to them, so the
model code is unchanged, CUDA graphs capture their kernels, and torch.compile traces through them.
They are created under ``torch.inference_mode`` (their views are made inside inference mode by the
engine; views of subclasses created outside it cannot be made there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PersonaplexError

QUANTIZE_MODES = ("none", "int8", "fp8")


class QuantizationError(PersonaplexError):
    """Quantization was asked for but cannot be done here."""


def _torchao():
    """Import torchao quietly (it logs a warning for each CUDA extension it cannot load on CPU builds)."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        from torchao import quantization
    except ImportError as error:
        raise QuantizationError(
            f"--quantize needs the torchao package ({error}); install it with: pip install 'personaplex[quantize]'"
        ) from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return quantization


def torchao_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchao")
    except PackageNotFoundError:
        return None


def fp8_matmul_supported(device: torch.device | str) -> bool:
    """FP8 tensor-core matmuls: CUDA devices of compute capability 8.9 or newer."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def describe_mode(mode: str, device: torch.device | str) -> str:
    """One phrase for logs: what ``mode`` does on ``device``."""
    if mode == "int8":
        return "int8 weights (per-row scales), activations in the model dtype"
    if mode == "fp8":
        if fp8_matmul_supported(device):
            return "fp8 e4m3 weights and activations (per-row scales), FP8 tensor-core matmuls"
        return "fp8 e4m3 weights (per-row scales), widened for each matmul: this device has no FP8 matmuls"
    return "no quantization"


def weight_config(mode: str, device: torch.device | str):
    """The torchao configuration for ``mode`` on ``device``."""
    quantization = _torchao()
    granularity = quantization.PerRow()
    if mode == "int8":
        return quantization.Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False)
    if mode == "fp8":
        if fp8_matmul_supported(device):
            return quantization.Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False)
        return quantization.Float8WeightOnlyConfig(granularity=granularity, set_inductor_config=False)
    raise ValueError(f"quantize mode must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")


def check_mode(mode: str) -> None:
    if mode not in QUANTIZE_MODES:
        raise QuantizationError(f"unknown quantization {mode!r}; choose one of: {', '.join(QUANTIZE_MODES)}")
    if mode != "none":
        _torchao()


def matmul_weight_names(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) of the weights that multiply activations: what gets quantized."""
    from ..lm.temporal_transformer import SelfAttentionWeights

    names = []
    for prefix, child in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(child, nn.Linear):
            names.append(f"{dot}weight")
        elif isinstance(child, SelfAttentionWeights):
            names.append(f"{dot}in_proj_weight")
    return names


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a quantized (tensor subclass) weight."""
    return type(tensor) not in (torch.Tensor, nn.Parameter)


def quantize_module_(module: nn.Module, mode: str, device: torch.device | str | None = None) -> int:
    """Quantize the matmul weights of ``module`` in place (see the module docstring).

    Returns how many weights were quantized; torchao leaves a weight as it is when its shape does not
    suit the kernels (fp8 needs dimensions that are multiples of 16), which ``QuantizedSummary`` shows.
    """
    if mode == "none":
        return 0
    quantization = _torchao()
    names = [n for n in matmul_weight_names(module) if not is_quantized(module.get_parameter(n))]
    if not names:
        return 0
    device = device if device is not None else next(module.parameters()).device
    config = weight_config(mode, device)
    with torch.inference_mode():
        quantization.quantize_(module, quantization.FqnToConfig({name: config for name in names}), filter_fn=None)
    return sum(is_quantized(module.get_parameter(n)) for n in names)


@dataclass
class QuantizedSummary:
    """What quantization did to a model: values per storage kind and bytes in all."""

    quantized_values: int
    kept_values: int  # values left in the model dtype (embeddings, norms, weights torchao declined)
    declined: list[str]  # matmul weights that stayed unquantized
    total_bytes: int

    def describe(self) -> str:
        total = self.quantized_values + self.kept_values
        if not self.quantized_values:
            return f"no weights quantized, {self.total_bytes / 2**30:.2f} GiB in all"
        text = (
            f"{self.quantized_values / 1e6:.1f} M of {total / 1e6:.1f} M weights quantized, "
            f"{self.total_bytes / 2**30:.2f} GiB in all"
        )
        if self.declined:
            text += f"; {len(self.declined)} matmul weights kept (shapes the kernels do not take): {', '.join(self.declined[:3])}"
        return text


def tensor_parts(tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors that hold ``tensor``'s data: itself, or a quantized weight's data and scales."""
    if not is_quantized(tensor):
        return {"": tensor}
    names, _ = tensor.__tensor_flatten__()
    return {name: getattr(tensor, name) for name in names}


def tensor_bytes(tensor: torch.Tensor) -> int:
    return sum(part.numel() * part.element_size() for part in tensor_parts(tensor).values())


def summarize(model: nn.Module) -> QuantizedSummary:
    matmul = set(matmul_weight_names(model))
    quantized = kept = total = 0
    declined = []
    for name, param in model.named_parameters():
        total += tensor_bytes(param)
        if is_quantized(param):
            quantized += param.numel()
        else:
            kept += param.numel()
            if name in matmul:
                declined.append(name)
    return QuantizedSummary(quantized, kept, declined, total)


def quantize_lm_(model: nn.Module, mode: str) -> QuantizedSummary:
    """Quantize a loaded LM in place, one transformer layer at a time (the transient extra memory is one
    layer's weights). Prefer ``personaplex.loading.load_lm(quantize=...)``, which quantizes while loading."""
    check_mode(mode)
    for unit in model_units(model):
        quantize_module_(model.get_submodule(unit), mode)
    return summarize(model)


def model_units(model: nn.Module) -> list[str]:
    """Submodule names that partition an LM's parameters into pieces of at most one layer: each temporal
    and depth transformer layer, and every other top-level child. Loading and quantizing go unit by unit."""
    units = []
    for name, child in model.named_children():
        layers = getattr(child, "layers", None)
        if isinstance(layers, nn.ModuleList) and sum(1 for _ in child.parameters(recurse=False)) == 0:
            units += [f"{name}.layers.{index}" for index in range(len(layers))]
        else:
            units.append(name)
    return units
