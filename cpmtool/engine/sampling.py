"""Logit processing and token sampling, batched over rows with per-row settings.

Order as in vLLM/HF: temperature, then top-k, top-p and min-p filtering on the tempered
distribution, then sampling. Greedy rows (temperature 0) take the argmax of the raw logits.
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Tempered, filtered logits (B, V) with removed tokens at -inf.

    Args:
        logits: (B, V) float32 raw logits.
        temperature: (B,) > 0 (greedy rows are handled by the caller).
        top_k: (B,) long; <= 0 disables.
        top_p: (B,) in (0, 1]; 1 disables.
        min_p: (B,) in [0, 1]; 0 disables (keeps tokens with p >= min_p * p_max).
    """
    x = logits / temperature[:, None]
    vocab = x.shape[-1]
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        kth = x.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # (B, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    if bool((top_p < 1).any()):
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    if bool((min_p > 0).any()):
        probs = x.softmax(-1)
        x = x.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
    return x


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Next tokens (B,) long. Each row draws from its own generator, so a seeded request gives the
    same tokens whatever else shares its batch."""
    greedy = temperature <= 0
    out = logits.argmax(-1)
    if bool(greedy.all()):
        return out
    rows = (~greedy).nonzero().flatten()
    x = filter_logits(logits[rows], temperature[rows], top_k[rows], top_p[rows], min_p[rows])
    probs = x.softmax(-1)  # (R, V)
    # torch.multinomial's own one-sample algorithm (argmax of p / q with q ~ Exp(1)), batched: only
    # the noise is drawn per row, from the row's generator, so the tokens are the ones a per-row
    # torch.multinomial(p, 1, generator=g) call gives, bit for bit, without its per-call checks
    # (a fifth of a cpm-tiny GRPO rollout went to those)
    noise = torch.empty_like(probs)
    shared = []
    for j, r in enumerate(rows.tolist()):
        if generators[r] is None:
            shared.append(j)
        else:
            noise[j].exponential_(generator=generators[r])
    if len(shared) == len(noise):
        noise.exponential_()
    elif shared:
        noise[shared] = torch.empty(len(shared), noise.shape[1]).exponential_()
    out[rows] = probs.div_(noise).argmax(-1)
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int = 0):
    """Raw log-probabilities of `tokens` (B,) and, when top > 0, the top (values, ids) per row."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    if top > 0:
        vals, ids = logp.topk(top, dim=-1)
        return chosen, vals, ids
    return chosen, None, None
