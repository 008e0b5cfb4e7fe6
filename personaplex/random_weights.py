"""Random weights in the exact published layout, for tests, demos and benchmarks without real weights."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import LMConfig, MimiConfig


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every parameter of ``module`` in place, deterministically from ``seed``.

    Linear/conv weights ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default scale), embeddings
    ~ N(0, 1), norm scales around 1; buffers are left alone. The draw happens on the CPU so the same
    seed gives the same weights on every device.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("alpha") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                values = 1 + 0.1 * torch.randn(param.shape, generator=generator)
            elif name.endswith(".bias") or name.endswith("scale"):
                values = 0.02 * torch.randn(param.shape, generator=generator)
            elif "emb" in name.split(".")[0] and param.dim() == 2:
                values = torch.randn(param.shape, generator=generator)
            else:
                fan_in = param[0].numel() if param.dim() > 1 else param.numel()
                bound = fan_in**-0.5
                values = (torch.rand(param.shape, generator=generator) * 2 - 1) * bound
            param.copy_(values.to(param.dtype))
    return module


def write_random_lm_checkpoint(
    config: LMConfig, path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"
) -> Path:
    """Write a safetensors LM checkpoint with random weights under the reference key names.

    Weights are drawn directly on ``device`` with torch's default initialisation (fast for 7B on a
    GPU); use ``randomize_`` instead when values must be identical across devices.
    """
    from .lm.model import LMModel

    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the target dtype: no float32 copy of 7B weights
    try:
        with torch.device(device):
            model = LMModel(config)
    finally:
        torch.set_default_dtype(default_dtype)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(path))
    return Path(path)


def ensure_random_lm_checkpoint(config: LMConfig, path: str | Path, *, device: str = "cpu") -> None:
    """``write_random_lm_checkpoint`` (bf16) unless ``path`` exists, saying how long it took (benchmarks)."""
    path = Path(path)
    if path.exists():
        return
    started = time.perf_counter()
    write_random_lm_checkpoint(config, path, dtype=torch.bfloat16, device=device)
    print(f"wrote random checkpoint {path} in {time.perf_counter() - started:.0f} s", flush=True)


def random_mimi_state_dict(config: MimiConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A plausible float32 Mimi state dict (codebooks spread out, usage counts 1)."""
    from .codec import Mimi

    model = randomize_(Mimi(config), seed)
    state = model.state_dict()
    generator = torch.Generator().manual_seed(seed + 1)
    for name in state:
        if name.endswith("embedding_sum"):
            state[name] = torch.randn(state[name].shape, generator=generator)
        elif name.endswith("cluster_usage"):
            state[name] = torch.ones(state[name].shape)
        elif name.endswith("_initialized"):
            state[name] = torch.ones(state[name].shape)
    return state


def random_mimi(config: MimiConfig, device: torch.device | str = "cpu", seed: int = 0):
    """A Mimi codec with ``random_mimi_state_dict`` weights, on ``device``, ready for inference."""
    from .checkpoint import build_mimi

    mimi = build_mimi(config, "cpu")
    mimi.load_state_dict(random_mimi_state_dict(config, seed), strict=True)
    return mimi.to(device).eval().requires_grad_(False)
