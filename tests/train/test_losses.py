"""Losses against values computed by hand from the formulas in rl-algorithms.md.

Each test writes the arithmetic out; tensors are float64 so the hand values match to 1e-9.
"""

from __future__ import annotations

import math

import pytest
import torch

from cpmtool.train import losses as L

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


# ---------------------------------------------------------------- agg_loss (§1.4)


def test_agg_loss_modes_by_hand():
    loss = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # token-mean: (1+2+3+4) / 4 valid tokens
    assert L.agg_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    # seq-mean-token-sum: (6 + 4) / 2 sequences
    assert L.agg_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(10 / 2)
    # seq-mean-token-mean: (6/3 + 4/1) / 2
    assert L.agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    # seq-mean-token-sum-norm: 10 / L (= 3) or / a given constant
    assert L.agg_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / 3)
    assert L.agg_loss(loss, mask, "seq-mean-token-sum-norm", norm=5).item() == pytest.approx(10 / 5)
    # a global token count (split mini-batch) replaces the local one
    assert L.agg_loss(loss, mask, "token-mean", num_tokens=8).item() == pytest.approx(10 / 8)
    with pytest.raises(ValueError, match="token-mean"):
        L.agg_loss(loss, mask, "mean")


# ---------------------------------------------------------------- PPO clip / DAPO / dual clip (§1.3)


def _ppo_case():
    # ratios chosen directly: old_logp = 0, logp = log(ratio)
    ratio = t([[1.5, 1.0, 0.5], [1.5, 0.5, 5.0]])
    adv = t([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    return ratio.log().requires_grad_(), torch.zeros(2, 3, dtype=D), adv


def test_ppo_clip_dapo_dual_clip_by_hand():
    logp, old, adv = _ppo_case()
    mask = torch.ones(2, 3, dtype=D)
    loss, st = L.ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=3.0)
    # row 0, A=+1: l1 = -r = [-1.5, -1, -0.5]; l2 = -clip(r, 0.8, 1.28) = [-1.28, -1, -0.8]
    #   max -> [-1.28, -1, -0.5]; clipped where l2 > l1: token 0
    # row 1, A=-1: l1 = r = [1.5, 0.5, 5]; l2 = [1.28, 0.8, 1.28]; max -> [1.5, 0.8, 5]
    #   dual clip min(-A*c = 3, .) -> [1.5, 0.8, 3]; clipped: token 1; dual-clipped: token 2
    row0 = -1.28 - 1.0 - 0.5
    row1 = 1.5 + 0.8 + 3.0
    assert loss.item() == pytest.approx((row0 + row1) / 6)
    assert st["clip_frac"] == pytest.approx(2 / 6)
    assert st["clip_frac_lower"] == pytest.approx(1 / 6)
    # ppo_kl = mean(old - new) = -mean(log r)
    assert st["ppo_kl"] == pytest.approx(-sum(math.log(r) for r in (1.5, 1, 0.5, 1.5, 0.5, 5)) / 6)
    loss.backward()
    # d(-A r)/dlogp = -A r on unclipped tokens, 0 on clipped and dual-clipped ones; / 6 tokens
    expect = t([[0.0, -1.0, -0.5], [1.5, 0.0, 0.0]]) / 6
    assert torch.allclose(logp.grad, expect)


def test_ppo_clip_without_dual_clip_and_masked_aggregations():
    logp, old, adv = _ppo_case()
    mask = t([[1, 1, 1], [1, 1, 0]])
    loss, _ = L.ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=None)
    # row 0 sum -2.78 (3 tokens); row 1 without token 2: 1.5 + 0.8 = 2.3 (2 tokens)
    assert loss.item() == pytest.approx((-2.78 + 2.3) / 5)
    for mode, want in [("seq-mean-token-sum", (-2.78 + 2.3) / 2),
                       ("seq-mean-token-mean", (-2.78 / 3 + 2.3 / 2) / 2),
                       ("seq-mean-token-sum-norm", (-2.78 + 2.3) / 3)]:
        got, _ = L.ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=None, agg=mode)
        assert got.item() == pytest.approx(want), mode
    # unmasked, no dual clip: row 1 token 2 keeps its full 5.0
    full, _ = L.ppo_clip_loss(logp, old, adv, torch.ones(2, 3, dtype=D), clip_low=0.2, clip_high=0.28,
                              clip_c=None)
    assert full.item() == pytest.approx((-2.78 + 1.5 + 0.8 + 5.0) / 6)
    with pytest.raises(ValueError, match="> 1"):
        L.ppo_clip_loss(logp, old, adv, mask, clip_c=1.0)


