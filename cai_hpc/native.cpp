// The fused model's memory-bound float32 steps, each one pass over its tensors (see native.py):
// the ViT block's attention, PCM, residual adds and LayerNorms, and the Inception's 3x3 max-pool.
//
// Shapes are AstroMAE's: 17 tokens (class token first) of 192 channels, 3 heads of 64, and the
// PCM's 48 groups of 4 channels -> 16 hidden -> 4. Tensors are C-contiguous float32 (channels-last
// for the max-pool); Python checks that before calling. Samples are spread over torch's intra-op
// threads (at::parallel_for). The hot loops have three forms, chosen by the instruction set the
// library is compiled for (-march; native.py builds one library per level): AVX-512 (x86-64-v4),
// AVX2 + FMA (x86-64-v3: 8-lane layouts of the same algorithms) and a portable one (GCC vector
// extensions) for every other CPU, aarch64 included. cai_isa() says which one a build holds.
//
// No -ffast-math: exp_approx's range reduction relies on the order of its operations, so the
// sums that should use vector lanes are written with 16 explicit lanes instead.
#include <ATen/Parallel.h>
#if defined(__AVX512F__)
#define CAI_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define CAI_AVX2 1
#endif
#if defined(CAI_AVX512) || defined(CAI_AVX2)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t TOKENS = 17, PATCHES = 16, CHANNELS = 192, HEADS = 3, HEAD_DIM = 64;
constexpr int64_t GROUPS = 48, GROUP_IN = 4, GROUP_HIDDEN = 16;
constexpr int64_t LANES = 16;
constexpr int64_t QKV_ROW = 3 * CHANNELS;  // a token's q, k and v

// 16 floats, for loops whose accumulators must stay in registers (GCC/Clang vector extension:
// one AVX-512 register, two AVX2 ones).
typedef float vec16 __attribute__((vector_size(64), aligned(4)));

inline vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store16(float* p, vec16 v) { std::memcpy(p, &v, sizeof v); }

inline float bits_to_float(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// exp(x) within 1e-7 relative for x in [-87, 80] (Cephes' expf: Cody-Waite reduction, degree-6
// polynomial), inline so that the loops calling it vectorise. Clamped to that range: softmax
// and SiLU need no more.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 80.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return (p * r * r + r + 1.0f) * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

#if defined(CAI_AVX512)
// exp_approx on 16 lanes with AVX-512's own instructions for rounding and scaling by 2^n.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(80.0f));
  const __m512 n =
      _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

// SiLU, most of the PCM's time: a / (1 + exp(-a)) without a division, which measured the
// bottleneck (a vector division's latency): a 14-bit reciprocal and one Newton step (2^-28).
inline void silu_inplace(float* v, int64_t n) {
  for (int64_t e = 0; e < n; e += LANES) {
    const __m512 a = _mm512_loadu_ps(v + e);
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), a)));
    __m512 y = _mm512_rcp14_ps(d);
    y = _mm512_mul_ps(y, _mm512_fnmadd_ps(d, y, _mm512_set1_ps(2.0f)));
    _mm512_storeu_ps(v + e, _mm512_mul_ps(a, y));
  }
}

