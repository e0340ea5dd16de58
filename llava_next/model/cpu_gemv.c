/* One-row products for CPU decode: y (M, N) = x (M, K) W^T (+ bias), M small (one row per sequence).
 *
 * Decoding a token reads every weight once and does two flops per weight: its speed is the memory read
 * rate, if the loop keeps up with it. cpu_gemv.py builds this file at first use with -O3 -march=native
 * -fopenmp. Two implementations of each product:
 * - AVX512-BF16 (AMD Zen 4, Intel Cooper Lake / Sapphire Rapids and later): one dpbf16 instruction
 *   multiplies 32 bf16 pairs exactly and adds them into 16 fp32 sums. int8 and int4 weights become bf16
 *   without any conversion instruction: a nibble q OR-ed into the mantissa of 128.0 (0x4300) is the bf16
 *   number 128 + q exactly (bf16 holds every integer 128..255), so the loops sum x (128 + q) and subtract
 *   128 sum x once per row (per group for int4). Shifts and masks only; no shuffles, which are slow on Zen 4.
 * - AVX-512 without BF16 (Intel Skylake-SP, Cascade Lake, Ice Lake): weights widened to fp32 by shifts and
 *   masks within 32-bit lanes, never across them (a 32-bit lane of bf16 holds columns 2j, 2j + 1: the lane
 *   shifted left 16 bits is the first as fp32, the lane with its low half cleared the second; int8 and int4
 *   lanes give 4 and 8 columns by shifts), against x split once into that many fp32 streams (``to_streams``).
 * - plain C that the compiler vectorizes for any other CPU (AVX2, NEON), weights widened to fp32.
 *
 * Activations and outputs are bfloat16 (uint16_t bit patterns); sums are fp32, rounded to bf16 once, to
 * nearest-even, as oneDNN and torch's int kernels do. Weights (row n = output channel n, row-major):
 *   bf16   w[n, k]
 *   int8   q[n, k] * scale[n]                                   (model/quant.py, symmetric per channel)
 *   int4   (q[n, k] - 8) * scale[n, k / G] + zero[n, k / G]     q in [0, 15]; byte j of a row holds
 *          column 2j in its low nibble and 2j + 1 in its high one (model/quant.py's portable layout)
 * int4 sums per group:  sum_k x_k w_k = scale * sum_k x_k q_k + (zero - 8 scale) * sum_k x_k, so the inner
 * loop multiplies raw nibbles and the group's x sum is computed once per call, not once per row.
 *
 * Threads: the N output channels are split into contiguous blocks, one stream of weight memory per thread
 * (two or four rows at once, sharing the x loads, measured slower: more concurrent streams per core read
 * memory slower than one), on the OpenMP runtime torch already loaded (the same libgomp, one thread pool). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLOCK 16   /* output channels per scheduling unit */
#define LANES 64   /* fp32 partial sums per dot product in the plain C loops: 4 AVX-512 / 8 AVX2 registers */
#define AHEAD 2048 /* bytes of weight prefetched ahead of the loads (AVX512-BF16 int8 / int4 loops: +25% from
                    * memory on one thread; the bf16 loop reads faster without it, the hardware prefetcher
                    * keeping up with one load per 64 bytes) */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);  /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

static inline uint16_t finish(float acc, const uint16_t *bias, int64_t n) {
    return f32_to_bf16(bias ? acc + bf16_to_f32(bias[n]) : acc);
}

/* x (M, K) bf16 -> fp32 (M, R, L), L = ceil(K / R): stream r of row m holds x[m, R i + r] (zero-padded) */
static float *to_streams(const uint16_t *x, int64_t M, int64_t K, int64_t R) {
    const int64_t L = (K + R - 1) / R;
    float *xs = calloc(M * R * L, sizeof(float));
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) xs[m * R * L + (k % R) * L + k / R] = bf16_to_f32(x[m * K + k]);
    return xs;
}

#if defined(__AVX512F__)
static inline __m512 load_bf16x16(const uint16_t *p, __mmask16 m) {  /* 16 bf16 -> 16 fp32 (masked lanes 0) */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline __m512 widen_bf16x16(const uint16_t *p) {  /* 16 bf16 -> 16 fp32, an unmasked load */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
/* 32 bf16 in 16 32-bit lanes -> the even columns and the odd ones as fp32, within each lane */
static inline __m512 bf16_even(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
static inline __m512 bf16_odd(__m512i v) {
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
}
#endif

#if defined(__AVX512BF16__)
/* ---- AVX512-BF16 ---------------------------------------------------------------------------------------- */

static float dot_bf16(const uint16_t *x, const uint16_t *w, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(w + k));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + k + 32), (__m512bh)_mm512_loadu_si512(w + k + 32));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(x + k + 64), (__m512bh)_mm512_loadu_si512(w + k + 64));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(x + k + 96), (__m512bh)_mm512_loadu_si512(w + k + 96));
    }
    for (; k + 32 <= K; k += 32)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(w + k));
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; k < K; k++) s += bf16_to_f32(x[k]) * bf16_to_f32(w[k]);
    return s;
}

