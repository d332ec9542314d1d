// Weight-only quantized GEMM for decode steps: y = x @ W^T, W stored as integers (shared/models/quant.py):
//
//   w[n, k] = q[n, k] * scale[n, g] + offset[n, g]      g = k / group
//   8 bits: q int8 [N, K];  4 bits: q 0..15, two per byte [N, K/2] (even k low nibble, odd k high)
//
// The weights are never written out as floats. Per group the kernel needs only
//
//   sum_k w[n, k] x[m, k] = scale[n, g] * sum_k q[n, k] x[m, k] + offset[n, g] * sum_k x[m, k]
//
// so the inner loop converts integers to floats in registers and multiplies them with x; the group's
// sum of x is computed once per call. Paths for 1-4 tokens (M), by what the CPU has:
//   - 4 bits with AVX-512 VNNI: x as 24-bit integers (int24_digits: per 8 columns a power-of-two scale,
//     float32's precision at their largest value; three signed bytes), and vpdpbusd multiplies 64
//     nibbles by 64 of those bytes per instruction (vnni_row, int24_row32): integer sums, no float
//     conversion of weights;
//   - 4 bits otherwise, 1-2 tokens (AVX2: 1-3): each nibble is masked in place and x is permuted and
//     scaled by powers of 16 to meet it (mask_row); beyond, with AVX-512 and groups of 32 (GGUF Q4's),
//     a group's 16 possible weights are built as a table and the nibbles index it; and otherwise x is
//     split into its even and odd columns once per call, so the low and high nibbles of a byte vector
//     meet their x values without any shuffle (quant_row);
//   - 8 bits: widening loads and conversions (quant_row);
//   - int8_x (opt in, not exact): x rounded to int8 and llama.cpp's Q8 x Q4 / Q8 integer dot products.
// A row's lanes are summed together with the next rows' (rows_summed). Rows of W are split across
// threads. Beyond 4 rows (batches, prefill), blocks of rows are converted once into an L2-sized float
// buffer and skinny_gemm.h's outer-product tiles run over it for every row of x: W leaves DRAM as
// integers either way.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "skinny_gemm.h"

namespace tandem {

// Integer -> float conversions with the ISA's widening loads (GCC's generic vector conversions of
// byte vectors come out element by element).
#if defined(__AVX512F__)
inline vf int8_to_float(const int8_t* p) {
  const __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<vf>(_mm512_cvtepi32_ps(w));
}
inline void nibbles_to_float(const uint8_t* p, vf& lo, vf& hi) {
  const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = reinterpret_cast<vf>(_mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(15))));
  hi = reinterpret_cast<vf>(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4)));
}
#else
inline vf int8_to_float(const int8_t* p) {
  const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<vf>(_mm256_cvtepi32_ps(w));
}
inline void nibbles_to_float(const uint8_t* p, vf& lo, vf& hi) {
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo = reinterpret_cast<vf>(_mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(15))));
  hi = reinterpret_cast<vf>(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4)));
}
#endif

// Scales and offsets come as float32 or float16 (S): float16 halves their bytes, a sixth of a 4-bit
// weight's (GGUF stores them so).
inline float scalar(float v) { return v; }
inline float scalar(at::Half v) { return _cvtsh_ss(v.x); }
inline vf vload_s(const float* p) { return vload(p); }
#if defined(__AVX512F__)
inline vf vload_s(const at::Half* p) {
  return reinterpret_cast<vf>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
// up to 16 scales or offsets (the lanes of `mask`) as floats
inline __m512 masked_s(__mmask16 mask, const float* p) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 masked_s(__mmask16 mask, const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}
#else
inline vf vload_s(const at::Half* p) {
  return reinterpret_cast<vf>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

// The integers stream faster than the hardware prefetchers fetch them (rows of a few hundred bytes
// from three arrays): each tile asks for the tile PREFETCH_AHEAD tiles on (its rows, scales and offsets),
// 16 rows (2-18 KB of integers here) since tiles are single rows.
constexpr int64_t PREFETCH_AHEAD = 16;
template <int R, typename S>
inline void prefetch_ahead(const uint8_t* q, int64_t row_bytes, const S* scale, const S* offset, int64_t groups) {
  const char* qa = reinterpret_cast<const char*>(q + PREFETCH_AHEAD * R * row_bytes);
  for (int64_t b = 0; b < R * row_bytes; b += 64) _mm_prefetch(qa + b, _MM_HINT_T0);
  const char* sa = reinterpret_cast<const char*>(scale + PREFETCH_AHEAD * R * groups);
  for (int64_t b = 0; b < R * groups * static_cast<int64_t>(sizeof(S)); b += 64) _mm_prefetch(sa + b, _MM_HINT_T0);
  if (!offset) return;
  const char* oa = reinterpret_cast<const char*>(offset + PREFETCH_AHEAD * R * groups);
  for (int64_t b = 0; b < R * groups * static_cast<int64_t>(sizeof(S)); b += 64) _mm_prefetch(oa + b, _MM_HINT_T0);
}

// What a group size must be a multiple of for these kernels: whole vectors of columns (4 bits: 32,
// which also covers two AVX-512 vectors of nibbles).
inline int64_t group_multiple(int64_t bits) { return bits == 4 ? 32 : VW; }

// 16 bytes of packed nibbles -> the 32 values in column order (each byte's low nibble first), as bytes.
inline void nibbles_in_order(const uint8_t* p, __m128i& first, __m128i& second) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), m = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  first = _mm_unpacklo_epi8(lo, hi);
  second = _mm_unpackhi_epi8(lo, hi);
}

// 16 small unsigned bytes -> out[0:16] = byte * s + o.
inline void bytes_to_floats(__m128i v, float s, float o, float* out) {
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
  _mm512_storeu_ps(out, _mm512_fmadd_ps(f, _mm512_set1_ps(s), _mm512_set1_ps(o)));
#else
  const __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
  const __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
  _mm256_storeu_ps(out, _mm256_fmadd_ps(a, _mm256_set1_ps(s), _mm256_set1_ps(o)));
  _mm256_storeu_ps(out + 8, _mm256_fmadd_ps(b, _mm256_set1_ps(s), _mm256_set1_ps(o)));
#endif
}

// sum_g a[g] * b[g] over n values.
template <typename S>
inline float dot(const S* a, const float* b, int64_t n) {
  vf acc{};
  int64_t g = 0;
  for (; g + VW <= n; g += VW) acc += vload_s(a + g) * vload(b + g);
  float out = hsum(acc);
  for (; g < n; ++g) out += scalar(a[g]) * b[g];
  return out;
}

// acc[m] += s * (lo . xe[m] + hi . xo[m]): one row's converted nibbles (even and odd columns) against
// M tokens. One token: scale the partial dot product (3 FMA-unit ops, not 4); more: scale the weights
// once for all of them.
template <int M>
inline void scaled_fma(vf lo, vf hi, vf s, const vf* xe, const vf* xo, vf* acc) {
  if constexpr (M == 1) {
    vf part = lo * xe[0];
    part += hi * xo[0];
    acc[0] += part * s;
  } else {
    lo *= s, hi *= s;
    for (int m = 0; m < M; ++m) acc[m] += lo * xe[m], acc[m] += hi * xo[m];
  }
}