def test_ppo_importance_weights_scale_token_losses():
    logp, old, adv = _ppo_case()
    mask = torch.ones(2, 3, dtype=D)
    w = t([[2.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, _ = L.ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=3.0, is_weights=w)
    # per-token losses [-1.28, -1, -0.5], [1.5, 0.8, 3] times the weights
    assert loss.item() == pytest.approx((2 * -1.28 - 1.0 - 0.5 + 1.5 + 0.8 + 0.0) / 6)


# ---------------------------------------------------------------- KL estimators (§1.5)


def test_kl_estimators_by_hand():
    logp = t([-1.0, -2.0]).requires_grad_()
    ref = t([-2.0, -1.5])
    # x = logp - ref = [1, -0.5]
    assert L.kl_penalty(logp, ref, "k1").tolist() == pytest.approx([1.0, -0.5])
    assert L.kl_penalty(logp, ref, "abs").tolist() == pytest.approx([1.0, 0.5])
    assert L.kl_penalty(logp, ref, "k2").tolist() == pytest.approx([0.5, 0.125])
    # k3: kl = ref - logp = [-1, 0.5]; e^kl - kl - 1 = [e^-1, e^0.5 - 1.5]
    assert L.kl_penalty(logp, ref, "k3").tolist() == pytest.approx([math.exp(-1), math.exp(0.5) - 1.5])
    assert L.kl_penalty(logp, ref, "low_var_kl").tolist() == pytest.approx([math.exp(-1), math.exp(0.5) - 1.5])
    # k3+: value of k3, gradient of k2 (d 0.5x^2 / dlogp = x)
    v = L.kl_penalty(logp, ref, "k3+")
    assert v.tolist() == pytest.approx([math.exp(-1), math.exp(0.5) - 1.5])
    v.sum().backward()
    assert logp.grad.tolist() == pytest.approx([1.0, -0.5])
    with pytest.raises(ValueError, match="k3"):
        L.kl_penalty(logp, ref, "full")


# ---------------------------------------------------------------- Clip-Cov / KL-Cov (§3)


def _cov_case():
    # A: +1 on row 0, -1 on row 1 (mean 0); logp mean = -12/6 = -2
    adv = t([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    logp = t([[-0.5, -3.5, -2.0], [-2.8, -0.4, -2.8]]).requires_grad_()
    return logp, adv


def test_token_covariance_by_hand():
    logp, adv = _cov_case()
    cov = L.token_covariance(logp, adv, torch.ones(2, 3))
    # logp - mean = [1.5, -1.5, 0], [-0.8, 1.6, -0.8]; times (A - 0)
    assert torch.allclose(cov, t([[1.5, -1.5, 0.0], [0.8, -1.6, 0.8]]))


def test_clip_cov_zeroes_the_band_token():
    logp, adv = _cov_case()
    old = logp.detach().clone()  # ratio 1: no PPO clipping
    mask = torch.ones(2, 3, dtype=D)
    loss, st = L.clip_cov_loss(logp, old, adv, mask, clip_cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0)
    # clip_num = max(int(0.0002 * 6), 1) = 1; the only covariance in (1, 5) is 1.5 at (0, 0)
    # per-token -A*1 = [-1,-1,-1], [1,1,1] with (0,0) zeroed -> sum 1, token-mean 1/6
    assert loss.item() == pytest.approx(1 / 6)
    assert st["cov_selected"] == 1 and st["clip_frac"] == pytest.approx(1 / 6)
    assert st["cov_max"] == pytest.approx(1.5) and st["cov_min"] == pytest.approx(-1.6)
    loss.backward()
    assert torch.allclose(logp.grad, t([[0.0, -1.0, -1.0], [1.0, 1.0, 1.0]]) / 6)
    # an empty band selects nothing: plain PPO
    loss2, st2 = L.clip_cov_loss(logp, old, adv, mask, clip_cov_lb=10.0, clip_cov_ub=20.0)
    assert loss2.item() == pytest.approx(0.0) and st2["cov_selected"] == 0


def test_kl_cov_penalises_the_top_covariance_token():
    logp, adv = _cov_case()
    old = logp.detach().clone()
    old[0, 0] -= 0.1  # d = 0.1 at (0, 0)
    mask = torch.ones(2, 3, dtype=D)
    loss, st = L.kl_cov_loss(logp, old, adv, mask, kl_cov_ratio=0.0002, ppo_kl_coef=1.0)
    # k = max(1, int(6 * 0.0002)) = 1 -> the top covariance token (0, 0) (1.5)
    # row 0: -1*e^0.1 + 1.0*|0.1|, -1, -1; row 1: 1, 1, 1 (no clipping at all)
    want = (-math.exp(0.1) + 0.1 - 1 - 1 + 3) / 6
    assert loss.item() == pytest.approx(want)
    assert st["cov_selected"] == 1
    assert st["ppo_kl"] == pytest.approx(0.1 / 6)
    loss.backward()
    # gradient at (0,0): (-e^0.1 + 1) / 6 (d|d|/dlogp = +1 for d > 0)
    assert logp.grad[0, 0].item() == pytest.approx((-math.exp(0.1) + 1) / 6)


def test_kl_cov_on_policy_penalty_has_no_effect():
    # §3.4 edge case: old_logp = logp -> d = 0, d|d|/dd = 0: same gradient as plain -A*ratio
    logp, adv = _cov_case()
    mask = torch.ones(2, 3, dtype=D)
    loss, _ = L.kl_cov_loss(logp, logp.detach(), adv, mask)
    loss.backward()
    assert torch.allclose(logp.grad, -adv / 6)


# ---------------------------------------------------------------- NFT (§6.2, §6.3)


def test_nft_loss_by_hand():
    # one question, two responses: row 0 correct, row 1 wrong; r_hat = 0.5
    old = torch.zeros(2, 2, dtype=D)
    logp = t([[math.log(2.0), 0.0], [math.log(0.5), math.log(1.5)]]).requires_grad_()  # R = [2,1], [0.5,1.5]
    mask = torch.ones(2, 2, dtype=D)
    loss, _ = L.nft_loss(logp, old, t([1.0, 0.0]), t([0.5, 0.5]), mask)
    # positive: -log R = [-ln 2, 0], times (1 - r_hat) = 0.5
    # negative: proxy = (1 - 0.5 R)/0.5 = 2 - R = [1.5, 0.5] -> floor 1 -> [1.5, 1]; -log -> [-ln 1.5, 0]; x 0.5
    want = (0.5 * -math.log(2.0) + 0.5 * -math.log(1.5)) / 1000
    assert loss.item() == pytest.approx(want)
    loss.backward()
    # row 1 token 1 sits on the floor: value 1, gradient still -d proxy / 1 = r_hat R/(1 - r_hat) = 1.5
    assert logp.grad[1, 1].item() == pytest.approx(0.5 * 1.5 / 1000)
    # row 0 token 0: d(-log R)/dlogp = -1, times 0.5
    assert logp.grad[0, 0].item() == pytest.approx(-0.5 / 1000)


def _nft_vs_grpo_grads(normalize: int, off_policy: bool):
    torch.manual_seed(0)
    # a tiny "policy": logits = W x; five responses of three tokens, vocab 5, two questions:
    # question A (rows 0-2) correct [1, 0, 0] -> r_hat = 1/3; question B (rows 3-4) [0, 1] -> 1/2
    w = torch.randn(5, 4, dtype=D, requires_grad=True)
    x = torch.randn(5, 3, 4, dtype=D)
    tokens = torch.randint(0, 5, (5, 3))
    mask = t([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    correct = t([1.0, 0.0, 0.0, 0.0, 1.0])
    rate = t([1 / 3, 1 / 3, 1 / 3, 0.5, 0.5])

    def logp_of(w):
        return torch.log_softmax(x @ w.T, -1).gather(-1, tokens[..., None])[..., 0]  # (4, 3)

    old = logp_of(w).detach()
    if off_policy:
        old = old + 0.3 * torch.randn_like(old)
    nft, _ = L.nft_loss(logp_of(w), old, correct, rate, mask, normalize=normalize)
    (g_nft,) = torch.autograd.grad(nft, w)
    # GRPO on the same samples: advantage c - r_hat (normalize 1: Dr.GRPO, 0/1 rewards) or the
    # population-std normalised one (normalize 2); token-sum over the batch / 1000 like NFT
    adv = correct - rate
    if normalize == 2:
        adv = adv / torch.sqrt(rate * (1 - rate))
    pg, _ = L.ppo_clip_loss(logp_of(w), old, adv[:, None].expand(5, 3), mask, agg="seq-mean-token-sum")
    grpo = pg * mask.any(-1).sum() / 1000  # seq-mean-token-sum * N_seq = token sum
    (g_grpo,) = torch.autograd.grad(grpo, w)
    return g_nft, g_grpo


@pytest.mark.parametrize("normalize", [1, 2])
def test_nft_gradient_equals_grpo_on_policy(normalize):
    # §6.3: at R = 1 (first update on fresh samples, r_hat inside [0.02, 0.98], clamp_negative 1,
    # clamp_positive 0) NFT's gradient is GRPO's with advantage c - r_hat (normalize=1) or the
    # std-normalised advantage (normalize=2), both aggregated as token sum / 1000
    g_nft, g_grpo = _nft_vs_grpo_grads(normalize, off_policy=False)
    assert g_nft.abs().max() > 1e-6
    assert torch.allclose(g_nft, g_grpo, atol=1e-12)


def test_nft_gradient_differs_from_grpo_off_policy():
    g_nft, g_grpo = _nft_vs_grpo_grads(1, off_policy=True)
    assert not torch.allclose(g_nft, g_grpo, atol=1e-6)


# ---------------------------------------------------------------- LUFFY (§5.4)


def test_luffy_loss_by_hand():
    # row 0: an off-policy trace with p = [0.1, 0.9], A = 0.5; row 1: on-policy, ratio [1.2, 1], A = -0.5
    logp = t([[math.log(0.1), math.log(0.9)], [0.0, 0.0]]).requires_grad_()
    old = t([[0.0, 0.0], [-math.log(1.2), 0.0]])
    adv = t([[0.5, 0.5], [-0.5, -0.5]])
    mask = t([[1, 1], [1, 0]])
    off = torch.tensor([[True, True], [False, False]])
    loss, st = L.luffy_loss(logp, old, adv, mask, off, gamma=0.1)
    # off: f(p) = p/(p+0.1) = [0.5, 0.9]; -A f = [-0.25, -0.45]
    # on: -A * ratio = 0.5 * [1.2, 1] (token 1 masked) -> 0.6
    # sum / L (= 2): (-0.25 - 0.45 + 0.6) / 2
    assert loss.item() == pytest.approx(-0.05)
    assert st["off_policy_prob"] == pytest.approx(0.5)
    loss.backward()
    # d(-A p/(p+g))/dlogp = -A g p/(p+g)^2 = -0.5 * 0.1 * 0.1 / 0.04 = -0.125; / 2
    assert logp.grad[0, 0].item() == pytest.approx(-0.0625)
    # no clipping on-policy: d(-A r)/dlogp = 0.5 * 1.2 even though 1.2 is beyond 1 + 0.2; / 2
    assert logp.grad[1, 0].item() == pytest.approx(0.3)


# ---------------------------------------------------------------- PRIME PRM (§2.3)


def test_prm_loss_by_hand():
    lp_phi = t([[0.5, 1.5], [-1.0, 3.0]]).requires_grad_()
    lp_ref = torch.zeros(2, 2, dtype=D)
    mask = t([[1, 1], [1, 0]])
    loss, st = L.prm_loss(lp_phi, lp_ref, mask, t([1.0, 0.0]), beta_train=0.5)
    # sums of q on the mask: 2 and -1; scores 0.5*2 = 1, 0.5*-1 = -0.5
    # BCE: -log s(1) = log(1 + e^-1); -log(1 - s(-0.5)) = log(1 + e^-0.5)
    want = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-0.5))) / 2
    assert loss.item() == pytest.approx(want)
    assert st["prm_acc"] == 1.0


# ---------------------------------------------------------------- DPO, SFT, log-probs


def test_dpo_loss_by_hand():
    loss, st = L.dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5)
    # chosen reward 0.5 * (-1 + 2) = 0.5, rejected 0.5 * (-3 + 2) = -0.5, margin 1; -log s(1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert st["reward_margin"] == pytest.approx(1.0) and st["reward_accuracy"] == 1.0


def test_sft_loss_by_hand():
    logits = t([[[0.0, 0.0, 0.0], [5.0, 1.0, 2.0], [math.log(2.0), 0.0, 0.0]]])
    labels = torch.tensor([[1, -100, 0]])
    loss, n = L.sft_loss(logits, labels)
    # t0: uniform over 3 -> ln 3; t2: p(0) = 2/4 -> ln 2; mean over 2 labelled tokens
    assert n == 2 and loss.item() == pytest.approx((math.log(3) + math.log(2)) / 2)


def test_logprobs_and_entropy_with_temperature():
    logits = t([[[0.0, 0.0, 0.0, 0.0], [math.log(4.0), 0.0, 0.0, 0.0]]])
    logp, ent = L.logprobs_and_entropy(logits, torch.tensor([[2, 0]]), temperature=1.0)
    assert logp[0, 0].item() == pytest.approx(-math.log(4)) and ent[0, 0].item() == pytest.approx(math.log(4))
    # T = 2: z = [ln 2, 0, 0, 0]; p = [2/5, 1/5, 1/5, 1/5]
    logp, ent = L.logprobs_and_entropy(logits[:, 1:], torch.tensor([[0]]), temperature=2.0)
    assert logp.item() == pytest.approx(math.log(2 / 5), rel=1e-6)
    assert ent.item() == pytest.approx(-(0.4 * math.log(0.4) + 3 * 0.2 * math.log(0.2)), rel=1e-6)


def _reference_logp_entropy(logits, tokens, temperature):
    # the formulas as a plain autograd graph: log softmax gathered, H = log Z - E_p[z]
    z = logits.float() / temperature
    logz = torch.logsumexp(z, -1)
    return z.gather(-1, tokens[..., None])[..., 0] - logz, logz - (torch.softmax(z, -1) * z).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("block", [1 << 22, 7 * 50])  # one block, and blocks of 7 rows with a ragged last one
def test_blocked_token_logprobs_match_the_autograd_graph(monkeypatch, temperature, block):
    monkeypatch.setattr(L, "_BLOCK", block)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 11, 50, generator=gen) * 4).requires_grad_(True)
    tokens = torch.randint(0, 50, (3, 11), generator=gen)
    weights = torch.randn(3, 11, generator=gen)  # a per-token upstream gradient, as the PPO loss gives
    logp, ent = L.logprobs_and_entropy(logits, tokens, temperature)
    (logp * weights).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    ref_logp, ref_ent = _reference_logp_entropy(logits, tokens, temperature)
    (ref_logp * weights).sum().backward()
    assert torch.allclose(logp, ref_logp, atol=1e-5) and torch.allclose(ent, ref_ent.detach(), atol=1e-5)
    assert torch.allclose(got, logits.grad, atol=1e-6)
    assert not ent.requires_grad  # a statistic unless asked for