// A 16 x 16 block from rows of ``in`` to rows of ``out``, transposed in registers: 64 shuffles
// instead of 256 scalar moves, half of them to addresses 64 bytes apart.
inline void transpose16(const float* in, int64_t in_stride, float* out, int64_t out_stride) {
  __m512 rows[16], quads[4][4];
  for (int64_t i = 0; i < 16; ++i) rows[i] = _mm512_loadu_ps(in + i * in_stride);
  // quads[q][c], 128-bit lane k: column 4k + c of rows 4q .. 4q + 3.
  for (int64_t q = 0; q < 4; ++q) {
    const __m512 lo01 = _mm512_unpacklo_ps(rows[4 * q], rows[4 * q + 1]);
    const __m512 hi01 = _mm512_unpackhi_ps(rows[4 * q], rows[4 * q + 1]);
    const __m512 lo23 = _mm512_unpacklo_ps(rows[4 * q + 2], rows[4 * q + 3]);
    const __m512 hi23 = _mm512_unpackhi_ps(rows[4 * q + 2], rows[4 * q + 3]);
    quads[q][0] = _mm512_shuffle_ps(lo01, lo23, _MM_SHUFFLE(1, 0, 1, 0));
    quads[q][1] = _mm512_shuffle_ps(lo01, lo23, _MM_SHUFFLE(3, 2, 3, 2));
    quads[q][2] = _mm512_shuffle_ps(hi01, hi23, _MM_SHUFFLE(1, 0, 1, 0));
    quads[q][3] = _mm512_shuffle_ps(hi01, hi23, _MM_SHUFFLE(3, 2, 3, 2));
  }
  // Then a 4 x 4 transpose of 128-bit lanes: column 4k + c gathers lane k of quads[0..3][c].
  for (int64_t c = 0; c < 4; ++c) {
    const __m512 even01 = _mm512_shuffle_f32x4(quads[0][c], quads[1][c], 0x88);
    const __m512 odd01 = _mm512_shuffle_f32x4(quads[0][c], quads[1][c], 0xdd);
    const __m512 even23 = _mm512_shuffle_f32x4(quads[2][c], quads[3][c], 0x88);
    const __m512 odd23 = _mm512_shuffle_f32x4(quads[2][c], quads[3][c], 0xdd);
    _mm512_storeu_ps(out + c * out_stride, _mm512_shuffle_f32x4(even01, even23, 0x88));
    _mm512_storeu_ps(out + (4 + c) * out_stride, _mm512_shuffle_f32x4(odd01, odd23, 0x88));
    _mm512_storeu_ps(out + (8 + c) * out_stride, _mm512_shuffle_f32x4(even01, even23, 0xdd));
    _mm512_storeu_ps(out + (12 + c) * out_stride, _mm512_shuffle_f32x4(odd01, odd23, 0xdd));
  }
}

