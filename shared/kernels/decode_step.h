// A decode step of a dense decoder stack — 1 to 4 sequences, one new token each — on one team of
// threads for the whole stack.
//
// forward_layers' general path calls a kernel per operation, and each kernel forks and joins the
// thread pool (at::parallel_for) and allocates its output. For a prefill chunk or a batch the work
// per call dwarfs that; for one token it does not: a layer is six parallel regions of 10-50 us each,
// and two threads ran the stack only 1.4x faster than one. Here the threads enter one parallel region
// for all layers and meet at five barriers per layer:
//
//   every thread    h = rms_norm(x) (its own copy of x and h: a few hundred floats, no barrier)
//   split by rows   qkv^T = W_qkv h^T (+ bias)                                      -> barrier
//   every thread    RoPE on its copy of q and k
//   split by items  attention partials: (sequence, KV head, chunk of keys), the chunk holding the
//                   new token writes its k and v to the cache first                  -> barrier
//   every thread    merge the chunks' softmax partials into the attention output
//   split by rows   o^T = W_o a^T (+ bias)                                           -> barrier
//   every thread    x += o, h = rms_norm(x)
//   split by rows   gate and up rows of the same intermediate indices, SiLU(gate) * up -> barrier
//   split by rows   down^T = W_down act^T                                            -> barrier
//   every thread    x += down
//
// Splitting attention's keys into chunks keeps two threads busy when a step has fewer (sequence, KV
// head) pairs than threads can share evenly (one sequence of a 3-KV-head model: 3 items on 2 threads).
// The GEMM tiles are quant_gemm.h's and skinny_gemm.h's; only the split is new. Same arithmetic as the
// general path, up to float summation order (the split softmax).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "quant_gemm.h"
#include "skinny_gemm.h"

namespace tandem {

// exp, vectorisable (the compiler inlines it into simd loops): 2^n * p(r), |rel err| < 2e-7.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const float nf = (t + magic) - magic;
  const float r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t n = static_cast<int32_t>(nf);
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += n << 23;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// out[i] = weight[i] * x[i] / rms(x), for one token's row of `width`
inline void rms_norm_row(const float* x, const float* weight, int64_t width, float eps, float* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < width; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(width) + eps);
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) out[i] = weight[i] * (x[i] * r);
}

