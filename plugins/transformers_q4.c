/* 4-bit (Q4_1) and 8-bit (Q8_0) weights times float32 rows, for CPUs with AVX2
 * and FMA (transformers_q4.py says when it is used).
 *
 * torch's int4 CPU kernel is vectorised for bfloat16 inputs only, and on a CPU
 * without native bfloat16 its per-call cost dominates a decode step. Here the
 * weights' integer codes multiply the rows with integer instructions, as
 * llama.cpp does, with one float multiply-add per block of 32 inputs. The rows
 * are taken to 16-bit integers (a scale per block of 32), not to llama.cpp's 8
 * bits: with 8, greedy answers of the bundled model differed from the
 * de-quantized weights' in 7 of 20 fixed prompts; with 16, in none
 * (docs/agents/transformers.md). Each weight block is unpacked once for all
 * the rows of a call.
 *
 * Weight layouts, per output and per block of 32 inputs:
 * - Q4_1: 16 bytes of codes 0-15 (the low nibbles are inputs 0-15, the high
 *   ones 16-31), a scale d and a minimum m: weight = d * code + m;
 * - Q8_0: 32 codes from -127 to 127 and a scale d: weight = d * code.
 */
#include <immintrin.h>
#include <stdint.h>

#define BLOCK 32
#define MOST_ROWS 8 /* rows one pass of the weights multiplies; more rows take more passes */

/* Each row's blocks as int16 codes (round to nearest) with the block's scale (broadcast) and,
 * if ``xs``, the scale times the codes' sum (what a Q4_1 weight's minimum multiplies). */
static void quantize_rows(const float *x, int rows, int k, int16_t *xq, __m256 *xv, float *xs) {
    const int blocks = k / BLOCK;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < rows; r++) {
        for (int b = 0; b < blocks; b++) {
            const float *v = x + (long)r * k + b * BLOCK;
            int16_t *codes = xq + (long)r * k + b * BLOCK;
            const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
            const __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
            const __m256 most = _mm256_max_ps(
                _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(most), _mm256_extractf128_ps(most, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            const float amax = _mm_cvtss_f32(m4);
            const __m256 inverse = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
            /* packs interleave the 128-bit lanes; the permutation puts the codes back in order */
            const __m256i first = _mm256_permute4x64_epi64(_mm256_packs_epi32(
                _mm256_cvtps_epi32(_mm256_mul_ps(v0, inverse)),
                _mm256_cvtps_epi32(_mm256_mul_ps(v1, inverse))), 0xD8);
            const __m256i second = _mm256_permute4x64_epi64(_mm256_packs_epi32(
                _mm256_cvtps_epi32(_mm256_mul_ps(v2, inverse)),
                _mm256_cvtps_epi32(_mm256_mul_ps(v3, inverse))), 0xD8);
            _mm256_storeu_si256((__m256i *)codes, first);
            _mm256_storeu_si256((__m256i *)(codes + 16), second);
            const float scale = amax / 32767.f;
            xv[r * blocks + b] = _mm256_set1_ps(scale);
            if (xs) {
                const __m256i sum8 = _mm256_add_epi32(_mm256_madd_epi16(first, ones),
                                                      _mm256_madd_epi16(second, ones));
                __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(sum8),
                                             _mm256_extracti128_si256(sum8, 1));
                sum4 = _mm_hadd_epi32(sum4, sum4);
                sum4 = _mm_hadd_epi32(sum4, sum4);
                xs[r * blocks + b] = scale * (float)_mm_cvtsi128_si32(sum4);
            }
        }
    }
}

static inline float sum_lanes(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* The dot product of n floats (a row's scale-times-sum with an output's minimums). */
static inline float dot_floats(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float sum = sum_lanes(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* A block's products with R rows, given its weight codes as two vectors of 16
 * int16 (R known at compile time, so that the accumulators stay in registers):
 * vpmaddwd multiplies pairs and sums them in 32 bits; the row's block scale
 * comes broadcast already (xv), the weight's (dv) once for all rows. */
#define ROWS_TIMES_BLOCK(R)                                                                   \
    for (int r = 0; r < R; r++) {                                                             \
        const int16_t *x = xq + (long)r * k + b * BLOCK;                                      \
        const __m256i dot = _mm256_add_epi32(                                                 \
            _mm256_madd_epi16(first, _mm256_loadu_si256((const __m256i *)x)),                 \
            _mm256_madd_epi16(second, _mm256_loadu_si256((const __m256i *)(x + 16))));        \
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), xv[r * blocks + b]),  \
                                 dv, acc[r]);                                                 \
    }

/* One output of a Q4_1 weight times R rows. */
#define Q4_OUTPUT_TIMES_ROWS(R)                                                               \
static void q4_output_times_##R(const uint8_t *w, const float *wd, const float *wm,           \
                                int blocks, int k, const int16_t *xq, const __m256 *xv,       \
                                const float *xs, float *out, int n) {                         \
    const __m128i low = _mm_set1_epi8(0x0f);                                                  \
    __m256 acc[R];                                                                            \
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();                                 \
    for (int b = 0; b < blocks; b++) {                                                        \
        const __m128i packed = _mm_loadu_si128((const __m128i *)(w + b * 16));               \
        const __m256i first = _mm256_cvtepu8_epi16(_mm_and_si128(packed, low));              \
        const __m256i second = _mm256_cvtepu8_epi16(                                          \
            _mm_and_si128(_mm_srli_epi16(packed, 4), low));                                   \
        const __m256 dv = _mm256_set1_ps(wd[b]);                                              \
        ROWS_TIMES_BLOCK(R)                                                                   \
    }                                                                                         \
    for (int r = 0; r < R; r++)                                                               \
        out[(long)r * n] = sum_lanes(acc[r]) + dot_floats(wm, xs + r * blocks, blocks);       \
}

