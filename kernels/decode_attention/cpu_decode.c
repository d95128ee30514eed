/* Decode attention on the CPU: one query per row against its row's KV-cache slots.

   The engine's decode step is q (B, H, 1, D) against the cache k, v (B, Hkv, S, D): query head h
   reads kv head h / G (G = H / Hkv, grouped-query attention) and row b sees slot s iff s <= pos[b]
   and valid[b, s] (transformer.slot_mask). Reading the cache is all the work there is; ATen's
   flash kernel takes 1.3-1.8x as long as that read (a small GEMM per (row, head) plus its mask
   handling), so one pass per (row, kv head) reads each K and V slot once for the G query heads
   that share it:
   - scores of a block of BLK slots for the G heads, eight slots per head at a time (eight FMA
     chains and one transpose-add; q pre-scaled by scale * log2 e, so softmax uses exp2);
   - online softmax: the running max m and sum l per head, the accumulator rescaled by 2^(m - m')
     when a block raises the max;
   - the block's weights times V added to the G accumulators; out = acc / l.
   Arithmetic is fp32 with an exp2 accurate to float rounding (simd.h), so the output matches SDPA
   to rounding, not bit for bit. OpenMP over (row, kv head). Returns 0, or 2 for shapes it does not
   take (the caller runs SDPA); built without AVX2/FMA, decode_attention_available() is 0. */

#include <math.h>
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__)
#include "../simd.h"

#define MAXG 16
#define MAXD 256
#define BLK 64

int decode_attention_available(void) { return 1; }

/* Eight dot-product accumulators (one per slot) to one vector of the eight sums: a transpose-add. */
static inline __m256 hsum8(const __m256 *a) {
    const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    /* lanes: s0123 = (0 1 2 3 | 0 1 2 3) halves, s4567 likewise: add the 128-bit halves */
    const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    return _mm256_add_ps(lo, hi);
}