// RoPE (rotate-half pairing) on one head in place: its first 2 * half channels with cos, sin [half]
inline void rope_head(float* x, const float* cos, const float* sin, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

// KV caches hold float32 or float16 (T): float16 halves the bytes attention reads a step, and its rows
// become floats as they load. A row written to a float16 cache is rounded to nearest.
inline vf load_kv(const float* p) { return vload(p); }
inline vf load_kv(const at::Half* p) { return vload_s(p); }
inline void store_kv(float* dst, const float* src, int64_t d) { std::memcpy(dst, src, d * sizeof(float)); }
inline void store_kv(at::Half* dst, const float* src, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = at::Half(src[i]);
}

// One KV head of a paged cache [blocks, KV, B, D] as one sequence's block table reaches it: k and v
// point at the head's first row in block 0; blk is the elements per block.
template <typename T>
struct PagedHead {
  const T *k, *v;
  const int64_t* table;
  int64_t bs, d, blk;
  const T* key(int64_t p) const { return k + table[p / bs] * blk + (p % bs) * d; }
  const T* value(int64_t p) const { return v + table[p / bs] * blk + (p % bs) * d; }
};

// Rows of one KV head's keys or values in order from position p: the block table walked without a
// division per row.
template <typename T>
struct RowWalk {
  const T* base;  // the head's row 0 of block 0 in the K or V cache
  const PagedHead<T>& head;
  int64_t blk, off;
  RowWalk(const T* base, const PagedHead<T>& head, int64_t p) : base(base), head(head), blk(p / head.bs), off(p % head.bs) {}
  const T* next() {
    const T* row = base + head.table[blk] * head.blk + off * head.d;
    if (++off == head.bs) off = 0, ++blk;
    return row;
  }
};

// A block of the cache is a few KB of rows, the next one anywhere: the hardware prefetchers restart
// at each, so the kernels ask for rows this many positions ahead.
constexpr int64_t ROWS_AHEAD = 2 * VW;
template <typename T>
inline void prefetch_row(const T* row, int64_t d) {
  for (int64_t i = 0; i < d; i += 64 / sizeof(T)) _mm_prefetch(reinterpret_cast<const char*>(row + i), _MM_HINT_T0);
}

// q . key * scale for `group` query heads (rows qs1 apart) over keys [a, b): head j's scores at
// scores[j * ld + p - a], VW keys at a time, each head's VW dot products reduced together.
template <typename T>
inline void key_scores(const float* q, int64_t qs1, int64_t group, const PagedHead<T>& head, int64_t d, int64_t a,
                       int64_t b, float scale, float* scores, int64_t ld) {
  const vf sv = vsplat(scale);
  RowWalk<T> rows(head.k, head, a), ahead(head.k, head, std::min(b, a + ROWS_AHEAD));
  for (int64_t p0 = a; p0 < b; p0 += VW) {
    const int64_t n = std::min<int64_t>(VW, b - p0);
    const T* key[VW];
    for (int64_t i = 0; i < n; ++i) key[i] = rows.next();
    for (int64_t i = n; i < VW; ++i) key[i] = key[0];  // past b: computed, not stored
    for (int64_t p = p0 + ROWS_AHEAD; p < std::min(b, p0 + VW + ROWS_AHEAD); ++p)
      prefetch_row(ahead.next(), d);
    for (int64_t j = 0; j < group; ++j) {
      const float* qj = q + j * qs1;
      vf part[VW];
      const vf q0 = vload(qj);
      for (int i = 0; i < VW; ++i) part[reduce_slot(i)] = q0 * load_kv(key[i]);
      for (int64_t v = VW; v < d; v += VW) {
        const vf qv = vload(qj + v);
        for (int i = 0; i < VW; ++i) part[reduce_slot(i)] += qv * load_kv(key[i] + v);
      }
      vstore(scores + j * ld + (p0 - a), reduce_lanes(part) * sv);
    }
  }
}

// acc[j][0:d] = sum_p w[j * ld + p - a] * value[p] for G heads, SV vectors of d at a time in registers.
template <int G, int SV, typename T>
void weigh_values(const float* w, int64_t ld, const PagedHead<T>& head, int64_t d, int64_t a, int64_t b, float* part) {
  for (int64_t v0 = 0; v0 < d; v0 += SV * VW) {
    vf acc[G][SV];
    for (int j = 0; j < G; ++j)
      for (int s = 0; s < SV; ++s) acc[j][s] = vf{};
    RowWalk<T> rows(head.v, head, a), ahead(head.v, head, std::min(b, a + ROWS_AHEAD));
    for (int64_t p = a; p < b; ++p) {
      const T* value = rows.next() + v0;
      if (v0 == 0 && p + ROWS_AHEAD < b) prefetch_row(ahead.next(), d);
      vf val[SV];
      for (int s = 0; s < SV; ++s) val[s] = load_kv(value + s * VW);
      for (int j = 0; j < G; ++j) {
        const vf wj = vsplat(w[j * ld + (p - a)]);
        for (int s = 0; s < SV; ++s) acc[j][s] += wj * val[s];
      }
    }
    for (int j = 0; j < G; ++j)
      for (int s = 0; s < SV; ++s) vstore(part + j * (d + 2) + 2 + v0 + s * VW, acc[j][s]);
  }
}

// weigh_values for `group` heads: register tiles of up to 4 heads (AVX2: 2) and 4 vectors of d.
template <typename T>
inline void weigh_all(const float* w, int64_t ld, int64_t group, const PagedHead<T>& head, int64_t d, int64_t a,
                      int64_t b, float* part) {
  constexpr int GT = VW == 16 ? 4 : 2;
  const bool four = d % (4 * VW) == 0;
  for (int64_t j = 0; j < group; j += GT) {
    const float* wj = w + j * ld;
    float* pj = part + j * (d + 2);
    switch (std::min<int64_t>(GT, group - j) * 2 + four) {
      case 2: weigh_values<1, 1>(wj, ld, head, d, a, b, pj); break;
      case 3: weigh_values<1, 4>(wj, ld, head, d, a, b, pj); break;
      case 4: weigh_values<2, 1>(wj, ld, head, d, a, b, pj); break;
      case 5: weigh_values<2, 4>(wj, ld, head, d, a, b, pj); break;
      case 6: weigh_values<3, 1>(wj, ld, head, d, a, b, pj); break;
      case 7: weigh_values<3, 4>(wj, ld, head, d, a, b, pj); break;
      case 8: weigh_values<4, 1>(wj, ld, head, d, a, b, pj); break;
      default: weigh_values<4, 4>(wj, ld, head, d, a, b, pj); break;
    }
  }
}

// Softmax partials of `group` query heads (q rows qs1 floats apart) over keys [a, b) of one KV head:
// per head j, part[j * (d + 2) ...] = (max score, sum of exp, sum of exp * value [d]). The output is
// the last d floats over the second; partials of several key ranges merge by their maxima. Heads of
// whole vectors (d a multiple of VW) take the register-tiled kernels above, each key and value row
// read once for all `group` heads; others a plain loop.
template <typename T>
inline void attend_keys(const float* q, int64_t qs1, int64_t group, const PagedHead<T>& head, int64_t d, int64_t a,
                        int64_t b, float scale, std::vector<float>& scores, float* part) {
  const int64_t n_keys = b - a, ld = (n_keys + VW - 1) / VW * VW;
  const bool tiled = d % VW == 0;
  scores.resize(std::max<int64_t>(1, group * ld));
  if (tiled) {
    key_scores(q, qs1, group, head, d, a, b, scale, scores.data(), ld);
  } else {
    for (int64_t p = a; p < b; ++p) {
      const T* key = head.key(p);
      for (int64_t j = 0; j < group; ++j) scores[j * ld + (p - a)] = dot(key, q + j * qs1, d) * scale;
    }
  }
  for (int64_t j = 0; j < group; ++j) {
    float* pj = part + j * (d + 2);
    float* sj = scores.data() + j * ld;
    float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
    for (int64_t i = 0; i < n_keys; ++i) mx = std::max(mx, sj[i]);
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n_keys; ++i) {
      sj[i] = fast_exp(sj[i] - mx);
      sum += sj[i];
    }
    pj[0] = mx, pj[1] = sum;
  }
  if (tiled) {
    weigh_all(scores.data(), ld, group, head, d, a, b, part);
    return;
  }
  for (int64_t j = 0; j < group; ++j) std::fill(part + j * (d + 2) + 2, part + j * (d + 2) + 2 + d, 0.f);
  for (int64_t p = a; p < b; ++p) {
    const T* value = head.value(p);
    for (int64_t j = 0; j < group; ++j) {
      const float w = scores[j * ld + (p - a)];
      float* acc = part + j * (d + 2) + 2;
      for (int64_t i = 0; i < d; ++i) acc[i] += w * scalar(value[i]);
    }
  }
}

