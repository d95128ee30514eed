/* Pointwise kernels for the CPU: the ops between the matmuls of a decode step and of training.

   Decode. A decode step of a small model is mostly per-operation overhead: on cpm-tiny (4 layers,
   hidden 256) a batch of 64 rows took ~16 ms a step, of which the matmuls were ~7 ms and the ~150
   ATen calls of the norms, rotary, cache writes and SwiGLU around them ~6 ms (each op ~5-40 us on
   tensors of a few KB). Here each of those runs as one pass over the rows:
   - add_rmsnorm: the residual add (x += a * rs) and the next RMSNorm, h = w * (x * rsqrt(mean(x^2) + eps));
   - rope_write: the rotary of q and k (HF rotate-half, with the sign folded into the sin table as
     transformer.rope_tables does) and the K/V write into the cache at each row's position;
   - silu_mul: SwiGLU's silu(gate) * up.

   Training. Autograd runs RMSNorm as ~6 ATen ops forward and ~10 backward, rotary as 4 and 4 and
   SwiGLU as 2 and 3, each a pass over an N x hidden (or N x intermediate) tensor (a GRPO update of
   cpm-tiny: ~3000 x 256, ~3000 x 768); here each is one pass forward and one backward (rmsnorm_fwd/
   bwd, rope_fwd with its transpose as the backward, swiglu_fwd/bwd). Measured fwd + bwd on those
   shapes, 2 threads, against autograd of the torch ops: 1.2 vs 3.7 ms (norm), 1.6 vs 3.2 ms (rotary),
   4.0-4.4 vs 6.5 ms (SwiGLU); the norm and rotary take 1.9 and 2.5 ms on one thread.

   The matmuls stay in ATen (MKL), the decode attention is kernels/decode_attention. Each kernel
   keeps the torch path's order of operations (separate multiplies and adds: -std=c11 turns off FMA
   contraction), so results differ from it only by the reduction order of the norm's sums and
   silu's exp (a polynomial exp2, simd.h): float rounding. The decode kernels are single-threaded
   (a decode step's rows are a few KB: less work than waking a thread team); the training passes
   split over the OpenMP threads from PAR_MIN (64K) elements up (the same libgomp as torch's, so
   its thread count). Built without AVX2/FMA, pointwise_available() is 0 and the callers keep the
   torch path. */

#include <math.h>
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__)
#include "../simd.h"

int pointwise_available(void) { return 1; }

/* The training passes split over the OpenMP threads from this many elements (fewer: less work than
   waking the thread team); the Python side picks rmsnorm_bwd's thread count by the same bound. */
#define PAR_MIN (1 << 16)

/* One row's RMSNorm: y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps); returns r. */
static inline float norm_row(const float *x, const float *w, float eps, float *y, int N) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= N; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    float ss = hsum(acc);
    for (; i < N; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)N + eps);
    for (i = 0; i < N; i++) y[i] = w[i] * (x[i] * r);
    return r;
}

/* x (B, N) at row stride sx, updated in place with x += a * rs when a is not NULL (rs == 1: a plain
   add, as the torch path skips the multiply); h (B, N) at row stride sh = w * (x * rsqrt(mean(x^2) + eps)). */
void add_rmsnorm(float *x, int64_t sx, const float *a, int64_t sa, float rs, const float *w, float eps, float *h,
                 int64_t sh, int B, int N) {
    for (int b = 0; b < B; b++) {
        float *xr = x + b * sx;
        if (a) {
            const float *ar = a + b * sa;
            if (rs == 1.0f)
                for (int i = 0; i < N; i++) xr[i] = xr[i] + ar[i];
            else
                for (int i = 0; i < N; i++) xr[i] = xr[i] + ar[i] * rs;
        }
        norm_row(xr, w, eps, h + b * sh, N);
    }
}

/* One head's rotary: out[i] = x[i] * cos[i] + x[(i + D/2) % D] * ssin[i] (ssin: sin with the first
   half negated), the torch path's `x * cos + x.roll(D/2) * signed_sin`. */
static inline void rotate(const float *x, const float *c, const float *s, float *out, int D) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) out[i] = x[i] * c[i] + x[i + half] * s[i];
    for (int i = half; i < D; i++) out[i] = x[i] * c[i] + x[i - half] * s[i];
}

/* q (B, H*D), k and v (B, Hkv*D) at row strides sq, sk, sv: the projections of one token per row.
   cos, ssin (B, D) contiguous. The rotated q goes to qout (B, H, D) contiguous; the rotated k and
   the plain v go to the cache slot pos[b] of row b: kc + b*skb + j*skh + pos[b]*sks (vc likewise,
   the same strides). Returns 2 for a position outside [0, S) (nothing written past it). */
