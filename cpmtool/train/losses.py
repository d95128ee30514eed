"""Losses of the RL, SFT and DPO recipes: small pure functions on (B, L) tensors.

Formulas follow ../shared/reference/rl-algorithms.md (verl, PRIME, Entropy-Mechanism, LUFFY and NFT
official code); each function names the section it implements. Conventions:

- `mask` (B, L) is 1 on response tokens up to and including the first EOS, 0 elsewhere.
- `logp` (B, L) is the current policy's log-probability of the sampled token (with grad),
  `old_logp` the behaviour policy's (no grad), `ref_logp` a frozen reference's.
- `adv` (B, L) is the per-token advantage (GRPO: one scalar per response broadcast on its tokens).
- Policy losses return `(loss, stats)` where stats are detached floats for metrics.jsonl.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "k2+", "k3+")


def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", *,
             num_tokens: float | None = None, num_seqs: float | None = None, norm: float | None = None
             ) -> torch.Tensor:
    """Aggregate a (B, L) per-token loss to a scalar (verl `agg_loss`, §1.4).

    Args:
        loss_mat: (B, L) per-token losses.
        mask: (B, L) response mask.
        mode: "token-mean" (sum / valid tokens; DAPO), "seq-mean-token-sum" (per-sequence sums,
            averaged over sequences), "seq-mean-token-mean" (per-sequence means averaged; original
            GRPO), "seq-mean-token-sum-norm" (total sum / `norm`, a constant such as max length; Dr.GRPO).
        num_tokens: the denominator of token-mean when the mini-batch is split over micro-batches
            or ranks (the global valid-token count); default: this tensor's count.
        num_seqs: likewise for the seq-mean modes (sequences with at least one valid token).
        norm: the constant of seq-mean-token-sum-norm (default L).
    """
    mask = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        return (loss_mat * mask).sum() / max(float(denom), 1.0)
    if mode == "seq-mean-token-sum-norm":
        return (loss_mat * mask).sum() / (loss_mat.shape[-1] if norm is None else norm)
    seq_valid = mask.sum(-1) > 0  # (B,)
    n_seq = seq_valid.sum() if num_seqs is None else num_seqs
    if mode == "seq-mean-token-sum":
        per_seq = (loss_mat * mask).sum(-1)  # (B,)
    elif mode == "seq-mean-token-mean":
        per_seq = (loss_mat * mask).sum(-1) / (mask.sum(-1) + 1e-8)
    else:
        raise ValueError(f"unknown loss aggregation {mode!r} (valid: {', '.join(AGG_MODES)})")
    return per_seq.sum() / max(float(n_seq), 1.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ---------------------------------------------------------------- log-probs and entropy


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                         with_entropy: bool = True, entropy_grad: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of `tokens` (B, L) under `logits` (B, L, V) / temperature, and the entropy.

    verl divides the logits by the rollout temperature before the log-softmax, so the trained
    distribution is the one that was sampled. The entropy carries a gradient only with
    `entropy_grad` (an entropy bonus in the loss); otherwise it is a statistic, computed in the
    same blocked passes as the log-probs (`_TokenLogProb`).
    """
    if with_entropy and entropy_grad:
        z = logits.float()
        if temperature != 1.0:
            z = z / temperature
        logz = torch.logsumexp(z, dim=-1)  # (B, L)
        logp = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logz
        p = torch.softmax(z, dim=-1)
        return logp, logz - (p * z).sum(-1)  # H = log Z - E_p[z]
    v = logits.shape[-1]
    logp, ent = _TokenLogProb.apply(logits.reshape(-1, v), tokens.reshape(-1), float(temperature), with_entropy)
    return logp.view(tokens.shape), ent.view(tokens.shape) if with_entropy else None


# a block of rows of the (N, V) logits that stays in cache: 2^22 floats, 16 MB
_BLOCK = 1 << 22