/* One output of a Q8_0 weight times R rows. */
#define Q8_OUTPUT_TIMES_ROWS(R)                                                               \
static void q8_output_times_##R(const int8_t *w, const float *wd, int blocks, int k,          \
                                const int16_t *xq, const __m256 *xv, float *out, int n) {     \
    __m256 acc[R];                                                                            \
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();                                 \
    for (int b = 0; b < blocks; b++) {                                                        \
        const __m256i codes = _mm256_loadu_si256((const __m256i *)(w + b * BLOCK));           \
        const __m256i first = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(codes));            \
        const __m256i second = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(codes, 1));      \
        const __m256 dv = _mm256_set1_ps(wd[b]);                                              \
        ROWS_TIMES_BLOCK(R)                                                                   \
    }                                                                                         \
    for (int r = 0; r < R; r++) out[(long)r * n] = sum_lanes(acc[r]);                         \
}

Q4_OUTPUT_TIMES_ROWS(1) Q4_OUTPUT_TIMES_ROWS(2) Q4_OUTPUT_TIMES_ROWS(3) Q4_OUTPUT_TIMES_ROWS(4)
Q4_OUTPUT_TIMES_ROWS(5) Q4_OUTPUT_TIMES_ROWS(6) Q4_OUTPUT_TIMES_ROWS(7) Q4_OUTPUT_TIMES_ROWS(8)
Q8_OUTPUT_TIMES_ROWS(1) Q8_OUTPUT_TIMES_ROWS(2) Q8_OUTPUT_TIMES_ROWS(3) Q8_OUTPUT_TIMES_ROWS(4)
Q8_OUTPUT_TIMES_ROWS(5) Q8_OUTPUT_TIMES_ROWS(6) Q8_OUTPUT_TIMES_ROWS(7) Q8_OUTPUT_TIMES_ROWS(8)

typedef void (*q4_output_times)(const uint8_t *, const float *, const float *, int, int,
                                const int16_t *, const __m256 *, const float *, float *, int);
typedef void (*q8_output_times)(const int8_t *, const float *, int, int, const int16_t *,
                                const __m256 *, float *, int);
static const q4_output_times Q4_OUTPUT_TIMES[MOST_ROWS + 1] = {
    0, q4_output_times_1, q4_output_times_2, q4_output_times_3, q4_output_times_4,
    q4_output_times_5, q4_output_times_6, q4_output_times_7, q4_output_times_8};
static const q8_output_times Q8_OUTPUT_TIMES[MOST_ROWS + 1] = {
    0, q8_output_times_1, q8_output_times_2, q8_output_times_3, q8_output_times_4,
    q8_output_times_5, q8_output_times_6, q8_output_times_7, q8_output_times_8};

/* The outputs are shared among OpenMP's threads: torch's own pool (the same
 * libgomp), with the thread count torch.set_num_threads gave the calling thread.
 * The caller keeps rows * k small (a decode step's few rows): the rows' codes
 * live on the stack. */
#define FOR_EACH_OUTPUT_AND_ROWS(CALL)                                                        \
    _Pragma("omp parallel for schedule(static)")                                              \
    for (int o = 0; o < n; o++) {                                                             \
        for (int first = 0; first < rows; first += MOST_ROWS) {                               \
            const int count = rows - first < MOST_ROWS ? rows - first : MOST_ROWS;            \
            CALL;                                                                             \
        }                                                                                     \
    }

/* out (rows x n) = x (rows x k) times a Q4_1 weight (n x k), k a multiple of 32:
 * w, n x k/32 blocks of 16 bytes; wd and wm, n x k/32 scales and minimums. */
void q4_1_matmul(const float *x, int rows, int k, const uint8_t *w, const float *wd,
                 const float *wm, int n, float *out) {
    const int blocks = k / BLOCK;
    int16_t xq[rows * k] __attribute__((aligned(32)));
    __m256 xv[rows * blocks];
    float xs[rows * blocks];
    quantize_rows(x, rows, k, xq, xv, xs);
    FOR_EACH_OUTPUT_AND_ROWS(Q4_OUTPUT_TIMES[count](
        w + (long)o * blocks * 16, wd + (long)o * blocks, wm + (long)o * blocks, blocks, k,
        xq + (long)first * k, xv + first * blocks, xs + first * blocks,
        out + (long)first * n + o, n))
}

/* out (rows x n) = x (rows x k) times a Q8_0 weight (n x k), k a multiple of 32:
 * w, n x k codes; wd, n x k/32 scales. */
void q8_0_matmul(const float *x, int rows, int k, const int8_t *w, const float *wd, int n,
                 float *out) {
    const int blocks = k / BLOCK;
    int16_t xq[rows * k] __attribute__((aligned(32)));
    __m256 xv[rows * blocks];
    quantize_rows(x, rows, k, xq, xv, 0);
    FOR_EACH_OUTPUT_AND_ROWS(Q8_OUTPUT_TIMES[count](
        w + (long)o * k, wd + (long)o * blocks, blocks, k, xq + (long)first * k,
        xv + first * blocks, out + (long)first * n + o, n))
}
