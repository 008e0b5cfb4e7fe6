"""The token-choice kernel against ``sampling.choose_tokens``: the same draws, slot by slot.

On a CPU the kernel runs in Triton's interpreter; skipped (with the reason) where Triton cannot run it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import require_triton_kernels

from personaplex.lm.sampling import TokenSampling, choose_tokens

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def kernel():
    require_triton_kernels()
    from personaplex.lm import sampling_kernel

    return sampling_kernel


def case(batch, vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, vocab, generator=generator)
    temperature = torch.tensor([0.0, 0.8, 1.0, 0.3, 2.0, 0.7, 1.2, 0.05])[:batch]
    top_k = torch.tensor([1, 250, 5, 1, 2048, 40, 7, 250])[:batch]
    params = TokenSampling(temperature.to(DEVICE), top_k.to(DEVICE))
    seeds = torch.randint(0, 2**40, (batch,), generator=generator).to(DEVICE)
    counters = torch.randint(0, 10_000, (batch,), generator=generator).to(DEVICE)
    return logits.to(DEVICE), params, seeds, counters


@pytest.mark.parametrize("vocab", [2048, 1000, 7])
def test_the_kernel_draws_what_choose_tokens_draws(kernel, vocab):
    for draw in range(6):
        logits, params, seeds, counters = case(8, vocab, draw)
        for stream in (1, 5):
            got = kernel.choose_tokens_fused(logits, params, seeds, counters, stream, max_top_k=250)
            want = choose_tokens(logits, params, seeds, counters, stream, max_top_k=250)
            assert got.dtype == torch.long and torch.equal(got, want), (draw, stream)


def test_ties_at_the_kth_value_keep_the_lowest_ids(kernel):
    """Equal logits straddling the top-k boundary: the kernel keeps the lowest ids, as a stable ranking, so
    over many draws it picks only among them."""
    logits = torch.zeros(1, 64, device=DEVICE)
    logits[0, 10:20] = 5.0  # ten tied best entries; a top-4 keeps ids 10..13
    params = TokenSampling(torch.ones(1, device=DEVICE), torch.tensor([4], device=DEVICE))
    picked = {
        kernel.choose_tokens_fused(logits, params, torch.tensor([s], device=DEVICE), torch.zeros(1, dtype=torch.long,
                                   device=DEVICE), 1).item()
        for s in range(64)
    }
    assert picked == {10, 11, 12, 13}


def test_greedy_and_long_rows_run_choose_tokens(kernel):
    logits, params, seeds, counters = case(2, kernel.MAX_VOCAB + 1, 0)
    assert torch.equal(kernel.choose_tokens_fused(logits, params, seeds, counters, 0),
                       choose_tokens(logits, params, seeds, counters, 0))
    assert torch.equal(kernel.choose_tokens_fused(logits, None), logits.argmax(-1))


def test_bfloat16_logits_are_chosen_from_as_float32(kernel):
    logits, params, seeds, counters = case(8, 2048, 3)
    logits = logits.bfloat16()
    assert torch.equal(kernel.choose_tokens_fused(logits, params, seeds, counters, 2),
                       choose_tokens(logits, params, seeds, counters, 2))
