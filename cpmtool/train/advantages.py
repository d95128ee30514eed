"""Rewards to advantages: group statistics, filters and reward shaping, as small pure functions.

Formulas follow ../shared/reference/rl-algorithms.md. `index` is a sequence of group ids (one per
response; the n samples of a prompt share one), so groups need not be contiguous.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

LENGTH_SCHEMES = ("kimi", "sigmoid")


def _groups(index: Sequence) -> dict:
    groups: dict = defaultdict(list)
    for i, g in enumerate(index):
        groups[g].append(i)
    return groups


def grpo_advantages(scores: torch.Tensor, index: Sequence, *, norm_std: bool = True, eps: float = 1e-6
                    ) -> torch.Tensor:
    """GRPO outcome advantage per response (verl `compute_grpo_outcome_advantage`, §1.2).

    a_i = (r_i - mean_g) / (std_g + eps) with the unbiased std of the group; `norm_std=False` is
    Dr.GRPO (a_i = r_i - mean_g). A singleton group has mean 0 and std 1 (a_i = r_i). An all-equal
    group gets a_i = 0.
    """
    scores = scores.float()
    adv = torch.empty_like(scores)
    for rows in _groups(index).values():
        s = scores[rows]
        if len(rows) == 1:
            mean, std = torch.tensor(0.0), torch.tensor(1.0)
        else:
            mean, std = s.mean(), s.std()
        adv[rows] = (s - mean) / (std + eps) if norm_std else s - mean
    return adv


def rloo_advantages(scores: torch.Tensor, index: Sequence) -> torch.Tensor:
    """Leave-one-out baseline: a_i = r_i - mean_{j≠i} r_j (singletons: a_i = r_i)."""
    scores = scores.float()
    adv = scores.clone()
    for rows in _groups(index).values():
        n = len(rows)
        if n > 1:
            s = scores[rows]
            adv[rows] = s * n / (n - 1) - s.mean() * n / (n - 1)
    return adv


def keep_varied_groups(values: torch.Tensor, index: Sequence, *, keep_singletons: bool = True) -> torch.Tensor:
    """DAPO dynamic-sampling filter (§1.7): keep a group iff its values vary (population std > 0).

    Singleton groups are kept in verl's DAPO and dropped in NFT (`keep_singletons=False`).
    Returns a (B,) bool mask over responses.
    """
    keep = torch.zeros(len(index), dtype=torch.bool)
    for rows in _groups(index).values():
        v = values[rows].float()
        ok = (len(rows) == 1 and keep_singletons) or (len(rows) > 1 and bool(v.std(unbiased=False) > 0))
        keep[rows] = ok
    return keep


def accuracy_range_filter(acc: torch.Tensor, index: Sequence, lower: float = 0.2, upper: float = 0.8
                          ) -> torch.Tensor:
    """PRIME prompt filter (§2.2): keep a group iff lower <= its mean accuracy <= upper (inclusive)."""
    keep = torch.zeros(len(index), dtype=torch.bool)
    for rows in _groups(index).values():
        a = float(acc[rows].float().mean())
        keep[rows] = lower <= a <= upper
    return keep


def group_mean(values: torch.Tensor, index: Sequence) -> torch.Tensor:
    """Each response's group mean, (B,) (NFT's correct rate r̂ with 0/1 values)."""
    out = torch.empty(len(index), dtype=torch.float32)
    for rows in _groups(index).values():
        out[rows] = values[rows].float().mean()
    return out


# ---------------------------------------------------------------- reward shaping


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, penalty_factor: float = 1.0
                     ) -> torch.Tensor:
    """DAPO soft overlong punishment (§1.7): 0 up to max_len - buffer_len, then linear down to
    -penalty_factor at max_len. Added to the outcome reward."""
    expected = max_len - buffer_len
    exceed = lengths.float() - expected
    return torch.clamp(-exceed / buffer_len * penalty_factor, max=0.0)


def length_reward(correct: torch.Tensor, lengths: torch.Tensor, index: Sequence, *, scheme: str = "kimi",
                  alpha: float = 0.2) -> torch.Tensor:
    """A length-aware reward for efficient reasoning, (B,), from correctness and response lengths.

    - "kimi" (Kimi k1.5 group length reward): λ = 0.5 - (len - min)/(max - min) over the group;
      reward = correct + α·(λ if correct else min(0, λ)). A group of equal lengths has λ = 0.
    - "sigmoid" ("Training LMs to Reason Efficiently"): correct ⇒ 1 - α·σ((len - mean)/std) with
      mean/std over the group's correct responses (std 0 ⇒ the sigmoid term is σ(0) = 0.5);
      wrong ⇒ 0.
    The formulas are the survey's summaries (data-methods.md §6.3, unverified against code).
    """
    c = correct.float()
    n = lengths.float()
    out = torch.empty_like(c)
    for rows in _groups(index).values():
        cr, lr = c[rows], n[rows]
        if scheme == "kimi":
            lo, hi = lr.min(), lr.max()
            lam = torch.zeros_like(lr) if hi == lo else 0.5 - (lr - lo) / (hi - lo)
            out[rows] = cr + alpha * torch.where(cr > 0, lam, lam.clamp(max=0.0))
        elif scheme == "sigmoid":
            ok = lr[cr > 0]
            mean = ok.mean() if ok.numel() else lr.mean()
            std = ok.std(unbiased=False) if ok.numel() > 1 else torch.tensor(0.0)
            z = (lr - mean) / std if std > 0 else torch.zeros_like(lr)
            out[rows] = torch.where(cr > 0, 1 - alpha * torch.sigmoid(z), torch.zeros_like(lr))
        else:
            raise ValueError(f"unknown length-penalty scheme {scheme!r} (valid: {', '.join(LENGTH_SCHEMES)})")
    return out


# ---------------------------------------------------------------- PRIME (§2.3, §2.4)


def prime_process_rewards(q: torch.Tensor, mask: torch.Tensor, beta: float = 0.05, *, batch_norm: bool = True
                          ) -> torch.Tensor:
    """Implicit process rewards r_t = β·log(π_φ(y_t)/π_ref(y_t)) = β·q_t on valid tokens, (B, L).

    `batch_norm` (PRIME's default `prime_norm`) divides by the largest |return-to-go| in the batch,
    one scalar, so process returns lie in [-1, 1] (and β cancels).
    """
    r = beta * q * mask.to(q.dtype)
    if batch_norm:
        rtg = r.flip(-1).cumsum(-1).flip(-1)
        r = r / (rtg.abs().max() + 1e-6)
    return r


def masked_rloo(rewards: torch.Tensor, mask: torch.Tensor, index: Sequence) -> torch.Tensor:
    """PRIME's RLOO on token rewards (§2.4): per group of n, each row's masked rewards become
    R·n/(n-1) - Σ_j m_j/(n-1), m_j the mean masked reward of row j. Singletons are left as they are."""
    m = mask.bool()
    r = torch.where(m, rewards, torch.zeros_like(rewards))
    out = r.clone()
    row_mean = r.sum(-1) / m.sum(-1).clamp(min=1)  # (B,)
    for rows in _groups(index).values():
        n = len(rows)
        if n < 2:
            continue
        baseline = row_mean[rows].sum() / (n - 1)
        g = r[rows] * n / (n - 1) - baseline
        out[rows] = torch.where(m[rows], g, torch.zeros_like(g))
    return out


def discounted_returns(rewards: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go per token: G_t = r_t + γ G_{t+1}, (B, L)."""
    out = torch.zeros_like(rewards)
    acc = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        acc = rewards[:, t] + gamma * acc
        out[:, t] = acc
    return out


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid tokens of the whole batch (unbiased var, as verl)."""
    v = x[mask.bool()]
    mean = v.mean()
    var = v.var() if v.numel() > 1 else torch.tensor(0.0)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + eps), torch.zeros_like(x))


def last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool with True at each row's last valid token."""
    m = mask.bool()
    length = m.sum(-1)
    out = torch.zeros_like(m)
    rows = (length > 0).nonzero().flatten()
    out[rows, length[rows] - 1] = True
    return out


def prime_advantages(process_rewards: torch.Tensor, outcome: torch.Tensor, mask: torch.Tensor, index: Sequence,
                     *, gamma_rm: float = 1.0, gamma_gt: float = 1.0, coef_rm: float = 1.0, coef_gt: float = 1.0
                     ) -> torch.Tensor:
    """PRIME advantages (§2.4): RLOO per reward source, returns-to-go, summed, whitened, (B, L).

    The process source is the (B, L) token rewards on the response mask; the outcome source is the
    (B,) verifier reward placed on each response's last valid token.
    """
    last = last_token_mask(mask)
    gt = torch.zeros_like(process_rewards)
    gt[last] = outcome.to(gt.dtype)[last.any(-1)]
    ret = coef_rm * discounted_returns(masked_rloo(process_rewards, mask, index), gamma_rm)
    ret = ret + coef_gt * discounted_returns(masked_rloo(gt, last, index), gamma_gt)
    return masked_whiten(ret, mask)
