"""Attention speed: dense SDPA vs InfLLM v2, prefill and decode, per context length.

One attention layer with random inputs, timed end to end:
- prefill: T queries at positions 0..T-1 over T keys, causal. Dense is
  `F.scaled_dot_product_attention(is_causal=True)`; InfLLM v2 includes the key compression, stage-1
  scoring, top-k selection and the block-sparse attention.
- decode: one query at position T-1 over a T-key cache. Dense is SDPA over all keys; InfLLM v2 uses
  compressed keys kept from the prefill (as the KV cache keeps them), plus the incremental update of
  the newest window, stage 1, top-k, and attention over the selected blocks.
InfLLM v2 is forced sparse at every length (dense_len is ignored here), so short contexts show its
overhead rather than the dense fallback a model would use. On CUDA the sparse side is the Triton
kernels ("infllmv2-triton"); elsewhere the batched CPU path (`kernels/infllmv2/cpu.py`) with its C
kernels ("infllmv2-c", built on first use), or without them ("infllmv2-torch": no C compiler or
AVX2, or CPMTOOL_CPU_KERNELS=0 to measure the torch path alone).

Random Gaussian q/k make every query's top-k nearly independent of its neighbours': a worst case
for the CPU path, which shares key-block gathers between queries that picked the same block.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from cpmtool.errors import ConfigError

DEFAULT_CONTEXTS = "4k,8k,16k,32k,64k"


def parse_contexts(spec: str) -> list[int]:
    """'4k,8k,16384' -> [4096, 8192, 16384] (k = 1024)."""
    out, bad = [], []
    for part in (p.strip().lower() for p in spec.split(",") if p.strip()):
        mult = 1024 if part.endswith("k") else 1
        num = part[:-1] if part.endswith("k") else part
        if not num.isdigit() or int(num) * mult <= 0:
            bad.append(part)
        else:
            out.append(int(num) * mult)
    if bad or not out:
        raise ConfigError(f"bad --context {spec!r}: use comma-separated lengths like 4k,8k,16384")
    return out


def bench_attention(
    contexts: list[int],
    *,
    heads: int = 16,
    kv_heads: int = 2,
    head_dim: int = 64,
    batch: int = 1,
    dtype: str | None = None,
    device: str = "auto",
    sparse_config: dict | None = None,
    repeats: int = 1,
    decode_steps: int = 10,
    threads: int | None = None,
    seed: int = 0,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Time dense SDPA and InfLLM v2 attention at each context length; one row per (context, phase).

    Args:
        contexts: key lengths (tokens).
        heads, kv_heads, head_dim, batch: the layer's shape (default: 16 query / 2 KV heads of 64,
            MiniCPM4-0.5B-like, G = 8 query heads per KV head).
        dtype: "float32" (default on CPU) or "bfloat16" (default on CUDA); "float16".
        device: "auto" (CUDA when available), "cpu" or "cuda".
        sparse_config: MiniCPM4 `sparse_config` keys (defaults: the model card's).
        repeats: prefill timings per length (the median is reported).
        decode_steps: decode timings per length (median).
        threads: torch CPU threads for the run (default: torch's).
        on_row: called with each row as soon as it is measured.

    Returns rows {op, phase, context, dense_ms, sparse_ms, speedup, dense, sparse, device, dtype,
    batch, heads, kv_heads, head_dim, threads, sparse_config}; speedup = dense_ms / sparse_ms.
    """
    import torch

    from cpmtool.kernels.infllmv2 import SparseConfig

    problems = []
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        problems.append(f"heads={heads} must be a positive multiple of kv_heads={kv_heads}")
    if repeats < 1 or decode_steps < 1:
        problems.append("repeats and decode_steps must be >= 1")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        problems.append(f"device {device!r} is not available (cpu{', cuda' if torch.cuda.is_available() else ''})")
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"dtype {dtype!r} (valid: float32, bfloat16, float16)")
    if problems:
        raise ConfigError(problems)
    cfg = SparseConfig.from_dict({**(sparse_config or {}), "dense_len": -1})
    tdtype = getattr(torch, dtype)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn, n: int) -> float:
        times = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    if device == "cuda":
        sparse_name = "infllmv2-triton"
    else:  # the C kernels (cpu_fused.c) when they build here, else the torch path alone
        from cpmtool.kernels.infllmv2.cpu import _fused_kernels

        sparse_name = "infllmv2-torch" if _fused_kernels() is None else "infllmv2-c"
    base = dict(op="attention", dense="sdpa", sparse=sparse_name, device=device, dtype=dtype, batch=batch,
                heads=heads, kv_heads=kv_heads, head_dim=head_dim, threads=torch.get_num_threads(),
                sparse_config=cfg.to_dict())
    rows = []
    gen = torch.Generator().manual_seed(seed)
    try:
        for t in contexts:
            for row in _measure(t, batch, heads, kv_heads, head_dim, tdtype, device, cfg, gen, timed, repeats,
                                decode_steps):
                rows.append({**base, **row})
                if on_row:
                    on_row(rows[-1])
    finally:
        torch.set_num_threads(old_threads)
    return rows


def _measure(t, batch, heads, kv_heads, head_dim, dtype, device, cfg, gen, timed, repeats, decode_steps):
    import torch
    import torch.nn.functional as F

    from cpmtool.kernels.infllmv2.attention import infllmv2
    from cpmtool.kernels.infllmv2.cpu import compress

    q = torch.randn(batch, heads, t, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, kv_heads, t, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, kv_heads, t, head_dim, generator=gen).to(device, dtype)
    pos = torch.arange(t, device=device).expand(batch, t)
    gqa = heads != kv_heads
    with torch.no_grad():
        def dense_prefill():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        def sparse_prefill():
            infllmv2(q, k, v, pos, cfg)

        if device == "cuda":  # compile the kernels and warm the allocator first
            dense_prefill(), sparse_prefill()
        d_ms, s_ms = timed(dense_prefill, repeats), timed(sparse_prefill, repeats)
        yield {"phase": "prefill", "context": t, "dense_ms": d_ms, "sparse_ms": s_ms, "speedup": d_ms / s_ms}

        c1 = compress(k, cfg.kernel_size, cfg.kernel_stride)  # kept by the KV cache since the prefill
        c2 = compress(k, cfg.kernel_size2, cfg.kernel_stride2)
        q1, last = q[:, :, -1:].contiguous(), pos[:, -1:]
        # the most a decode step recompresses: one new window of each size (the KV cache's update)
        tail1, tail2 = k[:, :, t - cfg.kernel_size:], k[:, :, t - cfg.kernel_size2:]

        def dense_decode():
            F.scaled_dot_product_attention(q1, k, v, enable_gqa=gqa)

        def sparse_decode():
            compress(tail1, cfg.kernel_size, cfg.kernel_stride)
            compress(tail2, cfg.kernel_size2, cfg.kernel_stride2)
            infllmv2(q1, k, v, last, cfg, c1=c1, c2=c2)

        dense_decode(), sparse_decode()
        d_ms, s_ms = timed(dense_decode, decode_steps), timed(sparse_decode, decode_steps)
        yield {"phase": "decode", "context": t, "dense_ms": d_ms, "sparse_ms": s_ms, "speedup": d_ms / s_ms}
