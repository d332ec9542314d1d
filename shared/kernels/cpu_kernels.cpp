// Tandem's CPU kernels for the engine's steps, registered as torch ops in the `tandem` namespace.
//
// The PyTorch forward of a step on CPU pays, besides the matmuls, for the paged-KV gather that copies
// every decode's keys and values into a padded batch before SDPA, ~50 small ops per layer that each
// cost a few microseconds of dispatch or a memory pass, and MKL's packing of the weights on every
// call. These kernels remove all three:
//
//   skinny_linear / gemm_rows   x @ W^T by register-tiled micro-kernels that read W once, in place
//   quant_linear                x @ W^T with W as 8- or 4-bit integers (quant_gemm.h)
//                               (skinny_gemm.h): 1-64 rows give y^T, more give row-major y;
//   paged_decode_attention      one query token per sequence attending straight over its cache
//                               blocks (no gather, no padding, no mask), the GQA heads of a KV head
//                               sharing each key/value row read;
//   paged_prefill_attention     causal attention of a prefill chunk over its blocks, blocks of 32
//                               queries against only the key blocks they can see;
//   rope_and_cache              RoPE on the q and k heads of a fused qkv row, in place, and the
//                               token's k and v written to its cache slot;
//   add_rms_norm, silu_and_mul  the elementwise steps in one pass each;
//   argmax_rows                 greedy tokens from the LM head's transposed output;
//   make_stack / free_stack     a dense decoder stack's weights and KV caches handed over once, as a
//                               handle for forward_layers;
//   forward_layers              the whole stack for a step of decodes and prefill chunks: embedding,
//                               then per layer RMSNorm, qkv GEMM, rope_and_cache, attention, o GEMM,
//                               residual + RMSNorm, gate/up GEMM, SiLU * up, down GEMM, residual —
//                               one call for every layer; a step of 1-4 decodes runs on one team of
//                               threads for the whole stack (decode_step.h).
//
// Everything is float32 (KV caches float32 or float16: rows convert as they load, round to nearest as
// they are written), CPU, with the cache layout of shared/engine/paged_attention.py:
// [num_blocks, K, B, D]. Parallel loops use at::parallel_for, so they follow torch.set_num_threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "decode_step.h"
#include "quant_gemm.h"
#include "skinny_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

using at::Tensor;

using tandem::fast_exp;

void check_cache(const Tensor& k_cache, const Tensor& v_cache) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "KV caches must be contiguous [num_blocks, K, B, D]");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "K and V caches differ in shape");
  TORCH_CHECK((k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kHalf) &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "the CPU kernels take float32 or float16 caches (both the same)");
  TORCH_CHECK(k_cache.device().is_cpu(), "the CPU kernels take CPU tensors");
}

// paged_decode_attention over caches of T into out [N, H, D]
template <typename T>
void decode_attention(const Tensor& q, const T* kp, const T* vp, int64_t n_kv, int64_t bs, const int64_t* tp,
                      const int64_t* lp, int64_t max_blocks, double scale, int64_t window, Tensor& out) {
  const int64_t n_seq = q.size(0), n_heads = q.size(1), dim = q.size(2), group = n_heads / n_kv;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const float sc = static_cast<float>(scale);
  const int64_t row = bs * dim, blk = n_kv * row;  // a (block, head) row; a block

  at::parallel_for(0, n_seq * n_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, part(group * (dim + 2));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / n_kv, g = item % n_kv;
      const int64_t L = lp[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, L - window) : 0;
      const tandem::PagedHead<T> head{kp + g * row, vp + g * row, tp + s * max_blocks, bs, dim, blk};
      tandem::attend_keys(qp + s * qs0 + g * group * qs1, qs1, group, head, dim, first, L, sc, scores, part.data());
      for (int64_t j = 0; j < group; ++j) {
        const float* pj = part.data() + j * (dim + 2);
        float* o = op + (s * n_heads + g * group + j) * dim;
        const float inv = 1.f / pj[1];
        for (int64_t d = 0; d < dim; ++d) o[d] = pj[2 + d] * inv;
      }
    }
  });
}

// q: [N, H, D] (any strides for N and H, unit stride for D); tables: [N, M] int64 block ids;
// lens: [N] int64 keys per sequence (the query is the last of them). Returns [N, H, D].
Tensor paged_decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                              const Tensor& tables, const Tensor& lens, double scale, int64_t window) {
  check_cache(k_cache, v_cache);
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.scalar_type() == at::kFloat, "q must be float32 [N, H, D]");
  const int64_t n_seq = q.size(0), n_heads = q.size(1), dim = q.size(2);
  const int64_t n_kv = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim, "head dim of q and cache differ");
  TORCH_CHECK(n_heads % n_kv == 0, "query heads must be a multiple of KV heads");
  auto tab = tables.to(at::kLong).contiguous();
  auto len = lens.to(at::kLong).contiguous();
  TORCH_CHECK(tab.dim() == 2 && tab.size(0) == n_seq && len.numel() == n_seq, "tables/lens do not match q");
  const int64_t max_blocks = tab.size(1);
  const int64_t* tp = tab.data_ptr<int64_t>();
  const int64_t* lp = len.data_ptr<int64_t>();
  for (int64_t i = 0; i < n_seq; ++i)
    TORCH_CHECK(lp[i] > 0 && lp[i] <= max_blocks * bs, "sequence length out of range of its block table");
  auto out = at::empty({n_seq, n_heads, dim}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (k_cache.scalar_type() == at::kHalf)
    decode_attention(q, k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), n_kv, bs, tp, lp, max_blocks, scale,
                     window, out);
  else
    decode_attention(q, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), n_kv, bs, tp, lp, max_blocks, scale,
                     window, out);
  return out;
}

// Causal attention of a prefill chunk: queries q [Q, H, D] (any row and head strides, unit stride
// along D) are the last Q of the S positions whose keys and values `keys` gives; window > 0
// limits each query to its last `window` keys. Writes out rows (ld_out floats apart) [Q, H, D].
//
// Blocks of 32 queries of one head: S^T = K Q^T for the keys up to the block's last query (the skinny
// GEMM's outer-product tile over runs of key rows read in place), the causal mask and softmax down
// each column (a query), then O^T = V^T P^T with V^T packed once per KV head. Score blocks stay in
// L2; only the key blocks a query block can see are computed.
struct PagedKeys {  // caches [blocks, K, B, D] and one sequence's block table
  const float *k, *v;
  const int64_t* table;
  int64_t n_kv, bs, dim;
  int64_t offset(int64_t g, int64_t p) const { return ((table[p / bs] * n_kv + g) * bs + p % bs) * dim; }
  const float* key(int64_t g, int64_t p) const { return k + offset(g, p); }
  const float* value(int64_t g, int64_t p) const { return v + offset(g, p); }
  int64_t stride() const { return dim; }
  int64_t run(int64_t p, int64_t hi) const { return std::min(hi - p, bs - p % bs); }
};