// A 64-column block's scales for 8 lanes of 8 columns: lanes 0-3 get the group of columns 0-31, lanes
// 4-7 the group of columns 32-63 (groups are multiples of 32 columns).
// (Groups of 32, GGUF's, skip the divisions: per block and row they cost as much as a tenth of its work.)
inline __m256 block_scales(const float* s, int64_t group, int64_t b) {
  if (group == 32) return _mm256_set_m128(_mm_set1_ps(s[2 * b + 1]), _mm_set1_ps(s[2 * b]));
  const int64_t g0 = b * 64 / group, g1 = (b * 64 + 32) / group;
  if (g0 == g1) return _mm256_set1_ps(s[g0]);
  return _mm256_set_m128(_mm_set1_ps(s[g1]), _mm_set1_ps(s[g0]));
}
inline __m256 block_scales(const at::Half* s, int64_t group, int64_t b) {
  if (group == 32) {
    int32_t two;  // the block's two float16 scales, each repeated over four lanes
    std::memcpy(&two, s + 2 * b, 4);
    const __m128i pattern = _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3);
    return _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_cvtsi32_si128(two), pattern));
  }
  const int64_t g0 = b * 64 / group, g1 = (b * 64 + 32) / group;
  if (g0 == g1) return _mm256_set1_ps(scalar(s[g0]));
  return _mm256_set_m128(_mm_set1_ps(scalar(s[g1])), _mm_set1_ps(scalar(s[g0])));
}

// 4 bits, groups of 32, 64 or a multiple of a block: no table lookup and no byte widening. A vector
// load of a row is VW dwords of 8 nibbles (a block of 8 * VW columns: 64 on AVX2, 128 on AVX-512), and
// in the packed layout dword i nibble j is column 8i + j of the block. (dword & (15 << 4j)) converted
// to float is q * 16^j exactly, so x is prepared per block as 8 vectors, x'[j][i] = x[8i + j] * 16^-j
// (exact: powers of two), and each VW weights cost an AND, a conversion and an FMA — no shuffles (the
// conversions and FMAs run on ports the table path's vpermps and widening loads leave to the
// shuffles). Nibble 7 is shifted down instead (q << 28 would read as negative) and meets x unscaled.
// Lane i's 8 columns lie in one group; the block's scale vector holds each lane's group scale. On
// AVX-512 a row of 64-column multiples may end in half a block: its upper lanes load as zero.
// Tokens: AVX2 up to 3 (4 tokens' accumulators and partial sums spill its 16 registers), AVX-512 up to
// 2 (3-4 ran at half the table path's speed); more take the table or widening paths.
typedef int32_t vi __attribute__((vector_size(VW * 4), aligned(4), __may_alias__));
typedef uint32_t vu __attribute__((vector_size(VW * 4), aligned(4), __may_alias__));
constexpr int64_t MASK_BLOCK = 8 * VW;  // columns per block

inline bool mask_path(int64_t bits, int64_t group, int64_t k_dim, int64_t m_dim) {
  return bits == 4 && (group == 32 || group == 64 || group % MASK_BLOCK == 0) && k_dim % 64 == 0 &&
         m_dim <= (VW == 16 ? 2 : 3);
}

// a block of a row's nibbles (AVX-512: the last may be half a block, its upper lanes zero)
inline vi mask_block(const uint8_t* p, bool half) {
#if defined(__AVX512F__)
  if (half) return reinterpret_cast<vi>(_mm512_maskz_loadu_epi32(0x00FF, p));
#endif
  return *reinterpret_cast<const vi*>(p);
}

// the scale of each lane's group in block b (lanes past the row's end: 0)
template <typename S>
inline vf mask_scales(const S* s, int64_t group, int64_t groups, int64_t b) {
  // with one row a tile, a division here per block cost as much as a tenth of the block's work
  const int64_t g0 = group == 32 ? b * (MASK_BLOCK / 32) : group == 64 ? b * (MASK_BLOCK / 64) : b * MASK_BLOCK / group;
  if (group % MASK_BLOCK == 0) return vsplat(scalar(s[g0]));
#if defined(__AVX512F__)
  // 2 (groups of 64) or 4 (of 32) scales, each over 16 / n lanes
  const int64_t n = MASK_BLOCK / group;
  const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(n, groups - g0)) - 1);
  const __m512i idx = group == 64 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                                  : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  return reinterpret_cast<vf>(_mm512_permutexvar_ps(idx, masked_s(mask, s + g0)));
#else
  (void)groups;
  return reinterpret_cast<vf>(block_scales(s, group, b));  // groups of 32: lanes 0-3 and 4-7
#endif
}

// One block's 8 nibble vectors against M tokens' x' (F: the float vector, I/U: the int32 ones; AVX-512
// runs a row's last half block in 256-bit vectors, reading the first half of each x' vector).
template <int M, typename F, typename I, typename U>
inline void block_dot(I w, const float* xb, int64_t ldx, F* part) {
  // one token: two FMA chains (a block's 8 products in one chain wait on its latency)
  constexpr int CHAINS = M == 1 ? 2 : 1;
  F chain[CHAINS][M];
  for (int j = 0; j < 8; ++j) {
    const I t = j == 7 ? I(reinterpret_cast<I>(reinterpret_cast<U>(w) >> 28)) : (w & (15 << (4 * j)));
    const F f = __builtin_convertvector(t, F);
    const int c = j % CHAINS;
    for (int m = 0; m < M; ++m) {
      const F xv = *reinterpret_cast<const F*>(xb + m * ldx + j * VW);
      chain[c][m] = j < CHAINS ? f * xv : chain[c][m] + f * xv;
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int c = 1; c < CHAINS; ++c) chain[0][m] += chain[c][m];
    part[m] = chain[0][m];
  }
}

#if defined(__AVX512F__)
// half vectors: a row's last half block
typedef float half_vf __attribute__((vector_size(32), aligned(4), __may_alias__));
typedef int32_t half_vi __attribute__((vector_size(32), aligned(4), __may_alias__));
typedef uint32_t half_vu __attribute__((vector_size(32), aligned(4), __may_alias__));
#endif

// acc[m] += the offsets' term, sum_g offset[g] * (token m's sum of x over group g), lane-wise (the
// lanes are summed after)
template <int M, typename S>
inline void add_offsets(const S* offset, const float* gsum, int64_t groups, vf* acc) {
  int64_t g = 0;
  for (; g + VW <= groups; g += VW) {
    const vf o = vload_s(offset + g);
    for (int m = 0; m < M; ++m) acc[m] += o * vload(gsum + m * groups + g);
  }
  if (g == groups) return;
#if defined(__AVX512F__)
  const __mmask16 tail = static_cast<__mmask16>((1u << (groups - g)) - 1);
  const __m512 o = masked_s(tail, offset + g);
  for (int m = 0; m < M; ++m)
    acc[m] += reinterpret_cast<vf>(_mm512_mul_ps(o, _mm512_maskz_loadu_ps(tail, gsum + m * groups + g)));
#else
  for (int m = 0; m < M; ++m) {
    vf t{};
    for (int64_t u = g; u < groups; ++u) t[u - g] = scalar(offset[u]) * gsum[m * groups + u];
    acc[m] += t;
  }
#endif
}

// y^T rows [n0, n1) ([N, M]) from row(n, acc), which leaves row n's M accumulators with lanes still to
// sum: VW rows' lanes are summed together by reduce_lanes, not each row's on its own (a row's own
// reduction and its offsets' tail cost a fifth of a 576-column row).
template <int M, typename Row>
inline void rows_summed(int64_t n0, int64_t n1, float* yt, Row&& row) {
  int64_t n = n0;
  for (; n + VW <= n1; n += VW) {
    vf rows[M][VW];
    for (int i = 0; i < VW; ++i) {
      vf acc[M];
      row(n + i, acc);
      for (int m = 0; m < M; ++m) rows[m][reduce_slot(i)] = acc[m];
    }
    for (int m = 0; m < M; ++m) {
      const vf sums = reduce_lanes(rows[m]);
      if constexpr (M == 1) vstore(yt + n, sums);
      else
        for (int i = 0; i < VW; ++i) yt[(n + i) * M + m] = sums[i];
    }
  }
  for (; n < n1; ++n) {
    vf acc[M];
    row(n, acc);
    for (int m = 0; m < M; ++m) yt[n * M + m] = hsum(acc[m]);
  }
}

