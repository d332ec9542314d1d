// Skinny GEMM for decode steps: y = x @ W^T with few rows in x (1 to 64 tokens) and a large,
// row-major weight W [N, K] that lives in DRAM and is read once per call.
//
// MKL packs W into its own layout before computing, an extra pass over the largest operand; with a
// handful of tokens that pass and the DRAM stream it waits on cost as much as the arithmetic. Here W
// is read once, straight from its rows, by register-tiled micro-kernels built with GCC vector types
// (the compiler emits AVX-512 or AVX2 for the machine it is built on):
//
//   dot kernel (M <= 8):   R rows of W at a time, the vector running along K, M*R accumulators
//                          reduced at the end — a GEMV for one token, a few GEMVs sharing W for 2-8
//                          (no padding of M: a speculative step's 2-9 rows cost little more than one);
//   tile kernel (M > 8):   x^T padded to [K, Mp] (Mp a multiple of the vector width) stays in cache;
//                          for each k, R broadcast weights times Mp/VW vectors of x^T, R*Mp/VW
//                          accumulators — the outer-product form, no horizontal sums.
//
// Output is written as y^T [N, M] (rows of W are the outer loop), which is what the next kernels and
// GEMMs of the decode stack read; callers take the [M, N] transposed view.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#include <immintrin.h>

namespace tandem {

#if defined(__AVX512F__)
constexpr int VW = 16;
#else
constexpr int VW = 8;
#endif
typedef float vf __attribute__((vector_size(VW * 4), aligned(4), __may_alias__));

inline vf vload(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void vstore(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
inline vf vsplat(float a) { return vf{} + a; }
// the sum of a vector's lanes by halving shuffles (a lane-by-lane loop is a chain of VW scalar adds:
// ~15 % of a one-token GEMM row of 576)
inline float hsum8(__m256 a) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
}
inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  return hsum8(reinterpret_cast<__m256>(v));
#endif
}

// lane i of the result = the sum of v[i]'s lanes, for VW vectors at once: log2(VW) levels of shuffles
// and adds that halve the vectors each time, instead of VW separate reductions (decode attention's dot
// product of a 64-float head is 4 FMAs, and its own reduction cost more than they did; a row of a
// 576-column quantized GEMM lost a fifth of its time to its own). AVX-512's levels leave the sums
// in the lane order 4c + L <- vector 4L + c, so callers put vector i in slot reduce_slot(i).
inline int reduce_slot(int i) { return VW == 16 ? (i % 4) * 4 + i / 4 : i; }
#if defined(__AVX512F__)
inline vf reduce_lanes(const vf* v) {
  __m512 u[8], w[4], x[2];
  for (int k = 0; k < 8; ++k) {  // 128-bit halves of each pair: [a0+a2, a1+a3, b0+b2, b1+b3]
    const __m512 a = reinterpret_cast<__m512>(v[2 * k]), b = reinterpret_cast<__m512>(v[2 * k + 1]);
    u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int k = 0; k < 4; ++k)  // one 128-bit lane per vector
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * k], u[2 * k + 1], 0xDD));
  for (int k = 0; k < 2; ++k)  // two floats per vector
    x[k] = _mm512_add_ps(_mm512_unpacklo_ps(w[2 * k], w[2 * k + 1]), _mm512_unpackhi_ps(w[2 * k], w[2 * k + 1]));
  return reinterpret_cast<vf>(
      _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], 0x44), _mm512_shuffle_ps(x[0], x[1], 0xEE)));
}
#else
inline vf reduce_lanes(const vf* v) {
  __m256 x[4], y[2];
  for (int k = 0; k < 4; ++k) {
    const __m256 a = reinterpret_cast<__m256>(v[2 * k]), b = reinterpret_cast<__m256>(v[2 * k + 1]);
    x[k] = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  }
  for (int k = 0; k < 2; ++k)
    y[k] = _mm256_add_ps(_mm256_shuffle_ps(x[2 * k], x[2 * k + 1], 0x44),
                         _mm256_shuffle_ps(x[2 * k], x[2 * k + 1], 0xEE));
  return reinterpret_cast<vf>(
      _mm256_add_ps(_mm256_permute2f128_ps(y[0], y[1], 0x20), _mm256_permute2f128_ps(y[0], y[1], 0x31)));
}
#endif