// A sequence's first n_s keys and values as floats [K][S][D]: a float16 cache's rows converted once
// per prefill chunk and layer (the tiles read key rows in place; the conversion is O(S D), the
// attention O(S D Q)).
struct FloatKeys {
  const float *k, *v;
  int64_t n_s, dim;
  const float* key(int64_t g, int64_t p) const { return k + (g * n_s + p) * dim; }
  const float* value(int64_t g, int64_t p) const { return v + (g * n_s + p) * dim; }
  int64_t stride() const { return dim; }
  int64_t run(int64_t p, int64_t hi) const { return hi - p; }
};

FloatKeys float_keys(const at::Half* kc, const at::Half* vc, const int64_t* table, int64_t n_kv, int64_t bs,
                     int64_t dim, int64_t n_s, std::vector<float>& buf) {
  buf.resize(2 * n_kv * n_s * dim);
  float* k = buf.data();
  float* v = k + n_kv * n_s * dim;
  at::parallel_for(0, n_kv * n_s, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / n_s, p = i % n_s, src = ((table[p / bs] * n_kv + g) * bs + p % bs) * dim;
      for (int64_t d = 0; d < dim; ++d) k[i * dim + d] = static_cast<float>(kc[src + d]);
      for (int64_t d = 0; d < dim; ++d) v[i * dim + d] = static_cast<float>(vc[src + d]);
    }
  });
  return {k, v, n_s, dim};
}

template <typename Keys>
void chunk_attention(const float* qp, int64_t qs0, int64_t qs1, int64_t n_q, int64_t n_heads, int64_t n_kv,
                     int64_t dim, int64_t n_s, const Keys& keys, double scale, int64_t window, float* op,
                     int64_t ld_out) {
  constexpr int64_t BQ = 32;
  constexpr int NV = BQ / tandem::VW;
  const int64_t group = n_heads / n_kv, offset = n_s - n_q;
  if (n_q == 0) return;
  std::vector<float> vt(n_kv * dim * n_s);  // V^T per KV head: [K][D][S]
  at::parallel_for(0, n_kv * ((n_s + 63) / 64), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item % n_kv, s0 = (item / n_kv) * 64, s1 = std::min(n_s, s0 + 64);
      for (int64_t p = s0; p < s1; ++p) {
        const float* row = keys.value(g, p);
        for (int64_t d = 0; d < dim; ++d) vt[(g * dim + d) * n_s + p] = row[d];
      }
    }
  });
  const int64_t n_blocks = (n_q + BQ - 1) / BQ, items = n_heads * n_blocks;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qt(dim * BQ), st(n_s * BQ);
    for (int64_t item = begin; item < end; ++item) {
      // pair short and long causal blocks so that contiguous ranges of items cost about the same
      const int64_t h = item % n_heads, r = item / n_heads;
      const int64_t qb = (r % 2 == 0) ? r / 2 : n_blocks - 1 - r / 2;
      const int64_t g = h / group, i0 = qb * BQ, valid = std::min(BQ, n_q - i0);
      const int64_t first_pos = offset + i0, last_pos = offset + i0 + valid - 1;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, first_pos - window + 1) : 0, hi = last_pos + 1;
      const int64_t n_keys = hi - lo;
      std::fill(qt.begin(), qt.end(), 0.f);
      for (int64_t i = 0; i < valid; ++i)
        for (int64_t d = 0; d < dim; ++d) qt[d * BQ + i] = qp[(i0 + i) * qs0 + h * qs1 + d] * sc;
      // S^T [n_keys, BQ], over runs of key rows at a fixed stride
      for (int64_t p = lo; p < hi;) {
        const int64_t run = keys.run(p, hi), ld = keys.stride();
        const float* kr = keys.key(g, p);
        float* out = st.data() + (p - lo) * BQ;
        int64_t j = 0;
        for (; j + 8 <= run; j += 8)
          tandem::outer_tile<NV, 8>(kr + j * ld, dim, qt.data(), out + j * BQ, BQ, false, BQ, ld);
        for (; j < run; ++j) tandem::outer_tile<NV, 1>(kr + j * ld, dim, qt.data(), out + j * BQ, BQ, false, BQ, ld);
        p += run;
      }
      // mask, softmax down each column
      float mx[BQ], sum[BQ];
      for (int64_t i = 0; i < BQ; ++i) mx[i] = -std::numeric_limits<float>::infinity(), sum[i] = 0.f;
      for (int64_t jj = 0; jj < n_keys; ++jj) {
        float* row = st.data() + jj * BQ;
        const int64_t pos = lo + jj;
        // every query of the block sees this key: no mask (all keys before the block, bar a window's edge)
        if (valid == BQ && pos < first_pos && (window <= 0 || pos > last_pos - window)) {
#pragma omp simd
          for (int64_t i = 0; i < BQ; ++i) mx[i] = std::max(mx[i], row[i]);
          continue;
        }
        for (int64_t i = 0; i < BQ; ++i) {
          const int64_t qpos = first_pos + i;
          const bool ok = i < valid && pos <= qpos && (window <= 0 || pos > qpos - window);
          row[i] = ok ? row[i] : -std::numeric_limits<float>::infinity();
          mx[i] = std::max(mx[i], row[i]);
        }
      }
      for (int64_t jj = 0; jj < n_keys; ++jj) {
        float* row = st.data() + jj * BQ;
#pragma omp simd
        for (int64_t i = 0; i < BQ; ++i) {
          const float e = row[i] == -std::numeric_limits<float>::infinity() ? 0.f : fast_exp(row[i] - mx[i]);
          row[i] = e;
          sum[i] += e;
        }
      }
      for (int64_t i = 0; i < BQ; ++i) sum[i] = sum[i] > 0.f ? 1.f / sum[i] : 0.f;
      for (int64_t jj = 0; jj < n_keys; ++jj) {
        float* row = st.data() + jj * BQ;
#pragma omp simd
        for (int64_t i = 0; i < BQ; ++i) row[i] *= sum[i];
      }
      // O^T [D, BQ] = V^T [D, keys] P^T [keys, BQ], written as O rows
      const float* vg = vt.data() + g * dim * n_s + lo;
      float* og = op + i0 * ld_out + h * dim;
      int64_t d = 0;
      for (; d + 8 <= dim; d += 8)
        tandem::outer_tile<NV, 8>(vg + d * n_s, n_keys, st.data(), og + d, ld_out, true, valid, n_s);
      for (; d < dim; ++d)
        tandem::outer_tile<NV, 1>(vg + d * n_s, n_keys, st.data(), og + d, ld_out, true, valid, n_s);
    }
  });
}

