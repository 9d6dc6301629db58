// CPU routing kernel: one token per iteration of an at::parallel_for, fp32 math, then a tiled
// stable counting sort for the expert permutation (same tiling as the CUDA kernel).
#include <ATen/Parallel.h>
#include "../common/cpu_dispatch.h"

#include <cmath>
#include <limits>
#include <vector>

#include "routing.h"

namespace upsafe {
namespace routing {
namespace {

// Selection order: NaN first, then larger value, ties -> lower expert index.
inline bool ranks_before(float a, int ia, float b, int ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

inline float temperature_of(const float* tok, float scalar, long long t) {
  return tok ? tok[t] : scalar;
}

// Scaled logits s_e = (z_e + b_e) / tau into `s`, softmax into `prob`.
template <typename scalar_t>
void scaled_softmax_row(const scalar_t* row, const float* bias_row, float tau, int E, float* s,
                        float* prob) {
  float m = -std::numeric_limits<float>::infinity();
  bool any_nan = false;
  for (int e = 0; e < E; ++e) {
    float z = static_cast<float>(row[e]) + (bias_row ? bias_row[e] : 0.f);
    s[e] = z / tau;
    if (std::isnan(s[e])) any_nan = true;
    m = s[e] > m ? s[e] : m;
  }
  if (any_nan) m = std::numeric_limits<float>::quiet_NaN();
  float sum = 0.f;
  for (int e = 0; e < E; ++e) {
    prob[e] = std::exp(s[e] - m);
    sum += prob[e];
  }
  const float inv = 1.f / sum;
  for (int e = 0; e < E; ++e) prob[e] *= inv;
}

template <typename scalar_t>
void route_tokens(const RouteParams& p) {
  const auto* logits = static_cast<const scalar_t*>(p.logits);
  const int E = p.E, k = p.k;
  at::parallel_for(0, p.T, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> s(E), prob(E);
    for (int64_t t = begin; t < end; ++t) {
      const float* brow = p.bias ? p.bias + t * p.bias_token_stride : nullptr;
      scaled_softmax_row(logits + t * E, brow, temperature_of(p.temperature_tok, p.temperature, t),
                         E, s.data(), prob.data());
      // one pass keeping the k best in order (insertion): most experts are rejected by a single
      // comparison with the current k-th, so this is O(E) instead of O(k*E)
      int best_i[kMaxTopK];
      float best_s[kMaxTopK];
      int n = 0;
      for (int e = 0; e < E; ++e) {
        if (n == k && !ranks_before(s[e], e, best_s[k - 1], best_i[k - 1])) continue;
        int pos = n < k ? n++ : k - 1;
        while (pos > 0 && ranks_before(s[e], e, best_s[pos - 1], best_i[pos - 1])) {
          best_s[pos] = best_s[pos - 1];
          best_i[pos] = best_i[pos - 1];
          --pos;
        }
        best_s[pos] = s[e];
        best_i[pos] = e;
      }
      int sel[kMaxTopK];
      float w[kMaxTopK];
      float kept_sum = 0.f;
      for (int j = 0; j < k; ++j) {
        const int best = best_i[j];
        const bool keep = (j == 0) || !(prob[best] < p.min_weight);
        sel[j] = keep ? best : -1;
        w[j] = keep ? prob[best] : 0.f;
        kept_sum += w[j];
      }
      const float scale = p.renormalize ? 1.f / kept_sum : 1.f;
      for (int j = 0; j < k; ++j) {
        p.experts[t * k + j] = sel[j];
        p.weights[t * k + j] = sel[j] >= 0 ? w[j] * scale : 0.f;
      }
    }
  });
}

// Stable counting sort of the T*k slots by expert; dropped slots (expert -1) form bucket E.
void build_permutation(const RouteParams& p) {
  const int E = p.E, k = p.k, B = E + 1;
  const long long T = p.T;
  const long long n_tiles = (T + kTileTokens - 1) / kTileTokens;
  std::vector<int32_t> hist(n_tiles * B, 0);
  at::parallel_for(0, n_tiles, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t tile = b0; tile < b1; ++tile) {
      const long long s0 = tile * kTileTokens * k, s1 = std::min<long long>(T, (tile + 1) * kTileTokens) * k;
      for (long long s = s0; s < s1; ++s) {
        const int e = p.experts[s];
        ++hist[tile * B + (e < 0 ? E : e)];
      }
    }
  });
  // tile bases: bucket start + counts of earlier tiles
  std::vector<long long> running(B, 0);
  for (int e = 0; e < B; ++e)
    for (long long tile = 0; tile < n_tiles; ++tile) running[e] += hist[tile * B + e];
  long long acc = 0;
  for (int e = 0; e < E; ++e) {
    p.counts[e] = static_cast<int32_t>(running[e]);
    acc += running[e];
    p.offsets[e] = static_cast<int32_t>(acc);
  }
  std::vector<long long> base(n_tiles * B);
  long long start = 0;
  for (int e = 0; e < B; ++e) {
    long long pos = start;
    for (long long tile = 0; tile < n_tiles; ++tile) {
      base[tile * B + e] = pos;
      pos += hist[tile * B + e];
    }
    start = pos;
  }
  at::parallel_for(0, n_tiles, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t tile = b0; tile < b1; ++tile) {
      long long* bb = base.data() + tile * B;
      const long long s0 = tile * kTileTokens * k, s1 = std::min<long long>(T, (tile + 1) * kTileTokens) * k;
      for (long long s = s0; s < s1; ++s) {
        const int e = p.experts[s];
        const long long pos = bb[e < 0 ? E : e]++;
        p.permutation[pos] = static_cast<int32_t>(s);
        p.inverse[s] = static_cast<int32_t>(pos);
      }
    }
  });
}

