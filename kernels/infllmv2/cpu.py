"""InfLLM v2 for production on CPU: the reference's semantics with batched gathers, no loop over blocks.

Rows are flattened to N = B * Hkv "groups" (one KV head and its G query heads); every op is batched
over N. Prefill walks the queries in chunks (bounded memory), and per chunk:

1. stage 1: scores vs the visible compressed keys, max-pooled to blocks, top-k (`select_blocks`),
   per query token as the spec (inference-kernels.md 1.5) and reference.py have it;
2. the local window (forced): when the queries are consecutive positions (a prefill), the 64
   queries of a block share their window (blocks qb - local .. qb), so each block is one dense
   attention over an overlapping view of K with one causal pattern (`_band_blocks`, no gather);
   otherwise one contiguous key band per query sub-chunk (`_band`);
3. the other selected blocks (sinks and the top-k picks below the window) are (query, block) pairs.
   Pairs are sorted by block and packed into tiles of `PAIR_TILE` queries that share one key block,
   so a key block is gathered once per tile rather than once per query. Inference runs a batch of
   tiles as two bmm's into reused cache-sized buffers, with exp2 weights relative to the band's LSE
   added per query into the band's sums; with autograd, one batched attention call per tile set;
4. the band and the tiles are merged exactly (online softmax).

Decode (one query per row) gathers the selected blocks directly: (N, K, block, D).
Inference uses ATen's fused CPU flash kernel for the band (it returns the LSE); with autograd on, an
equivalent plain-matmul path runs so gradients flow to q, k and v (training through the sparse op).

Inference on an x86 CPU with AVX2/FMA runs three C kernels (`cpu_fused.c`, built on first use by
kernels/cbuild.py with the system compiler) in place of torch ops, same arithmetic:
- stage 1 (`_scores_fused`): the coarse keys' LSE and the head-summed exp2 scores, without the
  (N, G, T, N1) logits tensor the torch path writes and re-reads; `_pool_select_fused`: max-pool
  and top-k by one quickselect per query;
- the far blocks (`_remote_fused`): each key block's (query, head) rows read their query and add into
  their accumulator in place (no gathered tiles, no padding, no scatter-add).
No compiler, no AVX2, autograd, masked cache slots or `CPMTOOL_CPU_KERNELS=0`: the torch path.

Cost (64k prefill, 16/2 heads x 64, 1 thread, random q/k, `cpmtool bench attention`): 42-44 s
against 165 s for dense SDPA (3.7-3.9x; the torch path alone 60-73 s, 2.2-2.8x). Of it the far
blocks ~48% (the C kernel at ~45 GFLOP/s), the window (ATen's flash kernel) ~27%, stage 1 ~23%.
Decode, memory-bound, gains about the ratio of keys read (14x at 64k).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import SparseConfig, num_compressed

PAIR_TILE = 16  # queries per tile sharing one key block: 16 * G rows x 64 keys per matmul
TILE_BATCH = 32  # tiles per batched matmul: its buffers (~1 MB each) stay in L2
CHUNK = 2048  # queries per prefill chunk: enough pairs per key block to fill tiles (~6% padding at 64k)
BAND = 128  # queries per band attention call: the band spans BAND + window keys
SCORE_BUDGET = 1 << 22  # floats in one stage-1 score tensor (16 MB)
SCORE_PIECE = 512  # stage-1 c1 columns per logits block (2 x 8 x 64 queries x 512 floats = 2 MB)
SCORE_ALIGN = 16  # stage-1 logits widths: MKL's sgemm runs ~2x slower on a width that is not a multiple of 8
NEG = float("-inf")
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)
# ATen's CPU flash attention, which also returns the LSE (a private op: without it, plain matmuls)
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def compress(k: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Mean of keys over windows [j*stride, j*stride + kernel): (..., L, D) -> (..., N, D), float32.

    Sums stride-sized chunks once, then adds kernel/stride neighbouring chunk sums, so K is read once.
    """
    n = num_compressed(k.shape[-2], kernel, stride)
    if n == 0:
        return k.new_zeros(*k.shape[:-2], 0, k.shape[-1], dtype=torch.float32)
    m = kernel // stride
    chunks = k[..., : (n + m - 1) * stride, :].float().unflatten(-2, (n + m - 1, stride)).sum(-2)
    out = chunks[..., :n, :].clone()
    for i in range(1, m):
        out += chunks[..., i: i + n, :]
    return out / kernel