void check_queries(const Tensor& q) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.stride(2) == 1,
              "q must be float32 [Q, H, D] with unit stride along D");
}

// A prefill chunk's causal attention over the paged cache: queries q [Q, H, D] are the last Q of the
// sequence's first num_keys positions (the chunk's own K/V already written), reached through its
// block table [M]. Returns [Q, H, D].
Tensor paged_prefill_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& table,
                               int64_t num_keys, double scale, int64_t window) {
  check_queries(q);
  check_cache(k_cache, v_cache);
  const int64_t n_q = q.size(0), n_heads = q.size(1), dim = q.size(2);
  const int64_t n_kv = k_cache.size(1), bs = k_cache.size(2);
  auto tab = table.to(at::kLong).contiguous();
  TORCH_CHECK(k_cache.size(3) == dim && n_heads % n_kv == 0, "paged_prefill_attention: shapes do not match");
  TORCH_CHECK(num_keys >= n_q && num_keys <= tab.numel() * bs, "paged_prefill_attention: num_keys out of range of the table");
  const int64_t* tp = tab.data_ptr<int64_t>();
  for (int64_t i = 0; i < (num_keys + bs - 1) / bs; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < k_cache.size(0), "block id out of range");
  auto out = at::empty({n_q, n_heads, dim}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const auto attend = [&](const auto& keys) {
    chunk_attention(q.data_ptr<float>(), q.stride(0), q.stride(1), n_q, n_heads, n_kv, dim, num_keys, keys, scale,
                    window, out.data_ptr<float>(), n_heads * dim);
  };
  if (k_cache.scalar_type() == at::kHalf) {
    std::vector<float> buf;
    attend(float_keys(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), tp, n_kv, bs, dim, num_keys, buf));
  } else {
    attend(PagedKeys{k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tp, n_kv, bs, dim});
  }
  return out;
}

// qkv: [T, (H + 2K) * D] contiguous, q heads then k heads then v heads. Rotates the first rot_dim
// channels of every q and k head (rotate-half / NeoX pairing) in place with cos, sin [T, rot_dim/2],
// then writes each token's k and v heads to cache slot slots[t] (block slot / B, offset slot % B).
void rope_and_cache(Tensor qkv, const Tensor& cos, const Tensor& sin, Tensor k_cache, Tensor v_cache,
                    const Tensor& slots, int64_t n_heads, int64_t rot_dim) {
  check_cache(k_cache, v_cache);
  TORCH_CHECK(qkv.is_contiguous() && qkv.scalar_type() == at::kFloat && qkv.dim() == 2, "qkv must be float32 [T, (H+2K)*D]");
  const int64_t n_tok = qkv.size(0), n_kv = k_cache.size(1), bs = k_cache.size(2), dim = k_cache.size(3);
  TORCH_CHECK(qkv.size(1) == (n_heads + 2 * n_kv) * dim, "qkv width does not match the heads");
  const int64_t half = rot_dim / 2;
  auto c = cos.to(at::kFloat).contiguous(), s = sin.to(at::kFloat).contiguous();
  auto sl = slots.to(at::kLong).contiguous();
  TORCH_CHECK(c.numel() == n_tok * half && s.numel() == n_tok * half && sl.numel() == n_tok, "cos/sin/slots do not match qkv");
  float* xp = qkv.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const int64_t* slp = sl.data_ptr<int64_t>();
  const bool half_kv = k_cache.scalar_type() == at::kHalf;
  void* kc = k_cache.data_ptr();
  void* vc = v_cache.data_ptr();
  const int64_t width = qkv.size(1), n_blocks = k_cache.size(0);
  at::parallel_for(0, n_tok, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* x = xp + t * width;
      const float* ct = cp + t * half;
      const float* st = sp + t * half;
      for (int64_t h = 0; h < n_heads + n_kv; ++h) tandem::rope_head(x + h * dim, ct, st, half);
      const int64_t slot = slp[t], block = slot / bs, off = slot % bs;
      TORCH_CHECK(block >= 0 && block < n_blocks, "cache slot out of range");
      for (int64_t g = 0; g < n_kv; ++g) {
        const int64_t dst = ((block * n_kv + g) * bs + off) * dim;
        const float *k = x + (n_heads + g) * dim, *v = x + (n_heads + n_kv + g) * dim;
        if (half_kv) {
          tandem::store_kv(static_cast<at::Half*>(kc) + dst, k, dim);
          tandem::store_kv(static_cast<at::Half*>(vc) + dst, v, dim);
        } else {
          tandem::store_kv(static_cast<float*>(kc) + dst, k, dim);
          tandem::store_kv(static_cast<float*>(vc) + dst, v, dim);
        }
      }
    }
  });
}

// out = rms_norm(x (+ add, written back into x), weight): x, add [T, C] (add any 2-D strides).
Tensor add_rms_norm(Tensor x, const c10::optional<Tensor>& add, const Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be contiguous float32 [T, C]");
  const int64_t n_tok = x.size(0), width = x.size(1);
  auto out = at::empty_like(x);
  float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* ap = add ? add->data_ptr<float>() : nullptr;
  const int64_t as0 = add ? add->stride(0) : 0, as1 = add ? add->stride(1) : 0;
  const float e = static_cast<float>(eps);
  at::parallel_for(0, n_tok, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* row = xp + t * width;
      if (ap) {
        const float* a = ap + t * as0;
        for (int64_t i = 0; i < width; ++i) row[i] += a[i * as1];
      }
      tandem::rms_norm_row(row, wp, width, e, op + t * width);
    }
  });
  return out;
}