// One projection as forward_layers' weights give it: a float W [N, K], or integers (int8 [N, K] or
// nibbles [N, K/2]) with scales and offsets [N, K/group], all float16 or all float32.
struct Proj {
  const void* w = nullptr;
  const void* scales = nullptr;
  const void* offsets = nullptr;
  const float* bias = nullptr;
  int64_t n = 0, k = 0, bits = 0, group = 0;  // bits 0: float
  bool half = false;
  bool rows16 = false;  // w in quant_gemm.h's rows16 layout (a copy the stack made)

  // Weight rows per register tile for m tokens: a thread's share is whole tiles (rows16: whole blocks).
  int64_t tile(int64_t m) const {
    if (rows16) return 16;
    switch (m) {
      case 1: return bits ? quant_r<1>() : dot_r<1>();
      case 2: return bits ? quant_r<2>() : dot_r<2>();
      case 3: return bits ? quant_r<3>() : dot_r<3>();
      default: return bits ? quant_r<4>() : dot_r<4>();
    }
  }
};

// Rows [lo, hi) of n, in whole tiles, for thread t of nt.
struct Share {
  int64_t lo, hi;
  Share(int64_t n, int64_t tile, int t, int nt) {
    const int64_t tiles = (n + tile - 1) / tile;
    lo = std::min(n, tiles * t / nt * tile);
    hi = std::min(n, tiles * (t + 1) / nt * tile);
  }
};