/* int8: u = q + 128 (the byte with its top bit flipped) = n_lo + 16 n_hi. One 64-byte load is 32 16-bit
 * lanes of two columns (2j, 2j + 1); shifting by 0, 4, 8, 12 bits and masking gives 128 + each nibble
 * (flipping the top bit of a byte is flipping bit 3 of its high nibble: XOR 0x4308 where 0x4300 is OR-ed).
 * Low nibbles sum into p0, high ones into p1, against x's even and odd columns (xe, xo: bf16, L1-resident):
 * p0 + 16 p1 = sum x u + 128 * 17 * sum x = sum x q + 2304 sum x. ``xsum``: sum of x over the vector loop. */
static float dot_int8(const uint16_t *xe, const uint16_t *xo, float xsum, const int8_t *w, int64_t K) {
    const __m512i low = _mm512_set1_epi16(0x000f), one28 = _mm512_set1_epi16(0x4300),
                  flip = _mm512_set1_epi16(0x4308);
    /* four accumulators, one dpbf16 each per 64 bytes: with two, each chained two dpbf16 (latency-bound) */
    __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps(), p2 = _mm512_setzero_ps(), p3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        _mm_prefetch((const char *)(w + k) + AHEAD, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(w + k);
        const __m512bh e = (__m512bh)_mm512_loadu_si512(xe + k / 2), o = (__m512bh)_mm512_loadu_si512(xo + k / 2);
        p0 = _mm512_dpbf16_ps(p0, e, (__m512bh)_mm512_ternarylogic_epi32(v, low, one28, 0xEA));  /* (v & f) | 4300 */
        p1 = _mm512_dpbf16_ps(p1, e, (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), low, flip, 0x6A));
        p2 = _mm512_dpbf16_ps(p2, o, (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), low, one28, 0xEA));
        p3 = _mm512_dpbf16_ps(p3, o, (__m512bh)_mm512_xor_si512(_mm512_srli_epi16(v, 12), flip));  /* (v & f) ^ 4308 */
    }
    const __m512 lo = _mm512_add_ps(p0, p2), hi = _mm512_add_ps(p1, p3);
    float s = _mm512_reduce_add_ps(_mm512_fmadd_ps(_mm512_set1_ps(16.0f), hi, lo)) - 2304.0f * xsum;
    for (; k < K; k++) s += bf16_to_f32(k % 2 ? xo[k / 2] : xe[k / 2]) * (float)w[k];
    return s;
}

/* int4, G a multiple of 128: one 64-byte load holds columns 128 l .. 128 l + 127; its 16-bit lane j holds the
 * nibbles of columns 4j, 4j + 1 (low byte) and 4j + 2, 4j + 3 (high byte), so shifts by 0, 4, 8, 12 bits give
 * 128 + q for the columns 4j + r against the streams xs[r][i] = x[4i + r] (bf16). Per group
 * P = sum x (128 + q), and the row is sum_g scale_g P_g + (zero_g - 136 scale_g) X_g (X_g: the group's sum
 * of x), the zero-point term 16 groups at a time. */
static float dot_int4(const uint16_t *const xs[4], const float *xsum, const uint8_t *w, const uint16_t *scale,
                      const uint16_t *zero, int64_t K, int64_t G) {
    const int64_t groups = K / G, loads = G / 128;
    const __m512i low = _mm512_set1_epi16(0x000f), one28 = _mm512_set1_epi16(0x4300);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        /* four accumulators, one dpbf16 each per 64 bytes (with two, each chained two: latency-bound) */
        __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps(), p2 = _mm512_setzero_ps(), p3 = _mm512_setzero_ps();
        for (int64_t l = g * loads; l < (g + 1) * loads; l++) {
            _mm_prefetch((const char *)(w + 64 * l) + AHEAD, _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512(w + 64 * l);
            p0 = _mm512_dpbf16_ps(p0, (__m512bh)_mm512_loadu_si512(xs[0] + 32 * l),
                                  (__m512bh)_mm512_ternarylogic_epi32(v, low, one28, 0xEA));
            p1 = _mm512_dpbf16_ps(p1, (__m512bh)_mm512_loadu_si512(xs[1] + 32 * l),
                                  (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), low, one28, 0xEA));
            p2 = _mm512_dpbf16_ps(p2, (__m512bh)_mm512_loadu_si512(xs[2] + 32 * l),
                                  (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), low, one28, 0xEA));
            p3 = _mm512_dpbf16_ps(p3, (__m512bh)_mm512_loadu_si512(xs[3] + 32 * l),
                                  (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 12), one28));
        }
        const __m512 s = _mm512_set1_ps(bf16_to_f32(scale[g])), p = _mm512_add_ps(_mm512_add_ps(p0, p1), _mm512_add_ps(p2, p3));
        if (g & 1) acc1 = _mm512_fmadd_ps(s, p, acc1);  /* two chains: no wait on the FMA */
        else acc0 = _mm512_fmadd_ps(s, p, acc0);
    }
    __m512 corr = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
        const __mmask16 m = groups - g >= 16 ? 0xffff : (__mmask16)((1u << (groups - g)) - 1);
        const __m512 sv = load_bf16x16(scale + g, m), zv = load_bf16x16(zero + g, m);
        corr = _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_set1_ps(136.0f), sv, zv), _mm512_maskz_loadu_ps(m, xsum + g), corr);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), corr));
}