// Scores q_i . k_j of R query rows from i0 for keys 0-15 (one vector per row; keys transposed in
// kt), with two accumulators per row (halves of d) so that the FMAs do not wait on each other.
template <int R>
inline void score_rows(const float* q, const float kt[HEAD_DIM][LANES], int64_t i0, float p[][2 * LANES]) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t d = 0; d < HEAD_DIM / 2; ++d) {
    const __m512 low = _mm512_load_ps(kt[d]), high = _mm512_load_ps(kt[d + HEAD_DIM / 2]);
    for (int r = 0; r < R; ++r) {
      const float* qi = q + (i0 + r) * QKV_ROW;
      acc[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(qi[d]), low, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(_mm512_set1_ps(qi[d + HEAD_DIM / 2]), high, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_store_ps(p[i0 + r], _mm512_add_ps(acc[r][0], acc[r][1]));
}

// Output rows i0 .. i0 + R - 1: sum_j p_ij v_j, four vectors of 16 per row.
template <int R>
inline void weigh_values(const float* v, const float p[][2 * LANES], int64_t i0, float* out) {
  __m512 acc[R][HEAD_DIM / LANES];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < HEAD_DIM / LANES; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < TOKENS; ++j) {
    __m512 vj[HEAD_DIM / LANES];
    for (int c = 0; c < HEAD_DIM / LANES; ++c) vj[c] = _mm512_loadu_ps(v + j * QKV_ROW + c * LANES);
    for (int r = 0; r < R; ++r) {
      const __m512 weight = _mm512_set1_ps(p[i0 + r][j]);
      for (int c = 0; c < HEAD_DIM / LANES; ++c) acc[r][c] = _mm512_fmadd_ps(weight, vj[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < HEAD_DIM / LANES; ++c) _mm512_storeu_ps(out + (i0 + r) * CHANNELS + c * LANES, acc[r][c]);
}

// One head of one sample; q points at its first query (k and v follow at +192 and +384), out at
// its first output. Keys 0-15 are scored as one vector per query and key 16 as a dot product,
// so nothing is computed for padding.
inline void attention_head(const float* q, float* out) {
  const float* k = q + CHANNELS;
  const float* v = q + 2 * CHANNELS;
  alignas(64) float kt[HEAD_DIM][LANES];
  for (int64_t d = 0; d < HEAD_DIM; d += LANES) transpose16(k + d, QKV_ROW, kt[d], LANES);
  alignas(64) float p[TOKENS][2 * LANES];  // row i: probabilities of keys 0-15, then key 16
  for (int64_t i0 = 0; i0 + 4 <= TOKENS; i0 += 4) score_rows<4>(q, kt, i0, p);
  score_rows<TOKENS % 4>(q, kt, TOKENS - TOKENS % 4, p);
  const float* last_key = k + PATCHES * QKV_ROW;
  for (int64_t i = 0; i < TOKENS; ++i) {
    const float* qi = q + i * QKV_ROW;
    __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qi), _mm512_loadu_ps(last_key));
    for (int64_t d = LANES; d < HEAD_DIM; d += LANES)
      dot = _mm512_fmadd_ps(_mm512_loadu_ps(qi + d), _mm512_loadu_ps(last_key + d), dot);
    const float score16 = _mm512_reduce_add_ps(dot);
    const __m512 scores = _mm512_load_ps(p[i]);
    const float top = std::max(_mm512_reduce_max_ps(scores), score16);
    const __m512 e = exp16(_mm512_sub_ps(scores, _mm512_set1_ps(top)));
    const float e16 = exp_approx(score16 - top);
    const float inverse = 1.f / (_mm512_reduce_add_ps(e) + e16);
    _mm512_store_ps(p[i], _mm512_mul_ps(e, _mm512_set1_ps(inverse)));
    p[i][PATCHES] = e16 * inverse;
  }
  for (int64_t i0 = 0; i0 + 4 <= TOKENS; i0 += 4) weigh_values<4>(v, p, i0, out);
  weigh_values<TOKENS % 4>(v, p, TOKENS - TOKENS % 4, out);
}
#elif defined(CAI_AVX2)
// The AVX2 + FMA forms: the AVX-512 algorithms in 8-lane layouts (16 registers of 8 floats
// instead of 32 of 16, so the register blocks are smaller), with AVX2's own instructions where
// AVX-512 has ones AVX2 lacks (scalef, rcp14, the 16 x 16 transpose, reductions).
constexpr int64_t LANES8 = 8;

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float max8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// exp_approx on 8 lanes; 2^n is made in the exponent bits (AVX2 has no scalef).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(80.0f));
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}

// SiLU without a division: a 12-bit reciprocal and one Newton step (relative error ~2^-22).
inline __m256 silu8(__m256 a) {
  const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), a)));
  __m256 y = _mm256_rcp_ps(d);
  y = _mm256_mul_ps(y, _mm256_fnmadd_ps(d, y, _mm256_set1_ps(2.0f)));
  return _mm256_mul_ps(a, y);
}

