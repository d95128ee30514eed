"""InfLLM v2 as a model attention: the dense/sparse switch, the KV cache's compressed keys, dispatch.

Registered as "infllmv2" in `cpmtool.model.transformer.ATTENTION` by this package's `__init__`.
A model switches to it with `ModelConfig(attention="infllmv2", sparse_config={...})` (a `sparse_config`
in config.json does it on load).
"""

from __future__ import annotations

import torch

from .config import SparseConfig, num_compressed
from .cpu import compress, infllmv2_cpu


def infllmv2(q, k, v, q_pos, cfg: SparseConfig, *, c1=None, c2=None, q_score=None, k_score=None,
             key_valid=None) -> torch.Tensor:
    """InfLLM v2 attention (always sparse). q (B, Hq, T, D); k, v (B, Hkv, S, D); q_pos (B, T) -> (B, Hq, T, D).

    Key slot s holds position s. Args:
        c1, c2: compressed score keys (B, Hkv, N, D), if already kept (KV cache); else computed here.
        q_score, k_score: the copies used for block scoring (pre-RoPE when `use_nope`); default q, k.
        key_valid: (B, S) bool, False for unwritten cache slots.
    Runs the Triton kernels on CUDA and the batched torch path elsewhere.
    """
    if q.is_cuda and (key_valid is None or bool(key_valid[:, : int(q_pos.max()) + 1].all())):
        try:
            from .triton import infllmv2_triton
        except ImportError:  # no triton: the torch path also runs on CUDA tensors
            infllmv2_triton = None
        if infllmv2_triton is not None:
            return infllmv2_triton(q, k, v, q_pos, cfg, c1=c1, c2=c2, q_score=q_score, k_score=k_score)
    return infllmv2_cpu(q, k, v, q_pos, cfg, c1=c1, c2=c2, q_score=q_score, k_score=k_score, key_valid=key_valid)


def update_compressed(cache, layer: int, keys, positions, cfg: SparseConfig, score_keys=None):
    """Bring one layer's compressed score keys up to date after this call's write; return (c1, c2).

    They live in `cache.extra` as per-layer lists of batch-first tensors, so `KVCache.select_rows`
    carries them along: "infllmv2.c1"/"infllmv2.c2" (B, Hkv, Nmax, D) float32 window means and
    "infllmv2.n1"/"infllmv2.n2" (B,) valid windows per row. A call that writes slots from position p on
    invalidates exactly the windows that reach p and computes the windows complete now: during decode
    at most one new window per `kernel_stride` tokens (CPM.cu's incremental `compress`); after a row is
    reset and refilled, a rebuild of that row's windows.

    keys (B, Hkv, S, D) are the cached keys after the write; positions (B, T) the slots written;
    score_keys(a, b) -> (B, Hkv, b - a, D) the scoring copy of slots [a, b) (pre-RoPE when use_nope).
    """
    ex = cache.extra
    n_layers = len(cache.k)
    if ex.get("infllmv2.cfg") != cfg:  # first use, or new settings: start over
        ex.update({f"infllmv2.{name}": [None] * n_layers for name in ("c1", "c2", "n1", "n2")})
        ex["infllmv2.cfg"], ex["infllmv2.computed"] = cfg, 0
    b, hkv, _, d = keys.shape
    first = positions.min(1).values.cpu()
    length = positions.max(1).values.cpu() + 1
    out = []
    for name, kernel, stride in (("1", cfg.kernel_size, cfg.kernel_stride), ("2", cfg.kernel_size2, cfg.kernel_stride2)):
        bufs, counts = ex["infllmv2.c" + name], ex["infllmv2.n" + name]
        if bufs[layer] is None:
            n_max = num_compressed(cache.max_len, kernel, stride)
            bufs[layer] = torch.zeros(b, hkv, n_max, d, device=keys.device)
            counts[layer] = torch.zeros(b, dtype=torch.long)
        buf, count = bufs[layer], counts[layer]
        # windows that end after the first written slot are stale; the ones complete now are wanted
        keep = torch.minimum(count, torch.clamp((first - kernel) // stride + 1, min=0))
        want = torch.clamp((length - kernel) // stride + 1, min=0)
        j0, j1 = int(keep.min()), int(want.max())
        if j1 > j0:
            lo, hi = j0 * stride, (j1 - 1) * stride + kernel
            buf[:, :, j0:j1] = compress(keys[:, :, lo:hi] if score_keys is None else score_keys(lo, hi), kernel, stride)
            ex["infllmv2.computed"] += j1 - j0
        counts[layer] = want
        out.append(buf[:, :, : int(want.max())])
    return out[0], out[1]


def _sparse_config(config) -> SparseConfig:
    cached = getattr(config, "_infllmv2_cfg", None)
    if cached is None or cached[0] != config.sparse_config:
        cached = (config.sparse_config, SparseConfig.from_dict(config.sparse_config))
        object.__setattr__(config, "_infllmv2_cfg", cached)
    return cached[1]


def _unrotate(x, positions, config):
    """Undo RoPE: x (B, H, T, D) rotated at positions (B, T) -> the pre-RoPE vectors (for use_nope)."""
    from cpmtool.model.transformer import apply_rope, rope_cos_sin, rope_inv_freq

    cos, sin = rope_cos_sin(rope_inv_freq(config).to(x.device), positions, x.dtype)
    return apply_rope(x, cos, -sin)


def infllmv2_attention(q, k, v, *, positions, key_positions_valid=None, causal_no_cache=False, layer=None,
                       cache=None, config=None):
    """The model attention "infllmv2": dense below `dense_len` KV tokens, InfLLM v2 at or above it.

    Signature of `cpmtool.model.transformer.dense_attention`. q (B, H, T, D); k, v (B, Hkv, S, D).
    """
    from cpmtool.model.transformer import dense_attention

    cfg = _sparse_config(config)
    b, _, t, _ = q.shape
    if causal_no_cache:
        positions = torch.arange(t, device=q.device).expand(b, t)  # as dense: slot s is position s
    kv_len = int(positions.max()) + 1
    if not cfg.is_sparse(kv_len):
        return dense_attention(q, k, v, positions=positions, key_positions_valid=key_positions_valid,
                               causal_no_cache=causal_no_cache, layer=layer, cache=cache, config=config)
    q_score = _unrotate(q, positions, config) if cfg.use_nope else None
    if cache is None:
        k_score = None
        if cfg.use_nope:
            k_score = _unrotate(k, torch.arange(k.shape[2], device=k.device).expand(b, -1), config)
        return infllmv2(q, k, v, positions, cfg, q_score=q_score, k_score=k_score)
    score_keys = None
    if cfg.use_nope:
        def score_keys(a, b_):
            pos = torch.arange(a, b_, device=k.device).expand(k.shape[0], -1)
            return _unrotate(k[:, :, a:b_], pos, config)
    c1, c2 = update_compressed(cache, layer, k, positions, cfg, score_keys)
    return infllmv2(q, k, v, positions, cfg, c1=c1, c2=c2, q_score=q_score, key_valid=key_positions_valid)
