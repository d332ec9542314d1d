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
// sum of x is computed once per call. For 4 bits, x is split into its even and odd columns once per
// call, so the low and high nibbles of a byte vector meet their x values without any shuffle.
// Rows of W are split across threads; M (the tokens) goes up to 4 per pass. Beyond 4 rows (batches,
// prefill), blocks of rows are converted once into an L2-sized float buffer and skinny_gemm.h's
// outer-product tiles run over it for every row of x: W leaves DRAM as integers either way.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <cstdint>

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

// y^T[n0:n0+R, 0:M] for R weight rows (R rows at once: independent accumulator chains, shared x loads).
// xs: x (8 bits) or [x_even | x_odd] per token (4 bits), each token `ldx` floats apart; gsum [M, G]:
// each token's sum of x per group.
template <int M, int R, int BITS>
inline void quant_tile(const uint8_t* q, int64_t row_bytes, const float* scale, const float* offset, int64_t k_dim,
                       int64_t group, const float* xs, int64_t ldx, const float* gsum, int64_t groups, float* yt) {
  vf acc[R][M];
  float off[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = vf{}, off[r][m] = 0.f;
  const int64_t half = k_dim / 2;
  for (int64_t g = 0; g < groups; ++g) {
    vf part[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) part[r][m] = vf{};
    if (BITS == 8) {
      for (int64_t k = 0; k < group; k += VW) {
        vf xv[M];
        for (int m = 0; m < M; ++m) xv[m] = vload(xs + m * ldx + g * group + k);
        for (int r = 0; r < R; ++r) {
          const vf w = int8_to_float(reinterpret_cast<const int8_t*>(q + r * row_bytes) + g * group + k);
          for (int m = 0; m < M; ++m) part[r][m] += w * xv[m];
        }
      }
    } else {
      for (int64_t k = 0; k < group / 2; k += VW) {
        const int64_t at = g * group / 2 + k;
        vf xe[M], xo[M];
        for (int m = 0; m < M; ++m) xe[m] = vload(xs + m * ldx + at), xo[m] = vload(xs + m * ldx + half + at);
        for (int r = 0; r < R; ++r) {
          vf lo, hi;
          nibbles_to_float(q + r * row_bytes + at, lo, hi);
          for (int m = 0; m < M; ++m) part[r][m] += lo * xe[m] + hi * xo[m];
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const vf s = vsplat(scale[r * groups + g]);
      const float o = offset[r * groups + g];
      for (int m = 0; m < M; ++m) {
        acc[r][m] += s * part[r][m];
        off[r][m] += o * gsum[m * groups + g];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) yt[r * M + m] = hsum(acc[r][m]) + off[r][m];
}

template <int M, int BITS>
void quant_rows(const uint8_t* q, int64_t row_bytes, const float* scales, const float* offsets, int64_t n_dim,
                int64_t k_dim, int64_t group, const float* xs, int64_t ldx, const float* gsum, float* yt) {
  constexpr int R = M <= 2 ? 4 : 2;
  const int64_t groups = k_dim / group, tiles = n_dim / R;
  at::parallel_for(0, tiles + 1, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (t < tiles) {
        const int64_t n = t * R;
        quant_tile<M, R, BITS>(q + n * row_bytes, row_bytes, scales + n * groups, offsets + n * groups, k_dim, group,
                               xs, ldx, gsum, groups, yt + n * M);
      } else {
        for (int64_t n = tiles * R; n < n_dim; ++n)
          quant_tile<M, 1, BITS>(q + n * row_bytes, row_bytes, scales + n * groups, offsets + n * groups, k_dim, group,
                                 xs, ldx, gsum, groups, yt + n * M);
      }
    }
  });
}

// Quantized rows as floats for outer_rows (batches and prefill): a block of rows converted once
// into the thread's buffer (L2-sized), then the float tiles run over it for every column chunk of x.
struct QuantRows {
  const uint8_t* q;
  const float* scales;
  const float* offsets;
  int64_t k_dim, group, bits;
  static constexpr bool buffered = true;

  const float* rows(int64_t n0, int64_t n1, float* buf) const {
    const int64_t groups = k_dim / group, row_bytes = bits == 8 ? k_dim : k_dim / 2;
    for (int64_t n = n0; n < n1; ++n) {
      float* out = buf + (n - n0) * k_dim;
      const uint8_t* qr = q + n * row_bytes;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = scales[n * groups + g], o = offsets[n * groups + g];
        const int64_t k0 = g * group;
        if (bits == 8) {
          int64_t k = 0;
          for (; k + VW <= group; k += VW)
            vstore(out + k0 + k, int8_to_float(reinterpret_cast<const int8_t*>(qr) + k0 + k) * s + o);
          for (; k < group; ++k) out[k0 + k] = static_cast<int8_t>(qr[k0 + k]) * s + o;
        } else {
          for (int64_t k = 0; k < group; k += 2) {
            const uint8_t b = qr[(k0 + k) / 2];
            out[k0 + k] = (b & 15) * s + o;
            out[k0 + k + 1] = (b >> 4) * s + o;
          }
        }
      }
    }
    return buf;
  }
};

// x [M, K] float32, any M; returns y [M, N] (a transposed view up to 64 rows, row-major beyond).
inline at::Tensor quant_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                               const at::Tensor& offsets, int64_t bits, int64_t group) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "quant_linear: x must be float32 [M, K]");
  TORCH_CHECK(bits == 4 || bits == 8, "quant_linear: bits must be 4 or 8");
  const at::Tensor x = x_in.contiguous();
  const int64_t m_dim = x.size(0), k_dim = x.size(1), n_dim = qweight.size(0);
  TORCH_CHECK(m_dim >= 1, "quant_linear: at least one row");
  TORCH_CHECK(group % (bits == 4 ? 2 * VW : VW) == 0 && k_dim % group == 0, "quant_linear: group size");
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous() && offsets.is_contiguous(), "quant_linear: layout");
  if (m_dim > 4) {
    const QuantRows src{reinterpret_cast<const uint8_t*>(qweight.data_ptr()), scales.data_ptr<float>(),
                        offsets.data_ptr<float>(), k_dim, group, bits};
    if (m_dim > 64) return outer_y(x, src, n_dim);
    return outer_t(x, src, n_dim).narrow(1, 0, m_dim).t();
  }
  const int64_t groups = k_dim / group;
  // per token: the sums of x over each group, and (4 bits) x split into even and odd columns
  at::Tensor gsum = x.view({m_dim, groups, group}).sum(-1).contiguous();
  at::Tensor xs = bits == 8 ? x : at::cat({x.slice(1, 0, k_dim, 2), x.slice(1, 1, k_dim, 2)}, 1).contiguous();
  at::Tensor yt = at::empty({n_dim, m_dim}, x.options());
  const auto* q = reinterpret_cast<const uint8_t*>(qweight.data_ptr());
  const int64_t row_bytes = bits == 8 ? k_dim : k_dim / 2;
  const float *s = scales.data_ptr<float>(), *o = offsets.data_ptr<float>();
  const float *xp = xs.data_ptr<float>(), *gp = gsum.data_ptr<float>();
  float* y = yt.data_ptr<float>();
#define TANDEM_QUANT(M)                                                                              \
  if (bits == 8) quant_rows<M, 8>(q, row_bytes, s, o, n_dim, k_dim, group, xp, k_dim, gp, y);      \
  else quant_rows<M, 4>(q, row_bytes, s, o, n_dim, k_dim, group, xp, k_dim, gp, y);
  switch (m_dim) {
    case 1: TANDEM_QUANT(1) break;
    case 2: TANDEM_QUANT(2) break;
    case 3: TANDEM_QUANT(3) break;
    default: TANDEM_QUANT(4) break;
  }
#undef TANDEM_QUANT
  return yt.t();
}

}  // namespace tandem
