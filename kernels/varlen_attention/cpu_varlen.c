/* Attention over packed variable-length rows on the CPU, forward and backward, for training.

   A packed batch holds row b's tokens at [cu[b], cu[b+1]) of q (N, H*D) and k, v (N, Hkv*D), rotated
   already. Query i of row b sees its row's keys 0..i (causal) and, with a prefix, first every token
   of prefix row group[b] ([pcu[g], pcu[g+1]) of pk, pv): the prompt a GRPO response continues, run
   once for its n responses (transformer.response_logits). Query head h reads kv head h / G.

   The alternative is what the model did before: unpack q, k, v to padded (B, T) rows, fan the
   prompt's K/V out to the B rows and concatenate, build a slot mask, call ATen's flash attention,
   pack the output; and the same again backward. On cpm-tiny's GRPO update that chain was ~70 ms of
   ~400. Here there is no padding, no copy of the prompt per response, no mask tensor.

   One task per (row, kv head), OpenMP over them (the same libgomp as torch, so its thread count).
   A task copies its keys and values once into local buffers padded to 16 slots (K and V row-major,
   K^T and V^T), then runs its queries in chunks of QC, the G heads of each query side by side
   (row r = query * G + head):
   - forward: scores S = Q K^T in log2 units (q pre-scaled by scale * log2 e), softmax over each
     row's visible slots (exp2, simd.h), O = P V; it stores lse2 = max + log2(sum) per (token, head);
   - backward (FlashAttention's): P recomputed from lse2, dP = dO V^T, dS = P (dP - rowsum(dO O)),
     dQ = scale dS K, dK += scale dS^T Q, dV += P^T dO. Prefix slots' dK, dV go to the row's own
     slice of dpk/dpv (B, Pmax, Hkv*D), summed over the group by the caller, so no two tasks write
     the same memory.
   Every product is one 4 x 16 register tile (eight accumulators, AVX2 + FMA) over local buffers
   whose padding is zero, so no tile needs an edge case; a row block stops at the last slot any of
   its queries sees (causal), and dK/dV's key blocks start at the first query that sees them.
   fp32 throughout: the result matches SDPA to rounding, not bit for bit. Built without AVX2/FMA,
   varlen_attention_available() is 0 and the caller keeps its torch path. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include "../simd.h"

#define QC 32 /* queries per chunk: the chunk's score rows (QC * G x slots) stay in L2 */
#define MAXG 64 /* query heads per kv head */
#define LOG2E 1.4426950408889634f

int varlen_attention_available(void) { return 1; }

static inline int64_t up16(int64_t x) { return (x + 15) & ~(int64_t)15; }
static inline int64_t up4(int64_t x) { return (x + 3) & ~(int64_t)3; }

/* C[4 x 16] = (acc: +=) sum over k in [k0, k1) of A[r, k] * B[k, 0:16], A[r, k] at A + r*ars + k*aks
   (a row-major A, or a transposed one read in place). */
static inline void tile16(const float *A, int64_t ars, int64_t aks, const float *B, int64_t ldb, float *C,
                          int64_t ldc, int64_t k0, int64_t k1, int acc) {
#ifdef __AVX512F__
    __m512 c[4];
    for (int r = 0; r < 4; r++) c[r] = acc ? _mm512_loadu_ps(C + r * ldc) : _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; k++) {
        const __m512 b0 = _mm512_loadu_ps(B + k * ldb);
        for (int r = 0; r < 4; r++) c[r] = _mm512_fmadd_ps(_mm512_set1_ps(A[r * ars + k * aks]), b0, c[r]);
    }
    for (int r = 0; r < 4; r++) _mm512_storeu_ps(C + r * ldc, c[r]);
