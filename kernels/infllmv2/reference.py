"""InfLLM v2 in plain torch, one sequence, float32, deliberately naive: the spec the kernels are tested against.

Semantics follow the HF remote code / infllmv2_cuda_impl (training-consistent) path, see
`../shared/reference/inference-kernels.md` §1.3-1.6. Query i (absolute position q_pos[i]) sees key i' <= q_pos[i].
Ties in the top-k go to the lower block index (the official CUDA top-k leaves them unspecified).
Departure: a query that sees no coarse (c2) key yet scores every block 0 instead of +inf/NaN; such a
query lies in the first 4*kernel_size tokens, where the sink and local blocks already cover every key.
"""

import torch

from .config import SparseConfig, num_compressed


def compress(k, kernel: int, stride: int):
    """Mean-pool keys (H, L, D) over windows [j*stride, j*stride+kernel) -> (H, N, D)."""
    n = num_compressed(k.shape[1], kernel, stride)
    if n == 0:
        return k.new_zeros(k.shape[0], 0, k.shape[2], dtype=torch.float32)
    return torch.stack([k[:, j * stride: j * stride + kernel].float().mean(1) for j in range(n)], 1)


def block_scores(q, c1, c2, q_pos, cfg: SparseConfig):
    """Stage 1: exp(q.c1 - lse(q.c2)) summed over each GQA group, max-pooled to blocks -> (Hkv, T, n_blocks)."""
    hkv, (hq, t, d) = c1.shape[0], q.shape
    qg = q.float().reshape(hkv, hq // hkv, t, d)  # (Hkv, G, T, D)

    def logits(c, kernel, stride):  # compressed key j is visible once its whole window is in the past
        seen = torch.arange(c.shape[1], device=c.device) * stride + kernel <= q_pos[:, None] + 1  # (T, N)
        return (qg @ c.float()[:, None].transpose(-1, -2) / d**0.5).masked_fill(~seen, float("-inf"))

    lse2 = torch.logsumexp(logits(c2, cfg.kernel_size2, cfg.kernel_stride2), -1, keepdim=True)
    p = torch.exp(logits(c1, cfg.kernel_size, cfg.kernel_stride) - lse2).nan_to_num(0.0)
    p = torch.where(torch.isfinite(lse2), p, 0.0).sum(1)  # (Hkv, T, N1)
    n_blocks = -(-int(q_pos.max() + 1) // cfg.block_size)
    # block b takes the max over the compressed windows that overlap it
    j = torch.arange(c1.shape[1], device=c1.device)[:, None] * cfg.kernel_stride
    b = torch.arange(n_blocks, device=c1.device)[None] * cfg.block_size
    overlap = (j < b + cfg.block_size) & (j + cfg.kernel_size > b)  # (N1, n_blocks)
    return torch.where(overlap, p[..., None], 0.0).amax(-2) if p.shape[-1] else p.new_zeros(hkv, t, n_blocks)


def select_blocks(scores, q_pos, cfg: SparseConfig):
    """Top-k blocks per (kv head, query) with sink and local blocks forced -> (Hkv, T, K) sorted, -1 = unused."""
    qb = (q_pos // cfg.block_size)[:, None]  # (T, 1)
    b = torch.arange(scores.shape[-1], device=scores.device)[None]
    forced = (b < cfg.init_blocks) | ((b >= qb - cfg.local_blocks) & (b <= qb))
    s = torch.where(forced, float("inf"), scores).masked_fill(b > qb, float("-inf"))
    # ties (frequent: neighbouring blocks share the max-pooled window on their border) go to the lower block
    idx = s.sort(dim=-1, descending=True, stable=True).indices[..., : cfg.topk_eff]
    return torch.where(idx > qb, -1, idx).sort(-1).values


def sparse_attention(q, k, v, idx, q_pos, block_size: int):
    """Stage 2: causal attention restricted to the selected blocks. q (Hq, T, D); k, v (Hkv, S, D)."""
    hkv, s = k.shape[:2]
    g = q.shape[0] // hkv
    sel = (idx[..., None] == torch.arange(-(-s // block_size), device=idx.device)).any(-2)  # (Hkv, T, n_blocks)
    keys = torch.arange(s, device=idx.device)
    mask = sel[..., keys // block_size] & (keys <= q_pos[:, None])  # (Hkv, T, S)
    att = (q.float() @ k.float().repeat_interleave(g, 0).transpose(-1, -2)) / q.shape[-1] ** 0.5
    att = att.masked_fill(~mask.repeat_interleave(g, 0), float("-inf")).softmax(-1)
    return (att @ v.float().repeat_interleave(g, 0)).to(q.dtype)


def infllmv2_attention(q, k, v, q_pos, cfg: SparseConfig, q_score=None, k_score=None):
    """Whole op. q (Hq, T, D); k, v (Hkv, S, D); q_pos (T,). q_score/k_score: pre-RoPE copies when use_nope."""
    qs, ks = (q if q_score is None else q_score), (k if k_score is None else k_score)
    c1 = compress(ks, cfg.kernel_size, cfg.kernel_stride)
    c2 = compress(ks, cfg.kernel_size2, cfg.kernel_stride2)
    idx = select_blocks(block_scores(qs, c1, c2, q_pos, cfg), q_pos, cfg)
    return sparse_attention(q, k, v, idx, q_pos, cfg.block_size)