def _row_blocks(n: int, v: int) -> list[tuple[int, int]]:
    step = max(1, _BLOCK // max(v, 1))
    return [(a, min(a + step, n)) for a in range(0, n, step)]


class _TokenLogProb(torch.autograd.Function):
    """log softmax(z / T)[token] per row of z (N, V), with the entropy (no gradient) alongside.

    As an autograd graph (logsumexp, gather, softmax) this is about ten passes over the N x V
    logits and as many N x V temporaries: 400 MB each for smollm2-135m's 49152-token vocabulary
    at 2048 positions, where they took 14% of a GRPO update. Here every pass runs on a block of
    rows that stays in cache, and the backward writes the gradient in one pass per block:
    d logp / dz = (onehot(token) - softmax(z / T)) / T.
    """

    @staticmethod
    def forward(ctx, z, tokens, temperature, want_entropy):
        n, v = z.shape
        logz = torch.empty(n, dtype=torch.float32, device=z.device)
        logp = torch.empty_like(logz)
        ent = torch.empty_like(logz) if want_entropy else logz.new_empty(0)
        for a, b in _row_blocks(n, v):
            x = z[a:b].float()
            if temperature != 1.0:
                x = x / temperature
            m = x.amax(-1, keepdim=True)  # (C, 1)
            y = x - m  # shifted by the max, as softmax does, so the entropy keeps its precision
            e = y.exp()  # (C, V)
            s = e.sum(-1)  # (C,)
            log_s = s.log()
            logz[a:b] = m[:, 0] + log_s
            logp[a:b] = y.gather(-1, tokens[a:b, None])[:, 0] - log_s
            if want_entropy:  # H = log Z - E_p[z] = log s - E_p[y]
                ent[a:b] = log_s - e.mul_(y).sum(-1) / s
        ctx.save_for_backward(z, tokens, logz)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g, _g_ent):
        z, tokens, logz = ctx.saved_tensors
        t = ctx.temperature
        grad = torch.empty_like(z)
        for a, b in _row_blocks(*z.shape):
            x = z[a:b].float()
            p = (x / t if t != 1.0 else x.clone()).sub_(logz[a:b, None]).exp_()  # (C, V) softmax
            gb = g[a:b].float()[:, None] / t  # (C, 1)
            grad[a:b] = p.mul_(-gb).scatter_add_(-1, tokens[a:b, None], gb)
        return grad, None, None, None


# ---------------------------------------------------------------- KL estimators (§1.5)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL estimate between the policy and a reference, x = logp - ref_logp.

    k1 = x; abs = |x|; k2 = x²/2; k3 (low_var_kl) = e^{-x} + x - 1 with the exponent clamped to
    [-20, 20] and the result to [-10, 10]. A `+` suffix keeps the estimator's value and takes k2's
    gradient (straight-through): 0.5x² - sg(0.5x²) + sg(value).
    """
    if kind.endswith("+"):
        value = kl_penalty(logp, ref_logp, kind[:-1])
        k2 = 0.5 * (logp - ref_logp).square()
        return k2 - k2.detach() + value.detach()
    x = logp - ref_logp
    if kind in ("k1", "kl"):
        return x
    if kind == "abs":
        return x.abs()
    if kind in ("k2", "mse"):
        return 0.5 * x.square()
    if kind in ("k3", "low_var_kl"):
        kl = (ref_logp - logp).clamp(-20, 20)
        return (kl.exp() - kl - 1).clamp(-10, 10)
    raise ValueError(f"unknown KL estimator {kind!r} (valid: {', '.join(KL_TYPES)})")


# ---------------------------------------------------------------- PPO clip (GRPO / DAPO, §1.3)


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *,
                  clip_low: float = 0.2, clip_high: float = 0.2, clip_c: float | None = 3.0,
                  agg: str = "token-mean", is_weights: torch.Tensor | None = None, **agg_kw
                  ) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate with asymmetric clip (DAPO clip-higher) and dual clip (verl `vanilla`).

    ratio = exp(clamp(logp - old_logp, -20, 20)); l_clip = max(-A·ratio, -A·clip(ratio, 1-εlo, 1+εhi));
    for A < 0 the loss is capped at -A·c (dual clip, c > 1; None disables it).
    `is_weights` (B, L) multiplies the per-token loss (importance weights, e.g. chunk-wise rollout).
    """
    neg_kl = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = neg_kl.exp()
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    l_clip = torch.maximum(l1, l2)
    if clip_c is not None:
        if clip_c <= 1.0:
            raise ValueError(f"dual-clip constant must be > 1 (got {clip_c})")
        l3 = -adv * clip_c
        pg = torch.where(adv < 0, torch.minimum(l3, l_clip), l_clip)
        lower = ((l_clip > l3) & (adv < 0)).float()
    else:
        pg = l_clip
        lower = torch.zeros_like(l_clip)
    if is_weights is not None:
        pg = pg * is_weights
    loss = agg_loss(pg, mask, agg, **agg_kw)
    with torch.no_grad():
        stats = {
            "clip_frac": float(masked_mean((l2 > l1).float(), mask)),
            "clip_frac_lower": float(masked_mean(lower, mask)),
            "ppo_kl": float(masked_mean(-neg_kl, mask)),
        }
    return loss, stats


# ---------------------------------------------------------------- Clip-Cov / KL-Cov (§3)


