"""InfLLM v2 Triton kernels: stage 1 (compressed-key block scoring) and stage 2 (block-sparse attention,
forward and backward), with the host functions that launch them.

Layout: rows are N = B * Hkv groups; a program handles a tile of BQ consecutive query tokens x the
group's G query heads (M = 128 rows; the official kernels pack the 16 heads of one token, which
MiniCPM4-0.5B's 8 per group do not fill), so the head reduction of stage 1 stays inside the program
and each compressed key is loaded once per tile. Stage 2 loads each block of the tile's union of
top-k lists once and masks every row to its own token's picks (`tile_plan`). The first version ran
one program per token and re-read every block from L2 for each token: 3-10x slower than dense SDPA
on an H200. The backward computes dQ by query tile and
dK/dV by key block over the transposed plan (the official kernels transpose the block mask the same
way), with no atomics. Departure: the lists are sorted top-k indices (-1 = unused) rather than the
bitmask of design note 1.9.4 in `../shared/reference/inference-kernels.md`. Pooling and top-k between
the stages are torch (`cpu.pool_blocks`, `cpu.select_blocks`): `torch.topk` over <= 4096 blocks is
cheap on a GPU.

Triton is imported when this module is; `cpmtool.kernels.infllmv2` imports it only on CUDA or in tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .config import SparseConfig, num_compressed
from .cpu import compress, pool_blocks, select_blocks

MAX_HEAD_DIM = 256


def calculate_settings(group: int, head_dim: int, block_size: int, tokens: int = 1) -> dict:
    """Tile sizes; raises RuntimeError naming the limit it breaks.

    Both stages run one program per tile of BQ tokens x GP heads (G padded to a power of two, and to
    16 rows, the smallest `tl.dot`): up to 128 rows in stage 1 (FlashAttention-2's M tile), 16 in
    stage 2.
    """
    if head_dim > MAX_HEAD_DIM:
        raise RuntimeError(f"InfLLM v2 Triton kernels support head_dim <= {MAX_HEAD_DIM}, got {head_dim}.")
    if block_size < 16 or block_size & (block_size - 1):
        raise RuntimeError(f"InfLLM v2 Triton kernels need a power-of-two block_size >= 16, got {block_size}.")
    gp = triton.next_power_of_2(group)
    bq = 1 if tokens <= 1 else max(1, 16 // gp)  # one token (decode): its heads padded to 16 rows
    return {
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "BLOCK_C": 64,  # compressed keys per stage-1 step
        # stage 1: every token scores every visible compressed key, so big tiles only share loads
        "GP1": gp,
        "BQ1": max(16 // gp, min(128 // gp, triton.next_power_of_2(max(1, tokens)))) if gp < 128 else 1,
        # stage 2: a tile loads the union of its tokens' blocks; 16 rows (2 tokens of MiniCPM4-0.5B's
        # 8 heads, 1 of MiniCPM4-8B's 16) fill the smallest `tl.dot` without padding. 128-row tiles
        # (16 tokens) loaded 408 blocks per tile against 96 per token at 64k on an H200 (random
        # inputs: neighbours' top-k barely overlap) and ran the forward 1.5x slower.
        "GP": max(gp, 16 // bq),
        "BQ": bq,
    }


@triton.jit
def _rows(n, tile, T, G, POS, sp_n, BQ: tl.constexpr, GP: tl.constexpr):
    """The M = BQ * GP rows of a tile: query token (tile*BQ + r // GP) x head (r % GP), token-major."""
    r = tl.arange(0, BQ * GP)
    tok = tile * BQ + r // GP
    g = r % GP
    rm = (tok < T) & (g < G)
    pos = tl.load(POS + n * sp_n + tok, mask=rm, other=-1)  # a padding row sees no key
    return tok, g, rm, pos


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b: exact fp32 products for float32 inputs (parity with the reference), else Triton's default."""
    if IEEE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _key_block(K, V, n, blk, S, sk_n, sk_s, di, dm, BLOCK_N: tl.constexpr):
    """Block `blk` of keys and values (BLOCK_N, BLOCK_D), its key positions and which exist."""
    kpos = tl.where(blk >= 0, blk * BLOCK_N + tl.arange(0, BLOCK_N), S)  # an unused entry (-1) points past the keys
    km = kpos < S
    off = n * sk_n + kpos[:, None] * sk_s + di[None, :]
    k = tl.load(K + off, mask=km[:, None] & dm[None, :], other=0.0)
    v = tl.load(V + off, mask=km[:, None] & dm[None, :], other=0.0)
    return kpos, km, k, v


@triton.jit
def _allowed(MEMBER, n, tok, slot, rm, pos, kpos, km, sm_n, sm_t):
    """(M, BLOCK_N): the row's token picked this union slot, the key exists and is not in its future."""
    sel = tl.load(MEMBER + n * sm_n + tok * sm_t + slot, mask=rm, other=0)
    return (sel[:, None] != 0) & (kpos[None, :] <= pos[:, None]) & km[None, :]


@triton.jit
def _grad_rows(Q, DO, LSE, DELTA, n, tok, g, rm, di, dm, sq_n, sq_g, sq_t, sl_n, sl_g):
    """A tile's q and dO rows (q, do, dq share q's strides) and their lse and delta ((N, G, T) strides)."""
    qmask = rm[:, None] & dm[None, :]
    qoff = n * sq_n + g[:, None] * sq_g + tok[:, None] * sq_t + di[None, :]
    q = tl.load(Q + qoff, mask=qmask, other=0.0)
    do = tl.load(DO + qoff, mask=qmask, other=0.0)
    lse = tl.load(LSE + n * sl_n + g * sl_g + tok, mask=rm, other=0.0)
    delta = tl.load(DELTA + n * sl_n + g * sl_g + tok, mask=rm, other=0.0)
    return qoff, qmask, q, do, lse, delta


@triton.jit
def _p_ds(q, do, k, v, lse, delta, ok, scale, IEEE: tl.constexpr):
    """Backward of one (tile, key block) pair: probabilities p and score gradients ds, (M, BLOCK_N)."""
    p = tl.where(ok, tl.exp(_dot(q, tl.trans(k), IEEE) * scale - lse[:, None]), 0.0)
    ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None]) * scale
    return p, ds


