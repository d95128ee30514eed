"""Ternary matmul Triton kernel: unpack 2-bit codes tile by tile, scale, `tl.dot` (W2A8 by fake quant).

A program computes a (BLOCK_M, BLOCK_N) tile of y = x @ W.T: it walks K in BLOCK_K steps, loads the
bytes holding its (BLOCK_K, BLOCK_N) weight tile (8x fewer weight bytes than bf16), extracts the
codes with one shift-and-mask, scales them by their group's scale and accumulates in float32. The
activations are absmax-quantised on the host (`reference.act_quant`, one pass over x), so the dot
runs on float tiles: the "unpack to float tiles" prefill design of §3.5; an int8 `tl.dot` decode
kernel (sm80+) is not written. Forward only: QAT trains through the fake-quant torch path.

Triton is imported when this module is; `cpmtool.kernels.ternary_matmul` imports it only on CUDA or in tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import act_quant


def calculate_settings(m: int, n: int, k: int, groups: int) -> dict:
    """Tile sizes; raises RuntimeError naming the limit a shape breaks."""
    if k < 1 or n < 1:
        raise RuntimeError(f"ternary matmul needs in_features >= 1 and out_features >= 1, got K={k}, N={n}.")
    if k % groups:
        raise RuntimeError(f"ternary matmul needs in_features divisible by the scale groups, got K={k}, {groups} groups.")
    return {
        "BLOCK_M": 16 if m <= 16 else 64,  # tl.dot wants >= 16 rows; decode pads to 16
        "BLOCK_N": 64,
        "BLOCK_K": 64,
    }


@triton.jit
def _ternary_matmul_fwd_kernel(X, P, S, B, Y, M, N, K, GS, sx_m, sp_n, ss_n, ss_g, sy_m,
                               HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, nm = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        km = rk < K
        x = tl.load(X + rm[:, None] * sx_m + rk[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        wm = km[:, None] & nm[None, :]
        byte = tl.load(P + rn[None, :] * sp_n + (rk // 4)[:, None], mask=wm, other=0).to(tl.int32)  # (BK, BN)
        w = ((byte >> ((rk % 4) * 2)[:, None]) & 3).to(tl.float32) - 1.0
        s = tl.load(S + rn[None, :] * ss_n + (rk // GS)[:, None] * ss_g, mask=wm, other=0.0)
        w = w * s  # masked-out entries: scale 0, so padding codes add nothing
        if IEEE:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x.to(tl.float32), w)
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=nm, other=0.0)[None, :]
    tl.store(Y + rm[:, None] * sy_m + rn[None, :], acc.to(Y.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def ternary_matmul_fwd(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int,
                       act_bits: int = 8, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (..., N) in x's dtype; x (..., K), packed (N, ceil(K/4)) uint8, scale (N, G) or (1, 1)."""
    lead, k = x.shape[:-1], in_features
    x2 = act_quant(x.reshape(-1, k).float(), act_bits).to(x.dtype).contiguous()  # (M, K)
    m, n, groups = x2.shape[0], packed.shape[0], scale.shape[-1]
    st = calculate_settings(m, n, k, groups)
    scale, packed = scale.float().contiguous(), packed.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, st["BLOCK_M"]), triton.cdiv(n, st["BLOCK_N"]))
    _ternary_matmul_fwd_kernel[grid](
        x2, packed, scale, bias if bias is not None else scale, y, m, n, k, k // groups,
        x2.stride(0), packed.stride(0), scale.stride(0) if scale.shape[0] > 1 else 0, scale.stride(-1), y.stride(0),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, **st)
    return y.view(*lead, n)