static void one_head_group(const float *q, int64_t sqh, const float *kb, int64_t sks, const float *vb, int64_t svs,
                           const uint8_t *va, int64_t n, int G, int D, float c, float *out) {
    float qs[MAXG * MAXD] __attribute__((aligned(32)));
    float acc[MAXG * MAXD] __attribute__((aligned(32)));
    float sc[MAXG * BLK] __attribute__((aligned(32)));
    float m[MAXG], l[MAXG];
    const int DV = D / 8;
    for (int g = 0; g < G; g++) {
        for (int d = 0; d < D; d++) {
            qs[g * D + d] = q[g * sqh + d] * c;
            acc[g * D + d] = 0.0f;
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    for (int64_t s0 = 0; s0 < n; s0 += BLK) {
        const int nb = (int)(n - s0 < BLK ? n - s0 : BLK);
        const int nv = (nb + 7) & ~7;
        int nvalid = 0;
        for (int t = 0; t < nb; t++) nvalid += va[s0 + t] != 0;
        if (!nvalid) continue; /* every slot masked: the block adds nothing (and m may still be -inf) */
        /* scores, eight slots at a time per head: eight independent FMA chains, then one transpose-add;
           slots past the block's end read slot nb - 1 again and are masked below */
        for (int t0 = 0; t0 < nv; t0 += 8) {
            const float *kr[8];
            for (int u = 0; u < 8; u++) kr[u] = kb + (s0 + (t0 + u < nb ? t0 + u : nb - 1)) * sks;
            for (int g = 0; g < G; g++) {
                __m256 a[8];
                for (int u = 0; u < 8; u++) a[u] = _mm256_setzero_ps();
                for (int dv = 0; dv < DV; dv++) {
                    const __m256 qv = _mm256_load_ps(qs + g * D + dv * 8);
                    for (int u = 0; u < 8; u++) a[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[u] + dv * 8), a[u]);
                }
                _mm256_store_ps(sc + g * BLK + t0, hsum8(a));
            }
            for (int u = 0; u < 8; u++)
                if (t0 + u >= nb || !va[s0 + t0 + u])
                    for (int g = 0; g < G; g++) sc[g * BLK + t0 + u] = -INFINITY;
        }
        for (int g = 0; g < G; g++) {
            float *p = sc + g * BLK;
            __m256 mx = _mm256_set1_ps(-INFINITY);
            for (int t = 0; t < nv; t += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(p + t));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float mn = fmaxf(m[g], _mm_cvtss_f32(h));
            if (mn > m[g]) {
                const float alpha = exp2f(m[g] - mn); /* m = -inf: 0, the accumulator is still 0 */
                const __m256 av = _mm256_set1_ps(alpha);
                for (int dv = 0; dv < DV; dv++)
                    _mm256_store_ps(acc + g * D + dv * 8, _mm256_mul_ps(av, _mm256_load_ps(acc + g * D + dv * 8)));
                l[g] *= alpha;
                m[g] = mn;
            }
            const __m256 ref = _mm256_set1_ps(m[g]);
            __m256 sum = _mm256_setzero_ps();
            for (int t = 0; t < nv; t += 8) {
                const __m256 e = exp2_ps(_mm256_sub_ps(_mm256_load_ps(p + t), ref)); /* masked: -inf -> 0 */
                _mm256_store_ps(p + t, e);
                sum = _mm256_add_ps(sum, e);
            }
            l[g] += hsum(sum);
        }
        /* weights times V: per 8 features, two chains over the block's slots in registers; a masked
           slot is skipped rather than weighted 0, so whatever its V holds cannot reach the output */
        for (int g = 0; g < G; g++) {
            const float *p = sc + g * BLK;
            for (int dv = 0; dv < DV; dv++) {
                __m256 r0 = _mm256_setzero_ps(), r1 = _mm256_setzero_ps();
                const float *vc = vb + s0 * svs + dv * 8;
                if (nvalid == nb) {
                    int t = 0;
                    for (; t + 1 < nb; t += 2) {
                        r0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(vc + t * svs), r0);
                        r1 = _mm256_fmadd_ps(_mm256_set1_ps(p[t + 1]), _mm256_loadu_ps(vc + (t + 1) * svs), r1);
                    }
                    if (t < nb) r0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(vc + t * svs), r0);
                } else {
                    for (int t = 0; t < nb; t++)
                        if (va[s0 + t]) r0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(vc + t * svs), r0);
                }
                float *a = acc + g * D + dv * 8;
                _mm256_store_ps(a, _mm256_add_ps(_mm256_load_ps(a), _mm256_add_ps(r0, r1)));
            }
        }
    }
    for (int g = 0; g < G; g++) {
        const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f; /* no visible slot: 0, as SDPA gives */
        for (int d = 0; d < D; d++) out[g * D + d] = acc[g * D + d] * inv;
    }
}

/* q: query head h of row b at q + b*sqb + h*sqh (D contiguous floats); k, v: slot s of kv head j of
   row b at k + b*skb + j*skh + s*sks (v likewise with its strides); pos (B,) int64; valid: row b's
   slot flags at valid + b*sva (bytes); out (B, H, D) contiguous. Slots past S are never read. */
int decode_attention(const float *q, int64_t sqb, int64_t sqh, const float *k, int64_t skb, int64_t skh, int64_t sks,
                     const float *v, int64_t svb, int64_t svh, int64_t svs, const int64_t *pos, const uint8_t *valid,
                     int64_t sva, float *out, int B, int H, int Hkv, int S, int D, float scale) {
    if (Hkv <= 0 || H % Hkv || D % 8 || D > MAXD || H / Hkv > MAXG) return 2;
    const int G = H / Hkv;
    const float c = scale * 1.4426950408889634f;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int j = 0; j < Hkv; j++) {
            int64_t n = pos[b] + 1;
            if (n > S) n = S;
            if (n < 0) n = 0;
            one_head_group(q + b * sqb + (int64_t)j * G * sqh, sqh, k + b * skb + j * skh, sks, v + b * svb + j * svh,
                           svs, valid + b * sva, n, G, D, c, out + ((int64_t)b * H + (int64_t)j * G) * D);
        }
    return 0;
}

#else

int decode_attention_available(void) { return 0; } /* no AVX2/FMA: the caller keeps SDPA */

int decode_attention(const float *q, int64_t sqb, int64_t sqh, const float *k, int64_t skb, int64_t skh, int64_t sks,
                     const float *v, int64_t svb, int64_t svh, int64_t svs, const int64_t *pos, const uint8_t *valid,
                     int64_t sva, float *out, int B, int H, int Hkv, int S, int D, float scale) {
    return 1;
}

#endif
