/* InfLLM v2 on CPU: fused inference kernels for cpu.py (built on first use by kernels/cbuild.py).

   Stage 1 (block selection):
   - infllmv2_lse: the coarse keys' log-sum-exp per query and head (the LSE approximation);
   - infllmv2_scores: the sum over a group's heads of exp2(q . c1 - lse2) per query and compressed key,
     without the (N, G, T, N1) logits tensor the torch path writes and re-reads three times;
   - infllmv2_pool_select: max-pool to blocks and top-k with the forced blocks, a quickselect per query.

   Stage 2, infllmv2_far: the far blocks of prefill (sinks and top-k picks below the local window).
   cpu.py's torch path gathers each tile's queries and key/value blocks into buffers, runs two bmm's,
   then scatter-adds the results back: at 64k tokens the gathers, the scatter-add and the separate
   exp2/sub/sum passes cost as much as the bmm's. Here a key block's pairs are walked in place: the
   block's keys are packed once (transposed, L1-sized), and every (query, head) row that selected it
   reads its query straight from q and adds its exp2-weighted values straight into its accumulator
   row. Same arithmetic as the torch path: logits in base 2, relative to a per-row reference (the
   band's LSE), so the partial sums add into the band's (o = o_band + sum p v, den = 1 + sum p).

   infllmv2_far's layouts (float32, row-major):
     q    (Nq, G*D)   queries, pre-scaled by D^-0.5 * log2(e); row i*G + h of (Nq*G, D) is query i, head h
     k, v (N, S, D)   rows n at k + n*k_stride, v + n*v_stride (a KV cache's used prefix is a view)
     ref  (Nq, G)     per-row reference, base 2
     num  (Nq, G*D)   accumulators, in/out; den (Nq, G) in/out
     pairs: segments (one per (row n, block b), sorted by n), seg_block[s] = b,
            seg_ptr[s]..seg_ptr[s+1] index qidx (query indices), row_ptr[n]..row_ptr[n+1] the segments of n.
   Rows n run in parallel (OpenMP): their queries are disjoint, so no two threads add to one row.

   Micro-kernel (dot16): R (query, head) rows x 16 columns in 2R 8-float AVX2 accumulators; R = 6 in
   infllmv2_far keeps both FMA pipes busy while the loads (6 broadcasts + 2 vector loads per step)
   fit the load ports. Every function returns 0 (2 for shapes it does not take); built without
   AVX2/FMA, infllmv2_available() is 0 and the others return 1 (the caller runs the torch path). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include "../simd.h"

#define MAXR 6

int infllmv2_available(void) { return 1; }

/* The micro-kernel of all three kernels: R rows (pointers qr, D floats each) dotted with 16 columns
   of ct (D rows, ldc floats apart): a0[r], a1[r] = columns 0-7, 8-15. R <= 6 and a compile-time
   constant at every call (always_inline + switch), so the 2R accumulators live in registers. */
static inline __attribute__((always_inline)) void dot16(const int R, const float *const *qr, const float *ct,
                                                        int64_t ldc, int D, __m256 *a0, __m256 *a1) {
    for (int r = 0; r < R; r++) a0[r] = a1[r] = _mm256_setzero_ps();
    for (int d = 0; d < D; d++) {
        __m256 k0 = _mm256_loadu_ps(ct + (int64_t)d * ldc), k1 = _mm256_loadu_ps(ct + (int64_t)d * ldc + 8);
        /* keep the two key vectors in registers: GCC otherwise folds the load into every FMA
           (2R loads per step instead of 2, and the load ports, not the FMAs, set the pace) */
        __asm__("" : "+x"(k0), "+x"(k1));
        for (int r = 0; r < R; r++) {
            __m256 b = _mm256_broadcast_ss(qr[r] + d);
            a0[r] = _mm256_fmadd_ps(b, k0, a0[r]);
            a1[r] = _mm256_fmadd_ps(b, k1, a1[r]);
        }
    }
}

/* dot16 for a run-time R in 1..6 */
static void dot16_r(int R, const float *const *qr, const float *ct, int64_t ldc, int D, __m256 *a0, __m256 *a1) {
    switch (R) {
    case 6: dot16(6, qr, ct, ldc, D, a0, a1); break;
    case 5: dot16(5, qr, ct, ldc, D, a0, a1); break;
    case 4: dot16(4, qr, ct, ldc, D, a0, a1); break;
    case 3: dot16(3, qr, ct, ldc, D, a0, a1); break;
    case 2: dot16(2, qr, ct, ldc, D, a0, a1); break;
    default: dot16(1, qr, ct, ldc, D, a0, a1); break;
    }
}