#elif defined(__AVX512F__)
/* ---- AVX-512 without BF16: x as fp32 streams (to_streams), weights widened within 32-bit lanes ------------ */
#define BF16_STREAMS 2
#define INT8_STREAMS 4
#define INT4_STREAMS 8

/* xs: (2, L) the even columns of x, then the odd ones; one 64-byte load of w is 32 columns */
static float dot_bf16(const float *xs, const uint16_t *w, int64_t K) {
    const int64_t L = (K + 1) / 2;
    const float *xe = xs, *xo = xs + L;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        const __m512i v = _mm512_loadu_si512(w + k), u = _mm512_loadu_si512(w + k + 32);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xe + k / 2), bf16_even(v), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xo + k / 2), bf16_odd(v), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(xe + k / 2 + 16), bf16_even(u), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(xo + k / 2 + 16), bf16_odd(u), a3);
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; k < K; k++) s += (k % 2 ? xo : xe)[k / 2] * bf16_to_f32(w[k]);
    return s;
}

/* xs: (4, L) streams x[4i + r]; byte r of 32-bit lane j of a 64-byte load is column 4j + r, sign-extended by
 * shifting it to the top of the lane and back */
static float dot_int8(const float *xs, const int8_t *w, int64_t K) {
    const int64_t L = (K + 3) / 4;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        _mm_prefetch((const char *)(w + k) + AHEAD, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(w + k);
        const int64_t i = k / 4;
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xs + i), _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24)), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xs + L + i), _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24)), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(xs + 2 * L + i), _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24)), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(xs + 3 * L + i), _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24)), a3);
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; k < K; k++) s += xs[(k % 4) * L + k / 4] * (float)w[k];
    return s;
}

/* xs: (8, L) streams x[8i + t]; nibble t of 32-bit lane j of a 64-byte load is column 8j + t (byte 4j + b holds
 * columns 8j + 2b, 8j + 2b + 1). Per group P = sum x q, and the row is sum_g scale_g P_g + (zero_g - 8 scale_g) X_g.
 * G a multiple of 128 (one load never straddles two groups); other groups take the scalar loop. */
static float dot_int4_any(const uint16_t *x, const float *xs, const float *xsum, const uint8_t *w,
                          const uint16_t *scale, const uint16_t *zero, int64_t K, int64_t G) {
    (void)x;
    const int64_t groups = K / G, L = (K + 7) / 8;
    if (G % 128) {
        float total = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            float part = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++)
                part += xs[(k % 8) * L + k / 8] * (float)(k % 2 ? w[k / 2] >> 4 : w[k / 2] & 15);
            const float s = bf16_to_f32(scale[g]);
            total += s * part + (bf16_to_f32(zero[g]) - 8.0f * s) * xsum[g];
        }
        return total;
    }
    const int64_t loads = G / 128;
    const __m512i low = _mm512_set1_epi32(15);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps(), p2 = _mm512_setzero_ps(), p3 = _mm512_setzero_ps();
        for (int64_t l = g * loads; l < (g + 1) * loads; l++) {
            _mm_prefetch((const char *)(w + 64 * l) + AHEAD, _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512(w + 64 * l);
            const float *xl = xs + 16 * l;
#define NIB(t) _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 4 * (t)), low))
            p0 = _mm512_fmadd_ps(_mm512_loadu_ps(xl), _mm512_cvtepi32_ps(_mm512_and_si512(v, low)), p0);
            p1 = _mm512_fmadd_ps(_mm512_loadu_ps(xl + L), NIB(1), p1);
            p2 = _mm512_fmadd_ps(_mm512_loadu_ps(xl + 2 * L), NIB(2), p2);
            p3 = _mm512_fmadd_ps(_mm512_loadu_ps(xl + 3 * L), NIB(3), p3);
            p0 = _mm512_fmadd_ps(_mm512_loadu_ps(xl + 4 * L), NIB(4), p0);
            p1 = _mm512_fmadd_ps(_mm512_loadu_ps(xl + 5 * L), NIB(5), p1);
            p2 = _mm512_fmadd_ps(_mm512_loadu_ps(xl + 6 * L), NIB(6), p2);
            p3 = _mm512_fmadd_ps(_mm512_loadu_ps(xl + 7 * L), _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 28)), p3);