// silu(gate) * up for gate_up [T, 2I]: [T, I] in the input's orientation. A row-major input gives a
// contiguous result; a transposed GEMM result ([2I, T]^T, unit stride along T) gives a transposed one,
// which the next weights-left GEMM reads without a copy.
Tensor silu_and_mul(const Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == at::kFloat, "gate_up must be float32 [T, 2I]");
  const int64_t n_tok = gate_up.size(0), inter = gate_up.size(1) / 2;
  const float* gp = gate_up.data_ptr<float>();
  const int64_t s0 = gate_up.stride(0), s1 = gate_up.stride(1);
  if (s1 == 1 || n_tok == 1) {
    auto out = at::empty({n_tok, inter}, gate_up.options().memory_format(at::MemoryFormat::Contiguous));
    float* op = out.data_ptr<float>();
    at::parallel_for(0, n_tok * inter, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin / inter; t * inter < end; ++t) {
        const int64_t lo = std::max(begin, t * inter) - t * inter, hi = std::min(end, (t + 1) * inter) - t * inter;
        const float* g = gp + t * s0;
        float* o = op + t * inter;
        if (s1 == 1) {
#pragma omp simd
          for (int64_t i = lo; i < hi; ++i) o[i] = g[i] / (1.f + fast_exp(-g[i])) * g[i + inter];
        } else {
          for (int64_t i = lo; i < hi; ++i) {
            const float gv = g[i * s1];
            o[i] = gv / (1.f + fast_exp(-gv)) * g[(i + inter) * s1];
          }
        }
      }
    });
    return out;
  }
  TORCH_CHECK(s0 == 1, "silu_and_mul takes a row-major or a transposed input");
  auto out_t = at::empty({inter, n_tok}, gate_up.options().memory_format(at::MemoryFormat::Contiguous));
  float* op = out_t.data_ptr<float>();
  at::parallel_for(0, inter, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* g = gp + i * s1;
      const float* u = gp + (i + inter) * s1;
      float* o = op + i * n_tok;
#pragma omp simd
      for (int64_t t = 0; t < n_tok; ++t) o[t] = g[t] / (1.f + fast_exp(-g[t])) * u[t];
    }
  });
  return out_t.t();
}

// x @ w^T (+ b) for the few rows of a decode step by the skinny GEMM (skinny_gemm.h): [M, N], a
// transposed view unless `contiguous` (or a bias) asks for rows. More rows than max_rows go to the
// blocked GEMM (row-major result).
Tensor small_linear(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b, int64_t max_rows,
                    bool contiguous) {
  const int64_t rows = x.size(0);
  if (rows == 0) return at::linear(x, w, b);
  if (rows > max_rows || rows > 64) {  // prefill-sized: the blocked GEMM, row-major
    Tensor out = tandem::gemm_rows(x, w);
    if (b) out.add_(*b);
    return out;
  }
  Tensor out = tandem::skinny_gemm_t(x, w).narrow(1, 0, rows).t();
  if (contiguous || b) out = out.contiguous();
  if (b) out.add_(*b);
  return out;
}

// The float weight an integer one stands for (shared/models/quant.py's layout).
Tensor dequantize(const Tensor& q, const Tensor& scales, const Tensor& offsets, int64_t bits, int64_t in_features) {
  Tensor ints = bits == 8 ? q.to(at::kFloat)
                          : at::stack({at::bitwise_and(q, 15), at::bitwise_right_shift(q, 4)}, -1).to(at::kFloat);
  const int64_t n = q.size(0), groups = scales.size(1);
  ints = ints.view({n, groups, in_features / groups});
  return (ints * scales.unsqueeze(-1) + offsets.unsqueeze(-1)).view({n, in_features});
}

// small_linear for a float weight, or an integer one (scales and offsets non-empty): the quantized
// kernels (quant_gemm.h), or the weight dequantized for the call where its groups do not fit them.
Tensor any_linear(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b, const Tensor& scales,
                  const Tensor& offsets, int64_t max_rows, bool contiguous, bool int8_x = false) {
  if (w.scalar_type() == at::kFloat) return small_linear(x, w, b, max_rows, contiguous);
  const int64_t bits = w.scalar_type() == at::kChar ? 8 : 4, k_dim = x.size(1);
  const int64_t group = k_dim / scales.size(1);
  const int64_t rows = x.size(0);
  if (rows >= 1 && group % tandem::group_multiple(bits) == 0) {
    Tensor out = tandem::quant_linear(x, w, scales, offsets, bits, group, int8_x);
    if (contiguous || b || rows > max_rows) out = out.contiguous();
    if (b) out.add_(*b);
    return out;
  }
  return small_linear(x, dequantize(w, scales, offsets, bits, k_dim), b, max_rows, contiguous);
}

// argmax over the last dim of x [M, N] (any strides; fast for the transposed [N, M] layout the
// skinny GEMM writes): the first index of the maximum, as torch.argmax.
// The first index of the maximum of x[0:n] (NaNs are passed over; all -inf or NaN: 0): the maximum by
// vectors, then the first vector holding it.
int64_t row_argmax(const float* x, int64_t n) {
  using tandem::vf;
  using tandem::VW;
  constexpr float lowest = -std::numeric_limits<float>::infinity();
  vf m0 = tandem::vsplat(lowest), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 4 * VW <= n; j += 4 * VW) {  // four chains (a max waits on the one before)
    const vf a = tandem::vload(x + j), b = tandem::vload(x + j + VW), c = tandem::vload(x + j + 2 * VW),
             d = tandem::vload(x + j + 3 * VW);
    m0 = a > m0 ? a : m0, m1 = b > m1 ? b : m1, m2 = c > m2 ? c : m2, m3 = d > m3 ? d : m3;
  }
  m0 = m1 > m0 ? m1 : m0, m2 = m3 > m2 ? m3 : m2, m0 = m2 > m0 ? m2 : m0;
  float best = lowest;
  for (int i = 0; i < VW; ++i) best = m0[i] > best ? m0[i] : best;
  for (int64_t k = j; k < n; ++k) best = x[k] > best ? x[k] : best;
  if (!(best > lowest)) return 0;
  const vf target = tandem::vsplat(best);
  int64_t k = 0;
  for (; k + VW <= n; k += VW) {
    const auto hit = tandem::vload(x + k) == target;
    for (int i = 0; i < VW; ++i)
      if (hit[i]) return k + i;
  }
  for (; k < n; ++k)
    if (x[k] == best) return k;
  return 0;
}

