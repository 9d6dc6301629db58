// ESI CPU kernels: the same tile table as CUDA, parallel over tiles, per-range histograms and
// candidate lists merged under a lock (counts are order-independent; candidates are sorted later).
#include <ATen/Parallel.h>
#include "../common/cpu_dispatch.h"

#include <cmath>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "esi.h"

namespace upsafe {
namespace esi {
namespace {

inline uint32_t score_key(float s, bool invert) {
  uint32_t b;
  std::memcpy(&b, &s, 4);
  b &= 0x7fffffffu;
  return invert ? 0x7fffffffu - b : b;
}

}  // namespace

void accumulate_cpu(const MultiParams& p, const TensorMeta* metas) {
  const bool hist = p.finalize || p.hist != nullptr;
  const int mode = p.finalize ? 1 : (hist ? 2 : 0);
  std::mutex mu;
  dispatch_cpu(p.grad_dtype, [&](auto tag) {
    using G = decltype(tag);
    at::parallel_for(0, p.total_tiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<unsigned long long> local(hist ? kBins : 0, 0);
      for (int64_t tile = t0; tile < t1; ++tile) {
        const TensorMeta& m = metas[tile_owner(metas, p.n_tensors, tile)];
        const long long e0 = (tile - m.tile_begin) * kTile, e1 = std::min<long long>(e0 + kTile, m.n);
        const G* g = static_cast<const G*>(m.grad);
        for (long long i = e0; i < e1; ++i) {
          float v = m.acc[i];
          if (mode != 2) {
            v += static_cast<float>(g[i]);
            if (mode == 1) v = m.sigma * std::fabs(v);
            m.acc[i] = v;
          }
          if (hist) ++local[score_key(v, p.invert) >> kBinShift];
        }
      }
      if (hist) {
        std::lock_guard<std::mutex> lock(mu);
        for (int b = 0; b < kBins; ++b) p.hist[b] += local[b];
      }
    });
  });
}

void select_cpu(const MultiParams& p, const TensorMeta* metas) {
  std::mutex mu;
  at::parallel_for(0, p.total_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<unsigned long long> cands;
    for (int64_t tile = t0; tile < t1; ++tile) {
      const TensorMeta& m = metas[tile_owner(metas, p.n_tensors, tile)];
      const long long e0 = (tile - m.tile_begin) * kTile, e1 = std::min<long long>(e0 + kTile, m.n);
      for (long long i = e0; i < e1; ++i) {
        const uint32_t key = score_key(m.acc[i], p.invert);
        const int bin = static_cast<int>(key >> kBinShift);
        m.mask[i] = bin > p.threshold_bin;
        if (bin == p.threshold_bin)
          cands.push_back((static_cast<unsigned long long>(kLowMask - (key & kLowMask)) << 40) |
                          static_cast<unsigned long long>(m.elem_begin + i));
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    for (auto c : cands) {
      const unsigned long long slot = (*p.cand_count)++;
      if (static_cast<long long>(slot) < p.cand_capacity) p.cand_keys[slot] = c;
    }
  });
}

void mark_cpu(const MarkParams& p) {
  for (long long j = 0; j < p.n; ++j) {
    const long long g = p.indices[j];
    const int t = owner<true>(p.metas, p.n_tensors, g);
    p.metas[t].mask[g - p.metas[t].elem_begin] = 1;
  }
}

void sparse_adamw_cpu(const AdamParams& p, const AdamMeta* metas) {
  dispatch_cpu(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, p.total_tiles, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t tile = t0; tile < t1; ++tile) {
        const AdamMeta& m = metas[tile_owner(metas, p.n_tensors, tile)];
        const long long e0 = (tile - m.tile_begin) * kTile, e1 = std::min<long long>(e0 + kTile, m.n);
        T* param = static_cast<T*>(m.param);
        const T* grad = static_cast<const T*>(m.grad);
        for (long long j = e0; j < e1; ++j) {
          const long long i = m.idx[j];
          const float g = static_cast<float>(grad[i]);
          const float mm = p.beta1 * m.m[j] + (1.f - p.beta1) * g;
          const float vv = p.beta2 * m.v[j] + (1.f - p.beta2) * g * g;
          m.m[j] = mm;
          m.v[j] = vv;
          float w = m.master[j] * (1.f - p.lr * p.weight_decay);
          w -= p.lr * (mm / p.bias_c1) / (std::sqrt(vv / p.bias_c2) + p.eps);
          m.master[j] = w;
          param[i] = static_cast<T>(w);
        }
      }
    });
  });
}

}  // namespace esi
}  // namespace upsafe
