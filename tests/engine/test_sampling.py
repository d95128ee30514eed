"""Logit filtering and sampling against hand-computed values."""

import math

import torch

from cpmtool.engine.sampling import categorical, filter_logits, inverse_cdf, sample, token_logprobs


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


def test_batched_draws_do_not_depend_on_the_other_rows():
    # each seeded row draws from its own generator: its token is the one it gets sampled alone,
    # whatever the other rows are (greedy, unseeded, filtered)
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    temp = torch.tensor([1.0, 0.0, 0.7, 1.0, 1.3, 1.0])
    top_k = torch.tensor([0, 0, 5, 0, 0, 0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.8, 1.0, 1.0])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.05, 0.0])
    probs = filter_logits(logits, temp.clamp(min=1e-6), top_k, top_p, min_p).softmax(-1)
    for step in range(20):
        gens = [torch.Generator().manual_seed(step * 10 + i) for i in range(6)]
        gens[1] = gens[5] = None  # a greedy row and an unseeded one
        got = sample(logits, temp, top_k, top_p, min_p, gens)
        for i in (0, 2, 3, 4):
            alone = sample(logits[i:i + 1], temp[i:i + 1], top_k[i:i + 1], top_p[i:i + 1], min_p[i:i + 1],
                           [torch.Generator().manual_seed(step * 10 + i)])
            assert got[i].item() == alone.item(), (step, i)
            assert probs[i, got[i]] > 0  # never a filtered token
        assert got[1].item() == logits[1].argmax().item()
        assert probs[5, got[5]] > 0


def test_inverse_cdf_picks_the_interval_u_falls_in():
    # p = (0, 0.5, 0, 0.25, 0.25, 0): cdf 0, .5, .5, .75, 1, 1
    cdf = torch.tensor([[0.0, 0.5, 0.5, 0.75, 1.0, 1.0]], dtype=torch.float64)
    pick = [inverse_cdf(cdf, torch.tensor([[u]], dtype=torch.float64)).item()
            for u in (0.0, 0.25, 0.4999, 0.5, 0.74, 0.75, 0.9, 1 - 2**-53)]
    assert pick == [1, 1, 1, 3, 3, 4, 4, 4]  # tokens 0, 2 and 5 (probability 0) never


def test_inverse_cdf_top_edge_stays_on_the_last_nonzero_token():
    # u * total can round up to total (u = 1 - 2^-53, total not a power of two): still token 1
    cdf = torch.tensor([[0.3, 0.7, 0.7]], dtype=torch.float64)
    assert inverse_cdf(cdf, torch.tensor([[1 - 2**-53]], dtype=torch.float64)).item() == 1


def test_categorical_frequencies_match_the_probabilities():
    p = torch.tensor([0.0, 0.5, 0.2, 0.0, 0.05, 0.25])
    n = 20000
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(6)
    for _ in range(n // 100):  # 100 rows a call, all from one generator
        counts += torch.bincount(categorical(p.repeat(100, 1) * 3.0, [g] * 100), minlength=6)  # unnormalised rows
    assert counts[0] == 0 and counts[3] == 0
    sd = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 4 * sd + 1e-9).all(), counts / n
    # and the global generator for rows without one
    torch.manual_seed(7)
    got = torch.bincount(categorical(p.repeat(n, 1), [None] * n), minlength=6)
    assert got[0] == 0 and got[3] == 0 and ((got - n * p).abs() <= 4 * sd + 1e-9).all(), got / n


def test_categorical_takes_one_uniform_per_row_from_its_generator():
    # one uniform per row: a seeded row's generator advances by one float64 draw per token
    g = torch.Generator().manual_seed(5)
    categorical(torch.rand(3, 49152), [g, None, None])
    ref = torch.Generator().manual_seed(5)
    torch.rand(1, dtype=torch.float64, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())