#undef NIB
        }
        const __m512 s = _mm512_set1_ps(bf16_to_f32(scale[g])), p = _mm512_add_ps(_mm512_add_ps(p0, p1), _mm512_add_ps(p2, p3));
        if (g & 1) acc1 = _mm512_fmadd_ps(s, p, acc1);  /* two chains: no wait on the FMA */
        else acc0 = _mm512_fmadd_ps(s, p, acc0);
    }
    __m512 corr = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
        const __mmask16 m = groups - g >= 16 ? 0xffff : (__mmask16)((1u << (groups - g)) - 1);
        const __m512 sv = load_bf16x16(scale + g, m), zv = load_bf16x16(zero + g, m);
        corr = _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sv, zv), _mm512_maskz_loadu_ps(m, xsum + g), corr);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), corr));
}

/* Four output channels per pass, sharing each x load: these Intel cores read one stream of memory well below
 * what they can with several (a core has a few misses in flight per stream; measured on Ice Lake, 1 thread:
 * 7.7 GB/s with one row per pass, 11.9 with four; benchmarks/published/8-cpu-intel.md). The single-row loops
 * above take the channels left over, and int4 (four rows at once measured slower there: 4.3 GB/s against 5.5). */
#define ROWS 4

static void dot_bf16_rows(const float *xs, const uint16_t *w, int64_t K, float *out) {
    const int64_t L = (K + 1) / 2;
    const float *xe = xs, *xo = xs + L;
    __m512 a[ROWS], b[ROWS];
    for (int r = 0; r < ROWS; r++) a[r] = b[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512 e = _mm512_loadu_ps(xe + k / 2), o = _mm512_loadu_ps(xo + k / 2);
        for (int r = 0; r < ROWS; r++) {
            const __m512i v = _mm512_loadu_si512(w + r * K + k);
            a[r] = _mm512_fmadd_ps(e, bf16_even(v), a[r]);
            b[r] = _mm512_fmadd_ps(o, bf16_odd(v), b[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        float s = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
        for (int64_t j = k; j < K; j++) s += (j % 2 ? xo : xe)[j / 2] * bf16_to_f32(w[r * K + j]);
        out[r] = s;
    }
}

static void dot_int8_rows(const float *xs, const int8_t *w, int64_t K, float *out) {
    const int64_t L = (K + 3) / 4;
    __m512 a[ROWS], b[ROWS];
    for (int r = 0; r < ROWS; r++) a[r] = b[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        const int64_t i = k / 4;
        const __m512 x0 = _mm512_loadu_ps(xs + i), x1 = _mm512_loadu_ps(xs + L + i),
                     x2 = _mm512_loadu_ps(xs + 2 * L + i), x3 = _mm512_loadu_ps(xs + 3 * L + i);
        for (int r = 0; r < ROWS; r++) {
            const __m512i v = _mm512_loadu_si512(w + r * K + k);
            a[r] = _mm512_fmadd_ps(x0, _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24)), a[r]);
            b[r] = _mm512_fmadd_ps(x1, _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 24)), b[r]);
            a[r] = _mm512_fmadd_ps(x2, _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 8), 24)), a[r]);
            b[r] = _mm512_fmadd_ps(x3, _mm512_cvtepi32_ps(_mm512_srai_epi32(v, 24)), b[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        float s = _mm512_reduce_add_ps(_mm512_add_ps(a[r], b[r]));
        for (int64_t j = k; j < K; j++) s += xs[(j % 4) * L + j / 4] * (float)w[r * K + j];
        out[r] = s;
    }
}

#else
/* ---- plain C, vectorized by the compiler: LANES partial sums, weights widened to fp32 --------------------- */
#define BF16_STREAMS 1
#define INT8_STREAMS 1
#define INT4_STREAMS 2
static inline float hsum(const float *acc) {
    float s = 0.0f;
    for (int j = 0; j < LANES; j++) s += acc[j];
    return s;
}