int rope_write(const float *q, int64_t sq, const float *k, int64_t sk, const float *v, int64_t sv, const float *cos,
               const float *ssin, float *kc, float *vc, int64_t skb, int64_t skh, int64_t sks, int S,
               const int64_t *pos, float *qout, int B, int H, int Hkv, int D) {
    for (int b = 0; b < B; b++)
        if (pos[b] < 0 || pos[b] >= S) return 2;
    for (int b = 0; b < B; b++) {
        const float *c = cos + (int64_t)b * D, *s = ssin + (int64_t)b * D;
        for (int h = 0; h < H; h++) rotate(q + b * sq + (int64_t)h * D, c, s, qout + ((int64_t)b * H + h) * D, D);
        for (int j = 0; j < Hkv; j++) {
            const int64_t slot = b * skb + j * skh + pos[b] * sks;
            rotate(k + b * sk + (int64_t)j * D, c, s, kc + slot, D);
            const float *vr = v + b * sv + (int64_t)j * D;
            for (int i = 0; i < D; i++) vc[slot + i] = vr[i];
        }
    }
    return 0;
}

/* out (B, I) contiguous = silu(g) * u, silu(g) = g / (1 + e^-g); g, u at row strides sg, su. */
void silu_mul(const float *g, int64_t sg, const float *u, int64_t su, float *out, int B, int I) {
    const __m256 one = _mm256_set1_ps(1.0f), nl2e = _mm256_set1_ps(-1.4426950408889634f);
    for (int b = 0; b < B; b++) {
        const float *gr = g + b * sg, *ur = u + b * su;
        float *o = out + (int64_t)b * I;
        int i = 0;
        for (; i + 8 <= I; i += 8) {
            const __m256 x = _mm256_loadu_ps(gr + i);
            const __m256 sig = _mm256_div_ps(x, _mm256_add_ps(one, exp2_ps(_mm256_mul_ps(x, nl2e))));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(sig, _mm256_loadu_ps(ur + i)));
        }
        for (; i < I; i++) o[i] = gr[i] / (1.0f + expf(-gr[i])) * ur[i];
    }
}

/* SwiGLU's backward, h = silu(g) * u, over n contiguous elements: du = dh * silu(g) and
   dg = dh * u * silu'(g), silu'(g) = sig * (1 + g * (1 - sig)), sig = 1 / (1 + e^-g). One pass reads
   dh, g, u and writes dg, du; autograd's three (a mul for du, a mul and silu_backward for dg) read
   six tensors and write three. Chunks split over the OpenMP threads. */
void swiglu_bwd(const float *g, const float *u, const float *dh, float *dg, float *du, int64_t n) {
    const int64_t chunk = 1 << 14;
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const __m256 one = _mm256_set1_ps(1.0f), nl2e = _mm256_set1_ps(-1.4426950408889634f);
        const int64_t end = c0 + chunk < n ? c0 + chunk : n;
        int64_t i = c0;
        for (; i + 8 <= end; i += 8) {
            const __m256 x = _mm256_loadu_ps(g + i), d = _mm256_loadu_ps(dh + i);
            const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp2_ps(_mm256_mul_ps(x, nl2e))));
            _mm256_storeu_ps(du + i, _mm256_mul_ps(d, _mm256_mul_ps(x, sig)));
            const __m256 ds = _mm256_mul_ps(sig, _mm256_add_ps(one, _mm256_mul_ps(x, _mm256_sub_ps(one, sig))));
            _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(u + i)), ds));
        }
        for (; i < end; i++) {
            const float sig = 1.0f / (1.0f + expf(-g[i]));
            du[i] = dh[i] * (g[i] * sig);
            dg[i] = dh[i] * u[i] * (sig * (1.0f + g[i] * (1.0f - sig)));
        }
    }
}

/* SwiGLU's forward over n contiguous elements, threaded: h = silu(g) * u. */
void swiglu_fwd(const float *g, const float *u, float *h, int64_t n) {
    const int64_t chunk = 1 << 14;
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t end = c0 + chunk < n ? c0 + chunk : n;
        silu_mul(g + c0, 0, u + c0, 0, h + c0, 1, (int)(end - c0));
    }
}