@triton.jit
def _stage1_kernel(Q, C1, C2, POS, OUT, T, n1_max, n2_max, G, D, scale,
                   sq_n, sq_g, sq_t, sc1_n, sc1_j, sc2_n, sc2_j, sp_n, so_n, so_t,
                   KS1: tl.constexpr, ST1: tl.constexpr, KS2: tl.constexpr, ST2: tl.constexpr,
                   BQ: tl.constexpr, GP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                   IEEE: tl.constexpr):
    # one tile of BQ tokens x GP heads (token-major rows): each compressed key is loaded once per tile
    tile, n = tl.program_id(0), tl.program_id(1)
    tok, g, rm, pos = _rows(n, tile, T, G, POS, sp_n, BQ, GP)
    di = tl.arange(0, BLOCK_D)
    dm = di < D
    q = tl.load(Q + n * sq_n + g[:, None] * sq_g + tok[:, None] * sq_t + di[None, :], mask=rm[:, None] & dm[None, :],
                other=0.0)
    q = (q.to(tl.float32) * scale)
    # compressed key j is visible once its whole window is in the past: j*stride + kernel <= pos + 1
    # (integer division truncates toward zero here, so a negative numerator is handled apart)
    n2 = tl.minimum(tl.where(pos + 1 >= KS2, (pos + 1 - KS2) // ST2 + 1, 0), n2_max)  # (M,)
    n1 = tl.minimum(tl.where(pos + 1 >= KS1, (pos + 1 - KS1) // ST1 + 1, 0), n1_max)
    ci = tl.arange(0, BLOCK_C)
    # pass 1: log-sum-exp of each row over the coarse keys (online max / sum)
    m = tl.full([BQ * GP], -1.0e30, tl.float32)
    s_sum = tl.zeros([BQ * GP], tl.float32)
    for j0 in range(0, tl.max(n2, 0), BLOCK_C):
        jm = (j0 + ci) < n2_max
        c = tl.load(C2 + n * sc2_n + (j0 + ci)[:, None] * sc2_j + di[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
        s = _dot(q, tl.trans(c.to(tl.float32)), IEEE)
        s = tl.where((j0 + ci)[None, :] < n2[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        s_sum = s_sum * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m = m_new
    # no coarse key visible yet: every score is 0 (see reference.py)
    lse = tl.where(s_sum > 0, m + tl.log(tl.maximum(s_sum, 1e-30)), float("inf"))
    tq = tile * BQ + tl.arange(0, BQ)
    # pass 2: exp(q.c1 - lse2), summed over each token's heads
    for j0 in range(0, tl.max(n1, 0), BLOCK_C):  # OUT is zeroed: the keys past the tile's last token stay 0
        jm = (j0 + ci) < n1_max
        c = tl.load(C1 + n * sc1_n + (j0 + ci)[:, None] * sc1_j + di[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
        s = _dot(q, tl.trans(c.to(tl.float32)), IEEE)
        p = tl.where(((j0 + ci)[None, :] < n1[:, None]) & rm[:, None], tl.exp(s - lse[:, None]), 0.0)  # (M, C)
        p = tl.sum(tl.reshape(p, [BQ, GP, BLOCK_C]), 1)  # (BQ, C)
        tl.store(OUT + n * so_n + tq[:, None] * so_t + (j0 + ci)[None, :], p, mask=(tq[:, None] < T) & jm[None, :])


@triton.jit
def _infllmv2_fwd_kernel(Q, K, V, UNION, COUNT, MEMBER, POS, OUT, LSE, T, G, D, S, scale,
                         sq_n, sq_g, sq_t, sk_n, sk_s, su_n, su_t, sc_n, sm_n, sm_t, sp_n, so_n, so_g, so_t,
                         sl_n, sl_g,
                         BQ: tl.constexpr, GP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         IEEE: tl.constexpr):
    tile, n = tl.program_id(0), tl.program_id(1)
    tok, g, rm, pos = _rows(n, tile, T, G, POS, sp_n, BQ, GP)
    di = tl.arange(0, BLOCK_D)
    dm = di < D
    qmask = rm[:, None] & dm[None, :]
    q = tl.load(Q + n * sq_n + g[:, None] * sq_g + tok[:, None] * sq_t + di[None, :], mask=qmask, other=0.0)
    m = tl.full([BQ * GP], -1.0e30, tl.float32)  # finite, so a row with no key yet gives exp(-inf) = 0, not NaN
    den = tl.zeros([BQ * GP], tl.float32)
    acc = tl.zeros([BQ * GP, BLOCK_D], tl.float32)
    count = tl.load(COUNT + n * sc_n + tile)
    for i in range(0, count):  # the tile's union of selected blocks, ascending
        blk = tl.load(UNION + n * su_n + tile * su_t + i)
        kpos, km, k, v = _key_block(K, V, n, blk, S, sk_n, sk_s, di, dm, BLOCK_N)
        ok = _allowed(MEMBER, n, tok, i, rm, pos, kpos, km, sm_n, sm_t)
        s = tl.where(ok, _dot(q, tl.trans(k), IEEE) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        den = den * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m = m_new
    o = acc / tl.maximum(den, 1e-30)[:, None]
    tl.store(OUT + n * so_n + g[:, None] * so_g + tok[:, None] * so_t + di[None, :], o.to(OUT.dtype.element_ty),
             mask=qmask)
    tl.store(LSE + n * sl_n + g * sl_g + tok, m + tl.log(tl.maximum(den, 1e-30)), mask=rm)


@triton.jit
def _infllmv2_bwd_dq_kernel(Q, K, V, UNION, COUNT, MEMBER, POS, DO, LSE, DELTA, DQ, T, G, D, S, scale,
                            sq_n, sq_g, sq_t, sk_n, sk_s, su_n, su_t, sc_n, sm_n, sm_t, sp_n, sl_n, sl_g,
                            BQ: tl.constexpr, GP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                            IEEE: tl.constexpr):
    tile, n = tl.program_id(0), tl.program_id(1)
    tok, g, rm, pos = _rows(n, tile, T, G, POS, sp_n, BQ, GP)
    di = tl.arange(0, BLOCK_D)
    dm = di < D
    qoff, qmask, q, do, lse, delta = _grad_rows(Q, DO, LSE, DELTA, n, tok, g, rm, di, dm, sq_n, sq_g, sq_t, sl_n, sl_g)
    dq = tl.zeros([BQ * GP, BLOCK_D], tl.float32)
    count = tl.load(COUNT + n * sc_n + tile)
    for i in range(0, count):
        blk = tl.load(UNION + n * su_n + tile * su_t + i)
        kpos, km, k, v = _key_block(K, V, n, blk, S, sk_n, sk_s, di, dm, BLOCK_N)
        ok = _allowed(MEMBER, n, tok, i, rm, pos, kpos, km, sm_n, sm_t)
        _, ds = _p_ds(q, do, k, v, lse, delta, ok, scale, IEEE)
        dq += _dot(ds.to(k.dtype), k, IEEE)
    tl.store(DQ + qoff, dq.to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _infllmv2_bwd_dkdv_kernel(Q, K, V, OFFSETS, PAIR_TILE, PAIR_SLOT, MEMBER, POS, DO, LSE, DELTA, DK, DV,
                              T, G, D, S, n_kb, scale, sq_n, sq_g, sq_t, sk_n, sk_s, sm_n, sm_t, sp_n, sl_n, sl_g,
                              BQ: tl.constexpr, GP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                              IEEE: tl.constexpr):
    # one key block: walks the tiles whose union holds it (the transposed plan), so no atomics
    b, n = tl.program_id(0), tl.program_id(1)
    di = tl.arange(0, BLOCK_D)
    dm = di < D
    kpos, km, k, v = _key_block(K, V, n, b, S, sk_n, sk_s, di, dm, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    start = tl.load(OFFSETS + n * n_kb + b)
    end = tl.load(OFFSETS + n * n_kb + b + 1)
    for j in range(start, end):
        tile = tl.load(PAIR_TILE + j)
        tok, g, rm, pos = _rows(n, tile, T, G, POS, sp_n, BQ, GP)
        _, _, q, do, lse, delta = _grad_rows(Q, DO, LSE, DELTA, n, tok, g, rm, di, dm, sq_n, sq_g, sq_t, sl_n, sl_g)
        ok = _allowed(MEMBER, n, tok, tl.load(PAIR_SLOT + j), rm, pos, kpos, km, sm_n, sm_t)
        p, ds = _p_ds(q, do, k, v, lse, delta, ok, scale, IEEE)
        dv += _dot(tl.trans(p).to(do.dtype), do, IEEE)
        dk += _dot(tl.trans(ds).to(q.dtype), q, IEEE)
    koff = n * sk_n + kpos[:, None] * sk_s + di[None, :]
    tl.store(DK + koff, dk.to(DK.dtype.element_ty), mask=km[:, None] & dm[None, :])
    tl.store(DV + koff, dv.to(DV.dtype.element_ty), mask=km[:, None] & dm[None, :])


def stage1_scores(q, c1, c2, q_pos, cfg: SparseConfig) -> torch.Tensor:
    """exp(q.c1 - lse(q.c2)) summed per group. q (N, G, T, D); c1 (N, N1, D); c2 (N, N2, D) -> (N, T, N1) fp32."""
    n, g, t, d = q.shape
    q, c1, c2 = q.contiguous(), c1.contiguous(), c2.contiguous()
    q_pos = q_pos.to(torch.int32).contiguous()
    out = torch.zeros(n, t, c1.shape[1], device=q.device, dtype=torch.float32)
    if c1.shape[1] == 0 or t == 0:
        return out
    st = calculate_settings(g, d, cfg.block_size, t)
    _stage1_kernel[(-(-t // st["BQ1"]), n)](
        q, c1, c2, q_pos, out, t, c1.shape[1], c2.shape[1], g, d, d**-0.5,
        q.stride(0), q.stride(1), q.stride(2), c1.stride(0), c1.stride(1), c2.stride(0), c2.stride(1),
        q_pos.stride(0), out.stride(0), out.stride(1),
        KS1=cfg.kernel_size, ST1=cfg.kernel_stride, KS2=cfg.kernel_size2, ST2=cfg.kernel_stride2,
        IEEE=q.dtype == torch.float32, BQ=st["BQ1"], GP=st["GP1"], BLOCK_D=st["BLOCK_D"], BLOCK_C=st["BLOCK_C"],
        **_launch_opts(st["BQ1"] * st["GP1"], st["BLOCK_D"]))
    return out


class TilePlan(NamedTuple):
    """Stage 2's work list: query tiles of BQ consecutive tokens over the union of their selected blocks.

    union (N, NT, U) int32, ascending, -1 pad; count (N, NT) int32; member (N, T, U) uint8, 1 where
    token t selected union[n, t // BQ, u]; and the transpose for the dK/dV kernel, per key block the
    (tile, slot) pairs holding it: offsets (N * n_kb + 1,), pair_tile, pair_slot (P,) int32.
    """
    bq: int
    union: torch.Tensor
    count: torch.Tensor
    member: torch.Tensor
    offsets: torch.Tensor
    pair_tile: torch.Tensor
    pair_slot: torch.Tensor


def tile_plan(idx: torch.Tensor, n_key_blocks: int, bq: int, transpose: bool = True) -> TilePlan:
    """Build the TilePlan from the per-token lists idx (N, T, K) int, sorted, -1 = unused; the transposed
    pairs only with `transpose` (the backward needs them; inference skips their sort and host sync).

    Consecutive queries share their local-window blocks and some of their top-k, so a tile loads the
    union once for all its rows and masks each row to its own picks. With 16-row tiles this is the
    official kernels' one token of 16 heads (MiniCPM4-8B), or two tokens of MiniCPM4-0.5B's 8 heads.
    """
    n, t, kk = idx.shape
    none = idx.new_empty(0, dtype=torch.int32)  # the transposed fields of a plan built without them
    if bq == 1 and not transpose:  # one token per tile: its own list is the union (no sort, no host sync)
        union = idx.to(torch.int32).contiguous()
        return TilePlan(1, union, torch.full((n, t), kk, dtype=torch.int32, device=idx.device),
                        (union >= 0).to(torch.uint8), none, none, none)
    nt = -(-t // bq)
    big = torch.iinfo(torch.int32).max
    x = F.pad(idx.to(torch.int32), (0, 0, 0, nt * bq - t), value=-1).view(n, nt, bq * kk)
    x = x.masked_fill(x < 0, big).sort(-1).values
    x[..., 1:].masked_fill_(x[..., 1:] == x[..., :-1], big)  # a repeat of the previous entry
    x = x.sort(-1).values
    count = (x < big).sum(-1, dtype=torch.int32)  # (N, NT)
    union = x[..., : max(1, int(count.max()))]
    union = union.masked_fill(union == big, -1).contiguous()  # (N, NT, U)
    per_tok = union.repeat_interleave(bq, 1)[:, :t]  # (N, T, U): the token's tile's union
    srt = idx.to(torch.int32).contiguous()
    at = torch.searchsorted(srt, per_tok.contiguous()).clamp_(max=kk - 1)
    member = ((srt.gather(2, at) == per_tok) & (per_tok >= 0)).to(torch.uint8).contiguous()
    if not transpose:
        return TilePlan(bq, union, count.contiguous(), member, none, none, none)
    valid = union >= 0
    where = valid.nonzero()  # (P, 3): n, tile, slot
    key = where[:, 0] * n_key_blocks + union[valid].long()
    order = key.argsort(stable=True)
    offsets = torch.zeros(n * n_key_blocks + 1, dtype=torch.int32, device=idx.device)
    offsets[1:] = torch.bincount(key, minlength=n * n_key_blocks).cumsum(0)
    return TilePlan(bq, union, count.contiguous(), member, offsets, where[order, 1].to(torch.int32).contiguous(),
                    where[order, 2].to(torch.int32).contiguous())


def _launch_opts(rows: int, block_d: int) -> dict:
    return {"num_warps": 8 if rows * block_d >= 128 * 64 else 4}


def infllmv2_fwd(q, k, v, idx, q_pos, block_size: int, plan: TilePlan | None = None, transpose: bool = True):
    """Stage 2 forward. q (N, G, T, D); k, v (N, S, D); idx (N, T, K) int, -1 = unused; q_pos (N, T) int32
    -> o (N, G, T, D), lse (N, G, T), plan (reuse it for the backward: built with `transpose`)."""
    n, g, t, d = q.shape
    st = calculate_settings(g, d, block_size, t)
    if plan is None:
        plan = tile_plan(idx, -(-k.shape[1] // block_size), st["BQ"], transpose)
    o = torch.empty_like(q)
    lse = torch.empty(n, g, t, device=q.device, dtype=torch.float32)
    _infllmv2_fwd_kernel[(plan.count.shape[1], n)](
        q, k, v, plan.union, plan.count, plan.member, q_pos, o, lse, t, g, d, k.shape[1], d**-0.5,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), plan.union.stride(0), plan.union.stride(1),
        plan.count.stride(0), plan.member.stride(0), plan.member.stride(1), q_pos.stride(0),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        BQ=st["BQ"], GP=st["GP"], BLOCK_D=st["BLOCK_D"], BLOCK_N=block_size, IEEE=q.dtype == torch.float32,
        **_launch_opts(st["BQ"] * st["GP"], st["BLOCK_D"]))
    return o, lse, plan


def infllmv2_bwd(do, q, k, v, o, lse, q_pos, block_size: int, plan: TilePlan):
    """Stage 2 backward: dq by query tile, dk/dv by key block over the transposed plan (no atomics)."""
    n, g, t, d = q.shape
    st = calculate_settings(g, d, block_size, t)
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1).contiguous()  # (N, G, T)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    ieee, opts = q.dtype == torch.float32, _launch_opts(st["BQ"] * st["GP"], st["BLOCK_D"])
    common = dict(BQ=st["BQ"], GP=st["GP"], BLOCK_D=st["BLOCK_D"], BLOCK_N=block_size, IEEE=ieee, **opts)
    _infllmv2_bwd_dq_kernel[(plan.count.shape[1], n)](
        q, k, v, plan.union, plan.count, plan.member, q_pos, do, lse, delta, dq, t, g, d, k.shape[1], d**-0.5,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), plan.union.stride(0), plan.union.stride(1),
        plan.count.stride(0), plan.member.stride(0), plan.member.stride(1), q_pos.stride(0),
        lse.stride(0), lse.stride(1), **common)
    n_kb = -(-k.shape[1] // block_size)
    _infllmv2_bwd_dkdv_kernel[(n_kb, n)](
        q, k, v, plan.offsets, plan.pair_tile, plan.pair_slot, plan.member, q_pos, do, lse, delta, dk, dv,
        t, g, d, k.shape[1], n_kb, d**-0.5, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        plan.member.stride(0), plan.member.stride(1), q_pos.stride(0), lse.stride(0), lse.stride(1), **common)
    return dq, dk, dv


class InfLLMv2Function(torch.autograd.Function):
    """Block-sparse attention over given block lists; gradients for q, k and v (the selection has none).

    q (N, G, T, D); k, v (N, S, D), all contiguous; idx (N, T, K) int32 sorted, -1 = unused;
    q_pos (N, T) int32 absolute positions (key slot s is position s). Returns (N, G, T, D).
    """

    @staticmethod
    def forward(ctx, q, k, v, idx, q_pos, block_size):
        o, lse, plan = infllmv2_fwd(q, k, v, idx, q_pos, block_size, transpose=any(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(q, k, v, o, lse, q_pos, *plan[1:])
        ctx.block_size, ctx.bq = block_size, plan.bq
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, q_pos, *plan = ctx.saved_tensors
        dq, dk, dv = infllmv2_bwd(do, q, k, v, o, lse, q_pos, ctx.block_size, TilePlan(ctx.bq, *plan))
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