def token_covariance(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Centred product (A_i - mean A)(logp_i - mean logp) per valid token (§3.2), 0 on padding.

    Means are over the valid tokens of this batch; logp is detached.
    """
    valid = mask > 0
    lp = logp.detach()
    a_c = adv - adv[valid].mean()
    lp_c = lp - lp[valid].mean()
    return torch.where(valid, a_c * lp_c, torch.zeros_like(lp))


def _cov_stats(cov: torch.Tensor, mask: torch.Tensor) -> dict:
    c = cov[mask > 0]
    if c.numel() == 0:
        return {"cov_mean": 0.0, "cov_std": 0.0, "cov_max": 0.0, "cov_min": 0.0}
    return {"cov_mean": float(c.mean()), "cov_std": float(c.std()) if c.numel() > 1 else 0.0,
            "cov_max": float(c.max()), "cov_min": float(c.min())}


def clip_cov_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *,
                  clip_low: float = 0.2, clip_high: float = 0.2, clip_cov_ratio: float = 0.0002,
                  clip_cov_lb: float = 1.0, clip_cov_ub: float = 5.0, agg: str = "token-mean",
                  generator: torch.Generator | None = None, **agg_kw) -> tuple[torch.Tensor, dict]:
    """Clip-Cov (§3.3): zero the gradient of a random subset of tokens whose covariance is in (lb, ub).

    Tokens already clipped by PPO are not candidates; max(int(ratio · #valid), 1) are drawn at
    random (not top-k) from the band; no dual clip.
    """
    valid = mask > 0
    ratio = (logp - old_logp).exp()
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = (l2 > l1) & valid
    cov = token_covariance(logp, adv, mask)
    band = (cov < clip_cov_ub) & (cov > clip_cov_lb) & valid & ~clipped
    clip_num = max(int(clip_cov_ratio * int(valid.sum())), 1)
    cand = band.flatten().nonzero().flatten()
    perm = torch.randperm(cand.numel(), generator=generator)[: min(clip_num, cand.numel())]
    corr = torch.ones_like(adv).flatten()
    corr[cand[perm]] = 0.0
    corr = corr.view_as(adv)
    pg = torch.maximum(l1, l2) * corr
    loss = agg_loss(pg, mask, agg, **agg_kw)
    with torch.no_grad():
        stats = {"clip_frac": float(masked_mean((corr == 0).float(), mask)),
                 "ppo_kl": float(masked_mean(old_logp - logp, mask)),
                 "cov_selected": int(perm.numel()), **_cov_stats(cov, mask)}
    return loss, stats


def kl_cov_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *,
                kl_cov_ratio: float = 0.0002, ppo_kl_coef: float = 1.0, agg: str = "token-mean", **agg_kw
                ) -> tuple[torch.Tensor, dict]:
    """KL-Cov (§3.4): no ratio clip; the top-k covariance tokens get + ppo_kl_coef·|logp - old_logp|.

    k = max(1, int(#valid · ratio)), a deterministic top-k. Strictly on-policy (old_logp = logp)
    the penalty is 0 with 0 gradient, so it acts only on later mini-batches or epochs.
    """
    valid = mask > 0
    d = logp - old_logp
    ratio = d.exp()
    pg = -adv * ratio
    pg_kl = pg + ppo_kl_coef * d.abs()
    cov = token_covariance(logp, adv, mask)
    flat_idx = valid.flatten().nonzero().flatten()
    k = max(1, int(flat_idx.numel() * kl_cov_ratio)) if flat_idx.numel() else 0
    sel = torch.zeros(adv.numel(), dtype=torch.bool, device=adv.device)
    if k:
        top = cov.flatten()[flat_idx].topk(min(k, flat_idx.numel())).indices
        sel[flat_idx[top]] = True
    sel = sel.view_as(adv)
    pg = torch.where(sel, pg_kl, pg)
    loss = agg_loss(pg, mask, agg, **agg_kw)
    with torch.no_grad():
        stats = {"clip_frac": 0.0, "ppo_kl": float(masked_mean(d.abs(), mask)),
                 "cov_selected": int(sel.sum()), **_cov_stats(cov, mask)}
    return loss, stats


# ---------------------------------------------------------------- NFT (§6.2)


def _sg_clamp(x: torch.Tensor, lo: float) -> torch.Tensor:
    # forward value clamped from below, gradient of the unclamped x
    return x + (x.clamp(min=lo) - x).detach()


def nft_loss(logp: torch.Tensor, old_logp: torch.Tensor, correct: torch.Tensor, correct_rate: torch.Tensor,
             mask: torch.Tensor, *, neg_weight: float = 1.0, normalize: int = 1, clamp_negative: float = 1.0,
             clamp_positive: float = 0.0, scale: float = 1000.0) -> tuple[torch.Tensor, dict]:
    """Negative-aware Fine-Tuning loss with the implicit negative policy (NVlabs/NFT `token` ratio).

    R = exp(min(logp - old_logp, 10)); r̂ = clamp(correct rate of the question, 0.02, 0.98);
    positives: -log R (floored at clamp_positive on the value only); negatives:
    -log max((1 - r̂R)/(1 - r̂), clamp_negative) with a straight-through floor. normalize=1 scales by
    (1 - r̂), 2 by sqrt((1 - r̂)/r̂). The token losses are summed over the whole batch and divided by
    `scale` (1000 in the official code).

    Args:
        correct: (B,) 1 for a correct response, 0 otherwise.
        correct_rate: (B,) the fraction of correct responses in the response's group.
    """
    r = (logp - old_logp).clamp(max=10.0).exp()  # (B, L)
    r_hat = correct_rate.clamp(0.02, 0.98)[:, None].to(logp.dtype)  # (B, 1)
    c = correct.to(logp.dtype)[:, None]
    proxy = (1 - r_hat * r) / (1 - r_hat)
    neg = -torch.log(_sg_clamp(proxy, abs(clamp_negative)))
    pos = -torch.log(_sg_clamp(r, clamp_positive))
    pg = neg_weight * (1 - c) * neg + c * pos
    if normalize == 1:
        pg = pg * (1 - r_hat)
    elif normalize == 2:
        pg = pg * torch.sqrt((1 - r_hat) / r_hat)
    elif normalize != 0:
        raise ValueError(f"NFT normalize must be 0, 1 or 2 (got {normalize})")
    loss = (pg * mask.to(pg.dtype)).sum() / scale
    with torch.no_grad():
        stats = {"ppo_kl": float(masked_mean(old_logp - logp, mask)),
                 "clip_frac": float(masked_mean(((proxy < abs(clamp_negative)) & (c == 0)).float(), mask))}
    return loss, stats


# ---------------------------------------------------------------- LUFFY (§5.4)


def luffy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
               off_mask: torch.Tensor, *, gamma: float = 0.1, norm: float | None = None
               ) -> tuple[torch.Tensor, dict]:
    """LUFFY mixed-policy loss: on-policy tokens -A·ratio (no clip), off-policy tokens -A·f(p) with
    the policy shaping f(p) = p / (p + γ) (no behaviour-probability division, no clip).

    Aggregated as sum / norm (norm = L, the max response length: `loss_remove_token_mean`).

    Args:
        off_mask: (B, L) bool, True on tokens of an off-policy trace.
    """
    ratio = (logp - old_logp).clamp(-20.0, 20.0).exp()
    on = -adv * ratio
    p = logp.exp()
    off = -adv * (p / (p + gamma))
    pg = torch.where(off_mask, off, on)
    loss = agg_loss(pg, mask, "seq-mean-token-sum-norm", norm=norm)
    with torch.no_grad():
        on_mask = mask.bool() & ~off_mask
        stats = {"clip_frac": 0.0, "ppo_kl": float(masked_mean(old_logp - logp, on_mask)),
                 "off_policy_prob": float(masked_mean(p, off_mask & mask.bool())) if off_mask.any() else 0.0}
    return loss, stats


# ---------------------------------------------------------------- PRIME implicit PRM (§2.3)


def prm_loss(lp_phi: torch.Tensor, lp_ref: torch.Tensor, mask: torch.Tensor, acc: torch.Tensor,
             beta_train: float = 0.05) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of the implicit PRM's sequence score on outcome labels.

    q = lp_phi - lp_ref; s = sigmoid(β · Σ_t q_t); loss = BCE(s, acc), mean over the batch.
    """
    q = (lp_phi - lp_ref) * mask.to(lp_phi.dtype)
    score = beta_train * q.sum(-1)  # (B,)
    loss = F.binary_cross_entropy_with_logits(score, acc.to(score.dtype))
    with torch.no_grad():
        pred = score > 0
        stats = {"prm_loss": float(loss), "prm_acc": float((pred == acc.bool()).float().mean())}
    return loss, stats


# ---------------------------------------------------------------- DPO and SFT


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """DPO (sigmoid) loss on sequence log-probabilities (sums over the response tokens), all (B,).

    loss = -log σ(β((πc - refc) - (πr - refr))), mean over pairs.
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {"reward_chosen": float(chosen_reward.mean()), "reward_rejected": float(rejected_reward.mean()),
                 "reward_margin": float(margin.mean()), "reward_accuracy": float((margin > 0).float().mean())}
    return loss, stats


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled positions; labels (B, T) are already shifted
    (labels[:, t] is the target of logits[:, t]). Returns (loss, number of labelled tokens)."""
    n = int((labels != ignore_index).sum())
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")
    return loss / max(n, 1), n
