/* Quantized weights to float in one pass of C, beside torch's several passes they are tested against bit
 * for bit: NF4 (QLoRA's frozen base, model/nf4.py) and the int8 / int4 rows a prompt-sized GEMM dequantizes
 * chunk by chunk (model/quant.py ``dequantized_linear``). cpu_gemv.py builds this file with cpu_gemv.c into
 * one library, at first use, -O3 -march=native -fopenmp. Outputs are fp32 or bf16 (uint16_t bit patterns),
 * every float operation done in fp32 and rounded to bf16 where torch rounds: to nearest-even, NaN to 0xFFFF
 * (torch's vectorized fp32 -> bf16 cast; its scalar one gives 0x7FC0).
 *
 * NF4: out[e] = nf4[q_e] * absmax[e / blocksize]. QLoRA dequantizes each weight twice per training step
 * (forward and backward) and runs a float GEMM on it, as bitsandbytes' MatMul4Bit does; torch's way is a
 * table lookup, a multiply and a cast per chunk (model/nf4.py ``_dequantize_whole_blocks``). Layout
 * (bitsandbytes'): byte i holds element 2i in its HIGH nibble and 2i + 1 in its low one; blocks of
 * ``blocksize`` consecutive elements share one fp32 absmax (already decoded from double quantization).
 * Whole blocks only, blocksize a multiple of 32 (every size bitsandbytes accepts). With AVX-512 the 16
 * levels sit in one register and ``vpermps`` looks up 16 nibbles at once; for bf16 output the pair
 * (element 2i, 2i + 1) is one 32-bit word, low half first in memory, so the high nibbles' values go in the
 * low 16 bits and the low nibbles' in the high 16: no shuffle. fp32 outputs are interleaved with one
 * two-register permute per 16 values.
 *
 * int8 (model/quant.py, per output channel): out[n, k] = q[n, k] * scale[n].
 * int4 (model/quant.py's portable layout: byte j of a row holds column 2j in its LOW nibble, 2j + 1 in its
 * high one): out[n, k] = ((q[n, k] - 8) * scale[n, k / G]) + zero[n, k / G] in bf16, rounded after the
 * product and after the sum, as torch's in-place ``sub_(8).mul_(scale).add_(zero)`` on a bf16 tensor.
 * Plain C that the compiler vectorizes. */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* bitsandbytes.functional.get_4bit_type("nf4"), fp32, index = the stored nibble (model/nf4.py NF4_LEVELS) */
static const float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

static inline uint16_t to_bf16(float f) {  /* torch's vectorized cast (its scalar one gives NaN 0x7FC0) */
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t r = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? 0xffff : r;
}

static inline float bf16_round(float f) {  /* f rounded to the nearest bf16, as an fp32 */
    uint32_t u = (uint32_t)to_bf16(f) << 16;
    memcpy(&f, &u, 4);
    return f;
}

#if !defined(__AVX512F__)

static void block_plain(const uint8_t *p, float s, int64_t half, float *o32, uint16_t *o16) {
    for (int64_t i = 0; i < half; i++) {  /* half = blocksize / 2 bytes */
        float hi = NF4[p[i] >> 4] * s, lo = NF4[p[i] & 15] * s;
        if (o16) { o16[2 * i] = to_bf16(hi); o16[2 * i + 1] = to_bf16(lo); }
        else { o32[2 * i] = hi; o32[2 * i + 1] = lo; }
    }
}
#endif

#if defined(__AVX512F__)
static inline __m512i bf16_bits(__m512 v) {  /* 16 fp32 -> 16 bf16 in the low halves, as to_bf16 */
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_srli_epi32(r, 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xffff));
}

static void block_avx512(const uint8_t *p, float s, int64_t half, float *o32, uint16_t *o16) {
    const __m512 lut = _mm512_loadu_ps(NF4), scale = _mm512_set1_ps(s);
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int64_t i = 0; i < half; i += 16) {  /* 16 bytes -> 32 values */
        __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + i)));
        __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(u, 4), lut), scale);  /* elements 2i */
        __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(u, _mm512_set1_epi32(15)), lut), scale);
        if (o16) {
            __m512i word = _mm512_or_si512(bf16_bits(hi), _mm512_slli_epi32(bf16_bits(lo), 16));
            _mm512_storeu_si512((void *)(o16 + 2 * i), word);
        } else {
            _mm512_storeu_ps(o32 + 2 * i, _mm512_permutex2var_ps(hi, first, lo));
            _mm512_storeu_ps(o32 + 2 * i + 16, _mm512_permutex2var_ps(hi, second, lo));
        }
    }
}
#endif

/* packed (blocks * blocksize / 2,) uint8, absmax (blocks,) fp32 -> out (blocks * blocksize,) fp32 or bf16
 * (out_bf16 != 0: uint16_t bit patterns). */
