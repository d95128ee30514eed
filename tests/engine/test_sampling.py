"""Logit filtering and sampling against hand-computed values."""

import math

import torch

from cpmtool.engine.sampling import filter_logits, sample, token_logprobs


def one(x):
    return torch.tensor([x])


def kept(logits):
    return torch.isfinite(logits[0]).tolist()


LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.10]]))  # probabilities 0.5, 0.25, 0.15, 0.10


def test_temperature_divides_logits():
    out = filter_logits(torch.tensor([[2.0, 1.0]]), one(2.0), one(0), one(1.0), one(0.0))
    assert torch.allclose(out, torch.tensor([[1.0, 0.5]]))


def test_top_k_keeps_k_largest():
    out = filter_logits(LOGITS, one(1.0), one(2), one(1.0), one(0.0))
    assert kept(out) == [True, True, False, False]


def test_top_p_keeps_smallest_prefix_reaching_p():
    # cumulative 0.5, 0.75, 0.90, 1.0: p=0.7 needs the first two tokens; p=0.75 too (0.75 reached)
    assert kept(filter_logits(LOGITS, one(1.0), one(0), one(0.7), one(0.0))) == [True, True, False, False]
    assert kept(filter_logits(LOGITS, one(1.0), one(0), one(0.75), one(0.0))) == [True, True, False, False]
    assert kept(filter_logits(LOGITS, one(1.0), one(0), one(0.76), one(0.0))) == [True, True, True, False]
    # the top token always survives
    assert kept(filter_logits(LOGITS, one(1.0), one(0), one(0.1), one(0.0))) == [True, False, False, False]


def test_min_p_relative_to_top_probability():
    # min_p 0.4: keep p >= 0.4 * 0.5 = 0.2 -> 0.5 and 0.25
    assert kept(filter_logits(LOGITS, one(1.0), one(0), one(1.0), one(0.4))) == [True, True, False, False]


def test_per_row_settings():
    logits = LOGITS.repeat(2, 1)
    out = filter_logits(logits, torch.tensor([1.0, 1.0]), torch.tensor([1, 0]), torch.tensor([1.0, 1.0]),
                        torch.tensor([0.0, 0.0]))
    assert torch.isfinite(out[0]).sum() == 1 and torch.isfinite(out[1]).sum() == 4


def test_greedy_rows_take_argmax_and_seeded_rows_repeat():
    logits = torch.tensor([[0.0, 3.0, 1.0], [1.0, 1.0, 1.0]])
    args = (torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
    a = [sample(logits, *args, [None, torch.Generator().manual_seed(3)])[1].item() for _ in range(5)]
    b = [sample(logits, *args, [None, torch.Generator().manual_seed(3)])[1].item() for _ in range(5)]
    assert a == b
    assert sample(logits, *args, [None, None])[0].item() == 1


def test_sampling_frequencies_follow_the_filtered_distribution():
    g = torch.Generator().manual_seed(0)
    n = 4000
    draws = [sample(LOGITS, one(1.0), one(0), one(0.76), one(0.0), [g]).item() for _ in range(n)]
    freq = [draws.count(i) / n for i in range(4)]
    # renormalised over the top three: 0.5/0.9, 0.25/0.9, 0.15/0.9
    for got, want in zip(freq, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0.0], strict=True):
        assert abs(got - want) < 0.03, (freq, want)


def test_token_logprobs_are_raw_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    lp, vals, ids = token_logprobs(logits, torch.tensor([0]), top=2)
    z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert abs(lp.item() - (1 - z)) < 1e-6
    assert ids[0].tolist() == [2, 1] and abs(vals[0, 0].item() - (3 - z)) < 1e-6


def test_batched_draws_are_per_row_multinomial_draws():
    # each seeded row draws its noise from its own generator: the tokens are those of
    # torch.multinomial(p, 1, generator=g) row by row, whatever the other rows are
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    temp = torch.tensor([1.0, 0.0, 0.7, 1.0, 1.3, 1.0])
    top_k = torch.tensor([0, 0, 5, 0, 0, 0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.8, 1.0, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.05, 0.0])
    for step in range(20):
        gens = [torch.Generator().manual_seed(step * 10 + i) for i in range(6)]
        gens[1] = gens[5] = None  # a greedy row and an unseeded one
        got = sample(logits, temp, top_k, top_p, min_p, gens)
        probs = filter_logits(logits, temp.clamp(min=1e-6), top_k, top_p, min_p).softmax(-1)
        for i in (0, 2, 3, 4):
            g = torch.Generator().manual_seed(step * 10 + i)
            assert got[i].item() == torch.multinomial(probs[i], 1, generator=g).item(), (step, i)
        assert got[1].item() == logits[1].argmax().item()
        assert probs[5, got[5]] > 0
