/* Decode products with int8 activations (model/int8_activations.py, ``--activations int8``): a few rows of bf16 x,
 * each quantized to int8 with its own scale, against int8 or int4 weights, the products summed exactly in int32.
 * cpu_gemv.py builds this file with cpu_gemv.c and cpu_dequant.c into one library.
 *
 * Why: a decode step reads every weight once, so its speed is the memory read rate if the loop keeps up. With bf16
 * activations an int4 weight costs a widening to fp32 and an FMA per column, and a CPU without AVX512-BF16 (Intel
 * up to Ice Lake) cannot keep up with memory that way (cpu_gemv.c). With int8 activations one AVX512-VNNI
 * ``vpdpbusd`` multiplies 64 unsigned x signed byte pairs and adds them into 16 int32 sums: four instructions per
 * 64 weights, nibble unpacking included. llama.cpp's Q4_0 / Q8_0 dot products quantize the activations the same
 * way (per block of 32 there; per row here, the contract of the int8 prompt GEMM).
 *
 * The numbers (row m of x, xq = round(x / sx), sx = max |x| / 127: int8_quantize_rows in cpu_dequant.c):
 *   int8   y[m, n] = bf16(acc * sx * scale[n] (+ bias[n])),   acc = sum_k xq[k] q[n, k] in int32; each step in
 *          fp32 and no fused multiply-add: the bits of the prompt's path (torch._int_mm, then int8_scale_rows).
 *   int4   y[m, n] = bf16(sx * sum_g (scale_g P_g + (zero_g - 8 scale_g) X_g) (+ bias[n])),
 *          P_g = sum_{k in g} xq[k] q[n, k] (q the raw nibble, 0..15), X_g = sum_{k in g} xq[k], both in int32;
 *          the group terms summed in fp32 (the order differs from a sequential sum: ~1e-7 relative).
 * vpdpbusd's first operand is unsigned: an int8 weight is read as q + 128 (its sign bit flipped) and
 * 128 sum_k xq taken off once per row; a nibble is unsigned already. int4 needs G a multiple of 64 for the vector
 * loop (one 32-byte load is 64 columns: its low nibbles, then its high ones, against x's even columns, then its
 * odd ones, permuted once per call); other groups and CPUs without VNNI take plain C loops with the same sums.
 *
 * Threads: the N output channels in contiguous blocks, as cpu_gemv.c. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512VNNI__)
#include <immintrin.h>
#endif

#define A8_BLOCK 16    /* output channels per scheduling unit */
#define A8_AHEAD 2048  /* bytes of weight prefetched ahead of the loads */

void int8_quantize_rows(const uint16_t *x, int8_t *q, float *s, int64_t M, int64_t K, int threads);  /* cpu_dequant.c */

static inline uint16_t a8_to_bf16(float f) {  /* round to nearest-even, NaN kept a NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float a8_bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- int8 weights: acc = sum_k xq[k] q[k] ---------------------------------------------------------------- */
static int32_t dot_q8_a8(const int8_t *x, int32_t xsum, const int8_t *w, int64_t K) {
#if defined(__AVX512VNNI__)
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
        _mm_prefetch((const char *)(w + k) + A8_AHEAD, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + k) + A8_AHEAD + 64, _MM_HINT_T0);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_xor_si512(_mm512_loadu_si512(w + k), flip), _mm512_loadu_si512(x + k));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_xor_si512(_mm512_loadu_si512(w + k + 64), flip),
                                 _mm512_loadu_si512(x + k + 64));
    }
    for (; k < K; k += 64) {  /* masked tail: lanes past K load 0 (x) and 0x80 (w), products 0 */
        const __mmask64 m = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, w + k), flip),
                                 _mm512_maskz_loadu_epi8(m, x + k));
    }
    return _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1)) - 128 * xsum;  /* sum (q + 128) xq - 128 sum xq */
#else
    (void)xsum;
    int32_t s = 0;
    for (int64_t k = 0; k < K; k++) s += (int32_t)x[k] * (int32_t)w[k];
    return s;
#endif
}

/* no fused multiply-add in the scaling: the bits of int8_scale_rows (cpu_dequant.c), which torch's ops fix */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static uint16_t scale_q8(int32_t acc, float sx, const uint16_t *scales, const uint16_t *bias, int64_t n) {
    const float v = (float)acc * sx * a8_bf16_f32(scales[n]);
    return a8_to_bf16(bias ? v + a8_bf16_f32(bias[n]) : v);
}