void nf4_dequantize(const uint8_t *packed, const float *absmax, void *out, int64_t blocks, int64_t blocksize,
                    int out_bf16, int threads) {
    const int64_t half = blocksize / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        float *o32 = out_bf16 ? 0 : (float *)out + b * blocksize;
        uint16_t *o16 = out_bf16 ? (uint16_t *)out + b * blocksize : 0;
#if defined(__AVX512F__)
        block_avx512(packed + b * half, absmax[b], half, o32, o16);
#else
        block_plain(packed + b * half, absmax[b], half, o32, o16);
#endif
    }
}

/* q (rows, K) int8 row-major, scales (rows,) fp32 -> out (rows, K): q * scale in fp32 (out_bf16 = 0), rounded
 * to bf16 (1), or rounded to bf16 and written as fp32 (2: the bf16 weight widened, for a prompt summed in fp32). */
void int8_dequantize(const int8_t *q, const float *scales, void *out, int64_t rows, int64_t K, int out_bf16,
                     int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < rows; n++) {
        const int8_t *qr = q + n * K;
        const float s = scales[n];
        if (out_bf16 == 1) {
            uint16_t *o = (uint16_t *)out + n * K;
            for (int64_t k = 0; k < K; k++) o[k] = to_bf16((float)qr[k] * s);
        } else if (out_bf16 == 2) {
            uint32_t *o = (uint32_t *)out + n * K;
            for (int64_t k = 0; k < K; k++) o[k] = (uint32_t)to_bf16((float)qr[k] * s) << 16;
        } else {
            float *o = (float *)out + n * K;
            for (int64_t k = 0; k < K; k++) o[k] = (float)qr[k] * s;
        }
    }
}

/* packed (rows, K/2) uint8, scales / zeros (rows, K/G) fp32 -> out (rows, K) bf16: (q - 8) * scale + zero,
 * the product and the sum each rounded to bf16 (torch's in-place ops on a bf16 tensor; each rounding is explicit,
 * so no fused multiply-add can merge them); ``wide``: the same bf16 numbers written as fp32 (the bf16 weight
 * widened, for a prompt summed in fp32). */
void int4_dequantize(const uint8_t *packed, const float *scales, const float *zeros, void *out, int64_t rows,
                     int64_t K, int64_t G, int wide, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < rows; n++) {
        for (int64_t g = 0; g < K / G; g++) {
            const uint8_t *p = packed + n * (K / 2) + g * (G / 2);
            const float s = scales[n * (K / G) + g], z = zeros[n * (K / G) + g];
            if (wide) {
                uint32_t *o = (uint32_t *)out + n * K + g * G;
                for (int64_t j = 0; j < G / 2; j++) {
                    o[2 * j] = (uint32_t)to_bf16(bf16_round((float)((p[j] & 15) - 8) * s) + z) << 16;
                    o[2 * j + 1] = (uint32_t)to_bf16(bf16_round((float)((p[j] >> 4) - 8) * s) + z) << 16;
                }
            } else {
                uint16_t *o = (uint16_t *)out + n * K + g * G;
                for (int64_t j = 0; j < G / 2; j++) {
                    o[2 * j] = to_bf16(bf16_round((float)((p[j] & 15) - 8) * s) + z);
                    o[2 * j + 1] = to_bf16(bf16_round((float)((p[j] >> 4) - 8) * s) + z);
                }
            }
        }
    }
}

/* ---- int8 activations for a prompt's int8 x int8 GEMM (model/int8_activations.py) ---------------------------
 * Before the GEMM, per row m of x (bf16): s[m] = max_k |x[m, k]| / 127 in fp32 (at least FLT_MIN), and
 * q[m, k] = x[m, k] / s[m] rounded to nearest-even: the bits of torch's ``amax(|x|) / 127``, ``clamp_min``,
 * ``(x / s).round_()``, ``.to(int8)``. After it (acc: the exact int32 sums): y[m, n] = bf16(acc * s[m] *
 * scale[n] (+ bias[n])), each product rounded to fp32 in that order, as torch's ``(acc * s).mul_(scale)``. */
#include <float.h>
#include <math.h>

static inline float bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

void int8_quantize_rows(const uint16_t *x, int8_t *q, float *s, int64_t M, int64_t K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xr = x + m * K;
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(bf16_f32(xr[k])));
        float sm = amax / 127.0f;
        if (sm < FLT_MIN) sm = FLT_MIN;
        s[m] = sm;
        int8_t *qr = q + m * K;
        for (int64_t k = 0; k < K; k++) qr[k] = (int8_t)nearbyintf(bf16_f32(xr[k]) / sm);
    }
}

/* no fused multiply-add: torch rounds the product before adding the bias (GCC would contract across statements;
 * clang contracts only within one) */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void int8_scale_rows(const int32_t *acc, const float *s, const float *scale, const float *bias, uint16_t *y,
                     int64_t M, int64_t N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const int32_t *ar = acc + m * N;
        uint16_t *yr = y + m * N;
        const float sm = s[m];
        for (int64_t n = 0; n < N; n++) {
            const float v = (float)ar[n] * sm * scale[n];
            yr[n] = to_bf16(bias ? v + bias[n] : v);
        }
    }
}