// One row's accumulators for M tokens on the mask path (lanes still to be summed): the scaled blocks
// plus the offsets' term.
template <int M, typename S>
inline void mask_row(const uint8_t* q, const S* scale, const S* offset, int64_t k_dim, int64_t group,
                     const float* xs, int64_t ldx, const float* gsum, int64_t groups, vf* acc) {
  for (int m = 0; m < M; ++m) acc[m] = vf{};
  prefetch_ahead<1>(q, k_dim / 2, scale, offset, groups);
  const int64_t full = k_dim / MASK_BLOCK;
  for (int64_t b = 0; b < full; ++b) {
    vf part[M];
    block_dot<M, vf, vi, vu>(*reinterpret_cast<const vi*>(q + b * MASK_BLOCK / 2), xs + b * MASK_BLOCK, ldx, part);
    const vf s = mask_scales(scale, group, groups, b);
    for (int m = 0; m < M; ++m) acc[m] += part[m] * s;
  }
#if defined(__AVX512F__)
  if (full * MASK_BLOCK < k_dim) {  // half a block (rows of 64-column multiples)
    half_vf part[M];
    block_dot<M, half_vf, half_vi, half_vu>(*reinterpret_cast<const half_vi*>(q + full * MASK_BLOCK / 2),
                                            xs + full * MASK_BLOCK, ldx, part);
    const __m512 scales = reinterpret_cast<__m512>(mask_scales(scale, group, groups, full));
    const half_vf s = reinterpret_cast<half_vf>(_mm512_castps512_ps256(scales));
    for (int m = 0; m < M; ++m)
      acc[m] += reinterpret_cast<vf>(_mm512_zextps256_ps512(reinterpret_cast<__m256>(part[m] * s)));
  }
#endif
  add_offsets<M>(offset, gsum, groups, acc);
}

// x' for mask_row: per token and block, x'[j * VW + i] = x[8i + j] * 16^-j (j < 7), x[8i + 7]; a
// half block's upper lanes are zero. `out` holds mask_x_floats(k_dim).
inline int64_t mask_x_floats(int64_t k_dim) { return (k_dim + MASK_BLOCK - 1) / MASK_BLOCK * MASK_BLOCK; }
inline void mask_x(const float* x, int64_t k_dim, float* out) {
  static const float pow16[8] = {1.f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 1.f};
  for (int64_t b = 0; b < k_dim; b += MASK_BLOCK)
    for (int j = 0; j < 8; ++j)
      for (int i = 0; i < VW; ++i) {
        const int64_t k = b + 8 * i + j;
        out[b + j * VW + i] = k < k_dim ? x[k] * pow16[j] : 0.f;
      }
}

// AVX-512, 4-bit groups of 32 where the mask path does not apply: quant_row's table lookup
inline bool table_path(int64_t bits, int64_t group, int64_t k_dim, int64_t m_dim) {
#if defined(__AVX512F__)
  return bits == 4 && group == 32 && !mask_path(bits, group, k_dim, m_dim);
#else
  return false;
#endif
}

// One weight row's accumulators for M tokens (lanes still to sum; rows_summed sums them), on the paths
// other than the mask path (8 bits: a null offset stands for all-zero offsets, GGUF's Q8_0). xs: x
// (8 bits) or [x_even | x_odd] per token (4 bits), each token `ldx` floats apart; gsum [M, G]: each
// token's sum of x per group.
template <int M, int BITS, typename S>
inline void quant_row(const uint8_t* q, const S* scale, const S* offset, int64_t k_dim, int64_t group,
                      const float* xs, int64_t ldx, const float* gsum, int64_t groups, vf* acc) {
  for (int m = 0; m < M; ++m) acc[m] = vf{};
  prefetch_ahead<1>(q, BITS == 8 ? k_dim : k_dim / 2, scale, offset, groups);
  const int64_t half = k_dim / 2;
#if defined(__AVX512F__)
  if (table_path(BITS, group, k_dim, M)) {
    // Q4_0/Q4_1's groups of 32: a group's 16 possible weights q * scale + offset as a table, and the
    // nibbles pick from it (vpermps reads an index's low 4 bits), so no conversions, no scale
    // multiply and no offsets term after
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k = g * 16;
      const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(scalar(scale[g])), _mm512_set1_ps(scalar(offset[g])));
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)));
      const vf lo = reinterpret_cast<vf>(_mm512_permutexvar_ps(b, table));
      const vf hi = reinterpret_cast<vf>(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table));
      for (int m = 0; m < M; ++m) acc[m] += lo * vload(xs + m * ldx + k), acc[m] += hi * vload(xs + m * ldx + half + k);
    }
    return;
  }
#endif
  for (int64_t g = 0; g < groups; ++g) {
    const vf s = vsplat(scalar(scale[g]));
    if (BITS == 4) {
      for (int64_t k = g * group / 2; k < (g + 1) * group / 2; k += VW) {
        vf xe[M], xo[M], lo, hi;
        for (int m = 0; m < M; ++m) xe[m] = vload(xs + m * ldx + k), xo[m] = vload(xs + m * ldx + half + k);
        nibbles_to_float(q + k, lo, hi);
        scaled_fma<M>(lo, hi, s, xe, xo, acc);
      }
    } else if (M > 1 && group <= 64) {  // small groups: scale the weights once for all M tokens
      for (int64_t k = g * group; k < (g + 1) * group; k += VW) {
        const vf w = int8_to_float(reinterpret_cast<const int8_t*>(q) + k) * s;
        for (int m = 0; m < M; ++m) acc[m] += w * vload(xs + m * ldx + k);
      }
    } else {
      vf part[M];
      for (int m = 0; m < M; ++m) part[m] = vf{};
      for (int64_t k = g * group; k < (g + 1) * group; k += VW) {
        const vf w = int8_to_float(reinterpret_cast<const int8_t*>(q) + k);
        for (int m = 0; m < M; ++m) part[m] += w * vload(xs + m * ldx + k);
      }
      for (int m = 0; m < M; ++m) acc[m] += s * part[m];
    }
  }
  if (offset) add_offsets<M>(offset, gsum, groups, acc);
}

// Weight rows per register tile for M tokens: one, so that a thread reads its rows of W as a single
// sequential stream. Tiles of 2-4 rows advance through their rows side by side, 2-4 streams a few
// hundred bytes apart: level in cache, but on a Zen 4 VM they drew W from DRAM at half the rate
// (the int8 head: 12 against 24 GB/s; a one-request int4 step ~20 % slower). See dot_r.
template <int>
constexpr int quant_r() {
  return 1;
}

// y^T rows [n0, n1): one thread's share of a GEMM (quant_rows splits a GEMM into these; decode_step.h's
// team calls them).
template <int M, int BITS, typename S>
void quant_range(const uint8_t* q, int64_t row_bytes, const S* scales, const S* offsets, int64_t k_dim,
                 int64_t group, const float* xs, int64_t ldx, const float* gsum, float* yt, int64_t n0, int64_t n1) {
  const int64_t groups = k_dim / group;
  if (mask_path(BITS, group, k_dim, M)) {
    rows_summed<M>(n0, n1, yt, [=](int64_t n, vf* acc) {
      mask_row<M>(q + n * row_bytes, scales + n * groups, offsets + n * groups, k_dim, group, xs, ldx, gsum, groups,
                  acc);
    });
  } else {  // (8 bits: offsets may be null, all zero)
    rows_summed<M>(n0, n1, yt, [=](int64_t n, vf* acc) {
      quant_row<M, BITS>(q + n * row_bytes, scales + n * groups, offsets ? offsets + n * groups : nullptr, k_dim,
                         group, xs, ldx, gsum, groups, acc);
    });
  }
}