template <typename scalar_t>
void route_backward_tokens(const RouteBackwardParams& p) {
  const auto* logits = static_cast<const scalar_t*>(p.logits);
  const int E = p.E, k = p.k;
  at::parallel_for(0, p.T, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> s(E), prob(E);
    for (int64_t t = begin; t < end; ++t) {
      const float tau = temperature_of(p.temperature_tok, p.temperature, t);
      float* g_out = p.grad_logits + t * E;
      const float* g = p.grad_weights + t * k;
      const int32_t* ex = p.experts + t * k;
      std::fill(g_out, g_out + E, 0.f);
      if (p.renormalize) {
        const float* w = p.weights + t * k;
        float dot = 0.f;
        for (int j = 0; j < k; ++j)
          if (ex[j] >= 0) dot += g[j] * w[j];
        for (int j = 0; j < k; ++j)
          if (ex[j] >= 0) g_out[ex[j]] = w[j] * (g[j] - dot) / tau;
      } else {
        const float* brow = p.bias ? p.bias + t * p.bias_token_stride : nullptr;
        scaled_softmax_row(logits + t * E, brow, tau, E, s.data(), prob.data());
        float dot = 0.f;
        for (int j = 0; j < k; ++j)
          if (ex[j] >= 0) dot += g[j] * prob[ex[j]];
        for (int e = 0; e < E; ++e) g_out[e] = -prob[e] * dot / tau;
        for (int j = 0; j < k; ++j)
          if (ex[j] >= 0) g_out[ex[j]] += prob[ex[j]] * g[j] / tau;
      }
    }
  });
}

}  // namespace

void route_cpu(const RouteParams& p) {
  if (p.T == 0) {
    for (int e = 0; e < p.E; ++e) p.counts[e] = p.offsets[e] = 0;
    return;
  }
  dispatch_cpu(p.dtype, [&](auto tag) { route_tokens<decltype(tag)>(p); });
  build_permutation(p);
}

void route_backward_cpu(const RouteBackwardParams& p) {
  if (p.T == 0) return;
  dispatch_cpu(p.dtype, [&](auto tag) { route_backward_tokens<decltype(tag)>(p); });
}

}  // namespace routing
}  // namespace upsafe
