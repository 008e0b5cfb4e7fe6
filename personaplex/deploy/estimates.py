"""Will this setup keep real time? Estimates made before loading anything, from quick measurements.

A frame is 80 ms of audio. At small batches one frame step reads every weight it uses once, so its
time is set by how fast weights reach the arithmetic units:

- CPU offload: the offloaded layers cross the host link every frame, so a frame takes at least
  ``streamed bytes / host-to-device bandwidth`` (measured with a pinned copy at start).
- CPU only: the weights stream from host memory through matrix-vector products; the rate is measured
  on one matrix of the model's dtype (and quantization) and scaled to the weights a frame reads.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import FRAME_RATE, LMConfig
from .quantize import matmul_weight_names

FRAME_MS = 1000.0 / FRAME_RATE  # 80 ms
# Above this share of the frame spent on weight transfers there is too little left for compute.
OFFLOAD_SAFE_SHARE = 0.75


def layer_bytes(config: LMConfig, quantize: str, dtype: torch.dtype) -> int:
    """Device bytes of one temporal layer with ``quantize`` ("none", "int8", "fp8")."""
    from ..lm.temporal_transformer import TemporalLayer

    with torch.device("meta"):
        layer = TemporalLayer(config)
    return module_bytes(layer, quantize, dtype)


def module_bytes(module: torch.nn.Module, quantize: str, dtype: torch.dtype) -> int:
    """Bytes of ``module``'s parameters once loaded in ``dtype`` and quantized: 1 byte per quantized value
    plus, per row, a float32 scale (and an int8 zero point for int8)."""
    matmul = set(matmul_weight_names(module)) if quantize != "none" else set()
    total = 0
    for name, param in module.named_parameters():
        if name in matmul:
            total += param.numel() + param.shape[0] * (5 if quantize == "int8" else 4)
        else:
            total += param.numel() * dtype.itemsize
    return total


def lm_bytes(config: LMConfig, quantize: str, dtype: torch.dtype) -> int:
    from ..checkpoint import build_lm

    return module_bytes(build_lm(config, "meta", dtype), quantize, dtype)


def measure_host_to_device_bandwidth(device: torch.device | str, megabytes: int = 256, repeats: int = 3) -> float:
    """Bytes per second of a pinned host -> device copy (best of ``repeats``)."""
    device = torch.device(device)
    with torch.cuda.device(device):
        host = torch.empty(megabytes << 20, dtype=torch.uint8).pin_memory()
        target = torch.empty_like(host, device=device)
        target.copy_(host, non_blocking=True)  # first touch
        torch.cuda.synchronize(device)
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(host, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
    return host.numel() / best


@dataclass
class OffloadEstimate:
    offloaded_layers: int
    total_layers: int
    streamed_bytes: int  # per frame
    bandwidth: float  # bytes/s, host to device

    @property
    def transfer_ms(self) -> float:
        return 1000 * self.streamed_bytes / self.bandwidth

    @property
    def real_time(self) -> bool:
        return self.transfer_ms <= OFFLOAD_SAFE_SHARE * FRAME_MS

    def describe(self) -> str:
        head = (
            f"CPU offload: {self.offloaded_layers} of {self.total_layers} temporal layers "
            f"({self.streamed_bytes / 1e9:.2f} GB) stream over the host link at {self.bandwidth / 1e9:.1f} GB/s "
            f"every frame: at least {self.transfer_ms:.0f} ms per {FRAME_MS:.0f} ms frame"
        )
        if self.real_time:
            return f"{head}; this should keep real time for one conversation"
        if self.transfer_ms <= FRAME_MS:
            return f"{head}; at the edge of real time (little time left for compute): expect stutter when live"
        return (
            f"{head}: it will NOT keep real time ({self.transfer_ms / FRAME_MS:.1f}x slower); fine for offline "
            "files. For live use offload fewer layers, or add --quantize int8 (half the bytes)"
        )


def offload_estimate(config: LMConfig, offloaded: int, quantize: str, dtype: torch.dtype, bandwidth: float) -> OffloadEstimate:
    return OffloadEstimate(offloaded, config.num_layers, offloaded * layer_bytes(config, quantize, dtype), bandwidth)


def layers_to_offload(
    config: LMConfig, quantize: str, dtype: torch.dtype, free_bytes: int, other_bytes: int, buffers: int = 2
) -> int:
    """How many temporal layers must leave the device so that the model fits in ``free_bytes``, after
    ``other_bytes`` (codec, conversation state, activations). Offloaded layers need ``buffers``
    staging copies on the device. Returns num_layers + 1 when even offloading all does not fit."""
    per_layer = layer_bytes(config, quantize, dtype)
    rest = lm_bytes(config, quantize, dtype) - config.num_layers * per_layer
    budget = free_bytes - other_bytes - rest
    if budget >= config.num_layers * per_layer:
        return 0
    resident = int((budget - buffers * per_layer) // per_layer)
    if resident < 0:
        return config.num_layers + 1
    return config.num_layers - min(resident, config.num_layers)


# --- CPU only --------------------------------------------------------------------------------------


def values_read_per_frame(config: LMConfig, depth_steps: int | None = None) -> tuple[int, int]:
    """(weights the temporal part reads, weights the whole frame reads) for one frame step: every
    temporal layer and the text head, and of the depformer only the ``depth_steps`` codebooks computed
    (the agent's, by default)."""
    steps = config.agent_codebooks if depth_steps is None else depth_steps
    dim, hidden = config.dim, config.ffn_hidden
    temporal = config.num_layers * (4 * dim * dim + 3 * dim * hidden) + config.text_card * dim
    ddim, dhidden = config.depformer_dim, config.depformer_ffn_hidden
    depth = steps * (dim * ddim + ddim * config.card) + config.depformer_num_layers * steps * (4 * ddim * ddim + 3 * ddim * dhidden)
    return temporal, temporal + depth


def measure_matmul_seconds_per_value(dtype: torch.dtype, quantize: str, rows: int, size: int, repeats: int = 5) -> float:
    """Seconds per weight value of ``F.linear`` with ``rows`` input rows on this CPU, through the same
    weight storage the model would use (``dtype``, ``quantize``)."""
    from .quantize import quantize_module_

    generator = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(size, size, bias=False)
    with torch.no_grad():
        layer.weight.uniform_(-(size**-0.5), size**-0.5, generator=generator)
    layer = layer.to(dtype).requires_grad_(False)
    quantize_module_(layer, quantize, "cpu")
    x = torch.randn(rows, size, generator=generator).to(dtype)
    samples = []
    with torch.inference_mode():
        F.linear(x, layer.weight)
        for _ in range(repeats):
            start = time.perf_counter()
            F.linear(x, layer.weight)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) / (size * size)