template <int M, int BITS, typename S>
void quant_rows(const uint8_t* q, int64_t row_bytes, const S* scales, const S* offsets, int64_t n_dim,
                int64_t k_dim, int64_t group, const float* xs, int64_t ldx, const float* gsum, float* yt) {
  at::parallel_for(0, n_dim, 16, [&](int64_t begin, int64_t end) {
    quant_range<M, BITS>(q, row_bytes, scales, offsets, k_dim, group, xs, ldx, gsum, yt, begin, end);
  });
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define TANDEM_VNNI 1
#define TANDEM_INT8_X 1
#define TANDEM_ROWS16 1  // the rows16 weight layout (int24_block16)
// Integer dot products (AVX-512 VNNI, llama.cpp's Q8 x Q4 scheme): x is quantized per token and per 32
// columns to int8, and vpdpbusd multiplies 64 weight bytes by 64 activation bytes into 16 int32 lanes
// at once — no conversion of weights to floats. A chunk is 64 weight bytes (4 bits: 128 columns, the
// low nibbles meeting the even columns of x and the high nibbles the odd ones; 8 bits: 64 columns);
// lane l of a chunk covers 8 (4 bits) or 4 (8 bits) consecutive columns, all in one group of the weight
// and one of x, so each lane's int32 sum is scaled by (weight scale x x scale) of its groups. The
// offsets' term, offset x (sum of x over the group), is added once per row (add_offsets), from x's
// float sums per weight group (per chunk, it cost a permute, a load and an FMA a row: ~5 % of a
// one-token GEMM). 8-bit weights are signed: x goes in as unsigned (x + 128) and 128 * sum(w) comes off.
// The same tiles take x as 24-bit integers for 4-bit weights (int24_digits: three planes of signed
// bytes), float32's precision where int8 x is not: the default for 1-4 rows, int8 x only on request.
struct XInt8 {
  int64_t m_dim, chunks, cols;                     // cols: columns per chunk (128 or 64)
  int planes = 1;                                  // 1: x rounded to int8; 3: x as 24-bit integers
  std::vector<int8_t> q;                           // [M][chunks][planes][64] (4 bits: [M][chunks][planes][2][64])
  std::vector<float> scale;                        // [M][chunks][16]: per lane, x's scale
  std::vector<float> gsum;                         // [M][K / group]: x's float sum per weight group
  int64_t groups;
  std::vector<int32_t> idx;                        // [chunks][16]: lane -> weight group - base[c]
  std::vector<int64_t> base;                       // [chunks]: the chunk's first weight group
  std::vector<int32_t> n_groups;                   // [chunks]: weight groups the chunk touches
};

inline bool int8_x_ok(int64_t, int64_t group, int64_t k_dim) { return k_dim % 32 == 0 && group % 32 == 0; }

// x as 24-bit integers, for 4-bit weights (planes = 3): each 8 columns (a lane of vnni_row's sums) share
// a power-of-two scale d with max |x| < 2^22 d, and become X = x / d rounded to nearest: float32's own
// precision at the lane's largest value (a value 2^-k of it keeps 22 - k bits). X is stored as three
// signed bytes, X = (X2 * 256 + X1) * 256 + X0, most significant plane first (see vnni_row). Writes the
// digits of the 32 columns from column j0 of a chunk, and their 4 lanes' scales (NaN where a lane holds
// a NaN or an infinity: the row's sums come out NaN).
inline void int24_digits(const float* x, int64_t j0, int8_t* dst, float* lane_scale) {
  // per lane: the largest |x| (its exponent bits, read straight from the float) and whether all are
  // finite (an exponent field of 255 is a NaN or an infinity)
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i a_bits = _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(x)), magnitude);
  const __m512i b_bits = _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(x + 16)), magnitude);
  alignas(64) int32_t bits[32];
  _mm512_store_si512(bits, a_bits);
  _mm512_store_si512(bits + 16, b_bits);
  float inv[4];
  for (int l = 0; l < 4; ++l) {
    int32_t top = 0;  // non-negative floats order as their bits do
    for (int k = 8 * l; k < 8 * l + 8; ++k) top = std::max(top, bits[k]);
    const int field = top >> 23;  // amax < 2^(field - 126)
    // zero lanes, and lanes below 2^-100 (zeros to float32 sums of this size; 2^22 / 2^e must stay a
    // float): scale 0; NaN or infinity: NaN
    const bool finite = field < 255, zero = field < 27;
    const int e = field - 126;
    inv[l] = !finite || zero ? 0.f : std::bit_cast<float>((127 + 22 - e) << 23);  // 2^(22 - e)
    const float d = std::bit_cast<float>((127 + e - 22) << 23);  // 2^(e - 22)
    lane_scale[l] = !finite ? std::numeric_limits<float>::quiet_NaN() : zero ? 0.f : d;
  }
  const __m512 inv_a = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(inv[0])), _mm256_set1_ps(inv[1]), 1);
  const __m512 inv_b = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(inv[2])), _mm256_set1_ps(inv[3]), 1);
  // rounded to nearest even, as float32 rounds; the even columns, then the odd ones
  const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), inv_a));
  const __m512i b = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16), inv_b));
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  __m512i v[2] = {_mm512_permutex2var_epi32(a, even, b),
                  _mm512_permutex2var_epi32(a, _mm512_add_epi32(even, _mm512_set1_epi32(1)), b)};
  for (int p = 2; p >= 0; --p)
    for (int h = 0; h < 2; ++h) {
      const __m512i digit = _mm512_srai_epi32(_mm512_slli_epi32(v[h], 24), 24);  // the low byte, signed
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + p * 128 + h * 64 + j0 / 2), _mm512_cvtepi32_epi8(digit));
      v[h] = _mm512_srai_epi32(_mm512_sub_epi32(v[h], digit), 8);
    }
}

// Tokens up to which 4-bit GEMMs take x as 24-bit integers (int24_digits; AVX-512 VNNI only): 1.2-1.6x
// the float paths' speed on one thread, and float32's precision
constexpr int64_t INT24_M = 4;
inline int int24_planes(int64_t bits, int64_t group, int64_t k_dim, int64_t m_dim) {
  return bits == 4 && k_dim % 32 == 0 && group % 32 == 0 && m_dim <= INT24_M ? 3 : 0;
}

