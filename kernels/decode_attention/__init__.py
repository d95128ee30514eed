"""Decode attention against the KV cache on the CPU: `cpu_decode.c`, built on first use by kernels/cbuild.py.

`decode_attention(q, k, v, positions, valid)` is the engine's decode step (one query per row) in
one C call, or None when the kernel does not take the tensors (not CPU fp32, autograd, a query
longer than one token, no compiler, `CPMTOOL_CPU_KERNELS=0`); the caller then runs SDPA with the
slot mask, which is also the reference the tests hold it to.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("cpu_decode.c")
_lib: list = []  # [library or None], resolved once


def _kernel():
    if not _lib:
        from ..cbuild import load

        lib = load(_SRC)
        if lib is not None and lib.decode_attention_available():
            p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            lib.decode_attention.argtypes = [p, i64, i64, p, i64, i64, i64, p, i64, i64, i64, p, p, i64, p,
                                             i32, i32, i32, i32, i32, ctypes.c_float]
            lib.decode_attention.restype = ctypes.c_int
        else:
            lib = None
        _lib.append(lib)
    return _lib[0]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor | None:
    """Attention of q (B, H, 1, D) over k, v (B, Hkv, S, D), row b seeing slot s iff
    s <= positions[b, 0] and valid[b, s]; (B, H, 1, D), or None (run SDPA instead).

    k and v may be views into larger cache buffers (any strides but a contiguous last dim).
    """
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if (t != 1 or q.device.type != "cpu" or any(x.dtype != torch.float32 for x in (q, k, v))
            or (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))
            or k.stride(-1) != 1 or v.stride(-1) != 1 or valid.dtype != torch.bool or valid.shape[1] < s
            or positions.shape != (b, 1)):
        return None
    lib = _kernel()
    if lib is None:
        return None
    q = q.contiguous() if q.stride(-1) != 1 else q
    valid = valid if valid.stride(-1) == 1 else valid.contiguous()
    pos = positions.reshape(b).to(torch.int64).contiguous()
    out = torch.empty(b, h, 1, d)
    rc = lib.decode_attention(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1),
                              k.stride(2), v.data_ptr(), v.stride(0), v.stride(1), v.stride(2), pos.data_ptr(),
                              valid.data_ptr(), valid.stride(0), out.data_ptr(), b, h, hkv, s, d, d**-0.5)
    return out if rc == 0 else None
