/* Decode attention on the CPU: one query per row against its row's KV-cache slots.

   The engine's decode step is q (B, H, 1, D) against the cache k, v (B, Hkv, S, D): query head h
   reads kv head h / G (G = H / Hkv, grouped-query attention) and row b sees slot s iff s <= pos[b]
   and valid[b, s] (transformer.slot_mask). ATen's flash kernel runs this shape at ~1/3 of the
   memory bandwidth (a small GEMM per (row, head) plus its mask handling), and the cache read is all
   the work there is, so one pass per (row, kv head) reads each K and V slot once for the G query
   heads that share it:
   - scores of a block of BLK slots for the G heads (q pre-scaled by scale * log2 e, so softmax uses
     exp2);
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
        int any = 0;
        for (int t = 0; t < nv; t++) {
            const int64_t s = s0 + t;
            if (t >= nb || !va[s]) {
                for (int g = 0; g < G; g++) sc[g * BLK + t] = -INFINITY;
                continue;
            }
            any = 1;
            const float *kr = kb + s * sks;
            for (int g = 0; g < G; g++) {
                __m256 a = _mm256_setzero_ps();
                for (int dv = 0; dv < DV; dv++)
                    a = _mm256_fmadd_ps(_mm256_load_ps(qs + g * D + dv * 8), _mm256_loadu_ps(kr + dv * 8), a);
                sc[g * BLK + t] = hsum(a);
            }
        }
        if (!any) continue; /* every slot masked: the block adds nothing (and m may still be -inf) */
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
        for (int t = 0; t < nb; t++) {
            const int64_t s = s0 + t;
            if (!va[s]) continue;
            const float *vr = vb + s * svs;
            for (int g = 0; g < G; g++) {
                const __m256 w = _mm256_set1_ps(sc[g * BLK + t]);
                float *a = acc + g * D;
                for (int dv = 0; dv < DV; dv++)
                    _mm256_store_ps(a + dv * 8, _mm256_fmadd_ps(w, _mm256_loadu_ps(vr + dv * 8), _mm256_load_ps(a + dv * 8)));
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
