"""Advantages, filters and reward shaping against values computed by hand (rl-algorithms.md)."""

from __future__ import annotations

import math

import pytest
import torch

from cpmtool.train import advantages as A


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_grpo_advantages_by_hand():
    scores = t([1, 0, 0, 1, 1, 1, 0.5])
    index = ["a", "a", "a", "b", "b", "b", "c"]
    adv = A.grpo_advantages(scores, index)
    # group a: mean 1/3; deviations 2/3, -1/3, -1/3; unbiased var (4/9 + 1/9 + 1/9) / 2 = 1/3
    std = math.sqrt(1 / 3)
    want = [(2 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6),
            0.0, 0.0, 0.0,  # group b all equal: std 0, numerator 0
            0.5]  # singleton c: mean 0, std 1 -> the raw score (0.5 / (1 + 1e-6))
    assert adv.tolist() == pytest.approx(want, rel=1e-5)
    # Dr.GRPO: no std
    dr = A.grpo_advantages(scores, index, norm_std=False)
    assert dr.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0.5], rel=1e-6)


def test_grpo_groups_need_not_be_contiguous():
    adv = A.grpo_advantages(t([1, 0, 0, 1]), [0, 1, 0, 1], norm_std=False)
    assert adv.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])


def test_luffy_mixed_group_example():
    # §5.3: 7 on-policy samples all wrong, the off-policy trace correct; Dr.GRPO over all 8
    adv = A.grpo_advantages(t([1] + [0] * 7), [0] * 8, norm_std=False)
    assert adv[0].item() == pytest.approx(0.875) and adv[1:].tolist() == pytest.approx([-0.125] * 7)


def test_rloo_by_hand():
    adv = A.rloo_advantages(t([1, 0, 0, 0.7]), [0, 0, 0, 1])
    # a_i = r_i - mean of the others: 1 - 0, 0 - 1/2, 0 - 1/2; singleton keeps its reward
    assert adv.tolist() == pytest.approx([1.0, -0.5, -0.5, 0.7])


def test_dynamic_sampling_filter():
    values = t([1, 0, 1, 1, 0])
    index = ["a", "a", "b", "b", "c"]
    # a varies (kept), b all-correct (dropped), c singleton (kept by verl DAPO, dropped by NFT)
    assert A.keep_varied_groups(values, index).tolist() == [True, True, False, False, True]
    assert A.keep_varied_groups(values, index, keep_singletons=False).tolist() == [True, True, False, False, False]


def test_prime_accuracy_filter_inclusive_bounds():
    acc = t([0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1])
    index = [i // 4 for i in range(16)]
    keep = A.accuracy_range_filter(acc, index, 0.2, 0.8)
    # per-group accuracy 0, 0.25, 0.75, 1 -> keep the middle two
    assert keep.view(4, 4)[:, 0].tolist() == [False, True, True, False]
    # bounds are inclusive
    assert A.accuracy_range_filter(acc, index, 0.25, 0.75).view(4, 4)[:, 0].tolist() == [False, True, True, False]


def test_group_mean_is_the_nft_correct_rate():
    assert A.group_mean(t([1, 0, 0, 1, 1]), [0, 0, 0, 1, 1]).tolist() == pytest.approx([1 / 3] * 3 + [1, 1])


def test_overlong_penalty_by_hand():
    # L_max 10, buffer 4 -> free up to 6, then linear to -1 at 10
    pen = A.overlong_penalty(torch.tensor([5, 6, 8, 10]), max_len=10, buffer_len=4, penalty_factor=1.0)
    # exceed = [-1, 0, 2, 4]; min(-exceed / 4, 0) = [0, 0, -0.5, -1]
    assert pen.tolist() == pytest.approx([0, 0, -0.5, -1])


def test_length_reward_kimi_by_hand():
    r = A.length_reward(t([1, 0, 1]), torch.tensor([10, 30, 20]), [0, 0, 0], scheme="kimi", alpha=0.2)
    # lambda = 0.5 - (len - 10) / 20 = [0.5, -0.5, 0]; correct + 0.2 * (lambda | min(0, lambda))
    assert r.tolist() == pytest.approx([1.1, -0.1, 1.0])
    # equal lengths: lambda = 0
    assert A.length_reward(t([1, 0]), torch.tensor([7, 7]), [0, 0], alpha=0.2).tolist() == [1.0, 0.0]


def test_length_reward_sigmoid_by_hand():
    r = A.length_reward(t([1, 0, 1]), torch.tensor([10, 30, 20]), [0, 0, 0], scheme="sigmoid", alpha=0.2)
    # correct lengths 10, 20: mean 15, population std 5; z = -1 and +1
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert r.tolist() == pytest.approx([1 - 0.2 * s(-1), 0.0, 1 - 0.2 * s(1)], rel=1e-6)
    with pytest.raises(ValueError, match="kimi"):
        A.length_reward(t([1]), torch.tensor([1]), [0], scheme="l1")


def test_prime_process_rewards_batch_norm_by_hand():
    q = t([[1, -1, 2], [2, 2, 2]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    r = A.prime_process_rewards(q, mask, beta=0.1, batch_norm=False)
    assert r.tolist() == [pytest.approx([0.1, -0.1, 0.0]), pytest.approx([0.2, 0.2, 0.2])]
    rn = A.prime_process_rewards(q, mask, beta=0.1)
    # returns-to-go: [0, -0.1, 0], [0.6, 0.4, 0.2]; max |.| = 0.6
    assert rn.tolist() == [pytest.approx([1 / 6, -1 / 6, 0.0], rel=1e-5), pytest.approx([1 / 3] * 3, rel=1e-5)]


def test_prime_advantages_by_hand():
    # one group of two responses, L = 3
    proc = t([[0.2, 0.4, 0.0], [-0.3, 0.1, 0.5]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    # process RLOO: row means m = [0.3, 0.1]; baseline (0.3 + 0.1)/(2 - 1) = 0.4; R*2 - 0.4
    rl = A.masked_rloo(proc, mask, [0, 0])
    assert rl.tolist() == [pytest.approx([0.0, 0.4, 0.0]), pytest.approx([-1.0, -0.2, 0.6])]
    # process returns: [0.4, 0.4, 0], [-0.6, 0.4, 0.6]
    # outcome acc [1, 0] at the last tokens; RLOO -> +1 at (0, 1), -1 at (1, 2); returns [1, 1, 0], [-1, -1, -1]
    # sum: [1.4, 1.4, -], [-1.6, -0.6, -0.4]; whiten over the 5 valid tokens:
    # mean 0.2/5 = 0.04; deviations 1.36, 1.36, -1.64, -0.64, -0.44; unbiased var 6.992 / 4
    sd = math.sqrt(6.992 / 4 + 1e-8)
    adv = A.prime_advantages(proc, t([1, 0]), mask, [0, 0])
    assert adv.tolist() == [pytest.approx([1.36 / sd, 1.36 / sd, 0.0], rel=1e-5),
                            pytest.approx([-1.64 / sd, -0.64 / sd, -0.44 / sd], rel=1e-5)]


def test_discounted_returns_and_last_token():
    r = A.discounted_returns(t([[1, 0, 2]]), gamma=0.5)
    # G2 = 2, G1 = 0 + 0.5*2 = 1, G0 = 1 + 0.5*1 = 1.5
    assert r.tolist() == [[1.5, 1.0, 2.0]]
    assert A.last_token_mask(t([[1, 1, 0], [0, 0, 0], [1, 1, 1]])).tolist() == [
        [False, True, False], [False, False, False], [False, False, True]]