// An 8 x 8 block from rows of ``in`` to rows of ``out``, transposed in registers.
inline void transpose8(const float* in, int64_t in_stride, float* out, int64_t out_stride) {
  __m256 r[8], s[8];
  for (int64_t i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * in_stride);
  // s[4h + c], 128-bit lane k: column 4k + c of rows 4h .. 4h + 3.
  for (int64_t h = 0; h < 2; ++h) {
    const __m256 lo01 = _mm256_unpacklo_ps(r[4 * h], r[4 * h + 1]);
    const __m256 hi01 = _mm256_unpackhi_ps(r[4 * h], r[4 * h + 1]);
    const __m256 lo23 = _mm256_unpacklo_ps(r[4 * h + 2], r[4 * h + 3]);
    const __m256 hi23 = _mm256_unpackhi_ps(r[4 * h + 2], r[4 * h + 3]);
    s[4 * h] = _mm256_shuffle_ps(lo01, lo23, _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * h + 1] = _mm256_shuffle_ps(lo01, lo23, _MM_SHUFFLE(3, 2, 3, 2));
    s[4 * h + 2] = _mm256_shuffle_ps(hi01, hi23, _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * h + 3] = _mm256_shuffle_ps(hi01, hi23, _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int64_t c = 0; c < 4; ++c) {
    _mm256_storeu_ps(out + c * out_stride, _mm256_permute2f128_ps(s[c], s[4 + c], 0x20));
    _mm256_storeu_ps(out + (4 + c) * out_stride, _mm256_permute2f128_ps(s[c], s[4 + c], 0x31));
  }
}

// Scores of R query rows from i0 for keys 0-7 and 8-15 (two vectors per row, which are also the
// row's two independent accumulators); keys transposed in kt.
template <int R>
inline void score_rows(const float* q, const float kt[HEAD_DIM][LANES], int64_t i0, float p[][2 * LANES]) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < HEAD_DIM; ++d) {
    const __m256 low = _mm256_load_ps(kt[d]), high = _mm256_load_ps(kt[d] + LANES8);
    for (int r = 0; r < R; ++r) {
      const __m256 qd = _mm256_broadcast_ss(q + (i0 + r) * QKV_ROW + d);
      acc[r][0] = _mm256_fmadd_ps(qd, low, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(qd, high, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(p[i0 + r], acc[r][0]);
    _mm256_store_ps(p[i0 + r] + LANES8, acc[r][1]);
  }
}

// Output rows i0 .. i0 + R - 1: sum_j p_ij v_j, a half of the head's 64 values at a time
// (R x 4 accumulators and 4 values of v_j fit the 16 registers for R = 2).
template <int R>
inline void weigh_values(const float* v, const float p[][2 * LANES], int64_t i0, float* out) {
  constexpr int64_t HALF = HEAD_DIM / 2, VECTORS = HALF / LANES8;
  for (int64_t half = 0; half < HEAD_DIM; half += HALF) {
    __m256 acc[R][VECTORS];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < VECTORS; ++c) acc[r][c] = _mm256_setzero_ps();
    for (int64_t j = 0; j < TOKENS; ++j) {
      __m256 vj[VECTORS];
      for (int c = 0; c < VECTORS; ++c) vj[c] = _mm256_loadu_ps(v + j * QKV_ROW + half + c * LANES8);
      for (int r = 0; r < R; ++r) {
        const __m256 weight = _mm256_broadcast_ss(&p[i0 + r][j]);
        for (int c = 0; c < VECTORS; ++c) acc[r][c] = _mm256_fmadd_ps(weight, vj[c], acc[r][c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < VECTORS; ++c) _mm256_storeu_ps(out + (i0 + r) * CHANNELS + half + c * LANES8, acc[r][c]);
  }
}

// One head of one sample (see the AVX-512 form): keys 0-15 as two vectors per query, key 16 as a
// dot product, nothing computed for padding.
inline void attention_head(const float* q, float* out) {
  const float* k = q + CHANNELS;
  const float* v = q + 2 * CHANNELS;
  alignas(32) float kt[HEAD_DIM][LANES];
  for (int64_t j = 0; j < PATCHES; j += LANES8)
    for (int64_t d = 0; d < HEAD_DIM; d += LANES8) transpose8(k + j * QKV_ROW + d, QKV_ROW, kt[d] + j, LANES);
  alignas(32) float p[TOKENS][2 * LANES];  // row i: probabilities of keys 0-15, then key 16
  for (int64_t i0 = 0; i0 + 4 <= TOKENS; i0 += 4) score_rows<4>(q, kt, i0, p);
  score_rows<TOKENS % 4>(q, kt, TOKENS - TOKENS % 4, p);
  const float* last_key = k + PATCHES * QKV_ROW;
  for (int64_t i = 0; i < TOKENS; ++i) {
    const float* qi = q + i * QKV_ROW;
    __m256 dot0 = _mm256_mul_ps(_mm256_loadu_ps(qi), _mm256_loadu_ps(last_key));
    __m256 dot1 = _mm256_mul_ps(_mm256_loadu_ps(qi + LANES8), _mm256_loadu_ps(last_key + LANES8));
    for (int64_t d = 2 * LANES8; d < HEAD_DIM; d += 2 * LANES8) {
      dot0 = _mm256_fmadd_ps(_mm256_loadu_ps(qi + d), _mm256_loadu_ps(last_key + d), dot0);
      dot1 = _mm256_fmadd_ps(_mm256_loadu_ps(qi + d + LANES8), _mm256_loadu_ps(last_key + d + LANES8), dot1);
    }
    const float score16 = sum8(_mm256_add_ps(dot0, dot1));
    const __m256 low = _mm256_load_ps(p[i]), high = _mm256_load_ps(p[i] + LANES8);
    const float top = std::max(max8(_mm256_max_ps(low, high)), score16);
    const __m256 e_low = exp8(_mm256_sub_ps(low, _mm256_set1_ps(top)));
    const __m256 e_high = exp8(_mm256_sub_ps(high, _mm256_set1_ps(top)));
    const float e16 = exp_approx(score16 - top);
    const __m256 inverse = _mm256_set1_ps(1.f / (sum8(_mm256_add_ps(e_low, e_high)) + e16));
    _mm256_store_ps(p[i], _mm256_mul_ps(e_low, inverse));
    _mm256_store_ps(p[i] + LANES8, _mm256_mul_ps(e_high, inverse));
    p[i][PATCHES] = e16 * _mm256_cvtss_f32(inverse);
  }
  for (int64_t i0 = 0; i0 + 2 <= TOKENS; i0 += 2) weigh_values<2>(v, p, i0, out);
  weigh_values<1>(v, p, TOKENS - 1, out);
}

// LayerNorm of one token (192 = 24 vectors), four accumulators for the two sums.
inline void layer_norm(const float* v, const float* weight, const float* bias, float eps, float* out) {
  constexpr int64_t STEP = 4 * LANES8;
  __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t c = 0; c < CHANNELS; c += STEP)
    for (int u = 0; u < 4; ++u) s[u] = _mm256_add_ps(s[u], _mm256_loadu_ps(v + c + u * LANES8));
  const __m256 mean = _mm256_set1_ps(sum8(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]))) / CHANNELS);
  for (int u = 0; u < 4; ++u) s[u] = _mm256_setzero_ps();
  for (int64_t c = 0; c < CHANNELS; c += STEP)
    for (int u = 0; u < 4; ++u) {
      const __m256 dev = _mm256_sub_ps(_mm256_loadu_ps(v + c + u * LANES8), mean);
      s[u] = _mm256_fmadd_ps(dev, dev, s[u]);
    }
  const float variance = sum8(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]))) / CHANNELS;
  const __m256 scale = _mm256_set1_ps(1.f / std::sqrt(variance + eps));
  for (int64_t c = 0; c < CHANNELS; c += LANES8) {
    const __m256 scaled = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(v + c), mean), scale);
    _mm256_storeu_ps(out + c, _mm256_fmadd_ps(scaled, _mm256_loadu_ps(weight + c), _mm256_loadu_ps(bias + c)));
  }
}

