"""The naive torch reference of `varlen_attention`: one SDPA call per row on its prefix + own keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def varlen_attention_ref(q, k, v, cu, *, n_heads: int, prefix=None, scale=None) -> torch.Tensor:
    """Same contract as `kernels.varlen_attention.varlen_attention`, row by row (differentiable)."""
    d = q.shape[-1] // n_heads
    hkv = k.shape[-1] // d
    outs = []
    for b in range(cu.numel() - 1):
        lo, hi = int(cu[b]), int(cu[b + 1])
        n = hi - lo
        if n == 0:
            continue
        kk, vv = k[lo:hi], v[lo:hi]  # (n, Hkv*D)
        p = 0
        if prefix is not None:
            pk, pv, pcu, group = prefix
            g = int(group[b])
            a, z = int(pcu[g]), int(pcu[g + 1])
            kk, vv, p = torch.cat([pk[a:z], kk]), torch.cat([pv[a:z], vv]), z - a
        qh = q[lo:hi].view(n, n_heads, d).transpose(0, 1)  # (H, n, D)
        kh = kk.view(p + n, hkv, d).transpose(0, 1)  # (Hkv, P + n, D)
        vh = vv.view(p + n, hkv, d).transpose(0, 1)
        # query i sees slots 0 .. p + i
        mask = torch.arange(p + n)[None, :] <= (p + torch.arange(n))[:, None]  # (n, P + n)
        y = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=n_heads > hkv)
        outs.append(y.transpose(0, 1).reshape(n, n_heads * d))
    return torch.cat(outs) if outs else q.new_zeros(0, q.shape[-1])