/* Columns [j0, j1) (j1 - j0 a multiple of 16) of compressed keys c, element (j, d) at c[j*sj + d*sd],
   packed as [column block][d][16], zeros past column P. Both layouts come in: (Nc, D) rows (sj = D,
   sd = 1, as a KV cache keeps them) and (D, Nc) transposed (sj = 1); reading 16 columns straight from
   the transposed one would hit one cache set D times (its rows are a power-of-two stride apart). */
static void pack16(const float *c, int64_t sj, int64_t sd, int64_t P, int64_t j0, int64_t j1, int D, float *pk) {
    for (int64_t j = j0; j < j1; j += 16) {
        float *blk = pk + (j - j0) * D;
        if (sj == 1 && j + 16 <= P) {
            for (int d = 0; d < D; d++) memcpy(blk + d * 16, c + j + d * sd, 16 * sizeof(float));
            continue;
        }
        for (int d = 0; d < D; d++)
            for (int i = 0; i < 16; i++) blk[d * 16 + i] = j + i < P ? c[(j + i) * sj + d * sd] : 0.0f;
    }
}

typedef struct {
    const float *q; /* (D,) the query row */
    float *o;       /* (D,) its accumulator row */
    float *den;     /* its softmax denominator */
    float ref;      /* its reference, base 2 */
} Row;

/* R rows against one key block: kt (D, BS) the block's keys transposed, v (BS, D) its values,
   p (R, BS) scratch. */
static inline __attribute__((always_inline)) void tile(const int R, const Row *rows, const float *kt,
                                                       const float *v, int D, int BS, float *p) {
    __m256 a0[MAXR], a1[MAXR];
    const float *qr[MAXR];
    for (int r = 0; r < R; r++) qr[r] = rows[r].q;
    for (int c = 0; c < BS; c += 16) { /* p = exp2(q . k - ref) */
        dot16(R, qr, kt + c, BS, D, a0, a1);
        for (int r = 0; r < R; r++) {
            __m256 ref = _mm256_set1_ps(rows[r].ref);
            _mm256_storeu_ps(p + r * BS + c, exp2_ps(_mm256_sub_ps(a0[r], ref)));
            _mm256_storeu_ps(p + r * BS + c + 8, exp2_ps(_mm256_sub_ps(a1[r], ref)));
        }
    }
    for (int r = 0; r < R; r++) {
        __m256 s = _mm256_setzero_ps();
        for (int j = 0; j < BS; j += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(p + r * BS + j));
        *rows[r].den += hsum(s);
    }
    for (int c = 0; c < D; c += 16) { /* o += p v */
        for (int r = 0; r < R; r++) {
            a0[r] = _mm256_loadu_ps(rows[r].o + c);
            a1[r] = _mm256_loadu_ps(rows[r].o + c + 8);
        }
        for (int j = 0; j < BS; j++) {
            __m256 v0 = _mm256_loadu_ps(v + (int64_t)j * D + c), v1 = _mm256_loadu_ps(v + (int64_t)j * D + c + 8);
            for (int r = 0; r < R; r++) {
                __m256 b = _mm256_broadcast_ss(p + r * BS + j);
                a0[r] = _mm256_fmadd_ps(b, v0, a0[r]);
                a1[r] = _mm256_fmadd_ps(b, v1, a1[r]);
            }
        }
        for (int r = 0; r < R; r++) {
            _mm256_storeu_ps(rows[r].o + c, a0[r]);
            _mm256_storeu_ps(rows[r].o + c + 8, a1[r]);
        }
    }
}

static void run_rows(int R, const Row *rows, const float *kt, const float *v, int D, int BS, float *p) {
    switch (R) {
    case 6: tile(6, rows, kt, v, D, BS, p); break;
    case 5: tile(5, rows, kt, v, D, BS, p); break;
    case 4: tile(4, rows, kt, v, D, BS, p); break;
    case 3: tile(3, rows, kt, v, D, BS, p); break;
    case 2: tile(2, rows, kt, v, D, BS, p); break;
    case 1: tile(1, rows, kt, v, D, BS, p); break;
    default: break;
    }
}