static float dot_bf16(const float *x, const uint16_t *w, int64_t K) {
    float acc[LANES] = {0};
    int64_t k = 0;
    for (; k + LANES <= K; k += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += x[k + j] * bf16_to_f32(w[k + j]);
    float s = hsum(acc);
    for (; k < K; k++) s += x[k] * bf16_to_f32(w[k]);
    return s;
}

static float dot_int8(const float *x, const int8_t *w, int64_t K) {
    float acc[LANES] = {0};
    int64_t k = 0;
    for (; k + LANES <= K; k += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += x[k + j] * (float)w[k + j];
    float s = hsum(acc);
    for (; k < K; k++) s += x[k] * (float)w[k];
    return s;
}

/* sum_g scale_g sum_{k in g} x_k q_k + (zero_g - 8 scale_g) X_g over one row; xf: (2, K/2) the even columns
 * of x, then the odd ones (fp32), H = G/2 bytes per group. */
static float dot_int4(const float *xf, const float *xsum, const uint8_t *w, const uint16_t *scale,
                      const uint16_t *zero, int64_t K, int64_t G) {
    const float *xe = xf, *xo = xf + K / 2;
    const int64_t H = G / 2, groups = K / G;
    float total = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        float part[LANES] = {0}, tail = 0.0f;
        int64_t b = g * H;
        for (; b + LANES <= (g + 1) * H; b += LANES)
            for (int j = 0; j < LANES; j++)
                part[j] += xe[b + j] * (float)(w[b + j] & 15) + xo[b + j] * (float)(w[b + j] >> 4);
        for (; b < (g + 1) * H; b++) tail += xe[b] * (float)(w[b] & 15) + xo[b] * (float)(w[b] >> 4);
        const float s = bf16_to_f32(scale[g]);
        total += s * (hsum(part) + tail) + (bf16_to_f32(zero[g]) - 8.0f * s) * xsum[g];
    }
    return total;
}
#endif

/* ---- the entry points (cpu_gemv.py) ----------------------------------------------------------------------- */
void gemv_bf16(const uint16_t *x, const uint16_t *w, const uint16_t *bias, uint16_t *y,
               int64_t M, int64_t N, int64_t K, int threads) {
#if defined(__AVX512BF16__)
    const uint16_t *xr = x;  /* dpbf16 takes x as it is */
    const int64_t stride = K;
#else
    float *xr = to_streams(x, M, K, BF16_STREAMS);
    const int64_t stride = BF16_STREAMS * ((K + BF16_STREAMS - 1) / BF16_STREAMS);
#endif
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n0 = 0; n0 < N; n0 += BLOCK) {
        const int64_t end = n0 + BLOCK < N ? n0 + BLOCK : N;
        int64_t n = n0;
#if defined(ROWS)
        for (; n + ROWS <= end; n += ROWS)
            for (int64_t m = 0; m < M; m++) {
                float s[ROWS];
                dot_bf16_rows(xr + m * stride, w + n * K, K, s);
                for (int r = 0; r < ROWS; r++) y[m * N + n + r] = finish(s[r], bias, n + r);
            }
#endif
        for (; n < end; n++)
            for (int64_t m = 0; m < M; m++)
                y[m * N + n] = finish(dot_bf16(xr + m * stride, w + n * K, K), bias, n);
    }
#if !defined(__AVX512BF16__)
    free(xr);
#endif
}

void gemv_int8(const uint16_t *x, const int8_t *w, const uint16_t *scales, const uint16_t *bias, uint16_t *y,
               int64_t M, int64_t N, int64_t K, int threads) {
#if defined(__AVX512BF16__)
    const int64_t half = (K + 1) / 2;
    uint16_t *xs = malloc(sizeof(uint16_t) * M * 2 * half);  /* (M, 2, K/2): x's even columns, then its odd ones */
    float *xsum = malloc(sizeof(float) * M);  /* sum of x over the columns the vector loop covers */
    for (int64_t m = 0; m < M; m++) {
        float s = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            xs[m * 2 * half + (k % 2) * half + k / 2] = x[m * K + k];
            if (k < K / 64 * 64) s += bf16_to_f32(x[m * K + k]);
        }
        xsum[m] = s;
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n0 = 0; n0 < N; n0 += BLOCK)
        for (int64_t n = n0; n < n0 + BLOCK && n < N; n++)
            for (int64_t m = 0; m < M; m++) {
                const uint16_t *xe = xs + m * 2 * half;
                float acc = dot_int8(xe, xe + half, xsum[m], w + n * K, K);
                y[m * N + n] = finish(acc * bf16_to_f32(scales[n]), bias, n);
            }
    free(xs);
    free(xsum);
#else
    float *xf = to_streams(x, M, K, INT8_STREAMS);
    const int64_t stride = INT8_STREAMS * ((K + INT8_STREAMS - 1) / INT8_STREAMS);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n0 = 0; n0 < N; n0 += BLOCK) {
        const int64_t end = n0 + BLOCK < N ? n0 + BLOCK : N;
        int64_t n = n0;
#if defined(ROWS)
        for (; n + ROWS <= end; n += ROWS)
            for (int64_t m = 0; m < M; m++) {
                float s[ROWS];
                dot_int8_rows(xf + m * stride, w + n * K, K, s);
                for (int r = 0; r < ROWS; r++) y[m * N + n + r] = finish(s[r] * bf16_to_f32(scales[n + r]), bias, n + r);
            }
#endif
        for (; n < end; n++)
            for (int64_t m = 0; m < M; m++)
                y[m * N + n] = finish(dot_int8(xf + m * stride, w + n * K, K) * bf16_to_f32(scales[n]), bias, n);
    }
    free(xf);
#endif
}

/* AVX512-BF16 needs G a multiple of 128 (the default; 32 and 64 take the plain loops, compiled beside).
 * x: bf16 streams (4, K/4) for that loop; xf: fp32 streams (to_streams) for the others. */