def test_token_logprob_gradient_by_hand():
    # z = [ln 4, 0, 0, 0] at T = 1: p = [4/7, 1/7, 1/7, 1/7]; d logp(token 0) / dz = onehot - p
    logits = torch.tensor([[[math.log(4.0), 0.0, 0.0, 0.0]]], requires_grad=True)
    logp, _ = L.logprobs_and_entropy(logits, torch.tensor([[0]]), with_entropy=False)
    assert logp.item() == pytest.approx(math.log(4 / 7), rel=1e-6)
    logp.sum().backward()
    assert torch.allclose(logits.grad[0, 0], torch.tensor([3 / 7, -1 / 7, -1 / 7, -1 / 7]), atol=1e-7)
    # T = 2 scales it: (onehot - softmax(z / 2)) / 2, softmax([ln 2, 0, 0, 0]) = [2/5, 1/5, 1/5, 1/5]
    logits.grad = None
    logp, _ = L.logprobs_and_entropy(logits, torch.tensor([[0]]), temperature=2.0, with_entropy=False)
    logp.sum().backward()
    assert torch.allclose(logits.grad[0, 0], torch.tensor([0.3, -0.1, -0.1, -0.1]), atol=1e-7)


def test_entropy_gradient_when_it_is_in_the_loss():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 9, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 9, (2, 5), generator=gen)
    _, ent = L.logprobs_and_entropy(logits, tokens, 0.8, entropy_grad=True)
    ent.sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    _reference_logp_entropy(logits, tokens, 0.8)[1].sum().backward()
    assert torch.allclose(got, logits.grad, atol=1e-6)


def test_blocked_token_logprobs_in_bf16():
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(4, 6, 33, generator=gen) * 3).bfloat16().requires_grad_(True)
    tokens = torch.randint(0, 33, (4, 6), generator=gen)
    logp, ent = L.logprobs_and_entropy(logits, tokens, 1.0)
    assert logp.dtype == torch.float32
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    ref_logp, ref_ent = _reference_logp_entropy(logits.detach().float().requires_grad_(True), tokens, 1.0)
    assert torch.allclose(logp, ref_logp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