Tensor argmax_rows(const Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "argmax_rows takes float32 [M, N]");
  const int64_t m = x.size(0), n = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  const float* xp = x.data_ptr<float>();
  if (m == 1 && s1 == 1) {  // one contiguous row (a decode's logits): a few microseconds, no threads
    auto out = at::empty({1}, x.options().dtype(at::kLong));
    out.data_ptr<int64_t>()[0] = row_argmax(xp, n);
    return out;
  }
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 4096));
  std::vector<float> best(chunks * m, -std::numeric_limits<float>::infinity());
  std::vector<int64_t> where(chunks * m, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t lo = n * c / chunks, hi = n * (c + 1) / chunks;
      float* bv = best.data() + c * m;
      int64_t* bi = where.data() + c * m;
      for (int64_t r = 0; r < m; ++r) bi[r] = lo;
      for (int64_t j = lo; j < hi; ++j) {
        const float* col = xp + j * s1;
        for (int64_t r = 0; r < m; ++r) {
          const float v = col[r * s0];
          if (v > bv[r]) {
            bv[r] = v;
            bi[r] = j;
          }
        }
      }
    }
  });
  auto out = at::empty({m}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < m; ++r) {
    float bv = best[r];
    int64_t bi = where[r];
    for (int64_t c = 1; c < chunks; ++c)
      if (best[c * m + r] > bv) bv = best[c * m + r], bi = where[c * m + r];
    op[r] = bi;
  }
  return out;
}

inline c10::optional<Tensor> optional(const Tensor& t) {
  return t.numel() ? c10::optional<Tensor>(t) : c10::nullopt;
}

// forward_layers' weights for one projection as decode_step.h's Proj, or false where the team path
// does not compute it (groups the quantized tiles do not take: the general path dequantizes those).
bool as_proj(const Tensor& w, const Tensor& bias, const Tensor& scales, const Tensor& offsets, tandem::Proj& p) {
  if (!w.is_contiguous() || w.dim() != 2) return false;
  p.w = w.data_ptr();
  p.bias = bias.numel() ? bias.data_ptr<float>() : nullptr;
  p.n = w.size(0);
  if (w.scalar_type() == at::kFloat) {
    p.k = w.size(1);
    return !bias.numel() || (bias.is_contiguous() && bias.scalar_type() == at::kFloat);
  }
  p.bits = w.scalar_type() == at::kChar ? 8 : 4;
  p.k = p.bits == 8 ? w.size(1) : 2 * w.size(1);
  if (scales.dim() != 2 || !scales.is_contiguous() || !offsets.is_contiguous() || !scales.size(1)) return false;
  p.group = p.k / scales.size(1);
  p.half = scales.scalar_type() == at::kHalf;
  p.scales = scales.data_ptr(), p.offsets = offsets.data_ptr();
  return offsets.scalar_type() == scales.scalar_type() && (p.half || scales.scalar_type() == at::kFloat) &&
         p.k % p.group == 0 && p.group % tandem::group_multiple(p.bits) == 0;
}

// A dense decoder stack's weights, caches and shape constants, handed to the kernels once
// (shared/engine/cpu_stack.py registers it with make_stack and gets a handle): a step passes the
// handle and its own index tensors. Passed per call as lists, the ~540 tensors cost ~0.25 ms a step,
// most of it cache misses on their reference counts and sizes after the weights have streamed through
// the caches (a torch class object as the argument cost ~60 us a call). The decode team's projections
// are read out of the weights here, once.
// weights holds, per layer, in order: input norm, qkv weight, qkv bias, qkv scales, qkv offsets, o weight,
// o bias, o scales, o offsets, post-attention norm, gate_up weight, gate_up scales, gate_up offsets, down
// weight, down scales, down offsets (an empty tensor for an absent bias; scales and offsets are empty
// for a float weight and set for an integer one, shared/models/quant.py).
struct LayerStack {
  static constexpr int64_t per_layer = 16;
  std::vector<Tensor> weights, k_caches, v_caches;
  Tensor embed, final_norm;
  Tensor head_w, head_b, head_s, head_o;  // the LM head: weight, bias, scales, offsets (as a projection's)
  std::vector<int64_t> windows;
  int64_t n_heads, rot_dim, n_layers, c, n_kv, bs, dim;
  double scale, eps;
  bool int8_x;
  // the decode team's view: per layer qkv, o, gate_up, down; the norms' weights; the caches
  std::vector<tandem::Proj> projs;
  std::vector<const float*> norms;
  std::vector<void*> kc, vc;
  bool team = true;  // every projection is one the team computes
  tandem::Proj head;
  bool team_head = false;  // the team computes the LM head too
  std::vector<Tensor> rows16;  // the team's copies of 4-bit weights in the rows16 layout

  // A copy of the first `count` projections' 4-bit weights in quant_gemm.h's rows16 layout, for the
  // team's GEMMs of one token (~1.2x faster from memory; the general path keeps the row-major ones).
  // Not with int8 x (its tiles read rows), nor on CPUs without the 24-bit x path.
  void pack_rows16(tandem::Proj* p, int count) {
#ifdef TANDEM_ROWS16
    for (int i = 0; i < count && !int8_x; ++i) {
      if (!tandem::rows16_ok(p[i].bits, p[i].group, p[i].n, p[i].k)) continue;
      Tensor packed = at::empty({p[i].n * p[i].k / 2}, at::TensorOptions().dtype(at::kByte));
      tandem::pack_rows16(static_cast<const uint8_t*>(p[i].w), p[i].n, p[i].k, packed.data_ptr<uint8_t>());
      p[i].w = packed.data_ptr(), p[i].rows16 = true;
      rows16.push_back(std::move(packed));
    }
#else
    (void)p, (void)count;
#endif
  }

