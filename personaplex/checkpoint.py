"""Checkpoint layouts in the published (reference) key layout: what a safetensors file holds, what a model
expects, and a strict comparison of the two.

Models are built on the meta device, so no random weights are ever allocated. The file must contain exactly
the model's keys with the model's shapes, otherwise ``CheckpointError`` lists the differences and names the
preset that fits. Reading the weights is ``personaplex.loading``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .codec import Mimi
from .config import PRESETS, LMConfig, MimiConfig
from .errors import CheckpointError
from .lm.model import LMModel

Layout = dict[str, tuple[int, ...]]


def model_layout(module: nn.Module) -> Layout:
    """Key -> shape of a module's state dict (works on meta modules)."""
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def file_layout(path: str | Path) -> Layout:
    """Key -> shape of a safetensors file, read from its header only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc


@dataclass
class LayoutDiff:
    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, expected, found

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)

    @property
    def size(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.wrong_shape)

    def describe(self, limit: int = 8) -> str:
        def clip(items: list[str]) -> str:
            more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {clip(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: {clip(self.unexpected)}")
        if self.wrong_shape:
            shapes = [f"{k} expected {list(e)} found {list(f)}" for k, e, f in self.wrong_shape]
            parts.append(f"{len(self.wrong_shape)} wrong shape: {clip(shapes)}")
        return "; ".join(parts)


def compare_layouts(expected: Layout, found: Layout) -> LayoutDiff:
    return LayoutDiff(
        missing=sorted(set(expected) - set(found)),
        unexpected=sorted(set(found) - set(expected)),
        wrong_shape=sorted((k, expected[k], found[k]) for k in expected.keys() & found.keys() if expected[k] != found[k]),
    )


def build_lm(config: LMConfig, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32) -> LMModel:
    """An LM with uninitialised weights (meta by default: no memory is allocated)."""
    with torch.device(device):
        model = LMModel(config)
    return model.to(dtype=dtype)


def build_mimi(config: MimiConfig, device: torch.device | str = "meta") -> Mimi:
    with torch.device(device):
        return Mimi(config)


def _presets_matching(found: Layout, kind: str) -> list[str]:
    names = []
    for preset in PRESETS.values():
        module = build_lm(preset.lm) if kind == "lm" else build_mimi(preset.mimi)
        if compare_layouts(model_layout(module), found).ok:
            names.append(preset.name)
    return names


def _layout_summary(found: Layout) -> str:
    """A one-phrase description of what a file holds, to tell users what they actually passed."""
    if "text_emb.weight" in found:
        layers = sum(1 for k in found if k.startswith("transformer.layers.") and k.endswith(".norm1.alpha"))
        dep_q = sum(1 for k in found if k.startswith("linears.") and k.endswith(".weight"))
        rows, dim = found["text_emb.weight"]
        return f"an LM with dim {dim}, {layers} layers, dep_q {dep_q}, text vocabulary {rows - 1}"
    if any(k.startswith("encoder.model.") for k in found):
        return "a Mimi codec checkpoint"
    return f"{len(found)} tensors of an unknown model"


def check_layout(module: nn.Module, found: Layout, path: Path, kind: str, wanted: str) -> None:
    """CheckpointError unless ``found`` (the layout of the file at ``path``) is exactly ``module``'s; the error names
    the differences and the preset the file fits. ``kind``: "lm" or "mimi"; ``wanted``: what was asked for, in words
    ("preset 'personaplex-7b'")."""
    diff = compare_layouts(model_layout(module), found)
    if diff.ok:
        return
    fitting = _presets_matching(found, kind)
    if fitting:
        hint = f"this file has the layout of preset {' / '.join(repr(n) for n in fitting)}; load it with that preset"
    else:
        hint = f"the file holds {_layout_summary(found)}, which no known preset fits; is it the right, complete file?"
    raise CheckpointError(f"{path} does not fit {wanted}: {diff.describe()}. Hint: {hint}")


def detect_lm_preset(path: str | Path) -> str:
    """Name of the preset whose LM layout the file has; CheckpointError if none."""
    found = file_layout(path)
    fitting = _presets_matching(found, "lm")
    if not fitting:
        raise CheckpointError(f"{path}: no known LM preset fits this file ({len(found)} tensors)")
    return fitting[0]