// into `out`, whose buffers a caller may reuse from call to call
inline void quantize_x(const float* x, int64_t m_dim, int64_t k_dim, int64_t group, int64_t bits, XInt8& out,
                       int planes = 1) {
  const int64_t cols = bits == 4 ? 128 : 64, per_lane = cols / 16, chunks = (k_dim + cols - 1) / cols;
  const int64_t plane = bits == 4 ? 128 : 64;
  out.m_dim = m_dim, out.chunks = chunks, out.cols = cols, out.planes = planes;
  out.q.assign(m_dim * chunks * planes * plane, 0);
  out.scale.assign(m_dim * chunks * 16, 0.f);
  out.idx.assign(chunks * 16, 0);
  out.base.assign(chunks, 0);
  out.n_groups.assign(chunks, 1);
  out.groups = k_dim / group;
  out.gsum.assign(m_dim * out.groups, 0.f);
  for (int64_t m = 0; m < m_dim; ++m)
    for (int64_t g = 0; g < out.groups; ++g) {
      vf acc{};
      for (int64_t k = g * group; k < (g + 1) * group; k += VW) acc += vload(x + m * k_dim + k);
      out.gsum[m * out.groups + g] = hsum(acc);
    }
  for (int64_t c = 0; c < chunks; ++c) {
    out.base[c] = c * cols / group;
    for (int64_t l = 0; l < 16; ++l) {
      const int64_t k = std::min(c * cols + l * per_lane, k_dim - 1);
      out.idx[c * 16 + l] = static_cast<int32_t>(k / group - out.base[c]);
    }
    out.n_groups[c] = out.idx[c * 16 + 15] + 1;
  }
  for (int64_t m = 0; m < m_dim; ++m) {
    const float* xr = x + m * k_dim;
    for (int64_t g0 = 0; g0 < k_dim; g0 += 32) {  // x's groups of 32 columns: 4 (4 bits) or 8 lanes
      const int64_t c = g0 / cols, j0 = g0 - c * cols;
      int8_t* dst = out.q.data() + (m * chunks + c) * planes * plane;
      float* scale = out.scale.data() + (m * chunks + c) * 16;
      if (planes == 3) {
        int24_digits(xr + g0, j0, dst, scale + j0 / per_lane);
        continue;
      }
      float amax = 0.f;
      for (int64_t k = 0; k < 32; ++k) amax = std::max(amax, std::abs(xr[g0 + k]));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      for (int64_t k = 0; k < 32; ++k) {
        const float t = xr[g0 + k] * inv;
        const int8_t v = static_cast<int8_t>(static_cast<int>(t + (t >= 0.f ? 0.5f : -0.5f)));
        const int64_t j = j0 + k;
        if (bits == 4) dst[(j & 1) * 64 + (j >> 1)] = v;  // even columns, then odd ones
        else dst[j] = static_cast<int8_t>(static_cast<uint8_t>(v) ^ 0x80);  // x + 128, as unsigned
      }
      for (int64_t l = j0 / per_lane; l < (j0 + 32) / per_lane; ++l) scale[l] = d;
    }
  }
}

// One row's accumulators for M tokens (lanes still to sum), offsets' term included. With PLANES = 3
// (4 bits) the int32 sums take x's most significant digits first and shift up by 8 bits before each
// next plane: |sum| <= 8 * 15 * 128 * (2^16 + 2^8 + 1) < 2^31, exact, then one conversion to float.
template <int M, int BITS, int PLANES, typename S>
inline void vnni_row(const uint8_t* q, int64_t row_bytes, const S* scale, const S* offset, int64_t groups,
                     const XInt8& xq, vf* out) {
  static_assert(PLANES == 1 || BITS == 4, "24-bit x is for 4-bit weights");
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(15), bias = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t plane = BITS == 4 ? 128 : 64, chunk_bytes = 64;
  prefetch_ahead<1>(q, row_bytes, scale, offset, groups);
  for (int64_t c = 0; c < xq.chunks; ++c) {
    const int64_t left = row_bytes - c * chunk_bytes;
    const __mmask64 bytes = left >= 64 ? ~__mmask64(0) : ((__mmask64(1) << left) - 1);
    const __m512i idx = _mm512_loadu_si512(xq.idx.data() + c * 16);
    const __mmask16 gmask = static_cast<__mmask16>((1u << xq.n_groups[c]) - 1);
    const __m512i qv = _mm512_maskz_loadu_epi8(bytes, q + c * chunk_bytes);
    const __m512 s = _mm512_permutexvar_ps(idx, masked_s(gmask, scale + xq.base[c]));
    __m512i lo, hi, corr;
    if (BITS == 4) {
      lo = _mm512_and_si512(qv, low4);
      hi = _mm512_and_si512(_mm512_srli_epi16(qv, 4), low4);
    } else {
      corr = _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, qv);  // 128 * sum(w) per lane
    }
    for (int m = 0; m < M; ++m) {
      const int8_t* xp = xq.q.data() + (m * xq.chunks + c) * PLANES * plane;
      __m512i sums;
      if (BITS == 4) {
        sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xp));
        sums = _mm512_dpbusd_epi32(sums, hi, _mm512_loadu_si512(xp + 64));
        for (int p = 1; p < PLANES; ++p) {
          sums = _mm512_slli_epi32(sums, 8);
          sums = _mm512_dpbusd_epi32(sums, lo, _mm512_loadu_si512(xp + p * 128));
          sums = _mm512_dpbusd_epi32(sums, hi, _mm512_loadu_si512(xp + p * 128 + 64));
        }
      } else {
        sums = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xp), qv), corr);
      }
      const float* lane = xq.scale.data() + (m * xq.chunks + c) * 16;
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(s, _mm512_loadu_ps(lane)), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) out[m] = reinterpret_cast<vf>(acc[m]);
  add_offsets<M>(offset, xq.gsum.data(), groups, out);
}

// The int32 sums of a vector of low and one of high nibbles against x's digit planes x[0..5] (per plane
// its even then its odd columns, most significant plane first): shifted up 8 bits before each next plane
inline __m512i dpbusd(__m512i a, __m512i b, __m512i c) { return _mm512_dpbusd_epi32(a, b, c); }
inline __m256i dpbusd(__m256i a, __m256i b, __m256i c) { return _mm256_dpbusd_epi32(a, b, c); }
inline __m512i shift8(__m512i a) { return _mm512_slli_epi32(a, 8); }
inline __m256i shift8(__m256i a) { return _mm256_slli_epi32(a, 8); }
template <typename V>
inline V planes_dot(V lo, V hi, const V* x) {
  V sums = dpbusd(dpbusd(V{}, lo, x[0]), hi, x[1]);
  for (int p = 1; p < 3; ++p) sums = dpbusd(dpbusd(shift8(sums), lo, x[2 * p]), hi, x[2 * p + 1]);
  return sums;
}

// Groups of 32 (GGUF's Q4_0/Q4_1), x as 24-bit integers: vnni_row's arithmetic with each chunk's 4 weight scales
// as one 8-byte load spread over the lanes (no index loads), and a row's last half chunk (rows of 64
// multiples) in 256-bit vectors rather than masked 512-bit ones.
inline __m512 four_scales(const at::Half* s) {
  const __m256i pattern = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3,  //
                                           4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7);
  int64_t four;
  std::memcpy(&four, s, 8);
  return _mm512_cvtph_ps(_mm256_shuffle_epi8(_mm256_set1_epi64x(four), pattern));
}
inline __m512 four_scales(const float* s) {
  const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(s)));
}
// (q: the row's first chunk, `stride` bytes from one chunk to the next, `half`: its half chunk; a
// row-major row has stride 64 and its half chunk at q + 64 * full, a row of rows16 layout not)
template <int M, typename S>
inline void int24_row32(const uint8_t* q, int64_t stride, const uint8_t* half, int64_t k_dim, const S* scale,
                        const S* offset, const XInt8& xq, vf* out) {
  const int64_t row_bytes = k_dim / 2, groups = k_dim / 32, full = k_dim / 128;
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(15);
  if (stride == 64) prefetch_ahead<1>(q, row_bytes, scale, offset, groups);
  for (int64_t c = 0; c < full; ++c) {
    const __m512i w = _mm512_loadu_si512(q + c * stride);
    const __m512i lo = _mm512_and_si512(w, low4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
    const __m512 s = four_scales(scale + 4 * c);
    for (int m = 0; m < M; ++m) {
      __m512i x[6];
      for (int i = 0; i < 6; ++i) x[i] = _mm512_loadu_si512(xq.q.data() + (m * xq.chunks + c) * 384 + 64 * i);
      const __m512i sums = planes_dot(lo, hi, x);
      const float* lane = xq.scale.data() + (m * xq.chunks + c) * 16;
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(s, _mm512_loadu_ps(lane)), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) out[m] = reinterpret_cast<vf>(acc[m]);
  if (full * 128 < k_dim) {  // the half chunk: 64 columns, 8 lanes
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(half)), l4 = _mm256_set1_epi8(15);
    const __m256i lo = _mm256_and_si256(w, l4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), l4);
    const __m256 s = block_scales(scale, 32, 2 * full);  // the half chunk's 2 groups, 4 lanes each
    for (int m = 0; m < M; ++m) {
      const int8_t* xp = xq.q.data() + (m * xq.chunks + full) * 384;
      __m256i x[6];
      for (int i = 0; i < 6; ++i) x[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 64 * i));
      const __m256i sums = planes_dot(lo, hi, x);
      const float* lane = xq.scale.data() + (m * xq.chunks + full) * 16;
      const __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(s, _mm256_loadu_ps(lane)));
      out[m] += reinterpret_cast<vf>(_mm512_zextps256_ps512(part));
    }
  }
  add_offsets<M>(offset, xq.gsum.data(), groups, out);
}

