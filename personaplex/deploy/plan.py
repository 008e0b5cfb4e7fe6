"""Deciding, before loading, how the LM goes onto the device: quantization, offloaded layers, and
what the user should expect (messages said up front: real time or not, how long a CPU run takes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import LMConfig
from ..devices import default_dtype
from ..errors import PersonaplexError
from .quantize import check_mode, describe_mode
from .estimates import (
    cpu_estimate,
    layers_to_offload,
    lm_bytes,
    measure_host_to_device_bandwidth,
    offload_estimate,
)

# Device memory kept free for activations, CUDA graphs and compiled kernels beside weights and state.
RESERVE_BYTES = 2 << 30
TYPICAL_PROMPT_FRAMES = 200  # 10 s of voice and a short text prompt


class DeploymentError(PersonaplexError):
    """The model cannot be placed on this hardware as asked."""


@dataclass
class LoadPlan:
    device: torch.device
    dtype: torch.dtype
    quantize: str = "none"
    offload_layers: int = 0
    messages: list[str] = field(default_factory=list)


def conversation_state_bytes(config: LMConfig, dtype: torch.dtype, codec_bytes: int = 64 << 20) -> int:
    """Device bytes of one conversation slot: KV rings at full context plus the codec's streaming state."""
    kv = 2 * config.num_layers * config.num_heads * config.context * config.head_dim * dtype.itemsize
    return kv + codec_bytes


def codec_weight_bytes(preset) -> int:
    from ..checkpoint import build_mimi

    return sum(p.numel() * 4 for p in build_mimi(preset.mimi).parameters())  # float32


def _available_host_memory() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def plan_load(
    preset, device: torch.device | str, *, quantize: str = "none", cpu_offload: bool = False,
    offload_layers: int | None = None, slots: int = 1, input_frames: list[int] | None = None,
    dtype: torch.dtype | None = None,
) -> LoadPlan:
    """Check the flags against the hardware and say what to expect. ``preset``: a ``ModelPreset``;
    ``slots``: conversations run at once; ``input_frames``: lengths of the inputs (for a CPU run's time)."""
    check_mode(quantize)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    config = preset.lm
    plan = LoadPlan(device, dtype, quantize)
    if quantize != "none":
        plan.messages.append(f"quantization: {describe_mode(quantize, device)}")
    if offload_layers is not None:
        cpu_offload = True
        if not 0 <= offload_layers <= config.num_layers:
            raise DeploymentError(f"--offload-layers takes 0..{config.num_layers} for this model, not {offload_layers}")
    if device.type == "cpu":
        if cpu_offload:
            raise DeploymentError("--cpu-offload streams layers from host memory to a GPU; with --device cpu "
                                  "everything is in host memory already: drop the flag")
        _plan_cpu(plan, preset, slots, input_frames or [])
        return plan
    if device.type != "cuda":
        return plan
    if not torch.cuda.is_available():
        raise DeploymentError("CUDA is not available on this machine; pass --device cpu")
    free, _ = torch.cuda.mem_get_info(device)
    other = codec_weight_bytes(preset) + slots * conversation_state_bytes(config, dtype) + RESERVE_BYTES
    needed = lm_bytes(config, quantize, dtype) + other
    if not cpu_offload:
        if needed > free:
            hint = "add --quantize int8 (weights in half the memory)" if quantize == "none" else "use --cpu-offload"
            raise DeploymentError(
                f"{preset.name} needs about {needed / 2**30:.1f} GiB of GPU memory ({lm_bytes(config, quantize, dtype) / 2**30:.1f} "
                f"GiB of weights, state for {slots} conversation(s), working memory) but {free / 2**30:.1f} GiB are free: "
                f"{hint}, or --cpu-offload to keep some layers in host memory"
            )
        return plan
    count = offload_layers if offload_layers is not None else layers_to_offload(config, quantize, dtype, free, other)
    if count > config.num_layers:
        raise DeploymentError(
            f"{free / 2**30:.1f} GiB of free GPU memory do not hold even the non-layer weights of {preset.name} with "
            f"state for {slots} conversation(s); add --quantize int8 or use a larger GPU"
        )
    if count == 0:
        plan.messages.append("CPU offload: the whole model fits on the GPU, nothing to offload")
        return plan
    plan.offload_layers = count
    bandwidth = measure_host_to_device_bandwidth(device)
    plan.messages.append(offload_estimate(config, count, quantize, dtype, bandwidth).describe())
    return plan


def _plan_cpu(plan: LoadPlan, preset, slots: int, input_frames: list[int]) -> None:
    config = preset.lm
    weights = lm_bytes(config, plan.quantize, plan.dtype) + codec_weight_bytes(preset)
    available = _available_host_memory()
    if available is not None and weights > available:
        plan.messages.append(
            f"warning: the weights take {weights / 2**30:.1f} GiB in {str(plan.dtype).removeprefix('torch.')} but only "
            f"{available / 2**30:.1f} GiB of memory are available" + ("; --quantize int8 needs a quarter" if plan.quantize == "none" else "")
        )
    estimate = cpu_estimate(config, preset.name, plan.dtype, plan.quantize, slots, TYPICAL_PROMPT_FRAMES)
    if estimate.slowdown >= 1:
        plan.messages.append(estimate.describe(input_frames))  # no inputs (serve, voice build): the speed alone