// A thread's x for one projection: float tiles read prepare_x's layout, integer tiles an int8 copy.
struct PreparedX {
  const float* rows = nullptr;  // [M, K] (float W)
  XFloat xf{};
#ifdef TANDEM_INT8_X
  XInt8 xq;
  bool int8 = false;
#endif
};

struct DecodeStep {
  // shapes: M tokens (one per sequence), C hidden, H query and KV heads of D, I intermediate
  int64_t m, c, h, kv, d, inter, rot_half, bs, max_blocks;
  float scale, eps;
  bool int8_x;
  // the model's, read once when it is handed to the kernels (cpu_kernels.cpp's LayerStack)
  int64_t n_layers;
  const Proj* projs;                 // per layer: qkv, o, gate_up, down
  const float* const* norms;         // per layer: input, post-attention
  void* const* kc;                   // per layer: caches [blocks, KV, B, D], float or float16
  void* const* vc;
  bool half_kv = false;
  const int64_t* windows;            // per layer
  // some row attends to another's new key (a speculative step's rows of one sequence: each sees the
  // ones before it), so every row's k and v go into the cache, and a barrier, before attention
  bool rows_share_keys = false;
  const float *x_in, *final_norm, *cos, *sin;  // x_in [M, C]; cos, sin [M, rot_half]
  const int64_t *slots, *tables, *lens;        // [M], [M, max_blocks], [M]
  std::vector<int64_t> chunks;       // per sequence: key chunks attention splits into
  std::vector<int64_t> item_start;   // per (sequence, KV head): its first attention item
  int64_t n_items = 0;
  // shared between the threads: each writes its own rows, all read after a barrier
  std::vector<float> qkv_t, o_t, gu_t, act_t, down_t, partials;
  float* out;  // [M, C]: the final-normed hidden states, or
  const Proj* head = nullptr;  // with an LM head: its output y^T [V, M] (the logits) instead
  float* logits_t = nullptr;

  // (int8 x only where asked for, and never for the LM head: its rounding lands on the logits directly)
  void prepare(const Proj& p, const float* rows, PreparedX& px, std::vector<float>& buf) const {
    px.rows = rows;
    if (!p.bits) return;
#ifdef TANDEM_INT8_X
    const int planes = int8_x && &p != head && int8_x_ok(p.bits, p.group, p.k) ? 1 : int24_planes(p.bits, p.group, p.k, m);
    px.int8 = planes > 0;
    if (px.int8) {
      quantize_x(rows, m, p.k, p.group, p.bits, px.xq, planes);
      return;
    }
#endif
    buf.resize(x_floats(m, p.k, p.group, p.bits));
    px.xf = prepare_x(rows, m, p.k, p.group, p.bits, buf.data());
  }

  // y^T rows [lo, hi) of x @ W^T (+ bias): yt [N, M]
  void gemm(const Proj& p, const PreparedX& px, float* yt, int64_t lo, int64_t hi) const {
    if (lo >= hi) return;
    for_rows(m, [&](auto rows) {
      constexpr int M = decltype(rows)::value;
      if (!p.bits) {
        dot_range<M>(static_cast<const float*>(p.w), p.k, px.rows, yt, lo, hi);
      } else if (p.half) {
        gemm_as<M>(p, px, static_cast<const at::Half*>(p.scales), static_cast<const at::Half*>(p.offsets), yt, lo, hi);
      } else {
        gemm_as<M>(p, px, static_cast<const float*>(p.scales), static_cast<const float*>(p.offsets), yt, lo, hi);
      }
    });
    if (p.bias)
      for (int64_t n = lo; n < hi; ++n)
        for (int64_t t = 0; t < m; ++t) yt[n * m + t] += p.bias[n];
  }

  template <int M, typename S>
  void gemm_as(const Proj& p, const PreparedX& px, const S* s, const S* o, float* yt, int64_t lo, int64_t hi) const {
    const auto* q = static_cast<const uint8_t*>(p.w);
    const int64_t row_bytes = p.bits == 8 ? p.k : p.k / 2;
#ifdef TANDEM_INT8_X
    if (px.int8) {
      if (p.bits == 8) int8_range<M, 8>(q, row_bytes, s, o, p.k, p.group, px.xq, yt, lo, hi);
      else int8_range<M, 4>(q, row_bytes, s, o, p.k, p.group, px.xq, yt, lo, hi, p.rows16);
      return;
    }
#endif
    if (p.bits == 8) quant_range<M, 8>(q, row_bytes, s, o, p.k, p.group, px.xf.xs, px.xf.ldx, px.xf.gsum, yt, lo, hi);
    else quant_range<M, 4>(q, row_bytes, s, o, p.k, p.group, px.xf.xs, px.xf.ldx, px.xf.gsum, yt, lo, hi);
  }