// The rows16 layout of 4-bit weights (groups of 32, rows of 64-column multiples, whole blocks of 16
// rows): each block of 16 rows stores its rows' first 128-column chunks (64 bytes each), then their
// second ones, and so on, then their half chunks (32 bytes each). One token's GEMM (int24_block16)
// takes a block's chunk c for all 16 rows with x's planes for chunk c held in registers, and reads the
// weights in the order they lie in memory. Row-major, the 16 rows' chunk c lie 288 bytes apart (a
// 576-column row), and x's planes reloaded for every row: six loads of x for each 64 bytes of weights
// held the weights' stream from memory back to ~11 GB/s a thread (against ~23 for a plain read).
inline bool rows16_ok(int64_t bits, int64_t group, int64_t n_dim, int64_t k_dim) {
  return bits == 4 && group == 32 && k_dim % 64 == 0 && n_dim % 16 == 0 && n_dim > 0;
}
inline void pack_rows16(const uint8_t* q, int64_t n_dim, int64_t k_dim, uint8_t* out) {
  const int64_t row_bytes = k_dim / 2, full = k_dim / 128, block = 16 * row_bytes;
  for (int64_t b = 0; b < n_dim / 16; ++b)
    for (int64_t r = 0; r < 16; ++r) {
      const uint8_t* row = q + (b * 16 + r) * row_bytes;
      uint8_t* dst = out + b * block;
      for (int64_t c = 0; c < full; ++c) std::memcpy(dst + (c * 16 + r) * 64, row + c * 64, 64);
      if (full * 128 < k_dim) std::memcpy(dst + full * 16 * 64 + r * 32, row + full * 64, 32);
    }
}

// One token, one rows16 block: y^T of its 16 rows (x as 24-bit integers, int24_row32's arithmetic)
template <typename S>
inline void int24_block16(const uint8_t* q, int64_t k_dim, const S* scale, const S* offset, const XInt8& xq,
                          float* yt) {
  const int64_t groups = k_dim / 32, full = k_dim / 128;
  __m512 acc[16];
  for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(15);
  for (int64_t c = 0; c < full; ++c) {
    __m512i x[6];  // the chunk's x planes, held for the 16 rows
    for (int i = 0; i < 6; ++i) x[i] = _mm512_loadu_si512(xq.q.data() + c * 384 + 64 * i);
    const __m512 lane = _mm512_loadu_ps(xq.scale.data() + c * 16);
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      const __m512i w = _mm512_loadu_si512(q + (c * 16 + r) * 64);
      const __m512i lo = _mm512_and_si512(w, low4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
      const __m512i sums = planes_dot(lo, hi, x);
      const __m512 s = four_scales(scale + r * groups + 4 * c);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(s, lane), acc[r]);
    }
  }
  vf out[16];
  for (int r = 0; r < 16; ++r) out[reduce_slot(r)] = reinterpret_cast<vf>(acc[r]);
  if (full * 128 < k_dim) {  // the half chunks: 64 columns, 8 lanes
    __m256i x[6];
    for (int i = 0; i < 6; ++i)
      x[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.q.data() + full * 384 + 64 * i));
    const __m256 lane = _mm256_loadu_ps(xq.scale.data() + full * 16);
    const __m256i l4 = _mm256_set1_epi8(15);
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + full * 16 * 64 + r * 32));
      const __m256i lo = _mm256_and_si256(w, l4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), l4);
      const __m256i sums = planes_dot(lo, hi, x);
      const __m256 s = block_scales(scale + r * groups, 32, 2 * full);
      const __m256 part = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(s, lane));
      out[reduce_slot(r)] += reinterpret_cast<vf>(_mm512_zextps256_ps512(part));
    }
  }
  for (int r = 0; r < 16; ++r) add_offsets<1>(offset + r * groups, xq.gsum.data(), groups, &out[reduce_slot(r)]);
  vstore(yt, reduce_lanes(out));
}

// (rows16: q in the rows16 layout, x as 24-bit integers, n0 and n1 whole blocks)
template <int M, int BITS, typename S>
void int8_range(const uint8_t* q, int64_t row_bytes, const S* scales, const S* offsets, int64_t k_dim, int64_t group,
                const XInt8& xq, float* yt, int64_t n0, int64_t n1, bool rows16 = false) {
  const int64_t groups = k_dim / group;
  auto rows = [&](auto planes) {
    constexpr int PLANES = decltype(planes)::value;
    rows_summed<M>(n0, n1, yt, [=](int64_t n, vf* acc) {
      vnni_row<M, BITS, PLANES>(q + n * row_bytes, row_bytes, scales + n * groups, offsets + n * groups, groups, xq,
                                acc);
    });
  };
  if (rows16) {
    TORCH_CHECK(BITS == 4 && xq.planes == 3 && n0 % 16 == 0 && n1 % 16 == 0, "rows16: 24-bit x, whole blocks");
    const int64_t full = k_dim / 128;
    if constexpr (M == 1) {
      for (int64_t n = n0; n < n1; n += 16)
        int24_block16(q + n * row_bytes, k_dim, scales + n * groups, offsets + n * groups, xq, yt + n);
    } else {
      rows_summed<M>(n0, n1, yt, [=](int64_t n, vf* acc) {
        const uint8_t* block = q + (n & ~int64_t(15)) * row_bytes;
        const int64_t r = n & 15;
        int24_row32<M>(block + r * 64, 16 * 64, block + full * 16 * 64 + r * 32, k_dim, scales + n * groups,
                       offsets + n * groups, xq, acc);
      });
    }
  } else if (BITS == 4 && xq.planes == 3 && group == 32 && k_dim % 64 == 0) {
    const int64_t full = k_dim / 128;
    rows_summed<M>(n0, n1, yt, [=](int64_t n, vf* acc) {
      const uint8_t* row = q + n * row_bytes;
      int24_row32<M>(row, 64, row + full * 64, k_dim, scales + n * groups, offsets + n * groups, xq, acc);
    });
  } else if (BITS == 4 && xq.planes == 3) {
    rows(std::integral_constant<int, BITS == 4 ? 3 : 1>{});
  } else {
    rows(std::integral_constant<int, 1>{});
  }
}