#else
    __m256 c[8];
    for (int r = 0; r < 4; r++) {
        c[2 * r] = acc ? _mm256_loadu_ps(C + r * ldc) : _mm256_setzero_ps();
        c[2 * r + 1] = acc ? _mm256_loadu_ps(C + r * ldc + 8) : _mm256_setzero_ps();
    }
    for (int64_t k = k0; k < k1; k++) {
        const __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);
        for (int r = 0; r < 4; r++) {
            const __m256 a = _mm256_broadcast_ss(A + r * ars + k * aks);
            c[2 * r] = _mm256_fmadd_ps(a, b0, c[2 * r]);
            c[2 * r + 1] = _mm256_fmadd_ps(a, b1, c[2 * r + 1]);
        }
    }
    for (int r = 0; r < 4; r++) {
        _mm256_storeu_ps(C + r * ldc, c[2 * r]);
        _mm256_storeu_ps(C + r * ldc + 8, c[2 * r + 1]);
    }
#endif
}

#ifdef __AVX512F__
/* The same over 32 columns: eight 16-wide accumulators, each A element broadcast once for two. */
static inline void tile32(const float *A, int64_t ars, int64_t aks, const float *B, int64_t ldb, float *C,
                          int64_t ldc, int64_t k0, int64_t k1, int acc) {
    __m512 c[8];
    for (int r = 0; r < 4; r++) {
        c[2 * r] = acc ? _mm512_loadu_ps(C + r * ldc) : _mm512_setzero_ps();
        c[2 * r + 1] = acc ? _mm512_loadu_ps(C + r * ldc + 16) : _mm512_setzero_ps();
    }
    for (int64_t k = k0; k < k1; k++) {
        const __m512 b0 = _mm512_loadu_ps(B + k * ldb), b1 = _mm512_loadu_ps(B + k * ldb + 16);
        for (int r = 0; r < 4; r++) {
            const __m512 a = _mm512_set1_ps(A[r * ars + k * aks]);
            c[2 * r] = _mm512_fmadd_ps(a, b0, c[2 * r]);
            c[2 * r + 1] = _mm512_fmadd_ps(a, b1, c[2 * r + 1]);
        }
    }
    for (int r = 0; r < 4; r++) {
        _mm512_storeu_ps(C + r * ldc, c[2 * r]);
        _mm512_storeu_ps(C + r * ldc + 16, c[2 * r + 1]);
    }
}
#endif

/* C (M x ncol) (+)= A (M x K) B (K x ncol), M a multiple of 4, A[r, k] at A + r*ars + k*aks; per
   block of four rows rb the columns stop at ncol[rb] (or n) and the k range is [klo[rb], khi[rb])
   (or [0, K)). */
static void gemm(int64_t M, const int64_t *ncol, int64_t n, const float *A, int64_t ars, int64_t aks, const float *B,
                 int64_t ldb, float *C, int64_t ldc, const int64_t *klo, const int64_t *khi, int64_t K, int acc) {
    for (int64_t rb = 0; rb < M / 4; rb++) {
        const int64_t nc = ncol ? ncol[rb] : n, k1 = khi ? khi[rb] : K;
        int64_t k0 = klo ? klo[rb] : 0;
        k0 = k0 < k1 ? k0 : k1;
        const float *a = A + rb * 4 * ars;
        float *c = C + rb * 4 * ldc;
        int64_t c0 = 0;
#ifdef __AVX512F__
        for (; c0 + 32 <= nc; c0 += 32) tile32(a, ars, aks, B + c0, ldb, c + c0, ldc, k0, k1, acc);
#endif
        for (; c0 < nc; c0 += 16) tile16(a, ars, aks, B + c0, ldb, c + c0, ldc, k0, k1, acc);
    }
}

typedef struct {
    const float *q, *k, *v, *pk, *pv;
    int64_t sq, sk, sv, spk, spv; /* token strides, in floats */
    const int64_t *cu, *pcu, *group;
    int B, H, Hkv, D;
    float scale;
} Args;

typedef struct {
    int64_t n, npre, S, Sp, G;
    float *K, *V, *Kt, *Vt;
} Keys;

