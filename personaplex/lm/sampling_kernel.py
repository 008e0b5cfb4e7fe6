"""``sampling.choose_tokens`` as one Triton kernel, for the depth transformer's audio codebooks.

Why: eagerly a token choice is ~65 small kernels (softmax, top-k, the counter-based hash of the noise,
argmaxes, selects), nine times a frame; launched one by one they cost more than the depth transformer.
Here one program per slot holds its whole row of logits (up to ``MAX_VOCAB`` entries) and does it all:
the greedy argmax, the temperature softmax, the slot's top-k set, the same exponential-race noise keyed
by (seed, counter, stream, token id), and the draw.

The top-k set is found without sorting: the k-th largest probability by bisection over its float bits
(probabilities are >= 0, so their bit patterns order as they do), ties at that value taken lowest id
first. The draws are those of ``choose_tokens`` but for float32 rounding (the kernel's exp and log may
differ from PyTorch's in the last bit, which moves a draw only when two candidates tie to that bit).
Rows longer than ``MAX_VOCAB`` (the text vocabulary) and greedy calls run ``choose_tokens`` itself.
"""

from __future__ import annotations

import torch

from .sampling import TokenSampling, choose_tokens

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

MAX_VOCAB = 4096  # entries one program keeps in registers (the audio codebooks have 2,048)


if triton is not None:

    @triton.jit
    def _hash32(x):
        """``sampling._hash32`` (lowbias32) on int64 values in [0, 2**32): products wrap, the mask keeps 32 bits."""
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @triton.jit(do_not_specialize=["stream"])
    def _choose_kernel(
        logits_ptr, temperature_ptr, top_k_ptr, seed_ptr, counter_ptr, out_ptr, vocab, logits_stride, max_top_k,
        stream, BLOCK: tl.constexpr,
    ):
        slot = tl.program_id(0)
        ids = tl.arange(0, BLOCK)
        inside = ids < vocab
        logits = tl.load(logits_ptr + slot.to(tl.int64) * logits_stride + ids, mask=inside, other=float("-inf"))
        logits = logits.to(tl.float32)
        greedy = tl.argmax(logits, axis=0)  # first index of the largest, as torch.argmax
        temperature = tl.load(temperature_ptr + slot)
        top_k = tl.minimum(tl.load(top_k_ptr + slot), max_top_k)
        scaled = tl.math.div_rn(logits, tl.zeros_like(logits) + tl.maximum(temperature, 1e-6))
        weights = tl.exp(scaled - tl.max(scaled, axis=0))
        probs = tl.math.div_rn(weights, tl.zeros_like(weights) + tl.sum(weights, axis=0))
        probs = tl.where(inside, probs, -1.0)  # padding ranks below every probability
        # The k-th largest probability: the largest bit pattern t with at least k entries >= t (bisection).
        bits = probs.to(tl.int32, bitcast=True)  # >= 0 for probabilities, negative for the padding
        low = tl.zeros((), tl.int32)  # count(bits >= low) >= k holds (every probability is >= +0.0)
        high = tl.full((), 0x7F800001, tl.int32)  # count(bits >= high) == 0 (above +inf)
        for _ in range(32):
            middle = low + (high - low) // 2
            enough = tl.sum((bits >= middle).to(tl.int32), axis=0) >= top_k
            low = tl.where(enough, middle, low)
            high = tl.where(enough, high, middle)
        above = bits > low
        tied = bits == low
        room = top_k - tl.sum(above.to(tl.int32), axis=0)  # ties at the k-th value, lowest ids first
        kept = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= room))
        # Exponential-race noise of ``sampling.exponential_noise``, keyed by token id.
        seed = tl.load(seed_ptr + slot).to(tl.int64)
        counter = tl.load(counter_ptr + slot).to(tl.int64)
        base = _hash32((seed & 0xFFFFFFFF) ^ _hash32((counter * 97 + stream) & 0xFFFFFFFF))
        noise_bits = _hash32(base ^ _hash32(ids.to(tl.int64) & 0xFFFFFFFF))
        uniform = ((noise_bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)  # exact: a power of two
        noise = -tl.log(uniform)
        race = tl.where(kept & inside, tl.math.div_rn(tl.maximum(probs, 0.0), noise), -1.0)
        sampled = tl.argmax(race, axis=0)
        tl.store(out_ptr + slot, tl.where(temperature > 0, sampled, greedy).to(tl.int64))


def choose_tokens_fused(
    logits: torch.Tensor,
    params: TokenSampling | None,
    seed: torch.Tensor | None = None,
    counter: torch.Tensor | None = None,
    stream: int = 0,
    max_top_k: int = 250,
) -> torch.Tensor:
    """``choose_tokens`` (same arguments, logits [B, V] -> int64 [B]) in one kernel for V <= ``MAX_VOCAB``."""
    batch, vocab = logits.shape
    if params is None or vocab > MAX_VOCAB or triton is None:
        return choose_tokens(logits, params, seed, counter, stream, max_top_k)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(batch, dtype=torch.long, device=logits.device)
    _choose_kernel[(batch,)](
        logits, params.temperature, params.top_k, seed, counter, out, vocab, logits.stride(0), min(max_top_k, vocab),
        stream, BLOCK=triton.next_power_of_2(vocab),
    )
    return out