template <int M, int BITS, typename S>
void int8_rows(const uint8_t* q, int64_t row_bytes, const S* scales, const S* offsets, int64_t n_dim,
               int64_t k_dim, int64_t group, const XInt8& xq, float* yt) {
  at::parallel_for(0, n_dim, 16, [&](int64_t begin, int64_t end) {
    int8_range<M, BITS>(q, row_bytes, scales, offsets, k_dim, group, xq, yt, begin, end);
  });
}
#elif defined(__AVX2__)
#define TANDEM_INT8_X 1
// Integer dot products on AVX2 (llama.cpp's scheme for CPUs without VNNI): x quantized per token and per
// 32 columns to int8 (|q| <= 127), then vpmaddubsw multiplies unsigned by signed bytes and adds
// neighbouring pairs into int16, and vpmaddwd by ones adds pairs of those into int32 lanes.
//   4 bits: a 32-byte load of a row is a 64-column block (byte B: columns 2B and 2B + 1), so x is stored
//     per block as its 32 even then its 32 odd columns; the low nibbles meet the even ones, the high
//     nibbles the odd ones, and the two int16 products add up (|sum| <= 4 * 15 * 127, no saturation).
//     Lane l of the int32 sums covers columns 8l .. 8l + 7: lanes 0-3 one group of 32, lanes 4-7 the next.
//   8 bits: weights are signed, so |w| meets x with w's sign (vpsignb): |sum| <= 2 * 128 * 127.
// Each lane's sum is scaled by its weight scale times x's scale; the offsets' term, offset x (sum of x
// over the group), is added once per row from x's float sums.
struct XInt8 {
  int64_t k_dim = 0, groups = 0;
  std::vector<int8_t> q;      // [M][K]: 8 bits in column order; 4 bits per 64-column block, even then odd
  std::vector<float> d;       // [M][K / 32]: x's scale per 32 columns
  std::vector<float> dlane;   // 4 bits: [M][K / 64][8], per lane of a block (d of its 32 columns)
  std::vector<float> gsum;    // [M][K / group]: x's float sum per weight group
};

inline bool int8_x_ok(int64_t bits, int64_t group, int64_t k_dim) {
  return group % 32 == 0 && k_dim % (bits == 4 ? 64 : 32) == 0;
}

// 32 floats -> int8 in column order (rounded to nearest), returning the scale (max |x| / 127) and the sum
inline __m256i quantize32(const float* x, float& d, float& sum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], amax = _mm256_setzero_ps(), total = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    total = _mm256_add_ps(total, v[i]);
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float m = _mm_cvtss_f32(h);
  d = m / 127.f;
  sum = hsum8(total);
  const __m256 inv = _mm256_set1_ps(m > 0.f ? 127.f / m : 0.f);
  __m256i n[4];
  for (int i = 0; i < 4; ++i) n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
  // packs interleave the 128-bit lanes: dwords come out as 0 2 4 6 1 3 5 7 (in groups of 4 bytes)
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
  return _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// x as 24-bit integers needs VNNI
inline int int24_planes(int64_t, int64_t, int64_t, int64_t) { return 0; }

// into `out`, whose buffers a caller may reuse from call to call (planes: 1 only)
inline void quantize_x(const float* x, int64_t m_dim, int64_t k_dim, int64_t group, int64_t bits, XInt8& out,
                       int planes = 1) {
  TORCH_CHECK(planes == 1, "quantize_x: x as 24-bit integers needs AVX-512 VNNI");
  const int64_t chunks = k_dim / 32, groups = k_dim / group, per_group = group / 32;
  out.k_dim = k_dim, out.groups = groups;
  out.q.resize(m_dim * k_dim);
  out.d.resize(m_dim * chunks);
  out.gsum.assign(m_dim * groups, 0.f);
  if (bits == 4) out.dlane.resize(m_dim * chunks * 4);
  // within each 128-bit lane: the 8 even bytes, then the 8 odd ones
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t m = 0; m < m_dim; ++m) {
    const float* xr = x + m * k_dim;
    int8_t* qr = out.q.data() + m * k_dim;
    float* d = out.d.data() + m * chunks;
    float* gsum = out.gsum.data() + m * groups;
    for (int64_t c = 0; c < chunks; c += bits == 4 ? 2 : 1) {
      float sum;
      const __m256i a = quantize32(xr + c * 32, d[c], sum);
      gsum[c / per_group] += sum;
      if (bits == 8) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + c * 32), a);
        continue;
      }
      const __m256i b = quantize32(xr + c * 32 + 32, d[c + 1], sum);
      gsum[(c + 1) / per_group] += sum;
      // the shuffle leaves a's 64-bit quarters as lane 0's evens, its odds, lane 1's evens, its odds;
      // 0xD8 orders them [16 evens | 16 odds], and the 128-bit halves of a and b make the block's two rows
      const __m256i ea = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(a, split), 0xD8);
      const __m256i eb = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b, split), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + c * 32), _mm256_permute2x128_si256(ea, eb, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + c * 32 + 32), _mm256_permute2x128_si256(ea, eb, 0x31));
      float* lane = out.dlane.data() + (m * chunks + c) * 4;
      for (int i = 0; i < 4; ++i) lane[i] = d[c], lane[4 + i] = d[c + 1];
    }
  }
}

template <int M, int R, int BITS, typename S>
inline void maddubs_tile(const uint8_t* q, int64_t row_bytes, const S* scale, const S* offset, int64_t groups,
                         int64_t k_dim, int64_t group, const XInt8& xq, float* yt) {
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  prefetch_ahead<R>(q, row_bytes, scale, offset, groups);
  if constexpr (BITS == 4) {
    const __m256i low4 = _mm256_set1_epi8(15);
    const int64_t blocks = k_dim / 64;
    for (int64_t b = 0; b < blocks; ++b) {
      for (int r = 0; r < R; ++r) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * row_bytes + b * 32));
        const __m256i lo = _mm256_and_si256(w, low4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
        const __m256 s = block_scales(scale + r * groups, group, b);
        for (int m = 0; m < M; ++m) {
          const int8_t* xp = xq.q.data() + m * k_dim + b * 64;
          const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));
          const __m256i odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 32));
          const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd));
          const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
          const __m256 sd = _mm256_mul_ps(s, _mm256_loadu_ps(xq.dlane.data() + (m * blocks + b) * 8));
          acc[r][m] = _mm256_fmadd_ps(dot, sd, acc[r][m]);
        }
      }
    }
  } else {
    const int64_t chunks = k_dim / 32, per_group = group / 32;
    for (int64_t c = 0; c < chunks; ++c) {
      for (int r = 0; r < R; ++r) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * row_bytes + c * 32));
        const __m256i aw = _mm256_abs_epi8(w);
        const float s = scalar(scale[r * groups + c / per_group]);
        for (int m = 0; m < M; ++m) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.q.data() + m * k_dim + c * 32));
          const __m256i pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w));
          const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
          acc[r][m] = _mm256_fmadd_ps(dot, _mm256_set1_ps(s * xq.d[m * chunks + c]), acc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      yt[r * M + m] = hsum8(acc[r][m]) + dot(offset + r * groups, xq.gsum.data() + m * groups, groups);
}

template <int M, int BITS, typename S>
void int8_range(const uint8_t* q, int64_t row_bytes, const S* scales, const S* offsets, int64_t k_dim, int64_t group,
                const XInt8& xq, float* yt, int64_t n0, int64_t n1, bool rows16 = false) {
  TORCH_CHECK(!rows16, "the rows16 layout needs AVX-512 VNNI");
  constexpr int R = quant_r<M>();
  const int64_t groups = k_dim / group;
  int64_t n = n0;
  for (; n + R <= n1; n += R)
    maddubs_tile<M, R, BITS>(q + n * row_bytes, row_bytes, scales + n * groups, offsets + n * groups, groups, k_dim,
                             group, xq, yt + n * M);
  for (; n < n1; ++n)
    maddubs_tile<M, 1, BITS>(q + n * row_bytes, row_bytes, scales + n * groups, offsets + n * groups, groups, k_dim,
                             group, xq, yt + n * M);
}

template <int M, int BITS, typename S>
void int8_rows(const uint8_t* q, int64_t row_bytes, const S* scales, const S* offsets, int64_t n_dim,
               int64_t k_dim, int64_t group, const XInt8& xq, float* yt) {
  constexpr int R = quant_r<M>();
  at::parallel_for(0, (n_dim + R - 1) / R, 16, [&](int64_t begin, int64_t end) {
    int8_range<M, BITS>(q, row_bytes, scales, offsets, k_dim, group, xq, yt, begin * R, std::min(n_dim, end * R));
  });
}
#endif

