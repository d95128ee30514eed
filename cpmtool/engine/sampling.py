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
           min_p: torch.Tensor, generators: list[torch.Generator | None],
           uniforms: list[float | None] | None = None) -> torch.Tensor:
    """Next tokens (B,) long. Each row draws from its own generator, so a seeded request gives the
    same tokens whatever else shares its batch (`categorical`). `uniforms`: a row's draw when the
    caller already took it from the row's generator (None entries still draw)."""
    greedy = temperature <= 0
    if not bool(greedy.any()):  # all rows sample (a rollout): no argmax, no row selection
        x = filter_logits(logits, temperature, top_k, top_p, min_p)
        return categorical(x.softmax(-1), generators, uniforms)
    out = logits.argmax(-1)
    if bool(greedy.all()):
        return out
    rows = (~greedy).nonzero().flatten().tolist()
    x = filter_logits(logits[rows], temperature[rows], top_k[rows], top_p[rows], min_p[rows])
    out[rows] = categorical(x.softmax(-1), [generators[r] for r in rows],
                            None if uniforms is None else [uniforms[r] for r in rows])
    return out


def categorical(probs: torch.Tensor, generators: list[torch.Generator | None],
                uniforms: list[float | None] | None = None) -> torch.Tensor:
    """One token per row of `probs` (R, V) (rows need not sum to 1), each row drawn with one
    uniform from its own generator (None: the global one), by inverse transform sampling.
    `uniforms[r]`, when given and not None, is row r's uniform, already drawn from its generator.

    The race torch.multinomial runs (argmax of p / q, q ~ Exp(1)) draws V exponentials per row,
    serially: 1.2 ms a row at V = 49152, a tenth of a smollm2-135m rollout and more than the
    model's whole decode step on a GPU. Here the per-row cost is one random number, and the
    search runs batched. Token i is drawn with probability p_i / sum(p) up to float64 rounding
    of the cumulative sum; a token of probability 0 is never drawn. The tokens are not those of
    torch.multinomial (another algorithm), but a seed still gives the same tokens whatever else
    shares the batch, as vLLM's per-request generators do.
    """
    cdf = probs.double().cumsum(-1)  # (R, V)
    if uniforms is not None and None not in uniforms:  # every row's draw taken already
        u = torch.tensor(uniforms, dtype=torch.float64)[:, None]  # (R, 1)
        return inverse_cdf(cdf, u.to(cdf.device))
    given = uniforms or [None] * len(generators)
    # rows without a generator share one batched draw from the global one
    shared = iter(torch.rand(sum(g is None and x is None for g, x in zip(generators, given, strict=True)),
                             dtype=torch.float64).tolist())
    u = torch.tensor([x if x is not None else next(shared) if g is None
                      else torch.rand(1, dtype=torch.float64, generator=g).item()
                      for g, x in zip(generators, given, strict=True)], dtype=torch.float64)[:, None]  # (R, 1)
    return inverse_cdf(cdf, u.to(cdf.device))  # the uniforms come from CPU generators


def inverse_cdf(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first index i with cdf[i] > u * cdf[-1], per row: cdf (R, V) non-decreasing, u (R, 1) in
    [0, 1). A zero-probability token (cdf[i] == cdf[i - 1], or cdf[0] == 0) can never be first."""
    total = cdf[:, -1:]
    # u * total may round up to total itself; stay strictly below it so the last nonzero token wins
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int = 0):
    """Raw log-probabilities of `tokens` (B,) and, when top > 0, the top (values, ids) per row."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    if top > 0:
        vals, ids = logp.topk(top, dim=-1)
        return chosen, vals, ids
    return chosen, None, None
