"""Causal attention over packed variable-length rows, with an optional shared prefix per row, on the
CPU: `cpu_varlen.c`, built on first use by kernels/cbuild.py. Forward and backward (autograd).

`varlen_attention(q, k, v, cu, n_heads=H, prefix=...)`: q (N, H*D), k, v (N, Hkv*D) hold B rows packed
(row b at tokens cu[b]..cu[b+1]); query i of row b sees its row's keys 0..i and, with
`prefix=(pk, pv, pcu, group)`, first every token of prefix row group[b] (pk, pv (Np, Hkv*D), that
row at pcu[g]..pcu[g+1]). This is what training needs from attention: packed rows without padding
(SFT, DPO, the plain rows of an RL update), and GRPO's responses after their shared prompt
(`transformer.response_logits`), the prompt's K/V read in place rather than copied per response.
The torch reference the tests hold it to is `reference.py`.

`available(head_dim)` says whether the kernel takes a shape: fp32 CPU tensors, the library built
(AVX2 + FMA, a C compiler, `CPMTOOL_CPU_KERNELS` not 0), head_dim a multiple of 16. Callers check it
before choosing the packed layout and otherwise keep SDPA on padded rows.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("cpu_varlen.c")
_lib: list = []  # [library or None], resolved once


def _kernel():
    if not _lib:
        from ..cbuild import load

        lib = load(_SRC)
        if lib is not None and lib.varlen_attention_available():
            p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
            common = [p, i64, p, i64, p, i64, p, i64, p, i64, p, p, p]
            lib.varlen_fwd.argtypes = common + [p, p, i32, i32, i32, i32, f32]
            lib.varlen_bwd.argtypes = common + [p, p, p, p, p, p, p, p, i64, i32, i32, i32, i32, f32]
            lib.varlen_fwd.restype = lib.varlen_bwd.restype = ctypes.c_int
        else:
            lib = None
        _lib.append(lib)
    return _lib[0]


MAX_GROUP = 64  # query heads per KV head (cpu_varlen.c's MAXG)


def available(head_dim: int, *tensors: torch.Tensor, n_heads: int = 1, n_kv: int = 1) -> bool:
    """Whether `varlen_attention` runs on these: fp32 CPU tensors, head_dim % 16 == 0, at most
    MAX_GROUP query heads per KV head, the C library built."""
    if head_dim % 16 or n_heads % n_kv or n_heads // n_kv > MAX_GROUP:
        return False
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return False
    return _kernel() is not None


def _rows(t: torch.Tensor) -> torch.Tensor:
    # the kernel reads token rows with any stride but contiguous features
    return t if t.dim() == 2 and t.stride(1) == 1 else t.reshape(t.shape[0], -1).contiguous()


def _operands(q, k, v, pk, pv, cu, pcu, group) -> list:
    # the arguments varlen_fwd and varlen_bwd share: token rows and strides, then the row offsets
    # (the prefix ones NULL without a prefix)
    pre = pk is not None
    return [q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
            pk.data_ptr() if pre else None, pk.stride(0) if pre else 0, pv.data_ptr() if pre else None,
            pv.stride(0) if pre else 0, cu.data_ptr(), pcu.data_ptr() if pre else None,
            group.data_ptr() if pre else None]


def _check(rc: int, what: str) -> None:
    if rc == 2:
        raise ValueError(f"varlen_attention {what}: heads or head_dim it does not take")
    if rc:
        raise MemoryError(f"varlen_attention {what}: out of memory for a task buffer")


class _Varlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, cu, pcu, group, n_heads, scale):
        q, k, v = _rows(q), _rows(k), _rows(v)
        has_prefix = pk is not None
        if has_prefix:
            pk, pv = _rows(pk), _rows(pv)
        n, hd = q.shape
        hkv_d = k.shape[1]
        d = hd // n_heads
        hkv = hkv_d // d
        out = torch.empty(n, hd)
        lse = torch.empty(n, n_heads)
        rc = _kernel().varlen_fwd(*_operands(q, k, v, pk, pv, cu, pcu, group), out.data_ptr(), lse.data_ptr(),
                                  cu.numel() - 1, n_heads, hkv, d, scale)
        _check(rc, "forward")
        ctx.save_for_backward(q, k, v, pk, pv, cu, pcu, group, out, lse)
        ctx.n_heads, ctx.scale, ctx.has_prefix = n_heads, scale, has_prefix
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, pk, pv, cu, pcu, group, out, lse = ctx.saved_tensors
        has_prefix, h = ctx.has_prefix, ctx.n_heads
        dout = dout.contiguous()
        n, hd = q.shape
        d = hd // h
        hkv = k.shape[1] // d
        b = cu.numel() - 1
        dq, dk, dv = torch.empty_like(q), torch.empty(k.shape), torch.empty(v.shape)
        pmax = 0
        if has_prefix:
            plen = (pcu[1:] - pcu[:-1]).index_select(0, group)  # (B,) each row's prefix length
            pmax = int(plen.max()) if b else 0
        # each row's prefix gradients, (B, Pmax, Hkv*D): summed over a group's rows below
        dpk_rows = torch.zeros(b, pmax, hkv * d) if has_prefix else None
        dpv_rows = torch.zeros(b, pmax, hkv * d) if has_prefix else None
        rc = _kernel().varlen_bwd(*_operands(q, k, v, pk, pv, cu, pcu, group), out.data_ptr(), dout.data_ptr(),
                                  lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                                  dpk_rows.data_ptr() if has_prefix else None,
                                  dpv_rows.data_ptr() if has_prefix else None, pmax, b, h, hkv, d, ctx.scale)
        _check(rc, "backward")
        dpk = dpv = None
        if has_prefix:
            # row b's prefix slot t is prefix token pcu[group[b]] + t
            slot = torch.arange(pmax)[None, :]  # (1, Pmax)
            real = (slot < plen[:, None]).flatten()  # (B * Pmax,)
            dest = (pcu.index_select(0, group)[:, None] + slot).flatten()[real]
            dpk = torch.zeros(pk.shape).index_add_(0, dest, dpk_rows.view(-1, hkv * d)[real])
            dpv = torch.zeros(pv.shape).index_add_(0, dest, dpv_rows.view(-1, hkv * d)[real])
        return dq, dk, dv, dpk, dpv, None, None, None, None, None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, *, n_heads: int,
                     prefix: tuple | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention over packed rows; returns (N, H*D). See the module docstring.

    cu (B+1,) int64 row offsets into the N tokens; prefix (pk, pv, pcu (G+1,), group (B,)) or None;
    scale defaults to head_dim ** -0.5. Gradients flow to q, k, v and the prefix's pk, pv.
    """
    d = q.shape[-1] // n_heads
    cu = cu.to(torch.int64).contiguous()
    pk = pv = pcu = group = None
    if prefix is not None:
        pk, pv, pcu, group = prefix
        pcu, group = pcu.to(torch.int64).contiguous(), group.to(torch.int64).contiguous()
    return _Varlen.apply(q, k, v, pk, pv, cu, pcu, group, n_heads, d**-0.5 if scale is None else scale)