// Quantized rows as floats for outer_rows (batches and prefill): a block of rows converted once
// into the thread's buffer (L2-sized), then the float tiles run over it for every column chunk of x.
template <typename S>
struct QuantRows {
  const uint8_t* q;
  const S* scales;
  const S* offsets;
  int64_t k_dim, group, bits;
  static constexpr bool buffered = true;

  const float* rows(int64_t n0, int64_t n1, float* buf) const {
    const int64_t groups = k_dim / group, row_bytes = bits == 8 ? k_dim : k_dim / 2;
    for (int64_t n = n0; n < n1; ++n) {
      float* out = buf + (n - n0) * k_dim;
      const uint8_t* qr = q + n * row_bytes;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = scalar(scales[n * groups + g]), o = scalar(offsets[n * groups + g]);
        const int64_t k0 = g * group;
        if (bits == 8) {
          int64_t k = 0;
          for (; k + VW <= group; k += VW)
            vstore(out + k0 + k, int8_to_float(reinterpret_cast<const int8_t*>(qr) + k0 + k) * s + o);
          for (; k < group; ++k) out[k0 + k] = static_cast<int8_t>(qr[k0 + k]) * s + o;
        } else {  // groups are multiples of 32 columns (quant_linear checks)
          for (int64_t k = 0; k < group; k += 32) {
            __m128i first, second;
            nibbles_in_order(qr + (k0 + k) / 2, first, second);
            bytes_to_floats(first, s, o, out + k0 + k);
            bytes_to_floats(second, s, o, out + k0 + k + 16);
          }
        }
      }
    }
    return buf;
  }
};

// What the float tiles read of x: per token the sums of x over each group (the offsets' term; not
// needed by the table path) and, for 4 bits, x split into its even then its odd columns, so the low
// and high nibbles of a byte vector meet their x values without a shuffle (mask_row's rows: x
// permuted and scaled per block, mask_x). Plain loops into `buf`
// (x_floats of them): for 1-4 rows, ATen's slice/cat/sum calls cost more than the work.
struct XFloat {
  const float* xs;    // x (8 bits), [x_even | x_odd] or mask_x's blocks, per token ldx floats apart
  const float* gsum;  // [M, K / group]
  int64_t ldx;
};

inline int64_t x_floats(int64_t m_dim, int64_t k_dim, int64_t group, int64_t bits) {
  return m_dim * (k_dim / group + (bits == 4 ? mask_x_floats(k_dim) : 0));
}

inline XFloat prepare_x(const float* x, int64_t m_dim, int64_t k_dim, int64_t group, int64_t bits, float* buf) {
  const int64_t groups = k_dim / group;
  float* gsum = buf;
  if (!table_path(bits, group, k_dim, m_dim))
    for (int64_t m = 0; m < m_dim; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        float acc = 0.f;
        for (int64_t k = g * group; k < (g + 1) * group; ++k) acc += x[m * k_dim + k];
        gsum[m * groups + g] = acc;
      }
  if (bits == 8) return {x, gsum, k_dim};
  float* split = gsum + m_dim * groups;
  if (mask_path(bits, group, k_dim, m_dim)) {
    const int64_t ldx = mask_x_floats(k_dim);
    for (int64_t m = 0; m < m_dim; ++m) mask_x(x + m * k_dim, k_dim, split + m * ldx);
    return {split, gsum, ldx};
  }
  for (int64_t m = 0; m < m_dim; ++m)
    for (int64_t j = 0; j < k_dim / 2; ++j) {
      split[m * k_dim + j] = x[m * k_dim + 2 * j];
      split[m * k_dim + k_dim / 2 + j] = x[m * k_dim + 2 * j + 1];
    }
  return {split, gsum, k_dim};
}

// f(std::integral_constant<int, M>) for M = rows (1-4): the register tiles' row count as a constant.
template <typename F>
void for_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

template <typename S>
at::Tensor quant_linear_as(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& offsets, int64_t bits, int64_t group, bool int8_x) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "quant_linear: x must be float32 [M, K]");
  TORCH_CHECK(bits == 4 || bits == 8, "quant_linear: bits must be 4 or 8");
  const at::Tensor x = x_in.contiguous();
  const int64_t m_dim = x.size(0), k_dim = x.size(1), n_dim = qweight.size(0);
  TORCH_CHECK(m_dim >= 1, "quant_linear: at least one row");
  TORCH_CHECK(group % group_multiple(bits) == 0 && k_dim % group == 0, "quant_linear: group size");
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous() && offsets.is_contiguous(), "quant_linear: layout");
  if (m_dim > 4) {
    const QuantRows<S> src{reinterpret_cast<const uint8_t*>(qweight.data_ptr()), scales.data_ptr<S>(),
                           offsets.data_ptr<S>(), k_dim, group, bits};
    if (m_dim > 64) return outer_y(x, src, n_dim);
    return outer_t(x, src, n_dim).narrow(1, 0, m_dim).t();
  }
  at::Tensor yt = at::empty({n_dim, m_dim}, x.options());
  const auto* q = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const int64_t row_bytes = bits == 8 ? k_dim : k_dim / 2;
  const S *s = scales.data_ptr<S>(), *o = offsets.data_ptr<S>();
  float* y = yt.data_ptr<float>();
#ifdef TANDEM_INT8_X
  const int planes = int8_x && int8_x_ok(bits, group, k_dim) ? 1 : int24_planes(bits, group, k_dim, m_dim);
  if (planes) {
    thread_local XInt8 xq;
    quantize_x(x.data_ptr<float>(), m_dim, k_dim, group, bits, xq, planes);
    for_rows(m_dim, [&](auto rows) {
      constexpr int M = decltype(rows)::value;
      if (bits == 8) int8_rows<M, 8>(q, row_bytes, s, o, n_dim, k_dim, group, xq, y);
      else int8_rows<M, 4>(q, row_bytes, s, o, n_dim, k_dim, group, xq, y);
    });
    return yt.t();
  }
#endif
  thread_local std::vector<float> scratch;
  scratch.resize(x_floats(m_dim, k_dim, group, bits));
  const XFloat xf = prepare_x(x.data_ptr<float>(), m_dim, k_dim, group, bits, scratch.data());
  for_rows(m_dim, [&](auto rows) {
    constexpr int M = decltype(rows)::value;
    if (bits == 8) quant_rows<M, 8>(q, row_bytes, s, o, n_dim, k_dim, group, xf.xs, xf.ldx, xf.gsum, y);
    else quant_rows<M, 4>(q, row_bytes, s, o, n_dim, k_dim, group, xf.xs, xf.ldx, xf.gsum, y);
  });
  return yt.t();
}

// x [M, K] float32, any M; returns y [M, N] (a transposed view up to 64 rows, row-major beyond).
// Scales and offsets: float32 or float16, both the same. int8_x: for 1-4 rows, quantize x to int8 and
// use integer dot products (AVX-512 VNNI, or AVX2's vpmaddubsw); otherwise x stays float.
inline at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                               const at::Tensor& offsets, int64_t bits, int64_t group, bool int8_x = false) {
  const auto kind = scales.scalar_type();
  TORCH_CHECK(offsets.scalar_type() == kind && (kind == at::kFloat || kind == at::kHalf),
              "quant_linear: scales and offsets must both be float32 or both float16");
  if (kind == at::kHalf) return quant_linear_as<at::Half>(x, qweight, scales, offsets, bits, group, int8_x);
  return quant_linear_as<float>(x, qweight, scales, offsets, bits, group, int8_x);
}

}  // namespace tandem
