/* A whole decode step of a dense fp32 transformer on the CPU in one call: every layer's norms,
   projections, rotary + KV-cache write, attention and SwiGLU, for one token per row.

   `Transformer._decode_step` already runs the ops between the matmuls in C (kernels/pointwise,
   kernels/decode_attention), but from Python: ~11 calls a layer, each a Python frame, a dispatch
   and, for the matmuls, an ATen op. On cpm-tiny (3M parameters, 64 rows) that serial overhead is
   about a fifth of a step, while the second thread waits. Here the layer loop runs in C and calls
   those same kernels (this file includes their sources) and, for the matmuls, the BLAS sgemm that
   torch's own CPU matmul calls (MKL's Fortran `sgemm_`, found in torch's library at run time and
   passed in as a pointer), so the step computes what the Python path computes, op for op.

   Per layer, as `_decode_step`: h = RMSNorm(x += rs * a); q, k, v = h W^T (+ bias); rotate q and k,
   write k and v to the cache slot pos[b]; attention of q over the cache's visible slots; a = y Wo^T
   (+ bias); h = RMSNorm(x += rs * a); a = (silu(h Wg^T) * (h Wu^T)) Wd^T. Then the final norm. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "../decode_attention/cpu_decode.c"
#include "../pointwise/cpu_pointwise.c"

/* MKL's Fortran interface: column-major, arguments by pointer. */
typedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *, const float *, const float *,
                        const int *, const float *, const int *, const float *, float *, const int *);

/* Row-major y (M x N) = x (M x K) W^T with W (N x K) row-major (a torch Linear's weight), plus bias. */
static void linear(sgemm_t sgemm, const float *x, const float *w, const float *bias, float *y, int M, int N, int K) {
    const float one = 1.0f, zero = 0.0f;
    /* column-major: y^T (N x M) = W (N x K, stored as K x N: transposed) . x^T (K x M) */
    sgemm("T", "N", &N, &M, &K, &one, w, &K, x, &K, &zero, y, &N);
    if (bias)
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++) y[(int64_t)m * N + n] += bias[n];
}

#if defined(__AVX2__) && defined(__FMA__)
int decode_step_available(void) { return 1; }
#else
int decode_step_available(void) { return 0; }
#endif

/* w: per layer 13 pointers: ln1, q, k, v, o, ln2, gate, up, down weights, then q, k, v, o biases
   (NULL: none). kc, vc: per layer the cache buffers (B, Hkv, S, D) with strides skb, skh, sks (the
   same for every layer); valid (B, >= used) bytes at row stride sva. x (B, hidden) holds the
   tokens' embeddings and is the residual stream; out (B, hidden) gets the final normed hidden
   states. ws: workspace of B * (3 * H * D + 2 * Hkv * D + hidden + 2 * inter) floats. Returns 0,
   or 2 for a position outside the cache or a shape the attention kernel does not take. */
int decode_step(void *sgemm_ptr, const void *const *w, float *const *kc, float *const *vc, int64_t skb, int64_t skh,
                int64_t sks, int S, const int64_t *pos, const uint8_t *valid, int64_t sva, int used, const float *cos,
                const float *ssin, const float *final_norm, float eps, float rs, float *x, float *out, float *ws,
                int B, int L, int hidden, int inter, int H, int Hkv, int D) {
    sgemm_t sgemm = (sgemm_t)sgemm_ptr;
    const int HD = H * D, KD = Hkv * D;
    float *q = ws, *k = q + (int64_t)B * HD, *v = k + (int64_t)B * KD, *qr = v + (int64_t)B * KD;
    float *y = qr + (int64_t)B * HD, *a = y + (int64_t)B * HD, *g = a + (int64_t)B * hidden;
    float *u = g + (int64_t)B * inter, *h = out; /* out doubles as the normed input of each sublayer */
    const float scale = 1.0f / sqrtf((float)D);
    for (int l = 0; l < L; l++) {
        const float *const *p = (const float *const *)(w + 13 * l);
        add_rmsnorm(x, hidden, l ? a : NULL, hidden, rs, p[0], eps, h, hidden, B, hidden);
        linear(sgemm, h, p[1], p[9], q, B, HD, hidden);
        linear(sgemm, h, p[2], p[10], k, B, KD, hidden);
        linear(sgemm, h, p[3], p[11], v, B, KD, hidden);
        if (rope_write(q, HD, k, KD, v, KD, cos, ssin, kc[l], vc[l], skb, skh, sks, S, pos, qr, B, H, Hkv, D)) return 2;
        if (decode_attention(qr, (int64_t)HD, D, kc[l], skb, skh, sks, vc[l], skb, skh, sks, pos, valid, sva, y, B, H,
                             Hkv, used, D, scale))
            return 2;
        linear(sgemm, y, p[4], p[12], a, B, hidden, HD);
        add_rmsnorm(x, hidden, a, hidden, rs, p[5], eps, h, hidden, B, hidden);
        linear(sgemm, h, p[6], NULL, g, B, inter, hidden);
        linear(sgemm, h, p[7], NULL, u, B, inter, hidden);
        silu_mul(g, inter, u, inter, g, B, inter); /* in place: each element reads its own g, u first */
        linear(sgemm, g, p[8], NULL, a, B, hidden, inter);
    }
    add_rmsnorm(x, hidden, a, hidden, rs, final_norm, eps, out, hidden, B, hidden);
    return 0;
}