static float dot_int4_any(const uint16_t *x, const float *xf, const float *xsum, const uint8_t *w,
                          const uint16_t *scale, const uint16_t *zero, int64_t K, int64_t G);

void gemv_int4(const uint16_t *x, const uint8_t *w, const uint16_t *scales, const uint16_t *zeros,
               const uint16_t *bias, uint16_t *y, int64_t M, int64_t N, int64_t K, int64_t G, int threads) {
    const int64_t groups = K / G;
#if defined(__AVX512BF16__)
    const int64_t R = G % 128 == 0 ? 0 : 2;  /* 0: the AVX512-BF16 loop (bf16 streams), else fp32 even / odd */
#else
    const int64_t R = INT4_STREAMS;
#endif
    const int64_t stride = R ? R * ((K + R - 1) / R) : K;
    uint16_t *xs = R ? NULL : malloc(sizeof(uint16_t) * M * K);  /* (M, 4, K/4): xs[m][r][i] = x[m][4i + r] */
    float *xf = R ? to_streams(x, M, K, R) : NULL;
    float *xsum = malloc(sizeof(float) * M * groups);  /* (M, K/G) sum of x over each group */
    for (int64_t m = 0; m < M; m++) {
        if (xs)
            for (int64_t k = 0; k < K; k++) xs[m * K + (k % 4) * (K / 4) + k / 4] = x[m * K + k];
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) s += bf16_to_f32(x[m * K + k]);
            xsum[m * groups + g] = s;
        }
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n0 = 0; n0 < N; n0 += BLOCK)
        for (int64_t n = n0; n < n0 + BLOCK && n < N; n++)
            for (int64_t m = 0; m < M; m++) {
                float acc = dot_int4_any(xs ? xs + m * K : NULL, xf ? xf + m * stride : NULL, xsum + m * groups,
                                         w + n * K / 2, scales + n * groups, zeros + n * groups, K, G);
                y[m * N + n] = finish(acc, bias, n);
            }
    free(xs);
    free(xf);
    free(xsum);
}

#if defined(__AVX512BF16__)
/* the plain int4 loop for groups of 32 / 64 columns, kept scalar here (rare: the default group is 128) */
static float dot_int4_any(const uint16_t *x, const float *xf, const float *xsum, const uint8_t *w,
                          const uint16_t *scale, const uint16_t *zero, int64_t K, int64_t G) {
    if (G % 128 == 0) {
        const uint16_t *xs[4] = {x, x + K / 4, x + K / 2, x + 3 * K / 4};
        return dot_int4(xs, xsum, w, scale, zero, K, G);
    }
    const float *xe = xf, *xo = xf + K / 2;
    float total = 0.0f;
    for (int64_t g = 0; g < K / G; g++) {
        float part = 0.0f;
        for (int64_t b = g * G / 2; b < (g + 1) * G / 2; b++)
            part += xe[b] * (float)(w[b] & 15) + xo[b] * (float)(w[b] >> 4);
        const float s = bf16_to_f32(scale[g]);
        total += s * part + (bf16_to_f32(zero[g]) - 8.0f * s) * xsum[g];
    }
    return total;
}
#elif !defined(__AVX512F__)
static float dot_int4_any(const uint16_t *x, const float *xf, const float *xsum, const uint8_t *w,
                          const uint16_t *scale, const uint16_t *zero, int64_t K, int64_t G) {
    (void)x;
    return dot_int4(xf, xsum, w, scale, zero, K, G);
}
#endif

/* ---- one query against a KV cache: a decode step's attention (model/attention.py ``one_query_attention``) ----
 * out[b, h] = sum_s softmax_s(q[b, h] . k[b, g, s] / sqrt(D)) v[b, g, s], g = h / (Hq / Hkv): scores, softmax
 * and sums in fp32, the output rounded to bf16 once. Like a product, a decode step's attention reads its whole
 * cache once: one pass over the keys (the G query heads of a KV head share each key row), one over the values.
 * q (B, Hq, D) and out contiguous bf16; k and v rows of D contiguous bf16 at element offsets b * kb + g * kh +
 * s * ks (a slice of the preallocated cache). Threads split the (b, g) pairs. The AVX-512 loops need D % 32
 * == 0 (every decoder here: 64, 128); the plain ones take any D. The scores take dpbf16 where the CPU has it,
 * else q as fp32 even / odd columns against each key's 32-bit lanes widened in place (bf16_even / bf16_odd), four
 * keys at a time. Both passes read the S rows as four streams (rows s, s + S/4, s + S/2, s + 3S/4): an Intel core
 * reads one stream of memory well below what it reads from several (as the products' ROWS; measured in
 * benchmarks/published/8-cpu-intel.md). */
#if defined(__AVX512F__)
/* e^x for x <= 0, 16 at a time: x = n ln2 + f (|f| <= ln2 / 2), e^f by Cephes' expf polynomial (relative error
 * ~1e-7, as libm's), 2^n applied by scalef (underflow to 0 included) */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

