"""``sampling.choose_tokens`` for audio-sized rows as one Triton kernel: one program per row.

Uncompiled, choosing a token is ~40 small kernels (softmax, top-k, the noise hash, the race, the
greedy fallback), and a frame chooses eight audio tokens per conversation one after another inside
the depth transformer: ~320 launches of a few microseconds each, a visible part of a frame of the
"triton" kernel set (no compiler). Here a program loads its row once and does all of it in registers.

The arithmetic is ``choose_tokens``'s: softmax of logits / temperature, the slot's top-k by value
(ties: lower token id first, as a stable sort), the exponential race keyed by (seed, counter, stream,
token id) with the same 32-bit hash, and the greedy argmax where the temperature is <= 0. So the draws
are the same, except where two candidates' ``p / noise`` lie within float32 rounding of each other
(exp and log are the hardware's here, the library's there). Rows wider than ``MAX_VOCAB`` (the text
vocabulary) take ``choose_tokens`` itself; it is one call per frame.
"""

from __future__ import annotations

import torch

from .sampling import SamplingParams, choose_tokens

try:  # Triton ships with CUDA builds of torch; without it the "triton" kernel set is not offered.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

MAX_VOCAB = 4096  # one program holds a whole row in registers (the audio codebooks have 2,048 entries)


if triton is not None:

    @triton.jit
    def _hash32(x):
        """``sampling._hash32`` on int64 values in [0, 2**32): the same wrapping products, masked."""
        mask = 0xFFFFFFFF
        x = x ^ (x >> 16)
        x = (x * tl.full((), 0x7FEB352D, tl.int64)) & mask
        x = x ^ (x >> 15)
        x = (x * tl.full((), 0x846CA68B, tl.int64)) & mask
        return x ^ (x >> 16)

    @triton.jit
    def _choose_kernel(
        logits_ptr, row_stride, temperature_ptr, top_k_ptr, seed_ptr, counter_ptr, out_ptr,
        vocab, max_top_k, stream, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        ids = tl.arange(0, BLOCK)
        valid = ids < vocab
        logits = tl.load(logits_ptr + row * row_stride + ids, mask=valid, other=float("-inf")).to(tl.float32)
        greedy = tl.argmax(logits, axis=0, tie_break_left=True)

        temperature = tl.load(temperature_ptr + row)
        scaled = logits / tl.maximum(temperature, 1e-6)
        exps = tl.exp(scaled - tl.max(scaled, axis=0))  # padding: exp(-inf) = 0
        probs = exps / tl.sum(exps, axis=0)

        # The top-k set: every entry above the k-th largest value, then entries equal to it by token id.
        # The k-th largest value by bisection on the bit patterns (non-negative floats order as their bits),
        # 31 counting passes over registers: cheaper than a sort of the row, and exact.
        k = tl.minimum(tl.load(top_k_ptr + row), tl.minimum(max_top_k, vocab))
        bits = probs.to(tl.int32, bitcast=True)
        low = tl.zeros((), tl.int32)  # invariant: at least k entries have bits >= low
        high = tl.full((), 0x7F800000, tl.int32)
        for _ in range(31):
            middle = low + (high - low + 1) // 2
            enough = tl.sum((bits >= middle).to(tl.int32), axis=0) >= k
            low = tl.where(enough, middle, low)
            high = tl.where(enough, high, middle - 1)
        above = bits > low
        ties = ((bits == low) & valid).to(tl.int32)
        ties_before = tl.cumsum(ties, axis=0) - ties
        kept = above | ((ties > 0) & (ties_before < k - tl.sum(above.to(tl.int32), axis=0)))

        seed = tl.load(seed_ptr + row) & 0xFFFFFFFF
        counter = tl.load(counter_ptr + row)
        base = _hash32(seed ^ _hash32((counter * 97 + stream) & 0xFFFFFFFF))
        hashed = _hash32(base ^ _hash32(ids.to(tl.int64)))
        uniform = ((hashed >> 8).to(tl.float32) + 0.5) / 16777216.0  # (0, 1), never 0
        noise = -tl.log(uniform)
        sampled = tl.argmax(tl.where(kept, probs / noise, 0.0), axis=0, tie_break_left=True)
        tl.store(out_ptr + row, tl.where(temperature > 0, sampled, greedy).to(tl.int64))


def choose_tokens_fused(
    logits: torch.Tensor,
    params: SamplingParams | None,
    seed: torch.Tensor | None = None,
    counter: torch.Tensor | None = None,
    stream: int = 0,
    max_top_k: int = 250,
    rank_top_k: bool | None = None,
) -> torch.Tensor:
    """``choose_tokens`` (same arguments, int64 [B] out) in one launch for rows of up to ``MAX_VOCAB``."""
    batch, vocab = logits.shape
    if params is None or vocab > MAX_VOCAB or triton is None:
        return choose_tokens(logits, params, seed, counter, stream, max_top_k, rank_top_k)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty(batch, dtype=torch.long, device=logits.device)
    block = max(16, triton.next_power_of_2(vocab))
    _choose_kernel[(batch,)](
        logits, logits.stride(0), params.temperature.float().contiguous(), params.top_k.contiguous(),
        seed.contiguous(), counter.contiguous(), out, vocab, max_top_k, stream,
        BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )
    return out