// y^T[n0:n0+R, 0:M] for M <= 4 tokens: x [M, K] contiguous rows.
template <int M, int R>
inline void dot_tile(const float* w, int64_t k_dim, const float* x, float* yt, int64_t ld_y) {
  vf acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = vf{};
  int64_t k = 0;
  for (; k + VW <= k_dim; k += VW) {
    vf xv[M];
    for (int m = 0; m < M; ++m) xv[m] = vload(x + m * k_dim + k);
    for (int r = 0; r < R; ++r) {
      const vf wv = vload(w + r * k_dim + k);
      for (int m = 0; m < M; ++m) acc[r][m] += wv * xv[m];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float s = hsum(acc[r][m]);
      for (int64_t kk = k; kk < k_dim; ++kk) s += w[r * k_dim + kk] * x[m * k_dim + kk];
      yt[r * ld_y + m] = s;
    }
}

// y^T[n0:n0+R, 0:NV*VW] from a packed x^T chunk [K, NV*VW] and R rows of w (ld_w apart, default K);
// writes y^T rows (ld_y apart) or, with rows_out, y rows (y[m, n0 + r] at y + m * ld_y + r, for the
// first `valid` columns).
template <int NV, int R>
inline void outer_tile(const float* w, int64_t k_dim, const float* xt, float* y, int64_t ld_y, bool rows_out,
                       int64_t valid, int64_t ld_w = -1) {
  if (ld_w < 0) ld_w = k_dim;
  constexpr int cols = NV * VW;
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
  for (int64_t k = 0; k < k_dim; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(xt + k * cols + v * VW);
    for (int r = 0; r < R; ++r) {
      const vf a = vsplat(w[r * ld_w + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  if (!rows_out) {
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) vstore(y + r * ld_y + v * VW, acc[r][v]);
    return;
  }
  for (int v = 0; v < NV; ++v)
    for (int i = 0; i < VW && v * VW + i < valid; ++i)
      for (int r = 0; r < R; ++r) y[(v * VW + i) * ld_y + r] = acc[r][v][i];
}

// Rows of W per dot tile for M tokens: one, the x vectors streamed from L1. Each thread then reads
// its share of W as one sequential stream; tiles of several rows read them side by side, and on a
// Zen 4 VM that held the fp32 decode GEMMs to ~20 GB/s against ~29 for one stream (and one-request
// decode to 37 against ~50 tok/s). The tiles keep R for CPUs whose prefetchers follow several streams.
constexpr int DOT_MAX_ROWS = 8;
template <int>
constexpr int dot_r() {
  return 1;
}

// y^T rows [n0, n1) for M tokens: tiles of dot_r<M>() rows from n0, single rows for the rest. One
// thread's share of a GEMM (dot_rows splits a GEMM into these; decode_step.h's team calls them).
template <int M>
void dot_range(const float* w, int64_t k_dim, const float* x, float* yt, int64_t n0, int64_t n1) {
  constexpr int R = dot_r<M>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) dot_tile<M, R>(w + n * k_dim, k_dim, x, yt + n * M, M);
  for (; n < n1; ++n) dot_tile<M, 1>(w + n * k_dim, k_dim, x, yt + n * M, M);
}

template <int M>
void dot_rows(const float* w, int64_t n_dim, int64_t k_dim, const float* x, float* yt) {
  constexpr int R = dot_r<M>();
  at::parallel_for(0, (n_dim + R - 1) / R, 16, [&](int64_t begin, int64_t end) {
    dot_range<M>(w, k_dim, x, yt, begin * R, std::min(n_dim, end * R));
  });
}

// Tiles of R weight rows; rows are grouped in blocks that stay in L2 while every column chunk of
// the packed x^T ([chunks][K][NV*VW]) passes over them.
// Where outer_rows finds weight rows as floats: a float W in place (no copy); a quantized W
// (quant_gemm.h) converts a block of rows into the caller's per-thread buffer first.
struct FloatRows {
  const float* w;
  int64_t k_dim;
  const float* rows(int64_t n0, int64_t /*n1*/, float* /*buf*/) const { return w + n0 * k_dim; }
  static constexpr bool buffered = false;
};

template <int NV, typename Rows>
void outer_rows(const Rows& src, int64_t n_dim, int64_t k_dim, const float* xpack, int64_t m, float* y,
                int64_t ld_y, bool rows_out) {
  // registers: R*NV accumulators + NV loads; 32 vector registers with AVX-512, 16 with AVX2
  constexpr int budget = VW == 16 ? 24 : 12;
  constexpr int R = std::min(8, std::max(1, budget / NV - 1));
  constexpr int cols = NV * VW;
  const int64_t chunks = (m + cols - 1) / cols;
  // blocks of ~128 KB of W, as many as a multiple of the threads so that none idles at the end
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t target = std::max<int64_t>(R, 128 * 1024 / (k_dim * 4));
  const int64_t rounds = std::max<int64_t>(1, (n_dim + target * threads - 1) / (target * threads));
  const int64_t per = (n_dim + rounds * threads - 1) / (rounds * threads);
  const int64_t block = std::max<int64_t>(R, (per + R - 1) / R * R);
  const int64_t n_blocks = (n_dim + block - 1) / block;
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(Rows::buffered ? block * k_dim : 0);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * block, n1 = std::min(n_dim, n0 + block);
      const float* w = src.rows(n0, n1, buf.data()) - n0 * k_dim;  // row n at w + n * k_dim
      for (int64_t c = 0; c < chunks; ++c) {
        const float* xt = xpack + c * k_dim * cols;
        const int64_t valid = std::min<int64_t>(cols, m - c * cols);
        int64_t n = n0;
        for (; n + R <= n1; n += R) {
          float* out = rows_out ? y + c * cols * ld_y + n : y + n * ld_y + c * cols;
          outer_tile<NV, R>(w + n * k_dim, k_dim, xt, out, ld_y, rows_out, valid);
        }
        for (; n < n1; ++n) {
          float* out = rows_out ? y + c * cols * ld_y + n : y + n * ld_y + c * cols;
          outer_tile<NV, 1>(w + n * k_dim, k_dim, xt, out, ld_y, rows_out, valid);
        }
      }
    }
  });
}