int infllmv2_far(const float *q, const float *k, const float *v, int64_t k_stride, int64_t v_stride, const float *ref,
                 float *num, float *den, const int64_t *row_ptr, const int64_t *seg_block,
                 const int64_t *seg_ptr, const int64_t *qidx, int64_t n_rows, int G, int D, int BS,
                 int n_threads) {
    if (D % 16 || BS % 16) return 2;
#pragma omp parallel num_threads(n_threads)
    {
        float *kt = (float *)aligned_alloc(64, sizeof(float) * (size_t)(D * BS + MAXR * BS));
        float *p = kt + D * BS;
        Row *rows = NULL;
        int64_t cap = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t n = 0; n < n_rows; n++) {
            for (int64_t s = row_ptr[n]; s < row_ptr[n + 1]; s++) {
                const float *kb = k + n * k_stride + seg_block[s] * BS * D;
                const float *vb = v + n * v_stride + seg_block[s] * BS * D;
                for (int j = 0; j < BS; j++)
                    for (int d = 0; d < D; d++) kt[d * BS + j] = kb[j * D + d];
                int64_t m = (seg_ptr[s + 1] - seg_ptr[s]) * G;
                if (m > cap) {
                    cap = 2 * m;
                    rows = (Row *)realloc(rows, sizeof(Row) * (size_t)cap);
                }
                for (int64_t i = 0; i < m; i++) {
                    int64_t row = qidx[seg_ptr[s] + i / G] * G + i % G;
                    rows[i] = (Row){q + row * D, num + row * D, den + row, ref[row]};
                }
                /* a block's queries are scattered over the chunk (their q and accumulator rows come
                   from L3 or memory): fetch the next micro-tile's rows while this one computes */
                for (int64_t g0 = 0; g0 < m; g0 += MAXR) {
                    for (int64_t i = g0 + MAXR; i < g0 + 2 * MAXR && i < m; i++)
                        for (int c = 0; c < D; c += 16) {
                            __builtin_prefetch(rows[i].q + c, 0, 3);
                            __builtin_prefetch(rows[i].o + c, 1, 3);
                        }
                    run_rows(m - g0 < MAXR ? (int)(m - g0) : MAXR, rows + g0, kt, vb, D, BS, p);
                }
            }
        }
        free(rows);
        free(kt);
    }
    return 0;
}

/* Stage 1. q (N, T, G, D) scaled to base-2 logits; c1 the P compressed keys of each row n at
   c1 + n*c_stride, strided as in pack16; lse2 (N, T, G) base 2 (+inf: no coarse key visible, every
   score 0); n_vis (N, T) compressed keys each query sees (<= P). Out: p (N, T, ldp), ldp >= P rounded
   up to 16: p[n,t,j] = sum_h exp2(q_h . c_j - lse2_h) for j < n_vis, else 0. Heads go 4 at a time
   (8 accumulators of 16 columns: Zen3's 4-cycle FMA latency is covered), columns in panels of
   PANEL (32 KB packed) reused by every query. */
#define PANEL 128

static inline __attribute__((always_inline)) void score_heads(const int R, const float *const *qr,
                                                              const float *lse, const float *ct, int64_t W,
                                                              int D, __m256 *s0, __m256 *s1) {
    __m256 a0[4], a1[4];
    dot16(R, qr, ct, W, D, a0, a1);
    for (int r = 0; r < R; r++) {
        __m256 l = _mm256_set1_ps(lse[r]);
        *s0 = _mm256_add_ps(*s0, exp2_ps(_mm256_sub_ps(a0[r], l)));
        *s1 = _mm256_add_ps(*s1, exp2_ps(_mm256_sub_ps(a1[r], l)));
    }
}

