"""Token choice: greedy or temperature/top-k sampling, with a per-slot random stream.

Sampling uses the exponential-race form of multinomial sampling (pick argmax of p_i / E_i with
E_i ~ Exp(1)), like the reference, so it needs no host synchronisation. The noise comes from a
counter-based hash of (slot seed, frame counter, stream, token id) instead of a global generator:
each conversation's draws are reproducible from its seed and independent of which other
conversations share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    """Per-slot sampling settings, [B] tensors. temperature <= 0 means greedy."""

    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # int64, >= 1

    @classmethod
    def fill(cls, batch_size: int, temperature: float, top_k: int, device: torch.device | str = "cpu") -> "SamplingParams":
        return cls(
            torch.full((batch_size,), float(temperature), device=device),
            torch.full((batch_size,), int(top_k), dtype=torch.long, device=device),
        )


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def exponential_noise(seed: torch.Tensor, counter: torch.Tensor, stream: int, token_ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise, deterministic in (seed [B], counter [B], stream, token_ids [B, N]); float32 [B, N]."""
    base = _hash32((seed & _MASK32) ^ _hash32((counter * 97 + stream) & _MASK32))
    bits = _hash32(base[:, None] ^ _hash32(token_ids & _MASK32))
    uniform = ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)  # (0, 1), never 0
    return -torch.log(uniform)


def choose_tokens(
    logits: torch.Tensor,
    params: SamplingParams | None,
    seed: torch.Tensor | None = None,
    counter: torch.Tensor | None = None,
    stream: int = 0,
    max_top_k: int = 250,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V]; returns int64 [B].

    Greedy (argmax, first index on ties) where ``params`` is None or a slot's temperature is <= 0.
    Otherwise sample from softmax(logits / T) restricted to that slot's top-k. ``max_top_k`` bounds the
    per-slot top-k (a static shape, so the step can be graph-captured).
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if params is None:
        return greedy
    k = min(max_top_k, logits.shape[-1])
    temperature = params.temperature.clamp(min=1e-6)[:, None]
    probs = torch.softmax(logits / temperature, dim=-1)
    top_probs, top_ids = probs.topk(k, dim=-1)
    ranks = torch.arange(k, device=logits.device)
    top_probs = torch.where(ranks < params.top_k[:, None], top_probs, torch.zeros_like(top_probs))
    noise = exponential_noise(seed, counter, stream, top_ids)
    sampled = top_ids.gather(-1, (top_probs / noise).argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(params.temperature > 0, sampled, greedy)