void gemv_int8_a8(const uint16_t *x, const int8_t *w, const uint16_t *scales, const uint16_t *bias, uint16_t *y,
                  int64_t M, int64_t N, int64_t K, int threads) {
    int8_t *xq = malloc(M * K);
    float *sx = malloc(sizeof(float) * M);
    int32_t *xsum = malloc(sizeof(int32_t) * M);
    int8_quantize_rows(x, xq, sx, M, K, 1);
    for (int64_t m = 0; m < M; m++) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; k++) s += xq[m * K + k];
        xsum[m] = s;
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n0 = 0; n0 < N; n0 += A8_BLOCK)
        for (int64_t n = n0; n < n0 + A8_BLOCK && n < N; n++)
            for (int64_t m = 0; m < M; m++)
                y[m * N + n] = scale_q8(dot_q8_a8(xq + m * K, xsum[m], w + n * K, K), sx[m], scales, bias, n);
    free(xq);
    free(sx);
    free(xsum);
}

/* ---- int4 weights: per group P_g = sum xq q, the row sum_g scale_g P_g + (zero_g - 8 scale_g) X_g ----------- */
/* xq: a row of quantized x; xp: the same with each 64 columns c..c+63 stored as its 32 even columns, then its 32
 * odd ones (the order of a 32-byte load's low nibbles, then its high ones); X: (K / G) the groups' sums of xq */
static float dot_q4_a8(const int8_t *xq, const int8_t *xp, const int32_t *X, const uint8_t *w, const uint16_t *scale,
                       const uint16_t *zero, int64_t K, int64_t G) {
    const int64_t groups = K / G;
    float total = 0.0f;
#if defined(__AVX512VNNI__)
    if (G % 64 == 0) {
        const int64_t loads = G / 64;
        const __m512i low = _mm512_set1_epi8(15);
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            __m512i p = _mm512_setzero_si512();
            for (int64_t l = g * loads; l < (g + 1) * loads; l++) {
                _mm_prefetch((const char *)(w + 32 * l) + A8_AHEAD, _MM_HINT_T0);
                /* the 32 bytes in both halves; the high half shifted 4 bits: low nibbles, then high ones */
                const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w + 32 * l)));
                const __m512i q = _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xffff0000u, v, 4), low);
                p = _mm512_dpbusd_epi32(p, q, _mm512_loadu_si512(xp + 64 * l));
            }
            const __m512 s = _mm512_set1_ps(a8_bf16_f32(scale[g])), pf = _mm512_cvtepi32_ps(p);  /* exact: |p| < 2^24 */
            if (g & 1) acc1 = _mm512_fmadd_ps(s, pf, acc1);  /* two chains: no wait on the FMA */
            else acc0 = _mm512_fmadd_ps(s, pf, acc0);
        }
        total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    } else
#else
    (void)xp;
#endif
    {
        for (int64_t g = 0; g < groups; g++) {
            int32_t p = 0;
            for (int64_t b = g * G / 2; b < (g + 1) * G / 2; b++)
                p += (int32_t)xq[2 * b] * (w[b] & 15) + (int32_t)xq[2 * b + 1] * (w[b] >> 4);
            total += a8_bf16_f32(scale[g]) * (float)p;
        }
    }
    for (int64_t g = 0; g < groups; g++)
        total += (a8_bf16_f32(zero[g]) - 8.0f * a8_bf16_f32(scale[g])) * (float)X[g];
    return total;
}

void gemv_int4_a8(const uint16_t *x, const uint8_t *w, const uint16_t *scales, const uint16_t *zeros,
                  const uint16_t *bias, uint16_t *y, int64_t M, int64_t N, int64_t K, int64_t G, int threads) {
    const int64_t groups = K / G;
    int8_t *xq = malloc(M * K), *xp = malloc(M * K);
    float *sx = malloc(sizeof(float) * M);
    int32_t *X = malloc(sizeof(int32_t) * M * groups);
    int8_quantize_rows(x, xq, sx, M, K, 1);
    for (int64_t m = 0; m < M; m++) {
        const int8_t *xr = xq + m * K;
        int8_t *pr = xp + m * K;
        int64_t c = 0;
        for (; c + 64 <= K; c += 64)  /* each 64 columns: the even ones, then the odd ones */
            for (int64_t j = 0; j < 32; j++) {
                pr[c + j] = xr[c + 2 * j];
                pr[c + 32 + j] = xr[c + 2 * j + 1];
            }
        for (; c < K; c++) pr[c] = xr[c];
        for (int64_t g = 0; g < groups; g++) {
            int32_t sum = 0;
            for (int64_t k = g * G; k < (g + 1) * G; k++) sum += xr[k];
            X[m * groups + g] = sum;
        }
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n0 = 0; n0 < N; n0 += A8_BLOCK)
        for (int64_t n = n0; n < n0 + A8_BLOCK && n < N; n++)
            for (int64_t m = 0; m < M; m++) {
                const float t = dot_q4_a8(xq + m * K, xp + m * K, X + m * groups, w + n * K / 2, scales + n * groups,
                                          zeros + n * groups, K, G);
                const float v = sx[m] * t;
                y[m * N + n] = a8_to_bf16(bias ? v + a8_bf16_f32(bias[n]) : v);
            }
    free(xq);
    free(xp);
    free(sx);
    free(X);
}