// x [M, K] (any strides) -> x^T in chunks of `cols` columns, [chunks][K][cols], zero-padded.
inline void pack_columns(const at::Tensor& x, int64_t cols, float* out) {
  const int64_t m = x.size(0), k_dim = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  const int64_t chunks = (m + cols - 1) / cols;
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      float* dst = out + c * k_dim * cols;
      const int64_t valid = std::min<int64_t>(cols, m - c * cols);
      if (valid < cols) std::fill(dst, dst + k_dim * cols, 0.f);
      for (int64_t k0 = 0; k0 < k_dim; k0 += 64) {  // 64 x cols tiles: both sides stay in L1
        const int64_t k1 = std::min(k_dim, k0 + 64);
        for (int64_t i = 0; i < valid; ++i) {
          const float* src = xp + (c * cols + i) * s0;
          for (int64_t k = k0; k < k1; ++k) dst[k * cols + i] = src[k * s1];
        }
      }
    }
  });
}

// y^T as a [N, cols] tensor (the first M columns hold it) of x [M, K] (5 to 64 rows) against the
// rows `src` gives: x^T packed in one chunk of cols = M rounded up to the vector width.
template <typename Rows>
inline at::Tensor outer_t(const at::Tensor& x, const Rows& src, int64_t n_dim) {
  const int64_t m = x.size(0), k_dim = x.size(1);
  const int64_t nv = (m + VW - 1) / VW, cols = nv * VW;
  auto xt = at::empty({k_dim, cols}, x.options());
  pack_columns(x, cols, xt.data_ptr<float>());
  auto yt = at::empty({n_dim, cols}, x.options());
  const float* xp = xt.data_ptr<float>();
  float* yp = yt.data_ptr<float>();
  switch (nv) {
    case 1: outer_rows<1>(src, n_dim, k_dim, xp, m, yp, cols, false); break;
    case 2: outer_rows<2>(src, n_dim, k_dim, xp, m, yp, cols, false); break;
    case 3: outer_rows<3>(src, n_dim, k_dim, xp, m, yp, cols, false); break;
    case 4: outer_rows<4>(src, n_dim, k_dim, xp, m, yp, cols, false); break;
    case 5: outer_rows<5>(src, n_dim, k_dim, xp, m, yp, cols, false); break;
    case 6: outer_rows<6>(src, n_dim, k_dim, xp, m, yp, cols, false); break;
    case 7: outer_rows<7>(src, n_dim, k_dim, xp, m, yp, cols, false); break;
    default: outer_rows<8>(src, n_dim, k_dim, xp, m, yp, cols, false); break;
  }
  return yt;
}