// The PCM of 8 patch tokens (x: 8 rows of 192, out likewise), tokens in the lanes (see the
// generic pcm_sample). The hidden channels go 4 at a time: their 4 SiLUs are independent chains
// that overlap, and 4 hidden + 4 input + 4 output vectors stay in registers.
inline void pcm_tokens8(const float* x, const float* w1, const float* b1, const float* w2, const float* b2, float* out) {
  alignas(32) float xt[CHANNELS][LANES8];
  alignas(32) float by_channel[CHANNELS][LANES8];
  for (int64_t c = 0; c < CHANNELS; c += LANES8) transpose8(x + c, CHANNELS, xt[c], LANES8);
  for (int64_t g = 0; g < GROUPS; ++g) {
    const float* w1g = w1 + g * GROUP_IN * GROUP_HIDDEN;
    const float* w2g = w2 + g * GROUP_HIDDEN * GROUP_IN;
    __m256 xg[GROUP_IN], acc[GROUP_IN];
    for (int64_t i = 0; i < GROUP_IN; ++i) {
      xg[i] = _mm256_load_ps(xt[g * GROUP_IN + i]);
      acc[i] = _mm256_set1_ps(b2[g * GROUP_IN + i]);
    }
    for (int64_t j0 = 0; j0 < GROUP_HIDDEN; j0 += 4) {
      __m256 h[4];
      for (int64_t u = 0; u < 4; ++u) {
        h[u] = _mm256_set1_ps(b1[g * GROUP_HIDDEN + j0 + u]);
        for (int64_t i = 0; i < GROUP_IN; ++i)
          h[u] = _mm256_fmadd_ps(_mm256_set1_ps(w1g[i * GROUP_HIDDEN + j0 + u]), xg[i], h[u]);
      }
      for (int64_t u = 0; u < 4; ++u) h[u] = silu8(h[u]);
      for (int64_t u = 0; u < 4; ++u)
        for (int64_t m = 0; m < GROUP_IN; ++m)
          acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(w2g[(j0 + u) * GROUP_IN + m]), h[u], acc[m]);
    }
    for (int64_t m = 0; m < GROUP_IN; ++m) _mm256_store_ps(by_channel[g * GROUP_IN + m], acc[m]);
  }
  for (int64_t c = 0; c < CHANNELS; c += LANES8) transpose8(by_channel[c], LANES8, out + c, CHANNELS);
}