/* y (B, N) = w * (x * r), r[b] = 1 / sqrt(mean(x[b]^2) + eps) (saved for the backward); contiguous rows. */
void rmsnorm_fwd(const float *x, const float *w, float eps, float *y, float *r, int64_t B, int N) {
#pragma omp parallel for schedule(static) if (B * N >= PAR_MIN)
    for (int64_t b = 0; b < B; b++) r[b] = norm_row(x + b * N, w, eps, y + b * N, N);
}

/* The RMSNorm backward, per row with g = gy * w: dx = r * g - x * r^3 * mean(g * x); dw (N,) = the
   sum over rows of gy * x * r in float64. The rows split into T contiguous blocks, one per thread,
   each summing into its own row of acc (T, N); the blocks' sums then add up in block order, so the
   result depends on T but not on the threads' timing. dw is overwritten, not added to. */
void rmsnorm_bwd(const float *x, const float *w, const float *r, const float *gy, float *dx, float *dw, double *acc,
                 int64_t B, int N, int T) {
#pragma omp parallel for schedule(static) num_threads(T) if (T > 1)
    for (int t = 0; t < T; t++) {
        double *at = acc + (int64_t)t * N;
        for (int i = 0; i < N; i++) at[i] = 0.0;
        const int64_t lo = B * t / T, hi = B * (t + 1) / T;
        for (int64_t b = lo; b < hi; b++) {
            const float *xr = x + b * N, *gr = gy + b * N;
            const float rb = r[b];
            float dot = 0.0f;
            for (int i = 0; i < N; i++) dot += gr[i] * w[i] * xr[i];
            const float c = rb * rb * rb * (dot / (float)N);
            float *d = dx + b * N;
            for (int i = 0; i < N; i++) {
                d[i] = rb * (gr[i] * w[i]) - xr[i] * c;
                at[i] += (double)(gr[i] * (xr[i] * rb));
            }
        }
    }
    for (int i = 0; i < N; i++) {
        double sum = 0.0;
        for (int t = 0; t < T; t++) sum += acc[(int64_t)t * N + i];
        dw[i] = (float)sum;
    }
}

/* Rotary on x (R, H, D) contiguous, token r using row r of the tables cos, ssin (R, D) (R = B * T):
   y = x * cos + roll(x, D/2) * ssin. With `transpose` it applies the transpose (the backward): rotary is
   linear, y_i = x_i c_i + x_s(i) s_i with s(i) = (i + D/2) mod D its own inverse, so
   dx_k = gy_k c_k + gy_s(k) s_s(k). */
void rope_fwd(const float *x, const float *cos, const float *ssin, float *y, int64_t R, int H, int D, int transpose) {
    const int half = D / 2;
#pragma omp parallel for schedule(static) if (R * H * D >= PAR_MIN)
    for (int64_t r = 0; r < R; r++) {
        const float *c = cos + r * D, *s = ssin + r * D;
        for (int h = 0; h < H; h++) {
            const float *xr = x + (r * H + h) * D;
            float *yr = y + (r * H + h) * D;
            if (!transpose) {
                rotate(xr, c, s, yr, D);
            } else {
                for (int i = 0; i < half; i++) yr[i] = xr[i] * c[i] + xr[i + half] * s[i + half];
                for (int i = half; i < D; i++) yr[i] = xr[i] * c[i] + xr[i - half] * s[i - half];
            }
        }
    }
}

#else

int pointwise_available(void) { return 0; } /* no AVX2/FMA: the caller keeps the torch path */

void add_rmsnorm(float *x, int64_t sx, const float *a, int64_t sa, float rs, const float *w, float eps, float *h,
                 int64_t sh, int B, int N) {}
int rope_write(const float *q, int64_t sq, const float *k, int64_t sk, const float *v, int64_t sv, const float *cos,
               const float *ssin, float *kc, float *vc, int64_t skb, int64_t skh, int64_t sks, int S,
               const int64_t *pos, float *qout, int B, int H, int Hkv, int D) {
    return 1;
}
void silu_mul(const float *g, int64_t sg, const float *u, int64_t su, float *out, int B, int I) {}

void swiglu_bwd(const float *g, const float *u, const float *dh, float *dg, float *du, int64_t n) {}
void swiglu_fwd(const float *g, const float *u, float *h, int64_t n) {}
void rmsnorm_fwd(const float *x, const float *w, float eps, float *y, float *r, int64_t B, int N) {}
void rmsnorm_bwd(const float *x, const float *w, const float *r, const float *gy, float *dx, float *dw, double *acc,
                 int64_t B, int N, int T) {}
void rope_fwd(const float *x, const float *cos, const float *ssin, float *y, int64_t R, int H, int D, int transpose) {}

#endif
