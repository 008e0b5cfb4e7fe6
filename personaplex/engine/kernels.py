"""Which kernels an engine's steps run: one named set for the LM and Mimi's streaming transformers.

The sets (see ``personaplex.lm.fused``):
- "eager": PyTorch op by op; the reference arithmetic (CPU default).
- "triton": the LM's single-frame attention through the Triton decode kernel and its layers' element-wise
  groups through the fused Triton kernels of ``personaplex.layers.fused_ops``, Mimi's attention as plain
  matmuls with its RoPE and head layout through the same kernels; nothing compiled by Inductor, so a GPU engine's start-up is a few Triton JITs (about a second
  each) and its CUDA graph captures.
- "compile": the eager functions torch.compile'd, with the Triton decode attention (fewer kernels a
  frame; compiling costs start-up time, the first time on a machine minutes).

``PERSONAPLEX_KERNELS`` chooses the set of engines built with ``"auto"`` (servers, the offline tool);
``PERSONAPLEX_NO_COMPILE=1`` keeps "auto" away from "compile".
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

from ..codec.mimi import Mimi, StreamKernels
from ..compile_cache import use_persistent_compile_cache
from ..lm.fused import KERNEL_SETS, StepKernels, step_kernels
from ..lm.model import LMModel

log = logging.getLogger("personaplex.engine")

# What "auto" picks on a CUDA device with Triton: the set that starts in seconds and steps 64 conversations
# faster than the compiled one (bench/NOTES.md, H200); "compile" stays available for comparison.
GPU_DEFAULT = "triton"
# Mimi's streaming transformers under each set (``personaplex.codec.transformer.stream_function``).
CODEC_KIND = {"eager": "eager", "triton": "triton", "compile": "compile"}


@dataclass(frozen=True)
class EngineKernels:
    name: str  # one of ``KERNEL_SETS``
    lm: StepKernels
    codec: StreamKernels


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_kernel_set(name: str, device: torch.device) -> str:
    """The set "auto" stands for on ``device`` (``PERSONAPLEX_KERNELS`` first); other names as given."""
    if name != "auto":
        return name
    chosen = os.environ.get("PERSONAPLEX_KERNELS", "").strip()
    if chosen:
        if chosen not in KERNEL_SETS:
            raise ValueError(f"PERSONAPLEX_KERNELS must be one of {', '.join(KERNEL_SETS)}, got {chosen!r}")
        return chosen
    if device.type != "cuda" or not triton_available():
        return "eager"
    if os.environ.get("PERSONAPLEX_NO_COMPILE", "") not in ("", "0") and GPU_DEFAULT == "compile":
        return "triton"
    return GPU_DEFAULT


def engine_kernels(lm: LMModel, mimi: Mimi, name: str = "auto") -> EngineKernels:
    """The kernel set ``name`` ("auto" or one of ``KERNEL_SETS``) for steps of ``lm`` and ``mimi``.

    On a GPU the Triton and Inductor caches go to the user's cache directory (``compile_cache``), so
    that a second start finds what the first compiled."""
    name = resolve_kernel_set(name, lm.device)
    cache = use_persistent_compile_cache() if name != "eager" and lm.device.type == "cuda" else None
    log.info("kernels: %s%s", name, f" (compile cache {cache})" if cache else "")
    return EngineKernels(name, step_kernels(lm, name), mimi.stream_kernels(CODEC_KIND[name]))