  LayerStack(std::vector<Tensor> weights_, Tensor embed_, Tensor final_norm_, std::vector<Tensor> head_,
             std::vector<Tensor> k_caches_, std::vector<Tensor> v_caches_, std::vector<int64_t> windows_,
             int64_t n_heads_, int64_t rot_dim_, double scale_, double eps_, bool int8_x_)
      : weights(std::move(weights_)), k_caches(std::move(k_caches_)), v_caches(std::move(v_caches_)),
        embed(std::move(embed_)), final_norm(std::move(final_norm_)), windows(std::move(windows_)),
        n_heads(n_heads_), rot_dim(rot_dim_), scale(scale_), eps(eps_), int8_x(int8_x_) {
    n_layers = static_cast<int64_t>(k_caches.size());
    TORCH_CHECK(n_layers > 0 && static_cast<int64_t>(v_caches.size()) == n_layers, "LayerStack: one K and one V cache per layer");
    TORCH_CHECK(static_cast<int64_t>(weights.size()) == per_layer * n_layers, "LayerStack: 16 weights per layer");
    TORCH_CHECK(static_cast<int64_t>(windows.size()) == n_layers, "LayerStack: one window per layer");
    TORCH_CHECK(embed.dim() == 2 && embed.scalar_type() == at::kFloat && embed.is_contiguous(), "LayerStack: float32 [V, C] embedding");
    c = embed.size(1);
    TORCH_CHECK(final_norm.numel() == c && final_norm.scalar_type() == at::kFloat && final_norm.is_contiguous(),
                "LayerStack: the final norm's weight does not match the embedding");
    for (int64_t l = 0; l < n_layers; ++l) check_cache(k_caches[l], v_caches[l]);
    TORCH_CHECK(head_.size() == 4, "LayerStack: the LM head as weight, bias, scales, offsets");
    head_w = head_[0], head_b = head_[1], head_s = head_[2], head_o = head_[3];
    TORCH_CHECK(head_w.dim() == 2 && head_w.size(1) * (head_w.scalar_type() == at::kByte ? 2 : 1) == c,
                "LayerStack: the LM head does not match the embedding");
    team_head = as_proj(head_w, head_b, head_s, head_o, head);
    // a symmetric 8-bit head (GGUF's Q8_0) has all-zero offsets: 1.8 MB a token not to stream for
    // SmolLM2-135M's (the team's 8-bit tiles take a null offset for zero)
    if (team_head && head.bits == 8 && !head_o.ne(0).any().item<bool>()) head.offsets = nullptr;
    n_kv = k_caches[0].size(1), bs = k_caches[0].size(2), dim = k_caches[0].size(3);
    projs.resize(4 * n_layers);
    for (int64_t l = 0; l < n_layers && team; ++l) {
      const Tensor* w = weights.data() + per_layer * l;
      tandem::Proj* p = projs.data() + 4 * l;
      team = as_proj(w[1], w[2], w[3], w[4], p[0]) && as_proj(w[5], w[6], w[7], w[8], p[1]) &&
             as_proj(w[10], at::Tensor(), w[11], w[12], p[2]) && as_proj(w[13], at::Tensor(), w[14], w[15], p[3]) &&
             k_caches[l].sizes() == k_caches[0].sizes() && k_caches[l].scalar_type() == k_caches[0].scalar_type();
      if (team) {
        TORCH_CHECK(p[0].k == c && p[0].n == (n_heads + 2 * n_kv) * dim && p[1].k == n_heads * dim && p[1].n == c &&
                        p[2].k == c && p[3].k == p[2].n / 2 && p[3].n == c,
                    "LayerStack: projection shapes do not match the model");
        pack_rows16(p, 4);
      }
      norms.push_back(w[0].data_ptr<float>());
      norms.push_back(w[9].data_ptr<float>());
      kc.push_back(k_caches[l].data_ptr());
      vc.push_back(v_caches[l].data_ptr());
    }
  }
};

// the registered stacks by handle (a stack is freed with its CpuStack)
std::mutex stacks_lock;
std::unordered_map<int64_t, std::shared_ptr<const LayerStack>> stacks;
int64_t next_stack = 1;

int64_t make_stack(std::vector<Tensor> weights, Tensor embed, Tensor final_norm, std::vector<Tensor> head,
                   std::vector<Tensor> k_caches, std::vector<Tensor> v_caches, std::vector<int64_t> windows,
                   int64_t n_heads, int64_t rot_dim, double scale, double eps, bool int8_x) {
  auto stack = std::make_shared<const LayerStack>(std::move(weights), std::move(embed), std::move(final_norm),
                                                  std::move(head), std::move(k_caches), std::move(v_caches),
                                                  std::move(windows), n_heads, rot_dim, scale, eps, int8_x);
  std::lock_guard<std::mutex> guard(stacks_lock);
  stacks.emplace(next_stack, std::move(stack));
  return next_stack++;
}

void free_stack(int64_t handle) {
  std::lock_guard<std::mutex> guard(stacks_lock);
  stacks.erase(handle);
}

std::shared_ptr<const LayerStack> find_stack(int64_t handle) {
  std::lock_guard<std::mutex> guard(stacks_lock);
  const auto it = stacks.find(handle);
  TORCH_CHECK(it != stacks.end(), "forward_layers: no layer stack ", handle, " (freed, or never made)");
  return it->second;
}

// the tokens' embedding rows [T, C]
Tensor embed_rows(const LayerStack& st, const Tensor& ids) {
  const auto id = ids.to(at::kLong).contiguous();
  const int64_t n = id.numel(), vocab = st.embed.size(0), c = st.c;
  Tensor x = at::empty({n, c}, st.embed.options());
  const float* table = st.embed.data_ptr<float>();
  for (int64_t t = 0; t < n; ++t) {
    const int64_t row = id.data_ptr<int64_t>()[t];
    TORCH_CHECK(row >= 0 && row < vocab, "forward_layers: token id ", row, " out of range of the embedding");
    std::memcpy(x.data_ptr<float>() + t * c, table + row * c, c * sizeof(float));
  }
  return x;
}

// the LM head's logits [N, V] of hidden rows [N, C]
Tensor head_logits(const LayerStack& st, const Tensor& hidden, int64_t max_rows) {
  if (!hidden.size(0)) return at::empty({0, st.head_w.size(0)}, hidden.options());
  return any_linear(hidden, st.head_w, optional(st.head_b), st.head_s, st.head_o, max_rows, false);
}