/* Row b's slots for kv head j: the prefix's tokens, then its own. */
static void load_keys(const Args *a, int64_t b, int j, Keys *ks, float *buf) {
    const int D = a->D;
    const int64_t n = a->cu[b + 1] - a->cu[b];
    const int64_t g = a->pk ? a->group[b] : -1;
    const int64_t npre = a->pk ? a->pcu[g + 1] - a->pcu[g] : 0;
    ks->n = n, ks->npre = npre, ks->S = npre + n, ks->Sp = up16(npre + n), ks->G = a->H / a->Hkv;
    const int64_t Sp = ks->Sp;
    ks->K = buf, ks->V = buf + Sp * D, ks->Kt = buf + 2 * Sp * D, ks->Vt = buf + 3 * Sp * D;
    memset(buf, 0, sizeof(float) * 4 * Sp * D);
    for (int64_t t = 0; t < ks->S; t++) {
        const float *kr, *vr;
        if (t < npre) {
            kr = a->pk + (a->pcu[g] + t) * a->spk + (int64_t)j * D;
            vr = a->pv + (a->pcu[g] + t) * a->spv + (int64_t)j * D;
        } else {
            kr = a->k + (a->cu[b] + t - npre) * a->sk + (int64_t)j * D;
            vr = a->v + (a->cu[b] + t - npre) * a->sv + (int64_t)j * D;
        }
        memcpy(ks->K + t * D, kr, sizeof(float) * D);
        memcpy(ks->V + t * D, vr, sizeof(float) * D);
        for (int d = 0; d < D; d++) {
            ks->Kt[d * Sp + t] = kr[d];
            ks->Vt[d * Sp + t] = vr[d];
        }
    }
}

/* A chunk's queries [c0, c0 + nq) of row b, kv head j, as rows r = query * G + head of Qs (scaled by
   `mul`), Rp x D with zero padding; and each row block's visible slot count (rounded up to 16). */
static void load_queries(const Args *a, const float *src, int64_t sstride, int64_t b, int j, const Keys *ks,
                         int64_t c0, int64_t nq, float mul, float *Qs, int64_t *ncol, int64_t *lim) {
    const int D = a->D, G = (int)ks->G;
    const int64_t R = nq * G, Rp = up4(R);
    for (int64_t r = 0; r < Rp; r++) {
        float *dst = Qs + r * D;
        if (r < R) {
            const float *s = src + (a->cu[b] + c0 + r / G) * sstride + ((int64_t)j * G + r % G) * D;
            for (int d = 0; d < D; d++) dst[d] = s[d] * mul;
        } else {
            memset(dst, 0, sizeof(float) * D);
        }
        if (lim) lim[r] = r < R ? ks->npre + c0 + r / G + 1 : 0;
    }
    for (int64_t rb = 0; rb < Rp / 4; rb++) {
        const int64_t last = (rb * 4 + 3 < R ? rb * 4 + 3 : R - 1) / G;
        ncol[rb] = up16(ks->npre + c0 + last + 1);
    }
}

/* Row r of the scores (log2 units) to probabilities: exp2(s - ref) on its visible slots, 0 on the
   rest up to nc; ref = the row's max (returned, with the sum) or the given lse2. */
static void softmax_row(float *s, int64_t lim, int64_t nc, int use_ref, float ref_in, float *m_out, float *l_out) {
    for (int64_t t = lim; t < nc; t++) s[t] = -INFINITY;
    float ref = ref_in;
    if (!use_ref) {
        __m256 mx = _mm256_set1_ps(-INFINITY);
        for (int64_t t = 0; t < nc; t += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + t));
        float tmp[8];
        _mm256_storeu_ps(tmp, mx);
        ref = tmp[0];
        for (int u = 1; u < 8; u++) ref = tmp[u] > ref ? tmp[u] : ref;
    }
    const __m256 rv = _mm256_set1_ps(ref);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t t = 0; t < nc; t += 8) {
        const __m256 e = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(s + t), rv)); /* -inf -> 0 */
        _mm256_storeu_ps(s + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    if (m_out) *m_out = ref;
    if (l_out) *l_out = hsum(sum);
}