def block_scores(q, c1, c2, q_pos, cfg: SparseConfig, n_blocks: int, transposed: bool = False,
                 work: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 1. q (N, G, T, D); c1 (N, N1, D); c2 (N, N2, D); q_pos (N, T) -> block scores (N, T, n_blocks).

    With `transposed`, c1/c2 come as (N, D, Nc) float32: a contiguous right operand doubles the bmm's
    speed on CPU, so a caller that scores many chunks transposes them once. `work`, a flat float32
    buffer of >= N*G*T*(N1+N2) elements, receives the logits (fresh multi-MB tensors cost page faults).
    """
    n, g, t, d = q.shape
    if not q.is_cuda and (lib := _fused_kernels()) is not None:
        p = _scores_fused(lib, q, c1, c2, q_pos, cfg, transposed)
        if p is not None:
            return pool_blocks(p, cfg, n_blocks)
    pos1 = q_pos[:, None, :, None] + 1  # (N, 1, T, 1)
    used = [0]

    def logits(c, kernel, stride, scale, j0=0, j1=None):
        """Logits vs columns [j0, j1) of c: (N, G, T, j1 - j0); only columns some query cannot see get a mask."""
        qs = (q.float() * scale).reshape(n, g * t, d)
        ct = (c if transposed else c.float().transpose(1, 2))[..., j0:j1]
        if work is None:
            s = torch.bmm(qs, ct)
        else:
            size = n * g * t * ct.shape[-1]
            s = torch.bmm(qs, ct, out=work[used[0]: used[0] + size].view(n, g * t, ct.shape[-1]))
            used[0] += size
        s = s.view(n, g, t, -1)
        lo = num_compressed(int(q_pos.min()) + 1, kernel, stride) - j0
        if lo < s.shape[-1]:
            lo = max(lo, 0)
            seen = torch.arange(j0 + lo, j0 + s.shape[-1], device=q.device) * stride + kernel <= pos1
            s[..., lo:].masked_fill_(~seen, NEG)
        return s

    lse2 = logits(c2, cfg.kernel_size2, cfg.kernel_stride2, d**-0.5).logsumexp(-1, keepdim=True)
    # no coarse key visible yet: score 0 (reference.py docstring), via exp(x - inf)
    lse2.masked_fill_(torch.isinf(lse2), float("inf")).mul_(LOG2E)
    # exp(x - lse2) as exp2 of base-2 logits: torch's exp2 runs at twice exp's speed on CPU. The c1
    # columns go SCORE_PIECE at a time, so logits -> exp2 -> head sum run on a cache-sized block
    # (~1.7x faster than the whole width).
    n1 = c1.shape[-1] if transposed else c1.shape[1]
    p = q.new_empty(n, t, n1, dtype=torch.float32)
    mark = used[0]
    for j0 in range(0, n1, SCORE_PIECE):
        used[0] = mark
        part = logits(c1, cfg.kernel_size, cfg.kernel_stride, d**-0.5 * LOG2E, j0, j0 + SCORE_PIECE)
        p[..., j0: j0 + SCORE_PIECE] = part.sub_(lse2).exp2_().sum(1)
    return pool_blocks(p, cfg, n_blocks)


def pool_blocks(p, cfg: SparseConfig, n_blocks: int) -> torch.Tensor:
    """Compressed-key scores (..., N1) -> block scores (..., n_blocks): max over the windows overlapping a block.

    Window j overlaps block b iff b*P - m < j < (b+1)*P (P = block/stride, m = kernel/stride): a max-pool
    of width P + m - 1 and stride P over the scores left-padded by m - 1 zeros (scores are >= 0). With
    MiniCPM4's 32/16/64 this is the official max_pool1d(kernel 5, stride 4, padding 1).
    """
    per, m = cfg.block_size // cfg.kernel_stride, cfg.kernel_size // cfg.kernel_stride
    p = F.pad(p, (m - 1, n_blocks * per - p.shape[-1]))
    return p.unfold(-1, per + m - 1, per).amax(-1)


def select_blocks(scores, q_pos, cfg: SparseConfig) -> torch.Tensor:
    """Top-k blocks (N, T, K), sorted, -1 = unused; sink and local blocks forced, future blocks excluded."""
    qb = (q_pos // cfg.block_size)[..., None]  # (N, T, 1)
    b = torch.arange(scores.shape[-1], device=scores.device)
    forced = (b < cfg.init_blocks) | ((b >= qb - cfg.local_blocks) & (b <= qb))
    s = scores.masked_fill(forced, float("inf")).masked_fill_(b > qb, NEG)
    # Ties go to the lower block (as in reference.py): top-k over an int64 key, the float's bits (they
    # order like the floats for s >= 0, and -inf sorts below) above the reversed block index.
    key = (s.view(torch.int32).long() << 32) | (s.shape[-1] - 1 - b)
    idx = key.topk(min(cfg.topk_eff, s.shape[-1]), dim=-1).indices
    return torch.where(idx > qb, -1, idx).sort(-1).values


def _attend(q, k, v, bias, grad: bool):
    """Attention with its LSE. q (Z, H, L, D); k, v (Z, 1 or H, S, D); bias broadcastable to (Z, H, L, S)."""
    scale = q.shape[-1] ** -0.5
    if not grad and _FLASH is not None and not q.is_cuda:
        h = q.shape[1]
        k, v = k.expand(-1, h, -1, -1), v.expand(-1, h, -1, -1)
        if bias is not None:
            bias = bias.expand(-1, h, -1, -1)
        return _FLASH(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    m = s.amax(-1, keepdim=True).detach().clamp(min=-1e30)  # a fully masked row stays finite
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    return torch.matmul(p, v) / den.clamp(min=1e-30), (m + den.log()).squeeze(-1)


def _band(q, k, v, q_pos, cfg: SparseConfig, key_valid, grad):
    """The local window (forced blocks qb - local_blocks .. qb) as attention over one contiguous key slice
    (a view of k, no copy). q (N, G, C, D) -> (N, G, C, D), (N, G, C). Sinks go with the far blocks."""
    bs, dev = cfg.block_size, q.device
    qb = q_pos // bs  # (N, C)
    lo = max(0, (int(qb.min()) - cfg.local_blocks) * bs)
    hi = int(q_pos.max()) + 1
    kpos = torch.arange(lo, hi, device=dev)
    ok = (kpos <= q_pos[..., None]) & (kpos // bs >= qb[..., None] - cfg.local_blocks)  # (N, C, Lk)
    if key_valid is not None:
        ok &= key_valid[:, lo:hi][:, None]
    bias = torch.zeros(ok.shape, dtype=q.dtype, device=dev).masked_fill_(~ok, NEG)[:, None]  # (N, 1, C, Lk)
    return _attend(q, k[:, None, lo:hi], v[:, None, lo:hi], bias, grad)


def _band_blocks(q, k, v, q_pos, cfg: SparseConfig, key_valid):
    """Inference band when every row's queries are the same contiguous positions: the queries of one
    block share their window (blocks qb - local_blocks .. qb, L keys), so each block is a dense
    attention over an overlapping view of K with one causal pattern, and a row is one flash call.
    q (N, G, C, D) -> (N, G, C, D), (N, G, C); queries and keys are zero-padded to whole blocks."""
    n, g, c, d = q.shape
    s, bs, lb = k.shape[1], cfg.block_size, cfg.local_blocks
    width = (lb + 1) * bs
    p0 = int(q_pos[0, 0])
    qb0, qb1 = p0 // bs, (p0 + c - 1) // bs
    nqb, front = qb1 - qb0 + 1, p0 - qb0 * bs
    qp = q.new_zeros(n, g, nqb * bs, d)
    qp[:, :, front: front + c] = q
    qp = qp.view(n, g, nqb, bs, d).transpose(1, 2)  # (N, nqb, G, bs, D)
    k_lo, span = (qb0 - lb) * bs, (nqb + lb) * bs  # padded key slot i holds position k_lo + i
    lo, hi = max(0, k_lo), min(s, k_lo + span)
    ok = torch.zeros(n, span, dtype=torch.bool, device=q.device)
    ok[:, lo - k_lo: hi - k_lo] = True if key_valid is None else key_valid[:, lo:hi]
    pattern = torch.arange(width, device=q.device) <= lb * bs + torch.arange(bs, device=q.device)[:, None]  # (bs, L)
    outs, lses = [], []
    for i in range(n):
        kv = []
        for x in (k, v):
            xp = x.new_zeros(span, d)
            xp[lo - k_lo: hi - k_lo] = x[i, lo:hi]
            kv.append(xp.as_strided((nqb, 1, width, d), (bs * d, 0, d, 1)).expand(-1, g, -1, -1))
        win = ok[i].as_strided((nqb, 1, 1, width), (bs, 0, 0, 1))  # (nqb, 1, 1, L)
        if bool(win.all()):
            bias = torch.zeros(bs, width, dtype=q.dtype, device=q.device).masked_fill_(~pattern, NEG)
            bias = bias.expand(nqb, g, -1, -1)
        else:
            bias = torch.zeros(nqb, 1, bs, width, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill_(~(pattern & win), NEG).expand(-1, g, -1, -1)
        o, lse = _FLASH(qp[i].contiguous(), kv[0], kv[1], 0.0, False, attn_mask=bias, scale=d**-0.5)
        outs.append(o.transpose(0, 1).reshape(g, nqb * bs, d)[:, front: front + c])
        lses.append(lse.transpose(0, 1).reshape(g, nqb * bs)[:, front: front + c])
    return torch.stack(outs), torch.stack(lses)

def _pair_segments(idx, q_pos, cfg: SparseConfig, n_blocks: int):
    """The (query, far block) pairs sorted by (row, block). idx (N, C, K) -> seg, qrow (pairs,):
    seg = n * n_blocks + block, qrow = n*C + t the flat query index. Far blocks are the selected ones
    below the local window (sinks included): wholly in the past, so no causal mask is needed."""
    n, c, _ = idx.shape
    qb = (q_pos // cfg.block_size)[..., None]
    far = (idx >= 0) & (idx < qb - cfg.local_blocks)
    ni, ti, ri = far.nonzero(as_tuple=True)
    seg, order = (ni * n_blocks + idx[ni, ti, ri]).sort(stable=True)
    return seg, (ni * c + ti)[order]


def _pair_tiles(idx, q_pos, cfg: SparseConfig, n_blocks: int):
    """Group the (query, far block) pairs by (row, block) into tiles of PAIR_TILE queries.

    idx (N, C, K). Returns rows (tiles, PAIR_TILE) flat query indices n*C + t (N*C = padding) and
    tile_seg (tiles,) = n * n_blocks + block.
    """
    n, c, _ = idx.shape
    dev = idx.device
    seg, qrow = _pair_segments(idx, q_pos, cfg, n_blocks)
    counts = torch.bincount(seg, minlength=n * n_blocks)
    tiles_per = (counts + PAIR_TILE - 1) // PAIR_TILE
    rank = torch.arange(seg.numel(), device=dev) - (counts.cumsum(0) - counts)[seg]
    tile = (tiles_per.cumsum(0) - tiles_per)[seg] + rank // PAIR_TILE
    n_tiles = int(tiles_per.sum())
    rows = torch.full((n_tiles, PAIR_TILE), n * c, dtype=torch.long, device=dev)
    rows[tile, rank % PAIR_TILE] = qrow
    tile_seg = torch.zeros(n_tiles, dtype=torch.long, device=dev).index_put_((tile,), seg)
    return rows, tile_seg


def _gather_blocks(k, row, start, bs, out=None):
    """Blocks of bs keys from k (N, S, D): rows `row`, first tokens `start` (1-D) -> (len, bs, D).

    k may be a view into a bigger buffer (a KV cache's used prefix): an overlapping view
    "row r = the bs keys from element r*D on" over k's storage gathers whole blocks with one
    index_select and no copy of k. A block may run past S (the partial last block): the caller masks it.
    `out`, (len * bs, D) contiguous, receives the blocks.
    """
    n, s, d = k.shape
    first = row * (k.stride(0) // d) + start
    avail = k.untyped_storage().nbytes() // k.element_size() - k.storage_offset()
    n_rows = (avail - bs * d) // d + 1
    if k.stride(2) == 1 and k.stride(1) == d and k.stride(0) % d == 0 and int(first.max()) < n_rows:
        src = k.as_strided((n_rows, bs * d), (d, 1))
        if out is None:
            return src.index_select(0, first).view(-1, bs, d)
        return torch.index_select(src, 0, first, out=out.view(-1, bs * d)).view(-1, bs, d)
    tok = (start[:, None] + torch.arange(bs, device=k.device)).clamp(max=s - 1)
    return k[row[:, None], tok]


def _remote(q, k, v, q_pos, idx, cfg: SparseConfig, key_valid, grad, o_band, lse_band):
    """Add the far top-k blocks to the band's result, tile by tile. q (N, G, C, D) -> (N, G, C, D)."""
    n, g, c, d = q.shape
    s, bs, dev = k.shape[1], cfg.block_size, q.device
    n_blocks = -(-s // bs)
    if not grad and key_valid is None and (lib := _fused_kernels()) is not None:
        out = _remote_fused(lib, q, k, v, q_pos, idx, cfg, n_blocks, o_band, lse_band)
        if out is not None:
            return out
    rows, tile_seg = _pair_tiles(idx, q_pos, cfg, n_blocks)
    if rows.shape[0] == 0:
        return o_band
    qf = torch.cat([q.permute(0, 2, 1, 3).reshape(n * c, g * d), q.new_zeros(1, g * d)])  # (N*C + 1, G*D)
    valid = None if key_valid is None else torch.cat([key_valid, key_valid.new_zeros(n, -s % bs)], 1).view(n, -1, bs)
    if grad:  # exact per-row softmax merge, differentiable
        # dest[tile, p*G + h]: the (query, head) row a tile row adds to; padding rows land past n*c*g
        dest = rows[..., None] * g + torch.arange(g, device=dev)
        qt = qf[rows].view(-1, 1, PAIR_TILE * g, d)
        row, start = tile_seg // n_blocks, tile_seg % n_blocks * bs
        kt, vt = _gather_blocks(k, row, start, bs)[:, None], _gather_blocks(v, row, start, bs)[:, None]
        bias = None
        if valid is not None:
            ok = valid[tile_seg // n_blocks, tile_seg % n_blocks]  # (tiles, bs)
            bias = torch.zeros(ok.shape, dtype=q.dtype, device=dev).masked_fill_(~ok, NEG)[:, None, None]
        o, lse = _attend(qt, kt, vt, bias, True)
        dest, o, lse = dest.reshape(-1), o.reshape(-1, d), lse.reshape(-1)
        lb = lse_band.transpose(1, 2).reshape(-1)
        m = torch.cat([lb, lb.new_full((g,), NEG)]).detach().scatter_reduce(0, dest, lse.detach(), "amax")
        w = torch.exp(lse - m[dest])
        w0 = torch.exp(torch.cat([lb, lb.new_full((g,), NEG)]) - m)
        den = w0.index_add(0, dest, w)
        ob = torch.cat([o_band.transpose(1, 2).reshape(-1, d), o_band.new_zeros(g, d)])
        num = (ob * w0[:, None]).index_add(0, dest, w[:, None] * o)
        out = num / den[:, None]
        return out[: n * c * g].view(n, c, g, d).transpose(1, 2)
    # Inference: exp relative to the band's LSE (a per-row constant), so the tiles' partial sums add
    # straight into the band's (o = 1 * o_band + sum p@v, den = 1 + sum p). Two bmm's into reused
    # buffers run the 64-key tiles at about twice the flash kernel's rate. A tile whose logits exceed
    # that reference by > 88 would overflow: it is redone with its own row max (never seen in practice).
    # A tile row p*G + h is query p's head h, so one query's G heads are one contiguous (G*D) row:
    # gathers and adds move whole queries (few large rows run ~8x faster than many 64-float ones).
    # Logits and the reference in base 2 (exp2 is twice as fast as exp).
    ref = torch.cat([lse_band.transpose(1, 2).reshape(n * c, g), lse_band.new_zeros(1, g)]).mul_(LOG2E)  # (N*C+1, G)
    num = torch.cat([o_band.transpose(1, 2).reshape(n * c, g * d), o_band.new_zeros(1, g * d)])
    den = torch.ones_like(ref)
    qf.mul_(d**-0.5 * LOG2E)
    nb_max, rows_t = min(TILE_BATCH, rows.shape[0]), PAIR_TILE * g
    # reused buffers: fresh multi-MB tensors would cost page faults on every batch
    buf_q, buf_s, buf_o = (q.new_empty(nb_max * rows_t * x) for x in (d, bs, d))
    buf_k, buf_v = q.new_empty(nb_max * bs, d), q.new_empty(nb_max * bs, d)
    for t0 in range(0, rows.shape[0], TILE_BATCH):
        r, ts = rows[t0: t0 + TILE_BATCH].reshape(-1), tile_seg[t0: t0 + TILE_BATCH]
        nt = ts.shape[0]
        qt = torch.index_select(qf, 0, r, out=buf_q[: nt * rows_t * d].view(-1, g * d)).view(nt, rows_t, d)
        row, start = ts // n_blocks, ts % n_blocks * bs
        kt = _gather_blocks(k, row, start, bs, out=buf_k[: nt * bs])
        vt = _gather_blocks(v, row, start, bs, out=buf_v[: nt * bs])
        p = torch.bmm(qt, kt.transpose(1, 2), out=buf_s[: nt * rows_t * bs].view(nt, rows_t, bs))  # logits
        p.sub_(ref.index_select(0, r).view(nt, rows_t, 1))
        if valid is not None:  # unwritten slots: weight 0, and value 0 (their contents may be NaN)
            ok = valid[row, ts % n_blocks]  # (tiles, bs)
            p.masked_fill_(~ok[:, None], NEG)
            vt.masked_fill_(~ok[..., None], 0.0)
        w = p.exp2_().sum(-1).view(-1, g)  # weight vs the band's LSE; a fully masked row -> 0
        o = torch.bmm(p, vt, out=buf_o[: nt * rows_t * d].view(nt, rows_t, d))
        num.index_add_(0, r, o.view(-1, g * d))
        den.index_add_(0, r, w)
    if not bool(torch.isfinite(den).all()):  # an overflowed weight sums to inf
        return _remote(q, k, v, q_pos, idx, cfg, key_valid, True, o_band, lse_band)
    out = num[: n * c].view(n * c, g, d) / den[: n * c, :, None]
    return out.view(n, c, g, d).transpose(1, 2)

_FUSED_SRC = Path(__file__).with_name("cpu_fused.c")


def _fused_kernels():
    """cpu_fused.c built for this CPU (kernels/cbuild.py), or None: no compiler, a CPU without AVX2/FMA
    (the library then holds stubs), or CPMTOOL_CPU_KERNELS=0."""
    from ..cbuild import load

    lib = load(_FUSED_SRC)
    if lib is None or not lib.infllmv2_available():
        return None
    if lib.infllmv2_far.argtypes is None:
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.infllmv2_far.argtypes = [p, p, p, i64, i64, p, p, p, p, p, p, p, i64, i32, i32, i32, i32]
        lib.infllmv2_scores.argtypes = [p, p, i64, i64, i64, i64, p, p, p, i64, i64, i64, i32, i32, i32]
        lib.infllmv2_lse.argtypes = [p, p, i64, i64, i64, i64, p, p, i64, i64, i32, i32, i32]
        lib.infllmv2_pool_select.argtypes = [p, i64, i64, p, i64, i64, i64, i32, i32, i32, i32, i32, p, i32]
        for f in (lib.infllmv2_far, lib.infllmv2_scores, lib.infllmv2_lse, lib.infllmv2_pool_select):
            f.restype = ctypes.c_int
    return lib


def _scores_fused(lib, q, c1, c2, q_pos, cfg: SparseConfig, transposed: bool):
    """`block_scores`' compressed-key scores in two C calls (cpu_fused.c): the coarse keys' LSE, then
    exp2(q . c1 - lse2) summed over the group's heads, with no logits tensors. q (N, G, T, D);
    c1, c2 (N, Nc, D), or (N, D, Nc) when `transposed` -> p (N, T, N1); None when the kernels cannot
    take these tensors."""
    n, g, t, d = q.shape
    if any(c.dtype != torch.float32 for c in (c1, c2)):
        return None
    jd = (2, 1) if transposed else (1, 2)  # the dims of compressed key j and of feature d
    n1, n2 = c1.shape[jd[0]], c2.shape[jd[0]]
    qs = torch.empty(n, t, g, d)  # query-major, base-2 logits: a query's heads are consecutive rows
    torch.mul(q.transpose(1, 2), d**-0.5 * LOG2E, out=qs)
    pos1 = q_pos.long() + 1

    def visible(kernel, stride, width):  # (N, T) compressed keys each query sees
        return torch.where(pos1 < kernel, 0, (pos1 - kernel) // stride + 1).clamp_(max=width).contiguous()

    # (locals: a tensor must outlive the C call that reads its data_ptr)
    vis1, vis2 = visible(cfg.kernel_size, cfg.kernel_stride, n1), visible(cfg.kernel_size2, cfg.kernel_stride2, n2)
    ld = -(-n1 // 16) * 16
    lse, p = torch.empty(n, t, g), torch.empty(n, t, ld)
    threads = torch.get_num_threads()
    rc = lib.infllmv2_lse(qs.data_ptr(), c2.data_ptr(), c2.stride(0), c2.stride(jd[0]), c2.stride(jd[1]), n2,
                          vis2.data_ptr(), lse.data_ptr(), n, t, g, d, threads)
    if rc == 0:
        rc = lib.infllmv2_scores(qs.data_ptr(), c1.data_ptr(), c1.stride(0), c1.stride(jd[0]), c1.stride(jd[1]), n1,
                                 lse.data_ptr(), vis1.data_ptr(), p.data_ptr(), ld, n, t, g, d, threads)
    return p[..., :n1] if rc == 0 else None


def _pool_select_fused(lib, p, q_pos, cfg: SparseConfig, n_blocks: int):
    """`pool_blocks` then `select_blocks` in one C call (a quickselect per query instead of a top-k over
    64-bit keys): p (N, T, N1) from _scores_fused -> idx (N, T, K) as select_blocks returns it."""
    n, t, n1 = p.shape
    if p.stride(2) != 1 or p.stride(0) != t * p.stride(1):
        return None
    kout = min(cfg.topk_eff, n_blocks)
    pos = q_pos.long().contiguous()
    out = torch.empty(n, t, kout, dtype=torch.long)
    rc = lib.infllmv2_pool_select(p.data_ptr(), p.stride(1), n1, pos.data_ptr(), n * t, n_blocks, cfg.topk_eff,
                                  cfg.block_size // cfg.kernel_stride, cfg.kernel_size // cfg.kernel_stride,
                                  cfg.block_size, cfg.init_blocks, cfg.local_blocks, out.data_ptr(),
                                  torch.get_num_threads())
    return out if rc == 0 else None


def _remote_fused(lib, q, k, v, q_pos, idx, cfg: SparseConfig, n_blocks: int, o_band, lse_band):
    """`_remote`'s inference path in one C call (cpu_fused.c): no gathered tiles, no padding, no scatter.

    Same arithmetic (base-2 logits relative to the band's LSE, partial sums added into the band's).
    None when the kernel cannot take these tensors or a weight overflowed (the caller then runs the
    torch path / the exact merge). q (N, G, C, D) -> (N, G, C, D)."""
    n, g, c, d = q.shape
    bs = cfg.block_size
    if (d % 16 or bs % 16 or q.is_cuda or any(x.dtype != torch.float32 for x in (q, k, v, o_band))
            or any(x.stride(2) != 1 or x.stride(1) != d for x in (k, v))):
        return None
    seg, qrow = _pair_segments(idx, q_pos, cfg, n_blocks)
    if seg.numel() == 0:
        return o_band
    segs, counts = torch.unique_consecutive(seg, return_counts=True)
    seg_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    row_ptr = torch.searchsorted(segs // n_blocks, torch.arange(n + 1))
    seg_block = segs % n_blocks
    qf = torch.empty(n, c, g, d)  # query-major: one query's G heads are one contiguous (G*D) row
    torch.mul(q.transpose(1, 2), d**-0.5 * LOG2E, out=qf)
    # fresh copies (with G = 1 `.contiguous()` would return the band's own tensors, which the torch
    # path still needs if this call gives up)
    ref = (lse_band.transpose(1, 2) * LOG2E).contiguous()  # (N, C, G)
    num = o_band.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # (N, C, G, D)
    den = torch.ones(n, c, g)
    rc = lib.infllmv2_far(qf.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0), v.stride(0), ref.data_ptr(),
                          num.data_ptr(), den.data_ptr(), row_ptr.data_ptr(), seg_block.data_ptr(),
                          seg_ptr.data_ptr(), qrow.data_ptr(), n, g, d, bs, torch.get_num_threads())
    if rc != 0 or not bool(torch.isfinite(den).all()):
        return None
    return (num / den[..., None]).transpose(1, 2)


def _decode(q, k, v, q_pos, idx, cfg: SparseConfig, key_valid, grad):
    """One query per row: gather the selected blocks of each row. q (N, G, 1, D); idx (N, 1, K)."""
    n, g, _, d = q.shape
    s, bs, dev = k.shape[1], cfg.block_size, q.device
    kk = idx[:, 0]  # (N, K)
    tok = (kk.clamp(min=0) * bs)[..., None] + torch.arange(bs, device=dev)  # (N, K, bs)
    ok = (kk[..., None] >= 0) & (tok <= q_pos[:, :1, None])
    past = tok >= s  # the partial last block reads past the keys: zero those values (0 * NaN is NaN)
    tok = tok.clamp(max=s - 1)
    row = torch.arange(n, device=dev).repeat_interleave(kk.shape[1])
    kg = _gather_blocks(k, row, (kk.clamp(min=0) * bs).reshape(-1), bs).view(n, -1, d)
    vg = _gather_blocks(v, row, (kk.clamp(min=0) * bs).reshape(-1), bs).view(n, -1, d)
    if bool(past.any()):
        vg = vg.masked_fill(past.view(n, -1, 1), 0.0)
    if key_valid is not None:
        ok &= key_valid.gather(1, tok.reshape(n, -1)).reshape(ok.shape)
    # one query row per head: two small matmuls beat the flash kernel, which parallelises over rows
    att = torch.bmm(q.reshape(n, g, d), kg.transpose(1, 2)) * d**-0.5  # (N, G, K*bs)
    att = att.masked_fill_(~ok.view(n, 1, -1), NEG).softmax(-1)
    return torch.bmm(att, vg).view(n, g, 1, d)


def infllmv2_cpu(q, k, v, q_pos, cfg: SparseConfig, *, c1=None, c2=None, q_score=None, k_score=None,
                 key_valid=None) -> torch.Tensor:
    """InfLLM v2 attention, batched. q (B, Hq, T, D); k, v (B, Hkv, S, D); q_pos (B, T) absolute positions.

    Key slot s holds position s. `c1`/`c2` (B, Hkv, N, D) are compressed score keys already computed
    (the KV cache keeps them); else they are computed from `k_score` (or `k`). `key_valid` (B, S) masks
    unwritten cache slots. Returns (B, Hq, T, D) in q's dtype.
    """
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g, n = hq // hkv, b * hkv
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    dt = q.dtype
    if not grad:  # the flash kernel wants one dtype; bf16 on CPU runs in float32 here
        q, k, v = q.float(), k.float(), v.float()
    qs = (q if q_score is None else q_score).reshape(n, g, t, d)
    if c1 is None or c2 is None:
        ks = (k if k_score is None else k_score).reshape(n, s, d)
        c1 = compress(ks, cfg.kernel_size, cfg.kernel_stride)
        c2 = compress(ks, cfg.kernel_size2, cfg.kernel_stride2)
    c1, c2 = c1.reshape(n, -1, d), c2.reshape(n, -1, d)
    q = q.reshape(n, g, t, d)
    k, v = k.reshape(n, s, d), v.reshape(n, s, d)  # views for a KV cache's (B, Hkv, used, D) prefix
    pos = q_pos.repeat_interleave(hkv, 0)  # (N, T)
    # slots past the last query are never attended, so only the written prefix matters
    valid = key_valid
    if valid is not None and bool(valid[:, : int(q_pos.max()) + 1].all()):
        valid = None
    if valid is not None:
        valid = valid.repeat_interleave(hkv, 0)
    # stage-1 queries per call: the torch path's (N, G, sub, N1) logits fill SCORE_BUDGET; the C kernels
    # keep only (N, sub, N1) scores, so G times more queries share each packed panel of keys
    fused = not q.is_cuda and _fused_kernels() is not None
    sub = max(1, SCORE_BUDGET // max(1, n * (1 if fused else g) * c1.shape[1]))
    if t > sub:  # many sub-chunks score against them: transpose once (see block_scores), padded
        c1t, c2t = _transpose_padded(c1), _transpose_padded(c2)
    else:  # decode: a copy would cost more than the one bmm gains
        c1t, c2t = c1.float().transpose(1, 2), c2.float().transpose(1, 2)
    work = None if fused else q.new_empty(n * g * min(sub, t) * (c1t.shape[2] + c2t.shape[2]), dtype=torch.float32)
    # every row's queries at the same consecutive positions (a prefill, chunked or not): the band by query blocks
    contiguous = t > 1 and bool((pos == pos[:1, :1] + torch.arange(t, device=pos.device)).all())
    outs = []
    for c0 in range(0, t, CHUNK):
        qc, pc, qsc = q[:, :, c0: c0 + CHUNK], pos[:, c0: c0 + CHUNK], qs[:, :, c0: c0 + CHUNK]
        with torch.no_grad():
            nb = -(-(int(pc.max()) + 1) // cfg.block_size)  # one width for the chunk's sub-chunks
            idx = torch.cat([_select(qsc[:, :, i: i + sub].detach(), c1t, c2t, pc[:, i: i + sub], cfg, nb, work)
                             for i in range(0, qc.shape[2], sub)], 1)
        if t == 1:
            outs.append(_decode(qc, k, v, pc, idx, cfg, valid, grad))
            continue
        # by query blocks from the first whole window on (before it, the block windows are mostly
        # padding: the sliced band computes less there)
        split = qc.shape[2]
        if contiguous and not grad and _FLASH is not None and not q.is_cuda:
            split = min(max(cfg.local_blocks * cfg.block_size - int(pc[0, 0]), 0), qc.shape[2])
        band = [_band(qc[:, :, i: min(i + BAND, split)], k, v, pc[:, i: min(i + BAND, split)], cfg, valid, grad)
                for i in range(0, split, BAND)]
        if split < qc.shape[2]:
            band.append(_band_blocks(qc[:, :, split:], k, v, pc[:, split:], cfg, valid))
        o_band, lse_band = torch.cat([o for o, _ in band], 2), torch.cat([lse for _, lse in band], 2)
        outs.append(_remote(qc, k, v, pc, idx, cfg, valid, grad, o_band, lse_band))
    return torch.cat(outs, 2).reshape(b, hq, t, d).to(dt)


def _transpose_padded(c):
    """(N, Nc, D) -> (N, D, Nc') float32, Nc' = Nc rounded up to SCORE_ALIGN with zero columns."""
    n, nc, d = c.shape
    out = c.new_empty(n, d, -(-nc // SCORE_ALIGN) * SCORE_ALIGN, dtype=torch.float32)
    out[..., :nc] = c.transpose(1, 2)
    out[..., nc:] = 0.0
    return out


def _select(q, c1t, c2t, q_pos, cfg: SparseConfig, n_blocks: int, work):
    # c1t, c2t: (N, D, Nc') float32 from _transpose_padded. The columns scored are rounded up to
    # SCORE_ALIGN: the extra ones are windows no query here sees yet (or zero padding), masked.
    top = int(q_pos.max()) + 1  # compressed keys past the last query's view are never needed
    n1, n2 = (min(-(-num_compressed(top, kernel, stride) // SCORE_ALIGN) * SCORE_ALIGN, c.shape[2])
              for kernel, stride, c in ((cfg.kernel_size, cfg.kernel_stride, c1t),
                                        (cfg.kernel_size2, cfg.kernel_stride2, c2t)))
    if not q.is_cuda and (lib := _fused_kernels()) is not None:
        p = _scores_fused(lib, q, c1t[..., :n1], c2t[..., :n2], q_pos, cfg, True)
        if p is not None:
            idx = _pool_select_fused(lib, p, q_pos, cfg, n_blocks)
            if idx is not None:
                return idx
    scores = block_scores(q, c1t[..., :n1], c2t[..., :n2], q_pos, cfg, n_blocks, transposed=True, work=work)
    return select_blocks(scores, q_pos, cfg)