void pcm_sample(const float* x, const float* w1, const float* b1, const float* w2, const float* b2,
                float out[PATCHES][CHANNELS]) {
  for (int64_t t = 0; t < PATCHES; t += LANES8) pcm_tokens8(x + t * CHANNELS, w1, b1, w2, b2, out[t]);
}
#else
// 1/d for 1 <= d <= e^80 without a division, which measured the bottleneck of the SiLU loop (a
// vector division's latency): a first guess from the bit pattern, good to 12 %, then three
// Newton steps, each squaring the relative error (to 1.2e-7).
inline float reciprocal(float d) {
  int32_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  float y = bits_to_float(0x7EF311C3 - bits);
  y = y * (2.f - d * y);
  y = y * (2.f - d * y);
  return y * (2.f - d * y);
}

inline void silu_inplace(float* v, int64_t n) {
  for (int64_t e = 0; e < n; ++e) v[e] = v[e] * reciprocal(1.f + exp_approx(-v[e]));
}

inline void transpose16(const float* in, int64_t in_stride, float* out, int64_t out_stride) {
  for (int64_t i = 0; i < 16; ++i)
    for (int64_t j = 0; j < 16; ++j) out[j * out_stride + i] = in[i * in_stride + j];
}

// One head of one sample (see the AVX-512 version): keys padded to 32 (two vectors of scores),
// queries to 20 (blocks of 4 rows), the padding zeros.
inline void attention_head(const float* q, float* out) {
  constexpr int64_t KEYS = 32, QUERIES = 20, ROWS = 4;
  alignas(64) float keys[HEAD_DIM][KEYS] = {};
  alignas(64) float queries[QUERIES][HEAD_DIM] = {};
  alignas(64) float scores[QUERIES][KEYS];
  float inverse_sum[QUERIES];
  for (int64_t j = 0; j < TOKENS; ++j)
    for (int64_t d = 0; d < HEAD_DIM; ++d) {
      queries[j][d] = q[j * QKV_ROW + d];
      keys[d][j] = q[j * QKV_ROW + CHANNELS + d];
    }
  for (int64_t i0 = 0; i0 < QUERIES; i0 += ROWS) {
    vec16 low[ROWS] = {}, high[ROWS] = {};
    for (int64_t d = 0; d < HEAD_DIM; ++d) {
      const vec16 k_low = load16(keys[d]), k_high = load16(keys[d] + LANES);
      for (int64_t r = 0; r < ROWS; ++r) {
        low[r] += queries[i0 + r][d] * k_low;
        high[r] += queries[i0 + r][d] * k_high;
      }
    }
    for (int64_t r = 0; r < ROWS; ++r) {
      store16(scores[i0 + r], low[r]);
      store16(scores[i0 + r] + LANES, high[r]);
    }
  }
  for (int64_t i = 0; i < TOKENS; ++i) {
    float* row = scores[i];
    const float top = *std::max_element(row, row + TOKENS);
    for (int64_t j = 0; j < TOKENS; ++j) row[j] = exp_approx(row[j] - top);
    float sum = 0.f;
    for (int64_t j = 0; j < TOKENS; ++j) sum += row[j];
    inverse_sum[i] = 1.f / sum;
  }
  for (int64_t i0 = 0; i0 < TOKENS; i0 += ROWS) {
    vec16 acc[ROWS][HEAD_DIM / LANES] = {};
    for (int64_t j = 0; j < TOKENS; ++j) {
      const float* v = q + j * QKV_ROW + 2 * CHANNELS;
      vec16 vj[HEAD_DIM / LANES];
      for (int64_t c = 0; c < HEAD_DIM / LANES; ++c) vj[c] = load16(v + c * LANES);
      for (int64_t r = 0; r < ROWS; ++r)
        for (int64_t c = 0; c < HEAD_DIM / LANES; ++c) acc[r][c] += scores[i0 + r][j] * vj[c];
    }
    for (int64_t r = 0; r < ROWS && i0 + r < TOKENS; ++r)
      for (int64_t c = 0; c < HEAD_DIM / LANES; ++c)
        store16(out + (i0 + r) * CHANNELS + c * LANES, acc[r][c] * inverse_sum[i0 + r]);
  }
}
#endif