@dataclass
class CpuEstimate:
    model_name: str
    seconds_per_frame: float  # one batched step of ``slots`` conversations
    prefill_seconds: float  # one system prompt
    slots: int

    @property
    def slowdown(self) -> float:
        """Wall time per second of audio for one conversation running alone (> 1: slower than real time)."""
        return self.seconds_per_frame / (FRAME_MS / 1000)

    def total_seconds(self, frames: list[int]) -> float:
        """Time for conversations of ``frames`` frames each, ``slots`` at a time, each after its prompt."""
        steps = -(-sum(frames) // self.slots) if frames else 0
        return len(frames) * self.prefill_seconds + steps * self.seconds_per_frame

    def describe(self, frames: list[int] | None = None) -> str:
        """The speed; with the inputs' lengths (``frames``, one count per input) also how long they will take."""
        speed = (
            f"about {self.seconds_per_frame:.2f} s per {FRAME_MS:.0f} ms frame step ({self.slowdown:.0f}x slower than real time)"
            if self.slowdown >= 1
            else f"about {1000 * self.seconds_per_frame:.0f} ms per {FRAME_MS:.0f} ms frame step (faster than real time)"
        )
        if not frames:  # a server or a one-off job: no inputs to time
            return f"running {self.model_name} on the CPU: {speed} (estimated from a quick measurement of this CPU)"
        audio = sum(frames) * FRAME_MS / 1000
        return (
            f"running {self.model_name} on the CPU: {speed}; {len(frames)} input(s), {audio:.1f} s of audio, "
            f"{self.slots} at a time, will take about {format_duration(self.total_seconds(frames))} "
            "(a first estimate from a quick measurement of this CPU; the rate measured on the run itself follows "
            "after a few seconds)"
        )


def cpu_estimate(
    config: LMConfig, model_name: str, dtype: torch.dtype, quantize: str, slots: int, prompt_frames: int
) -> CpuEstimate:
    """Measure this CPU on one matrix and scale to the model (see the module docstring)."""
    # Large enough not to fit in caches (weights stream from memory, as in the real model).
    size = max(1024, min(8192, 2 * config.dim))
    temporal, frame = values_read_per_frame(config)
    per_value = measure_matmul_seconds_per_value(dtype, quantize, rows=slots, size=size, repeats=3)
    block = 64  # prompt frames per matmul: compute-bound, a smaller matrix measures it as well
    per_value_block = measure_matmul_seconds_per_value(dtype, quantize, rows=block, size=min(size, 2048), repeats=2)
    prefill = temporal * per_value_block * -(-prompt_frames // block)
    return CpuEstimate(model_name, frame * per_value, prefill, slots)


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