// A step of 1-4 decodes (no prefill chunk) on decode_step.h's thread team: x [M, C] the new tokens'
// embeddings, cos/sin [M, R/2] their RoPE rows. Returns the final-normed hidden [M, C], or with
// `logits` the LM head's output [M, V] (a transposed view), computed by the same team.
Tensor decode_layers(const LayerStack& st, const Tensor& x, const float* cos, const float* sin, const Tensor& slots,
                     const Tensor& tables, const Tensor& lens, bool logits) {
  const int64_t m = x.size(0), bs = st.bs;
  tandem::DecodeStep step;
  step.n_layers = st.n_layers, step.projs = st.projs.data(), step.norms = st.norms.data();
  step.kc = st.kc.data(), step.vc = st.vc.data(), step.windows = st.windows.data();
  step.half_kv = st.k_caches[0].scalar_type() == at::kHalf;
  step.m = m, step.c = st.c, step.h = st.n_heads, step.kv = st.n_kv, step.d = st.dim;
  step.inter = step.projs[2].n / 2, step.rot_half = st.rot_dim / 2, step.bs = bs, step.max_blocks = tables.size(1);
  step.scale = static_cast<float>(st.scale), step.eps = static_cast<float>(st.eps), step.int8_x = st.int8_x;
  const auto sl = slots.to(at::kLong).contiguous();
  TORCH_CHECK(sl.numel() == m, "forward_layers: one slot per decode");
  step.x_in = x.data_ptr<float>(), step.final_norm = st.final_norm.data_ptr<float>();
  step.cos = cos, step.sin = sin;
  step.slots = sl.data_ptr<int64_t>(), step.tables = tables.data_ptr<int64_t>(), step.lens = lens.data_ptr<int64_t>();
  const int64_t n_blocks = st.k_caches[0].size(0);
  for (int64_t t = 0; t < m; ++t) {
    const int64_t len = step.lens[t];
    TORCH_CHECK(len > 0 && len <= step.max_blocks * bs, "sequence length out of range of its block table");
    TORCH_CHECK(step.slots[t] >= 0 && step.slots[t] / bs < n_blocks, "cache slot out of range");
    for (int64_t b = 0; b < (len + bs - 1) / bs; ++b) {
      const int64_t id = step.tables[t * step.max_blocks + b];
      TORCH_CHECK(id >= 0 && id < n_blocks, "block id out of range");
    }
  }
  // rows that read another row's slot: the blocks of a row's keys hold another row's new token
  for (int64_t t = 0; t < m; ++t)
    for (int64_t u = 0; u < m; ++u) {
      if (u == t) continue;
      const int64_t* tab = step.tables + u * step.max_blocks;
      for (int64_t b = 0; b < (step.lens[u] + bs - 1) / bs; ++b)
        step.rows_share_keys |= tab[b] == step.slots[t] / bs;
    }
  // attention items: each (sequence, KV head) over enough chunks of keys that every thread gets some
  const int nt = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t n_kv = st.n_kv, want = std::max<int64_t>(1, (2 * nt + m * n_kv - 1) / (m * n_kv));
  for (int64_t t = 0; t < m; ++t) {
    step.chunks.push_back(std::min(want, std::max<int64_t>(1, step.lens[t] / 32)));
    for (int64_t g = 0; g < n_kv; ++g) {
      step.item_start.push_back(step.n_items);
      step.n_items += step.chunks[t];
    }
  }
  const int64_t width = (st.n_heads + 2 * n_kv) * st.dim;
  step.qkv_t.resize(width * m), step.o_t.resize(step.c * m), step.down_t.resize(step.c * m);
  step.gu_t.resize(2 * step.inter * m), step.act_t.resize(step.inter * m);
  step.partials.resize(step.n_items * (st.n_heads / n_kv) * (st.dim + 2));
  Tensor out = logits ? at::empty({st.head.n, m}, x.options()) : at::empty({m, step.c}, x.options());
  if (logits) step.head = &st.head, step.logits_t = out.data_ptr<float>();
  else step.out = out.data_ptr<float>();
#pragma omp parallel num_threads(nt)
  step.run(omp_get_thread_num(), omp_get_num_threads());
  return logits ? out.t() : out;
}