static void attend_group(const uint16_t *q, const uint16_t *kg, const uint16_t *vg, uint16_t *out, int64_t G,
                         int64_t S, int64_t D, int64_t ks, int64_t vs, float *p, float *acc, float *qf) {
    const float scale = 1.0f / sqrtf((float)D);
    float sum[64];  /* G <= 64 (checked by the caller) */
    (void)qf;  /* used by the AVX-512 loop without BF16 only */
#if defined(__AVX512F__)
    if (D % 32 == 0) {
        const int64_t Q = S / 4;  /* four streams of rows: s, s + Q, s + 2Q, s + 3Q (one core reads one stream of
                                   * memory well below what it reads from several) */
#if defined(__AVX512BF16__)
        for (int64_t s = 0; s < S; s++) {  /* scores: one dpbf16 per 32 elements, bf16 as stored */
            const uint16_t *kr = kg + s * ks;
            for (int64_t i = 0; i < G; i++) {
                __m512 a = _mm512_setzero_ps();
                for (int64_t d = 0; d < D; d += 32)
                    a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(q + i * D + d), (__m512bh)_mm512_loadu_si512(kr + d));
                p[i * S + s] = _mm512_reduce_add_ps(a) * scale;
            }
        }
#else
        for (int64_t i = 0; i < G; i++)  /* qf (G, 2, D/2): each head's even columns, then its odd ones, fp32 */
            for (int64_t d = 0; d < D; d++) qf[i * D + (d % 2) * (D / 2) + d / 2] = bf16_to_f32(q[i * D + d]);
        for (int64_t s = 0; s < Q; s++) {  /* scores, four keys at a time (eight FMA chains, each q load used four
                                            * times); each key's sums in the order of the one-key loop below */
            const uint16_t *k0 = kg + s * ks, *k1 = k0 + Q * ks, *k2 = k1 + Q * ks, *k3 = k2 + Q * ks;
            for (int64_t i = 0; i < G; i++) {
                const float *qe = qf + i * D, *qo = qe + D / 2;
                __m512 a0 = _mm512_setzero_ps(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0;
                for (int64_t d = 0; d < D; d += 32) {
                    const __m512 e = _mm512_loadu_ps(qe + d / 2), o = _mm512_loadu_ps(qo + d / 2);
                    const __m512i v0 = _mm512_loadu_si512(k0 + d), v1 = _mm512_loadu_si512(k1 + d),
                                  v2 = _mm512_loadu_si512(k2 + d), v3 = _mm512_loadu_si512(k3 + d);
                    a0 = _mm512_fmadd_ps(e, bf16_even(v0), a0);
                    b0 = _mm512_fmadd_ps(o, bf16_odd(v0), b0);
                    a1 = _mm512_fmadd_ps(e, bf16_even(v1), a1);
                    b1 = _mm512_fmadd_ps(o, bf16_odd(v1), b1);
                    a2 = _mm512_fmadd_ps(e, bf16_even(v2), a2);
                    b2 = _mm512_fmadd_ps(o, bf16_odd(v2), b2);
                    a3 = _mm512_fmadd_ps(e, bf16_even(v3), a3);
                    b3 = _mm512_fmadd_ps(o, bf16_odd(v3), b3);
                }
                p[i * S + s] = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0)) * scale;
                p[i * S + s + Q] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1)) * scale;
                p[i * S + s + 2 * Q] = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2)) * scale;
                p[i * S + s + 3 * Q] = _mm512_reduce_add_ps(_mm512_add_ps(a3, b3)) * scale;
            }
        }
        for (int64_t s = 4 * Q; s < S; s++) {  /* scores: two FMAs per 32 elements of the key */
            const uint16_t *kr = kg + s * ks;
            for (int64_t i = 0; i < G; i++) {
                const float *qe = qf + i * D, *qo = qe + D / 2;
                __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
                for (int64_t d = 0; d < D; d += 32) {
                    const __m512i kv = _mm512_loadu_si512(kr + d);
                    a = _mm512_fmadd_ps(_mm512_loadu_ps(qe + d / 2), bf16_even(kv), a);
                    b = _mm512_fmadd_ps(_mm512_loadu_ps(qo + d / 2), bf16_odd(kv), b);
                }
                p[i * S + s] = _mm512_reduce_add_ps(_mm512_add_ps(a, b)) * scale;
            }
        }