int infllmv2_scores(const float *q, const float *c1, int64_t c_stride, int64_t sj, int64_t sd, int64_t P,
                    const float *lse2, const int64_t *n_vis, float *p, int64_t ldp, int64_t N, int64_t T, int G,
                    int D, int n_threads) {
    int64_t P16 = (P + 15) / 16 * 16;
    if (ldp < P16) return 2;
#pragma omp parallel num_threads(n_threads)
    {
        float *pk = (float *)aligned_alloc(64, sizeof(float) * (size_t)(PANEL * D));
#pragma omp for collapse(2) schedule(static)
        for (int64_t n = 0; n < N; n++) {
            for (int64_t j0 = 0; j0 < P16; j0 += PANEL) {
                int64_t j1 = j0 + PANEL < P16 ? j0 + PANEL : P16;
                pack16(c1 + n * c_stride, sj, sd, P, j0, j1, D, pk);
                for (int64_t t = 0; t < T; t++) {
                    int64_t nt = n * T + t, nv = n_vis[nt];
                    float *out = p + nt * ldp;
                    for (int64_t j = j0; j < j1; j += 16) {
                        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
                        const float *cb = pk + (j - j0) * D;
                        for (int h = 0; h < G && j < nv; h += 4) {
                            const float *qr[4];
                            int R = G - h < 4 ? G - h : 4;
                            for (int r = 0; r < R; r++) qr[r] = q + (nt * G + h + r) * D;
                            const float *lse = lse2 + nt * G + h;
                            switch (R) {
                            case 4: score_heads(4, qr, lse, cb, 16, D, &s0, &s1); break;
                            case 3: score_heads(3, qr, lse, cb, 16, D, &s0, &s1); break;
                            case 2: score_heads(2, qr, lse, cb, 16, D, &s0, &s1); break;
                            default: score_heads(1, qr, lse, cb, 16, D, &s0, &s1); break;
                            }
                        }
                        _mm256_storeu_ps(out + j, s0);
                        _mm256_storeu_ps(out + j + 8, s1);
                        for (int64_t i = nv > j ? nv : j; i < j + 16; i++) out[i] = 0.0f; /* not yet visible */
                    }
                }
            }
        }
        free(pk);
    }
    return 0;
}

/* Stage 1's LSE approximation. lse (N, T, G) = log2 sum_{j < n_vis} exp2(q_h . c_j) over the P
   coarse keys c2 (strided as in pack16), +inf where none is visible yet (every score is then 0).
   q as for infllmv2_scores. A row's logits go to a buffer, then its max, then one exp2 per logit. */
int infllmv2_lse(const float *q, const float *c2, int64_t c_stride, int64_t sj, int64_t sd, int64_t P,
                 const int64_t *n_vis, float *lse, int64_t N, int64_t T, int G, int D, int n_threads) {
    int64_t P16 = (P + 15) / 16 * 16;
    float *pk = (float *)aligned_alloc(64, sizeof(float) * (size_t)(P16 * D + 16));
#pragma omp parallel num_threads(n_threads)
    {
        float *x = (float *)aligned_alloc(64, sizeof(float) * (size_t)(4 * P16 + 16));
        for (int64_t n = 0; n < N; n++) {
#pragma omp for schedule(static)
            for (int64_t jb = 0; jb < P16 / 16; jb++)
                pack16(c2 + n * c_stride, sj, sd, P, jb * 16, jb * 16 + 16, D, pk + jb * 16 * D);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < T; t++) {
                int64_t nt = n * T + t, nv = n_vis[nt], nv16 = (nv + 15) / 16 * 16;
                for (int h = 0; h < G; h += 4) {
                    int R = G - h < 4 ? G - h : 4;
                    const float *qr[4];
                    for (int r = 0; r < R; r++) qr[r] = q + (nt * G + h + r) * D;
                    for (int64_t j = 0; j < nv; j += 16) {
                        __m256 a0[MAXR], a1[MAXR];
                        dot16_r(R, qr, pk + j * D, 16, D, a0, a1);
                        for (int r = 0; r < R; r++) {
                            _mm256_storeu_ps(x + r * P16 + j, a0[r]);
                            _mm256_storeu_ps(x + r * P16 + j + 8, a1[r]);
                        }
                    }
                    for (int r = 0; r < R; r++) {
                        float *xr = x + r * P16;
                        if (nv == 0) {
                            lse[nt * G + h + r] = INFINITY;
                            continue;
                        }
                        for (int64_t i = nv; i < nv16; i++) xr[i] = -INFINITY;
                        __m256 m = _mm256_set1_ps(-INFINITY), sum = _mm256_setzero_ps();
                        for (int64_t i = 0; i < nv16; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(xr + i));
                        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
                        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
                        float mx = _mm_cvtss_f32(m4);
                        __m256 mv = _mm256_set1_ps(mx);
                        for (int64_t i = 0; i < nv16; i += 8)
                            sum = _mm256_add_ps(sum, exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + i), mv)));
                        lse[nt * G + h + r] = mx + log2f(hsum(sum));
                    }
                }
            }
        }
        free(x);
    }
    free(pk);
    return 0;
}