  // this thread's share of y^T = W x^T (+ bias), x rows [M, K]
  void project(const Proj& p, const float* x, float* yt, PreparedX& px, std::vector<float>& buf, int tid,
               int nt) const {
    prepare(p, x, px, buf);
    const Share share(p.n, p.tile(m), tid, nt);
    gemm(p, px, yt, share.lo, share.hi);
  }

  // x [M, C] += y^T's transpose (the residual)
  void add_rows(const float* y_t, float* x) const {
    for (int64_t t = 0; t < m; ++t)
      for (int64_t j = 0; j < c; ++j) x[t * c + j] += y_t[j * m + t];
  }

  // dst [M, N] = src^T for src [N, M]
  void rows_of(const float* src_t, int64_t n, float* dst) const {
    for (int64_t t = 0; t < m; ++t)
      for (int64_t j = 0; j < n; ++j) dst[t * n + j] = src_t[j * m + t];
  }

  // row t's k and v of KV head g into its cache slot
  void write_kv(int64_t l, int64_t t, int64_t g, const float* qkv) const {
    const int64_t width = (h + 2 * kv) * d, row = bs * d;
    const float* qrow = qkv + t * width;
    const int64_t slot = slots[t], dst = ((slot / bs) * kv + g) * row + (slot % bs) * d;
    if (half_kv) {
      store_kv(static_cast<at::Half*>(kc[l]) + dst, qrow + (h + g) * d, d);
      store_kv(static_cast<at::Half*>(vc[l]) + dst, qrow + (h + kv + g) * d, d);
    } else {
      store_kv(static_cast<float*>(kc[l]) + dst, qrow + (h + g) * d, d);
      store_kv(static_cast<float*>(vc[l]) + dst, qrow + (h + kv + g) * d, d);
    }
  }

  // Attention item `item` of layer l: one sequence's KV head over one chunk of its keys, for the
  // group's query heads (roped q in qkv rows). Writes per query head (max score, sum of exp, sum of
  // exp * v [D]) to partials. The chunk ending at the new token writes its k and v to the cache first,
  // unless rows read each other's keys (written before the attention then).
  void attend(int64_t l, int64_t item, const float* qkv, std::vector<float>& scores) {
    int64_t t = 0;
    while (t + 1 < m && item_start[(t + 1) * kv] <= item) ++t;
    const int64_t g = (item - item_start[t * kv]) / chunks[t], ch = (item - item_start[t * kv]) % chunks[t];
    const int64_t len = lens[t], first = windows[l] > 0 ? std::max<int64_t>(0, len - windows[l]) : 0;
    const int64_t keys = len - first, a = first + keys * ch / chunks[t], b = first + keys * (ch + 1) / chunks[t];
    const int64_t width = (h + 2 * kv) * d, group = h / kv, row = bs * d, blk = kv * row;
    const float* qrow = qkv + t * width;
    const int64_t* table = tables + t * max_blocks;
    if (b == len && !rows_share_keys) write_kv(l, t, g, qkv);  // the new token's k and v into its slot
    float* part = partials.data() + (item * group) * (d + 2);
    if (half_kv) {
      const auto *k = static_cast<const at::Half*>(kc[l]), *v = static_cast<const at::Half*>(vc[l]);
      attend_keys(qrow + g * group * d, d, group, PagedHead<at::Half>{k + g * row, v + g * row, table, bs, d, blk}, d,
                  a, b, scale, scores, part);
    } else {
      const auto *k = static_cast<const float*>(kc[l]), *v = static_cast<const float*>(vc[l]);
      attend_keys(qrow + g * group * d, d, group, PagedHead<float>{k + g * row, v + g * row, table, bs, d, blk}, d, a,
                  b, scale, scores, part);
    }
  }