// y [M, N] row-major of x [M, K] (any M) against the rows `src` gives: x^T packed in chunks of 32
// columns, each chunk passing over L2-sized blocks of W.
template <typename Rows>
inline at::Tensor outer_y(const at::Tensor& x, const Rows& src, int64_t n_dim) {
  const int64_t m = x.size(0), k_dim = x.size(1);
  constexpr int NV = 32 / VW, cols = 32;
  const int64_t chunks = (m + cols - 1) / cols;
  auto pack = at::empty({chunks, k_dim, cols}, x.options());
  pack_columns(x, cols, pack.data_ptr<float>());
  auto y = at::empty({m, n_dim}, x.options());
  outer_rows<NV>(src, n_dim, k_dim, pack.data_ptr<float>(), m, y.data_ptr<float>(), n_dim, true);
  return y;
}

// x [M, K] (any strides), w [N, K] contiguous float32 -> y^T as a [N, ld] tensor (ld >= M; the
// first M columns hold y^T). M must be in [1, 64].
inline at::Tensor skinny_gemm_t(const at::Tensor& x, const at::Tensor& w) {
  const int64_t m = x.size(0), k_dim = x.size(1), n_dim = w.size(0);
  TORCH_CHECK(w.is_contiguous() && w.size(1) == k_dim, "skinny_gemm: weight must be contiguous [N, K]");
  TORCH_CHECK(m >= 1 && m <= 64, "skinny_gemm: 1 to 64 rows");
  const float* wp = w.data_ptr<float>();
  if (m <= DOT_MAX_ROWS) {
    auto xc = x.contiguous();
    auto yt = at::empty({n_dim, m}, w.options());
    const float* xp = xc.data_ptr<float>();
    float* yp = yt.data_ptr<float>();
    switch (m) {
      case 1: dot_rows<1>(wp, n_dim, k_dim, xp, yp); break;
      case 2: dot_rows<2>(wp, n_dim, k_dim, xp, yp); break;
      case 3: dot_rows<3>(wp, n_dim, k_dim, xp, yp); break;
      case 4: dot_rows<4>(wp, n_dim, k_dim, xp, yp); break;
      case 5: dot_rows<5>(wp, n_dim, k_dim, xp, yp); break;
      case 6: dot_rows<6>(wp, n_dim, k_dim, xp, yp); break;
      case 7: dot_rows<7>(wp, n_dim, k_dim, xp, yp); break;
      default: dot_rows<8>(wp, n_dim, k_dim, xp, yp); break;
    }
    return yt;
  }
  return outer_t(x, FloatRows{wp, k_dim}, n_dim);
}

// x [M, K] (any strides) @ w [N, K]^T -> y [M, N] row-major, for any M: x^T packed in chunks of
// 32 columns, each chunk passing over L2-sized blocks of W.
inline at::Tensor gemm_rows(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.is_contiguous() && w.size(1) == x.size(1), "gemm: weight must be contiguous [N, K]");
  return outer_y(x, FloatRows{w.data_ptr<float>(), x.size(1)}, w.size(0));
}

}  // namespace tandem
