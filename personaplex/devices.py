"""Where the model runs by default, and in which precision."""

from __future__ import annotations

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on GPUs (what the weights are trained and shipped in), float32 on CPUs (faster there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
