"""Token choice: greedy, temperature and top-k, and the per-slot random streams."""

from __future__ import annotations

import torch

from personaplex.lm.sampling import TokenSampling, choose_tokens, rank_in_row


def draw(logits: torch.Tensor, temperature: float, top_k: int, n: int, seed: int = 7) -> torch.Tensor:
    """n draws for one row of logits, each at its own counter value, as n frames would."""
    rows = logits.expand(n, -1)
    params = TokenSampling.fill(n, temperature, top_k)
    return choose_tokens(rows, params, torch.full((n,), seed), torch.arange(n), stream=0, max_top_k=logits.shape[-1])


def test_greedy_without_params_or_with_zero_temperature():
    logits = torch.tensor([[0.1, 2.0, 2.0, -1.0], [3.0, 0.0, 1.0, 2.9]])
    assert choose_tokens(logits, None).tolist() == [1, 0]  # first index on ties
    params = TokenSampling(torch.tensor([0.0, 0.0]), torch.tensor([4, 4]))
    assert choose_tokens(logits, params, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)).tolist() == [1, 0]


def test_frequencies_follow_the_softmax():
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0, 0.3]])
    n = 40_000
    tokens = draw(logits, temperature=1.0, top_k=5, n=n)
    observed = torch.bincount(tokens, minlength=5).float() / n
    expected = torch.softmax(logits[0], -1)
    # 4 standard deviations of a binomial proportion.
    assert torch.all((observed - expected).abs() < 4 * (expected * (1 - expected) / n).sqrt())


def test_temperature_sharpens_and_top_k_truncates():
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0, 0.3]])
    n = 20_000
    cold = torch.bincount(draw(logits, 0.3, 5, n), minlength=5).float() / n
    expected = torch.softmax(logits[0] / 0.3, -1)
    assert torch.all((cold - expected).abs() < 4 * (expected * (1 - expected) / n).sqrt() + 1e-3)
    top2 = draw(logits, 1.0, 2, n)
    assert set(top2.unique().tolist()) == {0, 3}  # only the two most likely ids


def test_per_slot_settings_and_streams_are_independent_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    params = TokenSampling(torch.tensor([0.8, 0.0, 1.2]), torch.tensor([10, 50, 3]))
    seeds, counters = torch.tensor([1, 2, 3]), torch.tensor([5, 5, 9])
    together = choose_tokens(logits, params, seeds, counters, max_top_k=50)
    for slot in range(3):
        alone = choose_tokens(
            logits[slot : slot + 1],
            TokenSampling(params.temperature[slot : slot + 1], params.top_k[slot : slot + 1]),
            seeds[slot : slot + 1], counters[slot : slot + 1], max_top_k=50,
        )
        assert alone.item() == together[slot].item()
    assert together[1] == logits[1].argmax()
    assert together[2] in logits[2].topk(3).indices


def test_seed_reproduces_and_differs():
    logits = torch.zeros(1, 1000)
    first = draw(logits, 1.0, 1000, 64, seed=11)
    assert torch.equal(first, draw(logits, 1.0, 1000, 64, seed=11))
    assert not torch.equal(first, draw(logits, 1.0, 1000, 64, seed=12))


def test_rank_in_row_is_the_position_in_a_stable_descending_sort():
    torch.manual_seed(0)
    probs = torch.randn(3, 1000).softmax(-1)
    probs[0, 10] = probs[0, 20]  # a tie: the lower index comes first, as in a stable sort
    probs[2] = 0.001  # a row of ties
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
    expected = torch.empty_like(order).scatter_(1, order, torch.arange(1000).expand(3, -1).contiguous())
    assert torch.equal(rank_in_row(probs), expected)


def test_ranking_and_topk_sample_the_same_tokens():
    """The GPU finds short rows' top-k by ranking, the CPU by topk: the same draws."""
    torch.manual_seed(1)
    logits = torch.randn(6, 3000)
    logits[1, 100:108] = 4.0  # eight equal values around the top-5 boundary: kept by token id by both
    params = TokenSampling(torch.tensor([0.9, 0.9, 1.3, 0.7, 1.0, 0.0]), torch.tensor([1, 5, 25, 250, 2000, 3000]))
    seeds, counters = torch.arange(6), torch.arange(6) + 3
    draws = []
    for rank in (True, False):
        draws.append(torch.stack([
            choose_tokens(logits, params, seeds, counters + n, stream=2, max_top_k=3000, rank_top_k=rank) for n in range(50)
        ]))
    assert torch.equal(draws[0], draws[1])
    assert len(draws[0][:, 4].unique()) > 10  # a wide top-k really samples
    assert (draws[0][:, 0] == logits[0].argmax()).all()  # top-1 is greedy