// max(a, b) that keeps a NaN of either (std::max drops one in b).
inline float max_nan(float a, float b) { return (b > a || b != b) ? b : a; }

inline float lane_total(const float* lanes) {
  float total = 0.f;
  for (int64_t l = 0; l < LANES; ++l) total += lanes[l];
  return total;
}

#if !defined(CAI_AVX2)
// LayerNorm of one token, as torch computes it: mean, then the mean square deviation.
inline void layer_norm(const float* v, const float* weight, const float* bias, float eps, float* out) {
  float lanes[LANES] = {};
  for (int64_t c = 0; c < CHANNELS; c += LANES)
    for (int64_t l = 0; l < LANES; ++l) lanes[l] += v[c + l];
  const float mean = lane_total(lanes) / CHANNELS;
  float squares[LANES] = {};
  for (int64_t c = 0; c < CHANNELS; c += LANES)
    for (int64_t l = 0; l < LANES; ++l) squares[l] += (v[c + l] - mean) * (v[c + l] - mean);
  const float scale = 1.f / std::sqrt(lane_total(squares) / CHANNELS + eps);
  for (int64_t c = 0; c < CHANNELS; ++c) out[c] = (v[c] - mean) * scale * weight[c] + bias[c];
}

// The PCM of one sample's 16 patch tokens (x: 16 x 192), the tokens in the vector lanes so that
// each group's 4 -> 16 -> 4 maps are broadcast weights times token vectors, with no sums across
// lanes. Weights in the layouts of FusedBlock's batched matmuls: w1 (48, 4, 16), b1 (48, 16),
// w2 (48, 16, 4), b2 (48, 4). Writes out[token][channel].
void pcm_sample(const float* x, const float* w1, const float* b1, const float* w2, const float* b2,
                float out[PATCHES][CHANNELS]) {
  alignas(64) float by_channel[CHANNELS][PATCHES];
  alignas(64) float xt[CHANNELS][PATCHES];
  for (int64_t c = 0; c < CHANNELS; c += LANES) transpose16(x + c, CHANNELS, xt[c], PATCHES);
  for (int64_t g = 0; g < GROUPS; ++g) {
    const float* xg = xt[g * GROUP_IN];
    const float* w1g = w1 + g * GROUP_IN * GROUP_HIDDEN;
    const float* w2g = w2 + g * GROUP_HIDDEN * GROUP_IN;
    alignas(64) float hidden[GROUP_HIDDEN][PATCHES];
    for (int64_t j = 0; j < GROUP_HIDDEN; ++j) {
      vec16 a = b1[g * GROUP_HIDDEN + j] + vec16{};
      for (int64_t i = 0; i < GROUP_IN; ++i) a += w1g[i * GROUP_HIDDEN + j] * load16(xg + i * PATCHES);
      store16(hidden[j], a);
    }
    // One loop over all 256 values: independent iterations, so the SiLU's long dependency
    // chain of one vector overlaps the next one's.
    silu_inplace(hidden[0], GROUP_HIDDEN * PATCHES);
    // Two accumulators per output channel (even and odd hidden channels): one chain of 16
    // dependent additions each would leave the FMA units waiting on their latency.
    vec16 acc[2][GROUP_IN] = {};
    for (int64_t j = 0; j < GROUP_HIDDEN; ++j) {
      const vec16 h = load16(hidden[j]);
      for (int64_t m = 0; m < GROUP_IN; ++m) acc[j % 2][m] += w2g[j * GROUP_IN + m] * h;
    }
    for (int64_t m = 0; m < GROUP_IN; ++m)
      store16(by_channel[g * GROUP_IN + m], b2[g * GROUP_IN + m] + acc[0][m] + acc[1][m]);
  }
  for (int64_t c = 0; c < CHANNELS; c += LANES) transpose16(by_channel[c], PATCHES, out[0] + c, CHANNELS);
}
#endif

}  // namespace