  // attention output rows [M, H * D] from the items' partials
  void merge(float* attn) const {
    const int64_t group = h / kv;
    for (int64_t t = 0; t < m; ++t)
      for (int64_t head = 0; head < h; ++head) {
        const int64_t g = head / group, j = head % group, first = item_start[t * kv] + g * chunks[t];
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < chunks[t]; ++c) {
          const float* pc = partials.data() + ((first + c) * group + j) * (d + 2);
          if (pc[1] > 0.f) mx = std::max(mx, pc[0]);
        }
        float* o = attn + t * h * d + head * d;
        std::fill(o, o + d, 0.f);
        float denom = 0.f;
        for (int64_t c = 0; c < chunks[t]; ++c) {
          const float* pc = partials.data() + ((first + c) * group + j) * (d + 2);
          if (!(pc[1] > 0.f)) continue;
          const float w = fast_exp(pc[0] - mx);
          denom += w * pc[1];
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) o[i] += w * pc[2 + i];
        }
        const float inv = 1.f / denom;
        for (int64_t i = 0; i < d; ++i) o[i] *= inv;
      }
  }

  // RoPE (rotate-half pairing over the first 2 * rot_half channels) on every q and k head of qkv rows
  void rope(float* qkv) const {
    const int64_t width = (h + 2 * kv) * d;
    for (int64_t t = 0; t < m; ++t) {
      const float* ct = cos + t * rot_half;
      const float* st = sin + t * rot_half;
      for (int64_t head = 0; head < h + kv; ++head) rope_head(qkv + t * width + head * d, ct, st, rot_half);
    }
  }

  void run(int tid, int nt) {
    const int64_t width = (h + 2 * kv) * d;
    std::vector<float> x(x_in, x_in + m * c), hn(m * c), qkv(m * width), attn(m * h * d), act(m * inter);
    std::vector<float> buf, scores;
    PreparedX px;
    for (int64_t l = 0; l < n_layers; ++l) {
      const Proj* p = projs + 4 * l;
      for (int64_t t = 0; t < m; ++t) rms_norm_row(x.data() + t * c, norms[2 * l], c, eps, hn.data() + t * c);
      project(p[0], hn.data(), qkv_t.data(), px, buf, tid, nt);
#pragma omp barrier
      rows_of(qkv_t.data(), width, qkv.data());
      rope(qkv.data());
      if (rows_share_keys) {  // every row's k and v in the cache before any row attends
        for (int64_t t = tid; t < m; t += nt)
          for (int64_t g = 0; g < kv; ++g) write_kv(l, t, g, qkv.data());
#pragma omp barrier
      }
      for (int64_t i = n_items * tid / nt; i < n_items * (tid + 1) / nt; ++i) attend(l, i, qkv.data(), scores);
#pragma omp barrier
      merge(attn.data());
      project(p[1], attn.data(), o_t.data(), px, buf, tid, nt);
#pragma omp barrier
      add_rows(o_t.data(), x.data());
      for (int64_t t = 0; t < m; ++t) rms_norm_row(x.data() + t * c, norms[2 * l + 1], c, eps, hn.data() + t * c);
      prepare(p[2], hn.data(), px, buf);
      const Share is(inter, p[2].tile(m), tid, nt);  // the same intermediate indices of gate and up
      gemm(p[2], px, gu_t.data(), is.lo, is.hi);
      gemm(p[2], px, gu_t.data(), inter + is.lo, inter + is.hi);
      for (int64_t i = is.lo * m; i < is.hi * m; ++i) {
        const float g = gu_t[i];
        act_t[i] = g / (1.f + fast_exp(-g)) * gu_t[inter * m + i];
      }
#pragma omp barrier
      rows_of(act_t.data(), inter, act.data());
      project(p[3], act.data(), down_t.data(), px, buf, tid, nt);
#pragma omp barrier
      add_rows(down_t.data(), x.data());
    }
    if (head) {  // every thread normalises its own copy, then computes its share of the head's rows
      for (int64_t t = 0; t < m; ++t) rms_norm_row(x.data() + t * c, final_norm, c, eps, hn.data() + t * c);
      project(*head, hn.data(), logits_t, px, buf, tid, nt);
    } else if (tid == 0) {
      for (int64_t t = 0; t < m; ++t) rms_norm_row(x.data() + t * c, final_norm, c, eps, out + t * c);
    }
  }
};

}  // namespace tandem