#endif
        for (int64_t i = 0; i < G; i++) {  /* softmax numerators, the max subtracted */
            float *pi = p + i * S;
            __m512 mv = _mm512_set1_ps(-INFINITY);
            int64_t s = 0;
            for (; s + 16 <= S; s += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(pi + s));
            float mx = _mm512_reduce_max_ps(mv);
            for (; s < S; s++) mx = pi[s] > mx ? pi[s] : mx;
            const __m512 m16 = _mm512_set1_ps(mx);
            __m512 tv = _mm512_setzero_ps();
            for (s = 0; s < S; s += 16) {
                const __mmask16 k16 = S - s >= 16 ? 0xffff : (__mmask16)((1u << (S - s)) - 1);
                const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k16, pi + s), m16));
                _mm512_mask_storeu_ps(pi + s, k16, e);
                tv = _mm512_add_ps(tv, _mm512_maskz_mov_ps(k16, e));
            }
            sum[i] = _mm512_reduce_add_ps(tv);
        }
        memset(acc, 0, sizeof(float) * G * D);
        for (int64_t t = 0; t < Q; t++) {  /* values, four rows at a time from the four streams: one load and store
                                            * of the sums per four FMAs */
            const uint16_t *v0 = vg + t * vs, *v1 = v0 + Q * vs, *v2 = v1 + Q * vs, *v3 = v2 + Q * vs;
            for (int64_t d = 0; d < D; d += 16) {
                const __m512 x0 = widen_bf16x16(v0 + d), x1 = widen_bf16x16(v1 + d), x2 = widen_bf16x16(v2 + d),
                             x3 = widen_bf16x16(v3 + d);
                for (int64_t i = 0; i < G; i++) {
                    const float *pi = p + i * S + t;
                    __m512 a = _mm512_loadu_ps(acc + i * D + d);
                    a = _mm512_fmadd_ps(_mm512_set1_ps(pi[0]), x0, a);
                    a = _mm512_fmadd_ps(_mm512_set1_ps(pi[Q]), x1, a);
                    a = _mm512_fmadd_ps(_mm512_set1_ps(pi[2 * Q]), x2, a);
                    _mm512_storeu_ps(acc + i * D + d, _mm512_fmadd_ps(_mm512_set1_ps(pi[3 * Q]), x3, a));
                }
            }
        }
        for (int64_t t = 4 * Q; t < S; t++) {  /* values: sum of weight x row, 16 fp32 lanes at a time */
            const uint16_t *vr = vg + t * vs;
            for (int64_t d = 0; d < D; d += 16) {
                const __m512 vv = widen_bf16x16(vr + d);
                for (int64_t i = 0; i < G; i++)
                    _mm512_storeu_ps(acc + i * D + d, _mm512_fmadd_ps(_mm512_set1_ps(p[i * S + t]), vv,
                                                                      _mm512_loadu_ps(acc + i * D + d)));
            }
        }
        for (int64_t i = 0; i < G; i++)
            for (int64_t d = 0; d < D; d++) out[i * D + d] = f32_to_bf16(acc[i * D + d] / sum[i]);
        return;
    }
#endif
    for (int64_t s = 0; s < S; s++) {
        const uint16_t *kr = kg + s * ks;
        for (int64_t i = 0; i < G; i++) {
            float part[16] = {0}, tail = 0.0f;
            int64_t d = 0;
            for (; d + 16 <= D; d += 16)
                for (int j = 0; j < 16; j++) part[j] += bf16_to_f32(q[i * D + d + j]) * bf16_to_f32(kr[d + j]);
            for (; d < D; d++) tail += bf16_to_f32(q[i * D + d]) * bf16_to_f32(kr[d]);
            for (int j = 0; j < 16; j++) tail += part[j];
            p[i * S + s] = tail * scale;
        }
    }
    for (int64_t i = 0; i < G; i++) {
        float mx = -INFINITY, total = 0.0f;
        for (int64_t s = 0; s < S; s++) mx = p[i * S + s] > mx ? p[i * S + s] : mx;
        for (int64_t s = 0; s < S; s++) total += (p[i * S + s] = expf(p[i * S + s] - mx));
        sum[i] = total;
    }
    memset(acc, 0, sizeof(float) * G * D);
    for (int64_t s = 0; s < S; s++) {
        const uint16_t *vr = vg + s * vs;
        for (int64_t i = 0; i < G; i++)
            for (int64_t d = 0; d < D; d++) acc[i * D + d] += p[i * S + s] * bf16_to_f32(vr[d]);
    }
    for (int64_t i = 0; i < G; i++)
        for (int64_t d = 0; d < D; d++) out[i * D + d] = f32_to_bf16(acc[i * D + d] / sum[i]);
}

void attend_one_query(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t B,
                      int64_t Hq, int64_t Hkv, int64_t S, int64_t D, int64_t kb, int64_t kh, int64_t ks,
                      int64_t vb, int64_t vh, int64_t vs, int threads) {
    const int64_t G = Hq / Hkv;
    #pragma omp parallel for schedule(static) collapse(2) num_threads(threads)
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < Hkv; g++) {
            float *p = malloc(sizeof(float) * G * (S + 2 * D));  /* (G, S) scores then weights; (G, D) sums; (G, D) q */
            attend_group(q + (b * Hq + g * G) * D, k + b * kb + g * kh, v + b * vb + g * vh,
                         out + (b * Hq + g * G) * D, G, S, D, ks, vs, p, p + G * S, p + G * (S + D));
            free(p);
        }
}
