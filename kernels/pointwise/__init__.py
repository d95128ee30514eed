"""Pointwise ops of the transformer in C for fp32 on the CPU: `cpu_pointwise.c`, built on first use
by kernels/cbuild.py. Each mirrors a piece of the torch path in cpmtool.model.transformer, which is
also the reference the tests hold it to.

The decode step (`Transformer._decode_step`: one token per row, with a cache, no autograd):
- `add_rmsnorm(x, a, rs, weight, eps)`: x += a * rs in place (a may be None), returns RMSNorm(x);
- `rope_write(q, k, v, cos, signed_sin, cache_k, cache_v, positions)`: rotary on q and k
  (`transformer.rotate`), k and v stored at each row's slot, the rotated q (B, H, 1, D) returned;
- `silu_mul(gate, up)`: silu(gate) * up.

Training and prefill, autograd Functions with a one-pass backward each, split over the OpenMP
threads (torch's thread count) on large inputs:
- `rms_norm(x, weight, eps)`, `rope(x, cos, signed_sin)`, `swiglu(gate, up)`.

`kernel()` is None when the library cannot be used (no compiler, no AVX2/FMA,
`CPMTOOL_CPU_KERNELS=0`); the callers (`transformer._c_kernels`) then keep the torch path, as they
do for anything but fp32 CPU tensors.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("cpu_pointwise.c")
_lib: list = []  # [library or None], resolved once
_PAR_MIN = 1 << 16  # cpu_pointwise.c's PAR_MIN: the training passes' threading bound


def kernel():
    if not _lib:
        from ..cbuild import load

        lib = load(_SRC)
        if lib is not None and lib.pointwise_available():
            p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
            lib.add_rmsnorm.argtypes = [p, i64, p, i64, f32, p, f32, p, i64, i32, i32]
            lib.add_rmsnorm.restype = None
            lib.rope_write.argtypes = [p, i64, p, i64, p, i64, p, p, p, p, i64, i64, i64, i32, p, p, i32, i32, i32,
                                       i32]
            lib.rope_write.restype = ctypes.c_int
            lib.silu_mul.argtypes = [p, i64, p, i64, p, i32, i32]
            lib.silu_mul.restype = None
            lib.rmsnorm_fwd.argtypes = [p, p, f32, p, p, i64, i32]
            lib.rmsnorm_bwd.argtypes = [p, p, p, p, p, p, p, i64, i32, i32]
            lib.rope_fwd.argtypes = [p, p, p, p, i64, i32, i32, i32]
            lib.swiglu_fwd.argtypes = [p, p, p, i64]
            lib.swiglu_bwd.argtypes = [p, p, p, p, p, i64]
            for f in (lib.rmsnorm_fwd, lib.rmsnorm_bwd, lib.rope_fwd, lib.swiglu_fwd, lib.swiglu_bwd):
                f.restype = None
        else:
            lib = None
        _lib.append(lib)
    return _lib[0]


def _rows(*ts: torch.Tensor) -> None:
    # every operand: 2-D fp32 CPU rows with contiguous features (any row stride). On every decode
    # step's ~17 calls: `is_cpu` and `is` rather than `device.type` and `!=`, half the cost
    for t in ts:
        if t.dtype is not torch.float32 or not t.is_cpu or t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"pointwise kernels take 2-D fp32 CPU rows with a unit last stride, got "
                             f"{tuple(t.shape)} {t.dtype} strides {t.stride()}")


def add_rmsnorm(x: torch.Tensor, a: torch.Tensor | None, rs: float, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (B, N) += a * rs in place (skipped when a is None); returns weight * x * rsqrt(mean(x^2) + eps), (B, N)."""
    _rows(x, *([] if a is None else [a]))
    b, n = x.shape
    h = torch.empty(b, n)
    w = weight.detach().contiguous()
    kernel().add_rmsnorm(x.data_ptr(), x.stride(0), None if a is None else a.data_ptr(), 0 if a is None else a.stride(0),
                         rs, w.data_ptr(), eps, h.data_ptr(), n, b, n)
    return h


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
               cache_k: torch.Tensor, cache_v: torch.Tensor, positions: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q (B, H*D), k, v (B, Hkv*D): one token per row. Rotates q and k (cos, signed_sin (B, D), as
    `transformer.rope_tables` builds them), writes k and v into the cache buffers (B, Hkv, S, D) at
    slot positions[b] of row b, and returns the rotated q, (B, H, 1, D)."""
    _rows(q, k, v)
    b, hkv, s, d = cache_k.shape
    if cache_v.stride() != cache_k.stride() or cache_k.stride(-1) != 1:
        raise ValueError("rope_write: the K and V cache buffers need the same strides and contiguous rows")
    cos, signed_sin = cos.reshape(b, d).contiguous(), signed_sin.reshape(b, d).contiguous()
    pos = positions.reshape(b).to(torch.int64).contiguous()
    out = torch.empty(b, n_heads, 1, d)
    st = cache_k.stride()
    rc = kernel().rope_write(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
                             cos.data_ptr(), signed_sin.data_ptr(), cache_k.data_ptr(), cache_v.data_ptr(), st[0], st[1],
                             st[2], s, pos.data_ptr(), out.data_ptr(), b, n_heads, hkv, d)
    if rc:
        raise ValueError(f"rope_write: a position outside the cache's {s} slots")
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, (B, I)."""
    _rows(gate, up)
    b, i = gate.shape
    out = torch.empty(b, i)
    kernel().silu_mul(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), out.data_ptr(), b, i)
    return out