/* A task's buffer: K, V, K^T, V^T, dK, dV (Sp x D each), four Rp x D query-side blocks, two Rp x Sp
   score-side ones, the Rp row sums and dK/dV's per-block k starts. */
static size_t task_floats(const Args *a, int64_t b) {
    const int64_t n = a->cu[b + 1] - a->cu[b];
    const int64_t npre = a->pk ? a->pcu[a->group[b] + 1] - a->pcu[a->group[b]] : 0;
    const int64_t Sp = up16(npre + n), Rp = up4((int64_t)QC * (a->H / a->Hkv));
    return (size_t)(6 * Sp * a->D + 4 * Rp * a->D + 2 * Rp * Sp + Rp + 2 * (Sp / 4 + 1) + 64);
}

/* Whether the kernel takes these heads: grouped query heads, head_dim a multiple of 16. */
static int takes(int H, int Hkv, int D) { return Hkv > 0 && H % Hkv == 0 && H / Hkv <= MAXG && D > 0 && D % 16 == 0; }

/* Task (row b, kv head j): its buffer with the keys loaded, or NULL for an empty row (nothing to do)
   or a failed allocation (*err set). The caller frees the buffer. */
static float *begin_task(const Args *a, int64_t b, int j, Keys *ks, int *err) {
    if (a->cu[b + 1] <= a->cu[b]) return NULL;
    float *buf = aligned_alloc(64, up16((int64_t)task_floats(a, b)) * sizeof(float));
    if (!buf) {
        *err |= 1;
        return NULL;
    }
    load_keys(a, b, j, ks, buf);
    return buf;
}

/* out (N, H*D) and lse2 (N, H), both contiguous. */
int varlen_fwd(const float *q, int64_t sq, const float *k, int64_t sk, const float *v, int64_t sv, const float *pk,
               int64_t spk, const float *pv, int64_t spv, const int64_t *cu, const int64_t *pcu, const int64_t *group,
               float *out, float *lse2, int B, int H, int Hkv, int D, float scale) {
    if (!takes(H, Hkv, D)) return 2;
    const Args a = {q, k, v, pk, pv, sq, sk, sv, spk, spv, cu, pcu, group, B, H, Hkv, D, scale};
    int err = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : err)
    for (int64_t task = 0; task < (int64_t)B * Hkv; task++) {
        const int64_t b = task / Hkv;
        const int j = (int)(task % Hkv);
        Keys ks;
        float *buf = begin_task(&a, b, j, &ks, &err);
        if (!buf) continue;
        const int G = (int)ks.G;
        const int64_t Sp = ks.Sp, Rmax = up4((int64_t)QC * G);
        float *Qs = buf + 4 * Sp * D, *P = Qs + Rmax * D, *O = P + Rmax * Sp;
        int64_t ncol[QC * MAXG / 4 + 1], lim[QC * MAXG + 4];
        for (int64_t c0 = 0; c0 < ks.n; c0 += QC) {
            const int64_t nq = ks.n - c0 < QC ? ks.n - c0 : QC, R = nq * G, Rp = up4(R);
            load_queries(&a, q, sq, b, j, &ks, c0, nq, scale * LOG2E, Qs, ncol, lim);
            gemm(Rp, ncol, 0, Qs, D, 1, ks.Kt, Sp, P, Sp, NULL, NULL, D, 0);
            for (int64_t r = 0; r < Rp; r++) {
                float *s = P + r * Sp;
                const int64_t nc = ncol[r / 4];
                if (r >= R) {
                    memset(s, 0, sizeof(float) * nc);
                    continue;
                }
                float m, l;
                softmax_row(s, lim[r], nc, 0, 0.0f, &m, &l);
                const __m256 inv = _mm256_set1_ps(1.0f / l);
                for (int64_t t = 0; t < nc; t += 8) _mm256_storeu_ps(s + t, _mm256_mul_ps(inv, _mm256_loadu_ps(s + t)));
                lse2[(a.cu[b] + c0 + r / G) * H + (int64_t)j * G + r % G] = m + log2f(l);
            }
            gemm(Rp, NULL, D, P, Sp, 1, ks.V, D, O, D, NULL, ncol, 0, 0);
            for (int64_t r = 0; r < R; r++)
                memcpy(out + (a.cu[b] + c0 + r / G) * (int64_t)H * D + ((int64_t)j * G + r % G) * D, O + r * D,
                       sizeof(float) * D);
        }
        free(buf);
    }
    return err ? 1 : 0;
}

