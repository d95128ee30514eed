"""InfLLM v2 Triton kernels: stage 1 (compressed-key block scoring) and stage 2 (block-sparse attention,
forward and backward), with the host functions that launch them.

Layout: rows are N = B * Hkv groups; a program handles one (query token, group) and puts the group's
G query heads in the M tile (the official kernels pack the 16 heads of a token the same way), so the
head reduction of stage 1 and the shared block list of stage 2 stay inside the program.
Stage 2 walks the token's sorted top-k list (-1 = unused) instead of a bitmask (design note 1.9.4 of
`../shared/reference/inference-kernels.md`); the backward adds dK/dV with atomics instead of
transposing the mask. Pooling and top-k between the stages are torch (`cpu.pool_blocks`,
`cpu.select_blocks`): `torch.topk` over <= 4096 blocks is cheap on a GPU.

Triton is imported when this module is; `cpmtool.kernels.infllmv2` imports it only on CUDA or in tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import SparseConfig, num_compressed
from .cpu import compress, pool_blocks, select_blocks

MAX_HEAD_DIM = 256


def calculate_settings(group: int, head_dim: int, block_size: int) -> dict:
    """Tile sizes for one (token, group) program; raises RuntimeError naming the limit it breaks."""
    if head_dim > MAX_HEAD_DIM:
        raise RuntimeError(f"InfLLM v2 Triton kernels support head_dim <= {MAX_HEAD_DIM}, got {head_dim}.")
    if block_size < 16 or block_size & (block_size - 1):
        raise RuntimeError(f"InfLLM v2 Triton kernels need a power-of-two block_size >= 16, got {block_size}.")
    return {
        "BLOCK_G": max(16, triton.next_power_of_2(group)),  # tl.dot wants >= 16 rows
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "BLOCK_C": 64,  # compressed keys per stage-1 step
    }


@triton.jit
def _stage1_kernel(Q, C1, C2, POS, OUT, n1_max, n2_max, G, D, scale,
                   sq_n, sq_g, sq_t, sc1_n, sc1_j, sc2_n, sc2_j, sp_n, so_n, so_t,
                   KS1: tl.constexpr, ST1: tl.constexpr, KS2: tl.constexpr, ST2: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr):
    t, n = tl.program_id(0), tl.program_id(1)
    gi, di = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    gm, dm = gi < G, di < D
    q = tl.load(Q + n * sq_n + gi[:, None] * sq_g + t * sq_t + di[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    q = (q.to(tl.float32) * scale)
    pos = tl.load(POS + n * sp_n + t)
    # compressed key j is visible once its whole window is in the past: j*stride + kernel <= pos + 1
    # (integer division truncates toward zero here, so a negative numerator is handled apart)
    n2 = tl.minimum(tl.where(pos + 1 >= KS2, (pos + 1 - KS2) // ST2 + 1, 0), n2_max)
    n1 = tl.minimum(tl.where(pos + 1 >= KS1, (pos + 1 - KS1) // ST1 + 1, 0), n1_max)
    ci = tl.arange(0, BLOCK_C)
    # pass 1: log-sum-exp of each head over the coarse keys (online max / sum)
    m = tl.full([BLOCK_G], -1.0e30, tl.float32)
    s_sum = tl.zeros([BLOCK_G], tl.float32)
    for j0 in range(0, n2, BLOCK_C):
        jm = (j0 + ci) < n2
        c = tl.load(C2 + n * sc2_n + (j0 + ci)[:, None] * sc2_j + di[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(c.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(c.to(tl.float32)))
        s = tl.where(jm[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        s_sum = s_sum * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m = m_new
    # no coarse key visible yet: every score is 0 (see reference.py)
    lse = tl.where(s_sum > 0, m + tl.log(tl.maximum(s_sum, 1e-30)), float("inf"))
    # pass 2: exp(q.c1 - lse2), summed over the group's heads
    for j0 in range(0, n1, BLOCK_C):  # OUT is zeroed: the keys this query cannot see stay 0
        jm = (j0 + ci) < n1
        c = tl.load(C1 + n * sc1_n + (j0 + ci)[:, None] * sc1_j + di[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(c.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(c.to(tl.float32)))
        p = tl.where(jm[None, :] & gm[:, None], tl.exp(s - lse[:, None]), 0.0)
        tl.store(OUT + n * so_n + t * so_t + j0 + ci, tl.sum(p, 0), mask=jm)


@triton.jit
def _infllmv2_fwd_kernel(Q, K, V, IDX, POS, OUT, LSE, n_sel, G, D, S, scale,
                         sq_n, sq_g, sq_t, sk_n, sk_s, si_n, si_t, sp_n, so_n, so_g, so_t, sl_n, sl_g,
                         BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    t, n = tl.program_id(0), tl.program_id(1)
    gi, di, ki = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_N)
    gm, dm = gi < G, di < D
    q = tl.load(Q + n * sq_n + gi[:, None] * sq_g + t * sq_t + di[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    pos = tl.load(POS + n * sp_n + t)
    m = tl.full([BLOCK_G], -1.0e30, tl.float32)  # finite, so an empty first block gives exp(-inf) = 0, not NaN
    den = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for i in range(0, n_sel):
        blk = tl.load(IDX + n * si_n + t * si_t + i)
        kpos = tl.where(blk >= 0, blk * BLOCK_N + ki, S)  # an unused entry (-1) points past the keys
        km = (kpos <= pos) & (kpos < S)
        k = tl.load(K + n * sk_n + kpos[:, None] * sk_s + di[None, :], mask=km[:, None] & dm[None, :], other=0.0)
        v = tl.load(V + n * sk_n + kpos[:, None] * sk_s + di[None, :], mask=km[:, None] & dm[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(km[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        den = den * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    o = acc / den[:, None]
    tl.store(OUT + n * so_n + gi[:, None] * so_g + t * so_t + di[None, :], o.to(OUT.dtype.element_ty),
             mask=gm[:, None] & dm[None, :])
    tl.store(LSE + n * sl_n + gi * sl_g + t, m + tl.log(tl.maximum(den, 1e-30)), mask=gm)


@triton.jit
def _infllmv2_bwd_kernel(Q, K, V, IDX, POS, DO, LSE, DELTA, DQ, DK, DV, n_sel, G, D, S, scale,
                         sq_n, sq_g, sq_t, sk_n, sk_s, si_n, si_t, sp_n, sl_n, sl_g,
                         BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    # q, do, dq share q's strides; k, v, dk, dv share k's; lse, delta share (N, G, T) strides
    t, n = tl.program_id(0), tl.program_id(1)
    gi, di, ki = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_N)
    gm, dm = gi < G, di < D
    qoff = n * sq_n + gi[:, None] * sq_g + t * sq_t + di[None, :]
    qmask = gm[:, None] & dm[None, :]
    q = tl.load(Q + qoff, mask=qmask, other=0.0)
    do = tl.load(DO + qoff, mask=qmask, other=0.0)
    lse = tl.load(LSE + n * sl_n + gi * sl_g + t, mask=gm, other=0.0)
    delta = tl.load(DELTA + n * sl_n + gi * sl_g + t, mask=gm, other=0.0)
    pos = tl.load(POS + n * sp_n + t)
    dq = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for i in range(0, n_sel):
        blk = tl.load(IDX + n * si_n + t * si_t + i)
        kpos = tl.where(blk >= 0, blk * BLOCK_N + ki, S)  # an unused entry (-1) points past the keys
        km = (kpos <= pos) & (kpos < S)
        koff = n * sk_n + kpos[:, None] * sk_s + di[None, :]
        kmask = km[:, None] & dm[None, :]
        k = tl.load(K + koff, mask=kmask, other=0.0)
        v = tl.load(V + koff, mask=kmask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k)) * scale
            dp = tl.dot(do, tl.trans(v))
        p = tl.where(km[None, :] & gm[:, None], tl.exp(s - lse[:, None]), 0.0)  # (G, N)
        ds = p * (dp - delta[:, None]) * scale
        if IEEE:
            dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
            dk = tl.dot(tl.trans(ds), q.to(tl.float32), input_precision="ieee")
            dv = tl.dot(tl.trans(p), do.to(tl.float32), input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
            dk = tl.dot(tl.trans(ds).to(q.dtype), q)
            dv = tl.dot(tl.trans(p).to(do.dtype), do)
        tl.atomic_add(DK + koff, dk, mask=kmask)
        tl.atomic_add(DV + koff, dv, mask=kmask)
    tl.store(DQ + qoff, dq.to(DQ.dtype.element_ty), mask=qmask)


def stage1_scores(q, c1, c2, q_pos, cfg: SparseConfig) -> torch.Tensor:
    """exp(q.c1 - lse(q.c2)) summed per group. q (N, G, T, D); c1 (N, N1, D); c2 (N, N2, D) -> (N, T, N1) fp32."""
    n, g, t, d = q.shape
    q, c1, c2 = q.contiguous(), c1.contiguous(), c2.contiguous()
    q_pos = q_pos.to(torch.int32).contiguous()
    out = torch.zeros(n, t, c1.shape[1], device=q.device, dtype=torch.float32)
    if c1.shape[1] == 0 or t == 0:
        return out
    st = calculate_settings(g, d, cfg.block_size)
    _stage1_kernel[(t, n)](q, c1, c2, q_pos, out, c1.shape[1], c2.shape[1], g, d, d**-0.5,
                           q.stride(0), q.stride(1), q.stride(2), c1.stride(0), c1.stride(1), c2.stride(0), c2.stride(1),
                           q_pos.stride(0), out.stride(0), out.stride(1),
                           KS1=cfg.kernel_size, ST1=cfg.kernel_stride, KS2=cfg.kernel_size2, ST2=cfg.kernel_stride2,
                           IEEE=q.dtype == torch.float32, **st)
    return out


def infllmv2_fwd(q, k, v, idx, q_pos, block_size: int):
    """Stage 2 forward. q (N, G, T, D); k, v (N, S, D); idx (N, T, K) int, -1 = unused -> o (N,G,T,D), lse (N,G,T)."""
    n, g, t, d = q.shape
    st = calculate_settings(g, d, block_size)
    o = torch.empty_like(q)
    lse = torch.empty(n, g, t, device=q.device, dtype=torch.float32)
    _infllmv2_fwd_kernel[(t, n)](q, k, v, idx, q_pos, o, lse, idx.shape[-1], g, d, k.shape[1], d**-0.5,
                                 q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                                 idx.stride(0), idx.stride(1), q_pos.stride(0),
                                 o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                                 BLOCK_G=st["BLOCK_G"], BLOCK_D=st["BLOCK_D"], BLOCK_N=block_size,
                                 IEEE=q.dtype == torch.float32)
    return o, lse


def infllmv2_bwd(do, q, k, v, o, lse, idx, q_pos, block_size: int):
    n, g, t, d = q.shape
    st = calculate_settings(g, d, block_size)
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1).contiguous()  # (N, G, T)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    _infllmv2_bwd_kernel[(t, n)](q, k, v, idx, q_pos, do, lse, delta, dq, dk, dv, idx.shape[-1], g, d, k.shape[1],
                                 d**-0.5, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                                 idx.stride(0), idx.stride(1), q_pos.stride(0), lse.stride(0), lse.stride(1),
                                 BLOCK_G=st["BLOCK_G"], BLOCK_D=st["BLOCK_D"], BLOCK_N=block_size,
                                 IEEE=q.dtype == torch.float32)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class InfLLMv2Function(torch.autograd.Function):
    """Block-sparse attention over given block lists; gradients for q, k and v (the selection has none).

    q (N, G, T, D); k, v (N, S, D), all contiguous; idx (N, T, K) int32 sorted, -1 = unused;
    q_pos (N, T) int32 absolute positions (key slot s is position s). Returns (N, G, T, D).
    """

    @staticmethod
    def forward(ctx, q, k, v, idx, q_pos, block_size):
        o, lse = infllmv2_fwd(q, k, v, idx, q_pos, block_size)
        ctx.save_for_backward(q, k, v, o, lse, idx, q_pos)
        ctx.block_size = block_size
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, idx, q_pos = ctx.saved_tensors
        dq, dk, dv = infllmv2_bwd(do, q, k, v, o, lse, idx, q_pos, ctx.block_size)
        return dq, dk, dv, None, None, None


SCORE_CHUNK = 1 << 26  # stage-1 scores held at once (N * T * N1 floats, 256 MB)


def infllmv2_triton(q, k, v, q_pos, cfg: SparseConfig, *, c1=None, c2=None, q_score=None, k_score=None,
                    key_valid=None) -> torch.Tensor:
    """Same contract as `cpu.infllmv2_cpu`: q (B, Hq, T, D); k, v (B, Hkv, S, D); q_pos (B, T) -> (B, Hq, T, D)."""
    if key_valid is not None and not bool(key_valid.all()):
        raise RuntimeError("InfLLM v2 Triton kernels do not take a key-validity mask; use the torch path.")
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g, n = hq // hkv, b * hkv
    if c1 is None or c2 is None:
        ks = (k if k_score is None else k_score).reshape(n, s, d)
        c1 = compress(ks, cfg.kernel_size, cfg.kernel_stride)
        c2 = compress(ks, cfg.kernel_size2, cfg.kernel_stride2)
    c1, c2 = c1.reshape(n, -1, d), c2.reshape(n, -1, d)
    pos = q_pos.repeat_interleave(hkv, 0).to(torch.int32).contiguous()  # (N, T)
    qs = (q if q_score is None else q_score).reshape(n, g, t, d).detach()
    top = int(pos.max()) + 1
    n1 = num_compressed(top, cfg.kernel_size, cfg.kernel_stride)
    n2 = num_compressed(top, cfg.kernel_size2, cfg.kernel_stride2)
    n_blocks = -(-top // cfg.block_size)
    step = max(1, SCORE_CHUNK // max(1, n * n1))
    with torch.no_grad():
        idx = torch.cat([
            select_blocks(pool_blocks(stage1_scores(qs[:, :, i: i + step], c1[:, :n1], c2[:, :n2],
                                                    pos[:, i: i + step], cfg), cfg, n_blocks),
                          pos[:, i: i + step], cfg)
            for i in range(0, t, step)], 1).to(torch.int32).contiguous()
    o = InfLLMv2Function.apply(q.reshape(n, g, t, d).contiguous(), k.reshape(n, s, d).contiguous(),
                               v.reshape(n, s, d).contiguous(), idx, pos, cfg.block_size)
    return o.reshape(b, hq, t, d)