/* Pooling and top-k: p (rows, ldp) compressed-key scores (n1 valid columns, all >= 0) -> block
   scores (max over the windows j in [b*per - m + 1, (b+1)*per) overlapping block b, 0 where none:
   pool_blocks), then the selection of select_blocks: the forced blocks (sinks b < init, window
   qb - local .. qb) and the best of the other past blocks (ties to the lower block) up to K in all,
   never a block past qb = pos / bs. out (rows, kout) ascending, -1 first for unused slots,
   kout = min(K, nb). One quickselect per row instead of a top-k over 64-bit keys. */
static void swapf(float *a, int32_t *ai, int64_t i, int64_t j) {
    float t = a[i]; a[i] = a[j]; a[j] = t;
    int32_t u = ai[i]; ai[i] = ai[j]; ai[j] = u;
}

/* a[0..n) with indices ai: on return a[0..k) hold the k largest by (value desc, index asc) */
static void select_top(float *a, int32_t *ai, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        float pv = a[mid];
        int32_t pi = ai[mid];
        swapf(a, ai, mid, hi);
        int64_t st = lo;
        for (int64_t i = lo; i < hi; i++)
            if (a[i] > pv || (a[i] == pv && ai[i] < pi)) swapf(a, ai, i, st++);
        swapf(a, ai, st, hi);
        if (st == k - 1 || st == k) return;
        if (st < k) lo = st + 1;
        else hi = st - 1;
    }
}

int infllmv2_pool_select(const float *p, int64_t ldp, int64_t n1, const int64_t *pos, int64_t rows, int64_t nb,
                         int64_t K, int per, int m, int bs, int init, int local, int64_t *out, int n_threads) {
    int64_t kout = K < nb ? K : nb;
#pragma omp parallel num_threads(n_threads)
    {
        float *sc = (float *)malloc(sizeof(float) * (size_t)(nb + 1));
        int32_t *si = (int32_t *)malloc(sizeof(int32_t) * (size_t)(nb + 1));
        unsigned char *take = (unsigned char *)malloc((size_t)nb + 1);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *pr = p + r * ldp;
            int64_t qb = pos[r] / bs, top = qb < nb - 1 ? qb : nb - 1, nc = 0, nsel = 0;
            memset(take, 0, (size_t)nb);
            for (int64_t b = 0; b <= top; b++) {
                if (b < init || b >= qb - local) {
                    take[b] = 1;
                    nsel++;
                    continue;
                }
                int64_t j0 = b * per - m + 1, j1 = (b + 1) * per;
                float mx = 0.0f;
                for (int64_t j = j0 < 0 ? 0 : j0; j < j1 && j < n1; j++) mx = pr[j] > mx ? pr[j] : mx;
                sc[nc] = mx;
                si[nc++] = (int32_t)b;
            }
            int64_t want = kout - nsel; /* forced blocks never exceed K (init < topk) */
            if (want > nc) want = nc;
            if (want > 0) {
                if (want < nc) select_top(sc, si, nc, want);
                for (int64_t i = 0; i < want; i++) take[si[i]] = 1;
                nsel += want;
            }
            int64_t *o = out + r * kout, w = 0;
            for (; w < kout - nsel; w++) o[w] = -1;
            for (int64_t b = 0; b <= top; b++)
                if (take[b]) o[w++] = b;
        }
        free(sc);
        free(si);
        free(take);
    }
    return 0;
}

#else
int infllmv2_available(void) { return 0; } /* no AVX2/FMA: every caller keeps its torch path */

int infllmv2_pool_select(const float *p, int64_t ldp, int64_t n1, const int64_t *pos, int64_t rows, int64_t nb,
                         int64_t K, int per, int m, int bs, int init, int local, int64_t *out, int n_threads) {
    return 1;
}

int infllmv2_lse(const float *q, const float *c2, int64_t c_stride, int64_t sj, int64_t sd, int64_t P,
                 const int64_t *n_vis, float *lse, int64_t N, int64_t T, int G, int D, int n_threads) {
    return 1;
}

int infllmv2_scores(const float *q, const float *c1, int64_t c_stride, int64_t sj, int64_t sd, int64_t P,
                    const float *lse2, const int64_t *n_vis, float *p, int64_t ldp, int64_t N, int64_t T, int G,
                    int D, int n_threads) {
    return 1;
}

int infllmv2_far(const float *q, const float *k, const float *v, int64_t k_stride, int64_t v_stride, const float *ref,
                 float *num, float *den, const int64_t *row_ptr, const int64_t *seg_block,
                 const int64_t *seg_ptr, const int64_t *qidx, int64_t n_rows, int G, int D, int BS,
                 int n_threads) {
    return 1;
}
#endif