/* dq (N, H*D), dk, dv (N, Hkv*D) contiguous, written; dpk, dpv (B, Pmax, Hkv*D) contiguous and
   zeroed by the caller, row b's prefix slots written (summed over a group by the caller). */
int varlen_bwd(const float *q, int64_t sq, const float *k, int64_t sk, const float *v, int64_t sv, const float *pk,
               int64_t spk, const float *pv, int64_t spv, const int64_t *cu, const int64_t *pcu, const int64_t *group,
               const float *out, const float *dout, const float *lse2, float *dq, float *dk, float *dv, float *dpk,
               float *dpv, int64_t pmax, int B, int H, int Hkv, int D, float scale) {
    if (!takes(H, Hkv, D)) return 2;
    const Args a = {q, k, v, pk, pv, sq, sk, sv, spk, spv, cu, pcu, group, B, H, Hkv, D, scale};
    const int64_t HD = (int64_t)H * D, KD = (int64_t)Hkv * D;
    int err = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : err)
    for (int64_t task = 0; task < (int64_t)B * Hkv; task++) {
        const int64_t b = task / Hkv;
        const int j = (int)(task % Hkv);
        Keys ks;
        float *buf = begin_task(&a, b, j, &ks, &err);
        if (!buf) continue;
        const int G = (int)ks.G;
        const int64_t Sp = ks.Sp, Rmax = up4((int64_t)QC * G);
        float *dK = buf + 4 * Sp * D, *dV = dK + Sp * D;
        float *Qs = dV + Sp * D, *Qr = Qs + Rmax * D, *dO = Qr + Rmax * D, *dQ = dO + Rmax * D;
        float *P = dQ + Rmax * D, *dS = P + Rmax * Sp, *Di = dS + Rmax * Sp;
        int64_t *klo = (int64_t *)(Di + Rmax); /* Sp / 4 of them: two floats each */
        memset(dK, 0, sizeof(float) * 2 * Sp * D);
        int64_t ncol[QC * MAXG / 4 + 1], lim[QC * MAXG + 4];
        for (int64_t c0 = 0; c0 < ks.n; c0 += QC) {
            const int64_t nq = ks.n - c0 < QC ? ks.n - c0 : QC, R = nq * G, Rp = up4(R);
            load_queries(&a, q, sq, b, j, &ks, c0, nq, scale * LOG2E, Qs, ncol, lim);
            load_queries(&a, q, sq, b, j, &ks, c0, nq, 1.0f, Qr, ncol, NULL);
            load_queries(&a, dout, HD, b, j, &ks, c0, nq, 1.0f, dO, ncol, NULL);
            for (int64_t r = 0; r < Rp; r++) {
                float s = 0.0f;
                if (r < R) {
                    const float *o = out + (a.cu[b] + c0 + r / G) * HD + ((int64_t)j * G + r % G) * D;
                    for (int d = 0; d < D; d++) s += dO[r * D + d] * o[d];
                }
                Di[r] = s;
            }
            gemm(Rp, ncol, 0, Qs, D, 1, ks.Kt, Sp, P, Sp, NULL, NULL, D, 0);
            gemm(Rp, ncol, 0, dO, D, 1, ks.Vt, Sp, dS, Sp, NULL, NULL, D, 0);
            for (int64_t r = 0; r < Rp; r++) {
                float *p = P + r * Sp, *ds = dS + r * Sp;
                const int64_t nc = ncol[r / 4];
                if (r >= R) {
                    memset(p, 0, sizeof(float) * nc);
                    memset(ds, 0, sizeof(float) * nc);
                } else {
                    softmax_row(p, lim[r], nc, 1, lse2[(a.cu[b] + c0 + r / G) * H + (int64_t)j * G + r % G], NULL,
                                NULL);
                    const __m256 di = _mm256_set1_ps(Di[r]);
                    for (int64_t t = 0; t < nc; t += 8)
                        _mm256_storeu_ps(ds + t, _mm256_mul_ps(_mm256_loadu_ps(p + t),
                                                               _mm256_sub_ps(_mm256_loadu_ps(ds + t), di)));
                }
            }
            gemm(Rp, NULL, D, dS, Sp, 1, ks.K, D, dQ, D, NULL, ncol, 0, 0);
            for (int64_t r = 0; r < R; r++) {
                float *dst = dq + (a.cu[b] + c0 + r / G) * HD + ((int64_t)j * G + r % G) * D;
                for (int d = 0; d < D; d++) dst[d] = dQ[r * D + d] * scale;
            }
            /* dK and dV read dS and P transposed, in place: zero them past each block's columns up to
               the chunk's last; key block kb's first contributing row */
            const int64_t ncmax = ncol[Rp / 4 - 1];
            for (int64_t r = 0; r < Rp; r++) {
                const int64_t nc = ncol[r / 4];
                memset(P + r * Sp + nc, 0, sizeof(float) * (ncmax - nc));
                memset(dS + r * Sp + nc, 0, sizeof(float) * (ncmax - nc));
            }
            for (int64_t kb = 0; kb < ncmax / 4; kb++) {
                const int64_t first = kb * 4 - ks.npre - c0; /* the block's first slot as an own query index */
                klo[kb] = first > 0 ? first * G : 0;
            }
            gemm(ncmax, NULL, D, dS, 1, Sp, Qr, D, dK, D, klo, NULL, Rp, 1);
            gemm(ncmax, NULL, D, P, 1, Sp, dO, D, dV, D, klo, NULL, Rp, 1);
        }
        for (int64_t t = 0; t < ks.S; t++) {
            float *kd, *vd;
            if (t < ks.npre) {
                kd = dpk + (b * pmax + t) * KD + (int64_t)j * D;
                vd = dpv + (b * pmax + t) * KD + (int64_t)j * D;
            } else {
                kd = dk + (a.cu[b] + t - ks.npre) * KD + (int64_t)j * D;
                vd = dv + (a.cu[b] + t - ks.npre) * KD + (int64_t)j * D;
            }
            for (int d = 0; d < D; d++) {
                kd[d] = dK[t * D + d] * scale;
                vd[d] = dV[t * D + d];
            }
        }
        free(buf);
    }
    return err ? 1 : 0;
}

#else
int varlen_attention_available(void) { return 0; }
int varlen_fwd(const float *q, int64_t sq, const float *k, int64_t sk, const float *v, int64_t sv, const float *pk,
               int64_t spk, const float *pv, int64_t spv, const int64_t *cu, const int64_t *pcu, const int64_t *group,
               float *out, float *lse2, int B, int H, int Hkv, int D, float scale) {
    return 2;
}
int varlen_bwd(const float *q, int64_t sq, const float *k, int64_t sk, const float *v, int64_t sv, const float *pk,
               int64_t spk, const float *pv, int64_t spv, const int64_t *cu, const int64_t *pcu, const int64_t *group,
               const float *out, const float *dout, const float *lse2, float *dq, float *dk, float *dv, float *dpk,
               float *dpv, int64_t pmax, int B, int H, int Hkv, int D, float scale) {
    return 2;
}
#endif
