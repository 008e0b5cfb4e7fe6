"""Token choice: greedy or temperature/top-k sampling, with a per-slot random stream.

Sampling uses the exponential-race form of multinomial sampling (pick argmax of p_i / E_i with
E_i ~ Exp(1)), like the reference, so it needs no host synchronisation. The noise comes from a
counter-based hash of (slot seed, frame counter, stream, token id) instead of a global generator:
each conversation's draws are reproducible from its seed and independent of which other
conversations share the batch. Because the noise is keyed by token id, not by position in a sorted
list, the draw depends only on *which* tokens are in a slot's top-k: for the audio codebooks (2,048
entries) that set is found by ranking every pair of entries, one fused reduction, instead of sorting
the row (a sort per codebook was ~30 us of the depth step on an H100).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


@dataclass
class TokenSampling:
    """How one kind of token (text tokens, or audio codes) is chosen in each slot of a batch: [B] tensors.
    temperature <= 0 means greedy. ``BatchSampling`` (the frame step) holds one for text and one for audio."""

    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # int64, >= 1

    @classmethod
    def fill(cls, batch_size: int, temperature: float, top_k: int, device: torch.device | str = "cpu") -> "TokenSampling":
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


RANK_MAX_VOCAB = 4096  # on a GPU, rows up to this size find their top-k by pairwise ranking, larger by topk
_RANK_ROWS = 256  # eagerly, entries ranked at a time (bounds the [B, rows, V] comparison)


def rank_in_row(probs: torch.Tensor) -> torch.Tensor:
    """For each entry of probs [B, V], how many entries of its row come first (a higher value, or the same
    value at a lower index): 0 for the largest. int64 [B, V]; ties are broken like a stable sort."""
    ids = torch.arange(probs.shape[-1], device=probs.device)

    def ahead_of(rows: slice) -> torch.Tensor:
        mine, other = probs[:, rows, None], probs[:, None, :]
        first = (other > mine) | ((other == mine) & (ids[None, None, :] < ids[rows, None]))
        return first.sum(-1)

    if torch.compiler.is_compiling():  # compiled, the comparison is never materialised: one reduction
        return ahead_of(slice(None))
    return torch.cat([ahead_of(slice(s, s + _RANK_ROWS)) for s in range(0, probs.shape[-1], _RANK_ROWS)], dim=1)


def choose_tokens(
    logits: torch.Tensor,
    params: TokenSampling | None,
    seed: torch.Tensor | None = None,
    counter: torch.Tensor | None = None,
    stream: int = 0,
    max_top_k: int = 250,
    rank_top_k: bool | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` [B, V]; returns int64 [B].

    Greedy (argmax, first index on ties) where ``params`` is None or a slot's temperature is <= 0.
    Otherwise sample from softmax(logits / T) restricted to that slot's top-k. ``max_top_k`` bounds the
    per-slot top-k (a static shape, so the step can be graph-captured). ``rank_top_k``: find each row's
    top-k by pairwise ranking rather than ``topk`` (same draws); by default when compiled for a GPU, for
    rows of up to ``RANK_MAX_VOCAB`` entries, where it fuses into one reduction and saves a sort per row.
    Uncompiled (the CPU, the GPU's "triton" kernel set) the sort is the cheaper one: ranking eagerly
    materialises [B, 256, V] comparisons per chunk.
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if params is None:
        return greedy
    batch, vocab = logits.shape
    k = min(max_top_k, vocab)
    top_k = params.top_k.clamp(max=k)[:, None]
    temperature = params.temperature.clamp(min=1e-6)[:, None]
    probs = torch.softmax(logits / temperature, dim=-1)
    if rank_top_k is None:
        rank_top_k = logits.is_cuda and vocab <= RANK_MAX_VOCAB and torch.compiler.is_compiling()
    if rank_top_k:  # keep every entry, zero those outside the top-k: no sort
        ids = torch.arange(vocab, device=logits.device).expand(batch, vocab)
        kept = torch.where(rank_in_row(probs) < top_k, probs, torch.zeros_like(probs))
    else:
        # A stable sort, not ``topk``: entries equal to the k-th value are kept by token id, as the ranking
        # and the fused kernel keep them (``topk`` leaves the order of equal values unspecified).
        kept, ids = probs.sort(dim=-1, descending=True, stable=True)
        kept, ids = kept[:, :k], ids[:, :k]
        ranks = torch.arange(k, device=logits.device)
        kept = torch.where(ranks < top_k, kept, torch.zeros_like(kept))
    noise = exponential_noise(seed, counter, stream, ids)
    sampled = ids.gather(-1, (kept / noise).argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(params.temperature > 0, sampled, greedy)