extern "C" {

// After the attention: p <- x + p + [0; PCM(x's patch tokens)], normed <- LayerNorm(p).
// x, p, normed: (batch, 17, 192).
void cai_pcm_residual_norm(const float* x, float* p, const float* w1, const float* b1, const float* w2,
                           const float* b2, const float* norm_weight, const float* norm_bias, float eps,
                           float* normed, int64_t batch) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float pcm[PATCHES][CHANNELS];
    for (int64_t s = begin; s < end; ++s) {
      const float* xs = x + s * TOKENS * CHANNELS;
      float* ps = p + s * TOKENS * CHANNELS;
      pcm_sample(xs + CHANNELS, w1, b1, w2, b2, pcm);
      for (int64_t c = 0; c < CHANNELS; ++c) ps[c] += xs[c];
      for (int64_t t = 0; t < PATCHES; ++t)
        for (int64_t c = 0; c < CHANNELS; ++c)
          ps[(t + 1) * CHANNELS + c] += xs[(t + 1) * CHANNELS + c] + pcm[t][c];
      for (int64_t t = 0; t < TOKENS; ++t)
        layer_norm(ps + t * CHANNELS, norm_weight, norm_bias, eps, normed + (s * TOKENS + t) * CHANNELS);
    }
  });
}

// After the MLP: m <- m + x, normed <- LayerNorm(m) (the next block's first norm); rows of 192.
void cai_add_norm(float* m, const float* x, const float* norm_weight, const float* norm_bias, float eps,
                  float* normed, int64_t rows) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* mr = m + r * CHANNELS;
      for (int64_t c = 0; c < CHANNELS; ++c) mr[c] += x[r * CHANNELS + c];
      layer_norm(mr, norm_weight, norm_bias, eps, normed + r * CHANNELS);
    }
  });
}

// out[s, i, 64h:64h+64] = sum_j softmax_j(q_i . k_j) v_j for each head h, read straight from the
// qkv map's output (batch, 17, 3 x 192: q, k, v, each head by head; q already scaled) and written
// in the layout the output projection reads, so no tensor is permuted or copied.
void cai_attention(const float* qkv, float* out, int64_t batch) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s)
      for (int64_t h = 0; h < HEADS; ++h)
        attention_head(qkv + s * TOKENS * QKV_ROW + h * HEAD_DIM, out + s * TOKENS * CHANNELS + h * HEAD_DIM);
  });
}

// out = max_pool2d(x, 3, stride=1, padding=1) for channels-last x and out: (batch, height, width,
// channels) in memory. Rows are reduced over their 3 neighbours first, then columns, in one pass.
// A NaN anywhere in a window comes out, as from aten's kernel (max_nan).
void cai_max_pool_3x3(const float* x, float* out, int64_t batch, int64_t height, int64_t width, int64_t channels) {
  at::parallel_for(0, batch * height, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> column_max(width * channels);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t h = bh % height;
      const float* row = x + bh * width * channels;
      float* m = column_max.data();
      std::copy(row, row + width * channels, m);
      for (const int64_t dh : {-1, 1}) {
        if (h + dh < 0 || h + dh >= height) continue;
        const float* other = row + dh * width * channels;
        for (int64_t e = 0; e < width * channels; ++e) m[e] = max_nan(m[e], other[e]);
      }
      float* o = out + bh * width * channels;
      for (int64_t w = 0; w < width; ++w) {
        const float* centre = m + w * channels;
        for (int64_t c = 0; c < channels; ++c) {
          float v = centre[c];
          if (w > 0) v = max_nan(v, centre[c - channels]);
          if (w + 1 < width) v = max_nan(v, centre[c + channels]);
          o[w * channels + c] = v;
        }
      }
    }
  });
}

// How many threads this library's parallel loops would use: torch's count, unless the library
// was linked to an OpenMP runtime other than torch's (Python checks before using it).
// Which form of the kernels this build holds.
const char* cai_isa() {
#if defined(CAI_AVX512)
  return "avx512";
#elif defined(CAI_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

int64_t cai_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return at::get_num_threads();
#endif
}

}  // extern "C"