# ---------------------------------------------------------------- training (autograd)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()  # (R, N)
        w = weight.detach().contiguous()
        y, r = torch.empty_like(x2), torch.empty(x2.shape[0])
        kernel().rmsnorm_fwd(x2.data_ptr(), w.data_ptr(), eps, y.data_ptr(), r.data_ptr(), x2.shape[0], n)
        ctx.save_for_backward(x2, w, r)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, gy):
        x2, w, r = ctx.saved_tensors
        n = x2.shape[1]
        gy = gy.reshape(-1, n).contiguous()
        dx, dw = torch.empty_like(x2), torch.empty(n)
        # one float64 partial sum of dw per thread (under PAR_MIN elements: one); see rmsnorm_bwd
        t = torch.get_num_threads() if x2.numel() >= _PAR_MIN else 1
        acc = torch.empty(t, n, dtype=torch.float64)
        kernel().rmsnorm_bwd(x2.data_ptr(), w.data_ptr(), r.data_ptr(), gy.data_ptr(), dx.data_ptr(), dw.data_ptr(),
                             acc.data_ptr(), x2.shape[0], n, t)
        return dx.view(ctx.shape), dw, None


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, ssin):
        b, t, h, d = x.shape
        x = x.contiguous()
        c, s = (z.expand(b, 1, t, d).reshape(b * t, d).contiguous() for z in (cos, ssin))  # (B*T, D)
        y = torch.empty_like(x)
        kernel().rope_fwd(x.data_ptr(), c.data_ptr(), s.data_ptr(), y.data_ptr(), b * t, h, d, 0)
        ctx.save_for_backward(c, s)
        return y

    @staticmethod
    def backward(ctx, gy):
        c, s = ctx.saved_tensors
        b, t, h, d = gy.shape
        gy = gy.contiguous()
        dx = torch.empty_like(gy)
        kernel().rope_fwd(gy.data_ptr(), c.data_ptr(), s.data_ptr(), dx.data_ptr(), b * t, h, d, 1)
        return dx, None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        h = torch.empty_like(g)
        kernel().swiglu_fwd(g.data_ptr(), u.data_ptr(), h.data_ptr(), g.numel())
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        kernel().swiglu_bwd(g.data_ptr(), u.data_ptr(), dh.data_ptr(), dg.data_ptr(), du.data_ptr(), g.numel())
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, any shape (the two the same), with a one-pass backward. It saves gate and up
    only: autograd's silu and mul also keep silu(gate)."""
    return _SwiGLU.apply(gate, up)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)) over the last dim of x (..., N), with gradients for
    x and weight (the backward in one pass; weight's is summed in float64 over the rows)."""
    return _RMSNorm.apply(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`transformer.rotate` on x (B, T, H, D), tokens-major (before the head transpose), with the
    tables of `transformer.rope_tables` (B, 1, T, D); the gradient is the transposed rotation."""
    return _Rope.apply(x, cos, signed_sin)
