/* SIMD helpers shared by the C kernels (AVX2 + FMA; include only under `#if defined(__AVX2__) &&
   defined(__FMA__)`). kernels/cbuild.py hashes this file with every source that includes it. */
#ifndef CPMTOOL_SIMD_H
#define CPMTOOL_SIMD_H
#include <immintrin.h>

/* 2^x for x <= 128 (128 and above give +inf, so an overflow stays visible to the caller); x <= -127
   (and -inf) gives 0. 2^x = 2^n * 2^f with n = round(x), |f| <= 0.5, and 2^f by its Taylor series
   in f*ln2 to degree 7 (truncation error < 1e-9 relative, below float rounding). */
static inline __m256 exp2_ps(__m256 x) {
    x = _mm256_min_ps(x, _mm256_set1_ps(128.0f));
    x = _mm256_max_ps(x, _mm256_set1_ps(-127.0f));
    __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(x, n);
    /* c_k = ln(2)^k / k! */
    __m256 p = _mm256_set1_ps(1.5252733804059841e-05f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381608e-04f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-02f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    /* n = -127 gives exponent bits 0: exactly 0; n = 128 gives 255: +inf */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float hsum(__m256 x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