// The whole dense decoder stack for one step: every sequence's new tokens side by side, token ids
// ids [T]; RoPE rows cos_table/sin_table [P, R/2], row positions[t] for token t. Decodes (one new
// token each): rows dec_rows [Nd] of the batch, block tables dec_tables [Nd, M], keys dec_lens [Nd].
// Prefill chunks: first row pre_starts [Np], pre_queries tokens, block tables pre_tables [Np, M'],
// keys pre_keys [Np] (context + chunk). Returns the final-normed hidden [T, C], or with `logits` the LM
// head's logits [S, V] of rows sample_rows [S] (all rows where absent; a step of decodes computes the
// head on the same team).
Tensor forward_layers(int64_t handle, const Tensor& ids, const Tensor& cos_table,
                      const Tensor& sin_table, const Tensor& positions, const Tensor& slots, const Tensor& dec_rows,
                      const Tensor& dec_tables, const Tensor& dec_lens, const Tensor& pre_starts,
                      const Tensor& pre_queries, const Tensor& pre_tables, const Tensor& pre_keys, int64_t max_rows, bool logits,
                      const c10::optional<Tensor>& sample_rows) {
  const auto stack = find_stack(handle);
  const LayerStack& st = *stack;
  const int64_t n_layers = st.n_layers, n_heads = st.n_heads, rot_dim = st.rot_dim, bs = st.bs, dim = st.dim;
  const double scale = st.scale, eps = st.eps;
  const bool int8_x = st.int8_x;
  const auto pos = positions.to(at::kLong).contiguous();
  const int64_t n_tok = pos.numel(), half = rot_dim / 2;
  TORCH_CHECK(ids.numel() == n_tok, "forward_layers: one position per token");
  const auto ct = cos_table.to(at::kFloat).contiguous(), stab = sin_table.to(at::kFloat).contiguous();
  TORCH_CHECK(ct.dim() == 2 && ct.size(1) == half && stab.sizes() == ct.sizes(), "forward_layers: cos/sin tables must be [P, R/2]");
  for (int64_t t = 0; t < n_tok; ++t) {
    const int64_t p = pos.data_ptr<int64_t>()[t];
    TORCH_CHECK(p >= 0 && p < ct.size(0), "forward_layers: a position past the RoPE table");
  }
  const auto d_rows = dec_rows.to(at::kLong).contiguous();
  const auto d_tab = dec_tables.to(at::kLong).contiguous();
  const auto d_len = dec_lens.to(at::kLong).contiguous();
  const auto p_start = pre_starts.to(at::kLong).contiguous();
  const auto p_q = pre_queries.to(at::kLong).contiguous();
  const auto p_tab = pre_tables.to(at::kLong).contiguous();
  const auto p_keys = pre_keys.to(at::kLong).contiguous();
  const int64_t n_dec = d_rows.numel(), n_pre = p_start.numel();
  const bool all_decode = n_pre == 0 && n_dec == n_tok;
  int64_t covered = n_dec;
  for (int64_t i = 0; i < n_pre; ++i) {
    const int64_t st0 = p_start.data_ptr<int64_t>()[i], nq = p_q.data_ptr<int64_t>()[i];
    const int64_t nk = p_keys.data_ptr<int64_t>()[i];
    TORCH_CHECK(st0 >= 0 && st0 + nq <= n_tok && nq <= nk && nk <= p_tab.size(1) * bs, "forward_layers: bad prefill chunk");
    covered += nq;
  }
  TORCH_CHECK(covered == n_tok, "forward_layers: every token must belong to one decode or prefill chunk");
  Tensor x = embed_rows(st, ids);
  if (all_decode && n_tok <= 4 && st.team) {
    std::vector<float> cs(2 * n_tok * half);  // the rows' cos, then their sin
    for (int64_t t = 0; t < n_tok; ++t) {
      const int64_t p = pos.data_ptr<int64_t>()[t];
      std::memcpy(cs.data() + t * half, ct.data_ptr<float>() + p * half, half * sizeof(float));
      std::memcpy(cs.data() + (n_tok + t) * half, stab.data_ptr<float>() + p * half, half * sizeof(float));
    }
    const bool team_head = logits && st.team_head;
    Tensor out = decode_layers(st, x, cs.data(), cs.data() + n_tok * half, slots, d_tab, d_len, team_head);
    if (!logits) return out;
    if (sample_rows) out = out.index_select(0, sample_rows->to(at::kLong));
    return team_head ? out : head_logits(st, out, max_rows);
  }
  const Tensor cos = ct.index_select(0, pos), sin = stab.index_select(0, pos);
  c10::optional<Tensor> pending;  // the last sublayer's output, not yet added to x
  for (int64_t l = 0; l < n_layers; ++l) {
    const Tensor* w = st.weights.data() + LayerStack::per_layer * l;
    const Tensor &k_cache = st.k_caches[l], &v_cache = st.v_caches[l];
    Tensor h = add_rms_norm(x, pending, w[0], eps);
    Tensor qkv = any_linear(h, w[1], optional(w[2]), w[3], w[4], max_rows, true, int8_x);
    rope_and_cache(qkv, cos, sin, k_cache, v_cache, slots, n_heads, rot_dim);
    Tensor q = qkv.narrow(1, 0, n_heads * dim).view({n_tok, n_heads, dim});
    Tensor attn;
    if (all_decode) {
      attn = paged_decode_attention(q, k_cache, v_cache, d_tab, d_len, scale, st.windows[l]);
    } else {
      attn = at::empty({n_tok, n_heads, dim}, x.options());
      if (n_dec) {
        Tensor part = paged_decode_attention(q.index_select(0, d_rows), k_cache, v_cache, d_tab, d_len, scale,
                                             st.windows[l]);
        attn.index_copy_(0, d_rows, part);
      }
      const bool half_kv = k_cache.scalar_type() == at::kHalf;
      std::vector<float> buf;
      for (int64_t i = 0; i < n_pre; ++i) {
        const int64_t st0 = p_start.data_ptr<int64_t>()[i], nq = p_q.data_ptr<int64_t>()[i];
        const int64_t nk = p_keys.data_ptr<int64_t>()[i], *table = p_tab.data_ptr<int64_t>() + i * p_tab.size(1);
        const auto attend = [&](const auto& keys) {
          chunk_attention(q.data_ptr<float>() + st0 * q.stride(0), q.stride(0), q.stride(1), nq, n_heads, st.n_kv, dim,
                          nk, keys, scale, st.windows[l], attn.data_ptr<float>() + st0 * n_heads * dim, n_heads * dim);
        };
        if (half_kv)
          attend(float_keys(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), table, st.n_kv, bs, dim, nk,
                            buf));
        else
          attend(PagedKeys{k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), table, st.n_kv, bs, dim});
      }
    }
    Tensor o = any_linear(attn.view({n_tok, n_heads * dim}), w[5], optional(w[6]), w[7], w[8], max_rows, false, int8_x);
    h = add_rms_norm(x, o, w[9], eps);
    Tensor act = silu_and_mul(any_linear(h, w[10], c10::nullopt, w[11], w[12], max_rows, false, int8_x));
    pending = any_linear(act, w[13], c10::nullopt, w[14], w[15], max_rows, false, int8_x);
  }
  Tensor hidden = add_rms_norm(x, pending, st.final_norm, eps);
  if (!logits) return hidden;
  return head_logits(st, sample_rows ? hidden.index_select(0, sample_rows->to(at::kLong)) : hidden, max_rows);
}

}  // namespace

// x @ w^T for 1 to 64 rows by the skinny GEMM: [M, N] (a transposed view of the kernel's y^T).
Tensor skinny_linear(const Tensor& x, const Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.dim() == 2, "float32 [M, K] x");
  return tandem::skinny_gemm_t(x, w).narrow(1, 0, x.size(0)).t();
}

// x @ w^T (+ b) for any number of rows, row-major [M, N].
Tensor gemm_rows(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.dim() == 2, "float32 [M, K] x");
  auto y = tandem::gemm_rows(x, w);
  if (b) y.add_(*b);
  return y;
}

TORCH_LIBRARY(tandem, m) {
  m.def("gemm_rows(Tensor x, Tensor w, Tensor? b) -> Tensor");
  m.def("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor table, int num_keys, float scale, int window) -> Tensor");
  m.def("skinny_linear(Tensor x, Tensor w) -> Tensor");
  m.def("quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor offsets, int bits, int group, bool int8_x=False) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor lens, float scale, int window) -> Tensor");
  m.def("rope_and_cache(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slots, int n_heads, int rot_dim) -> ()");
  m.def("add_rms_norm(Tensor(a!) x, Tensor? add, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("make_stack(Tensor[] weights, Tensor embed, Tensor final_norm, Tensor[] head, Tensor[] k_caches, Tensor[] v_caches, int[] windows, int n_heads, int rot_dim, float scale, float eps, bool int8_x) -> int", &make_stack);
  m.def("free_stack(int stack) -> ()", &free_stack);
  // the stack's KV caches get the step's new keys and values
  m.def("forward_layers(int stack, Tensor ids, Tensor cos_table, Tensor sin_table, Tensor positions, Tensor slots, Tensor dec_rows, Tensor dec_tables, Tensor dec_lens, Tensor pre_starts, Tensor pre_queries, Tensor pre_tables, Tensor pre_keys, int max_rows, bool logits=False, Tensor? sample_rows=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("rope_and_cache", &rope_and_cache);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("forward_layers", &forward_layers);
  m.impl("skinny_linear", &skinny_linear);
  m.impl("quant_linear", &tandem::quant_linear);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("gemm_rows", &gemm_rows);
  m.impl("paged_prefill_attention", &paged_prefill_attention);
}
