// CPU versions of the grouped-MLP row stages: parallel over rows/tokens, fp32 math, the same
// formulas (activation_math.h) and summation order as the CUDA kernels.
#include <ATen/Parallel.h>
#include "../common/cpu_dispatch.h"

#include <stdexcept>

#include "activation_math.h"
#include "grouped_mlp.h"

namespace upsafe {
namespace grouped_mlp {
namespace {

inline int chunk_start(const int32_t* offsets, int e_begin) { return e_begin > 0 ? offsets[e_begin - 1] : 0; }

inline int expert_of_pos(const int32_t* offsets, int lo, int hi, int pos) {
  while (lo < hi - 1) {
    const int mid = (lo + hi - 1) / 2;
    if (offsets[mid] > pos) hi = mid + 1; else lo = mid + 1;
  }
  return lo;
}

inline int chunk_of_expert(const ChunkLayout& L, int e) {
  int c = 0;
  for (int i = 1; i < L.n_chunks; ++i)
    if (e >= L.first_expert[i]) c = i;
  return c;
}

}  // namespace

void gather_cpu(const GatherParams& p) {
  const int start = chunk_start(p.offsets, p.e_begin);
  const int count = p.offsets[p.e_end - 1] - start;
  if (p.rel_offsets)
    for (int e = p.e_begin; e < p.e_end; ++e) p.rel_offsets[e - p.e_begin] = p.offsets[e] - start;
  dispatch_cpu(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(p.x);
    T* out = static_cast<T*>(p.out);
    at::parallel_for(0, count, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int slot = p.permutation[start + r];
        const T* src = x + static_cast<long long>(slot / p.k) * p.H;
        T* dst = out + r * p.H;
        if (p.scale) {
          const float s = p.scale[slot];
          for (int c = 0; c < p.H; ++c) dst[c] = static_cast<T>(static_cast<float>(src[c]) * s);
        } else {
          std::copy(src, src + p.H, dst);
        }
      }
    });
  });
}

void activation_cpu(const ActParams& p) {
  const int start = chunk_start(p.offsets, p.e_begin);
  const int count = p.offsets[p.e_end - 1] - start;
  const int W = p.gated ? 2 * p.I : p.I;
  const int act = static_cast<int>(p.act);
  dispatch_cpu(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* h = static_cast<const T*>(p.h);
    const T* bias = static_cast<const T*>(p.bias);
    const T* ga = static_cast<const T*>(p.grad_a);
    T* a = static_cast<T*>(p.a);
    T* gh = static_cast<T*>(p.grad_h);
    at::parallel_for(0, count, 4, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* brow = bias ? bias + (long long)(expert_of_pos(p.offsets, p.e_begin, p.e_end, start + r) - p.e_begin) * W
                             : nullptr;
        const T* hrow = h + r * W;
        for (int c = 0; c < p.I; ++c) {
          const float gv = static_cast<float>(hrow[c]) + (brow ? static_cast<float>(brow[c]) : 0.f);
          const float fg = act_fwd(act, gv);
          const float uv = p.gated ? static_cast<float>(hrow[p.I + c]) + (brow ? static_cast<float>(brow[p.I + c]) : 0.f)
                                   : 1.f;
          a[r * p.I + c] = static_cast<T>(fg * uv);
          if (ga) {
            const float d = static_cast<float>(ga[r * p.I + c]);
            gh[r * W + c] = static_cast<T>(d * uv * act_grad(act, gv));
            if (p.gated) gh[r * W + p.I + c] = static_cast<T>(d * fg);
          }
        }
      }
    });
  });
}

void combine_cpu(const CombineParams& p) {
  dispatch_cpu(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* out = static_cast<T*>(p.out);
    at::parallel_for(0, p.T, 8, [&](int64_t t0, int64_t t1) {
      std::vector<float> acc(p.H);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int j = 0; j < p.k; ++j) {
          const long long slot = t * p.k + j;
          const int e = p.experts[slot];
          if (e < 0) continue;
          const int c = chunk_of_expert(p.layout, e);
          const int e0 = p.layout.first_expert[c];
          const T* row = static_cast<const T*>(p.rows[c]) + (p.inverse[slot] - chunk_start(p.offsets, e0)) * (long long)p.H;
          const T* b = p.bias[c] ? static_cast<const T*>(p.bias[c]) + (long long)(e - e0) * p.H : nullptr;
          const float w = p.weights ? p.weights[slot] : 1.f;
          for (int h = 0; h < p.H; ++h)
            acc[h] += w * (static_cast<float>(row[h]) + (b ? static_cast<float>(b[h]) : 0.f));
        }
        for (int h = 0; h < p.H; ++h) out[t * p.H + h] = static_cast<T>(acc[h]);
      }
    });
  });
}

void slot_dot_cpu(const SlotDotParams& p) {
  dispatch_cpu(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, p.T * p.k, 16, [&](int64_t s0, int64_t s1) {
      for (int64_t slot = s0; slot < s1; ++slot) {
        const int e = p.experts[slot];
        float acc = 0.f;
        if (e >= 0) {
          const int c = chunk_of_expert(p.layout, e);
          const int e0 = p.layout.first_expert[c];
          const T* y = static_cast<const T*>(p.rows[c]) + (p.inverse[slot] - chunk_start(p.offsets, e0)) * (long long)p.H;
          const T* b = p.bias[c] ? static_cast<const T*>(p.bias[c]) + (long long)(e - e0) * p.H : nullptr;
          const T* g = static_cast<const T*>(p.grad_out) + (slot / p.k) * p.H;
          for (int h = 0; h < p.H; ++h)
            acc += static_cast<float>(g[h]) * (static_cast<float>(y[h]) + (b ? static_cast<float>(b[h]) : 0.f));
        }
        p.grad_weights[slot] = acc;
      }
    });
  });
}

void segment_sum_cpu(const SegmentSumParams& p) {
  const int start = chunk_start(p.offsets, p.e_begin);
  dispatch_cpu(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(p.g);
    for (int e = p.e_begin; e < p.e_end; ++e) {
      const int r0 = (e > 0 ? p.offsets[e - 1] : 0) - start, r1 = p.offsets[e] - start;
      float* out = p.out + (long long)(e - p.e_begin) * p.W;
      std::fill(out, out + p.W, 0.f);
      for (int r = r0; r < r1; ++r)
        for (int c = 0; c < p.W; ++c) out[c] += static_cast<float>(g[(long long)r * p.W + c]);
    }
  });
}

}  // namespace grouped_mlp
}  // namespace upsafe
