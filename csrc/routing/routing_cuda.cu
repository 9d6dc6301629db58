// CUDA routing: a sub-warp of LANES threads per token holds the token's logits in registers
// (VPT values per lane), shuffle reductions for softmax and top-k, and a shared-memory expert
// histogram fused in. A second kernel turns the per-tile histograms into the stable permutation.
// Three launches in all (memset, route, permute); no host synchronisation.
#include <cub/block/block_scan.cuh>

#include <cfloat>
#include <climits>

#include "../common/cuda_utils.cuh"
#include "routing.h"

namespace upsafe {
namespace routing {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ bool ranks_before(float a, int ia, float b, int ib) {
  // NaN first, then larger, ties -> lower index; ib == INT_MAX means "nothing yet".
  if (ib == INT_MAX) return ia != INT_MAX;
  if (ia == INT_MAX) return false;
  const bool na = isnan(a), nb = isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

template <int LANES>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int off = LANES / 2; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off, LANES));
  return v;
}
template <int LANES>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int off = LANES / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off, LANES);
  return v;
}
template <int LANES>
__device__ __forceinline__ int group_or(int v) {
#pragma unroll
  for (int off = LANES / 2; off > 0; off /= 2) v |= __shfl_xor_sync(0xffffffffu, v, off, LANES);
  return v;
}

// Loads one token's scaled logits s = (z + b) / tau into registers and returns the softmax
// statistics (max m, sum of exp(s - m)); invalid lanes/values hold -inf and index INT_MAX.
template <typename scalar_t, int VPT, int LANES>
__device__ __forceinline__ void load_scaled(const scalar_t* __restrict__ logits, const float* bias,
                                            long long bias_stride, float tau, long long t, int E,
                                            int lane, bool active, float (&s)[VPT], float& m,
                                            float& sum) {
  float mx = -INFINITY;
  int nan_flag = 0;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int e = v * LANES + lane;
    if (active && e < E) {
      float z = to_float(logits[t * E + e]);
      if (bias) z += bias[t * bias_stride + e];
      s[v] = z / tau;
      nan_flag |= isnan(s[v]);
      mx = fmaxf(mx, s[v]);
    } else {
      s[v] = -INFINITY;
    }
  }
  mx = group_max<LANES>(mx);
  if (group_or<LANES>(nan_flag)) mx = NAN;
  float acc = 0.f;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int e = v * LANES + lane;
    if (active && e < E) acc += __expf(s[v] - mx);
  }
  m = mx;
  sum = group_sum<LANES>(acc);
}

template <typename scalar_t, int VPT, int LANES>
__global__ void __launch_bounds__(kThreads) route_kernel(RouteParams p, int32_t* __restrict__ tile_hist) {
  constexpr int GROUPS = kThreads / LANES;
  __shared__ int s_hist[kMaxExperts + 1];
  const int E = p.E, k = p.k;
  for (int i = threadIdx.x; i <= E; i += kThreads) s_hist[i] = 0;
  __syncthreads();

  const int lane = threadIdx.x % LANES;
  const long long t = (long long)blockIdx.x * GROUPS + threadIdx.x / LANES;
  const bool active = t < p.T;
  const float tau = (active && p.temperature_tok) ? p.temperature_tok[t] : p.temperature;

  float s[VPT], m, sum;
  load_scaled<scalar_t, VPT, LANES>(static_cast<const scalar_t*>(p.logits), p.bias, p.bias_token_stride,
                                    tau, t, E, lane, active, s, m, sum);
  const float inv_sum = 1.f / sum;

  unsigned taken = 0;
  int sel[kMaxTopK];
  float prob[kMaxTopK];
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j) {
    sel[j] = -1;
    prob[j] = 0.f;
    if (j < k) {
      float bv = -INFINITY;
      int bi = INT_MAX;
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
        const int e = v * LANES + lane;
        if (e < E && !(taken & (1u << v)) && ranks_before(s[v], e, bv, bi)) { bv = s[v]; bi = e; }
      }
#pragma unroll
      for (int off = LANES / 2; off > 0; off /= 2) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, off, LANES);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, off, LANES);
        if (ranks_before(ov, oi, bv, bi)) { bv = ov; bi = oi; }
      }
      if (bi != INT_MAX && bi % LANES == lane) taken |= 1u << (bi / LANES);
      const float pj = __expf(bv - m) * inv_sum;
      const bool keep = (j == 0) || !(pj < p.min_weight);
      sel[j] = keep ? bi : -1;
      prob[j] = keep ? pj : 0.f;
    }
  }
  if (active && lane == 0) {
    float kept = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j) kept += prob[j];
    const float scale = p.renormalize ? 1.f / kept : 1.f;
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j) {
      if (j < k) {
        p.experts[t * k + j] = sel[j];
        p.weights[t * k + j] = sel[j] >= 0 ? prob[j] * scale : 0.f;
        atomicAdd(&s_hist[sel[j] >= 0 ? sel[j] : E], 1);
      }
    }
  }
  __syncthreads();
  const long long tile = ((long long)blockIdx.x * GROUPS) / kTileTokens;
  for (int i = threadIdx.x; i <= E; i += kThreads)
    if (s_hist[i]) atomicAdd(&tile_hist[tile * (E + 1) + i], s_hist[i]);
}

// One block per tile of kTileTokens tokens: bucket bases from the tile histograms, then a stable
// scatter of the tile's slots, each warp owning a contiguous run and ranking peers by match_any.
__global__ void __launch_bounds__(kThreads) permute_kernel(RouteParams p, const int32_t* __restrict__ tile_hist,
                                                           int n_tiles) {
  constexpr int kWarps = kThreads / 32;
  constexpr int kScanItems = (kMaxExperts + 1 + kThreads - 1) / kThreads;
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_tmp;
  __shared__ int s_total[kMaxExperts + 1];
  __shared__ int s_base[kMaxExperts + 1];
  __shared__ int s_warp[kWarps][kMaxExperts + 1];

  const int E = p.E, B = E + 1, k = p.k;
  const int tile = blockIdx.x;
  for (int e = threadIdx.x; e < B; e += kThreads) {
    int total = 0, before = 0;
    for (int i = 0; i < n_tiles; ++i) {
      const int c = tile_hist[(long long)i * B + e];
      total += c;
      before += (i < tile) ? c : 0;
    }
    s_total[e] = total;
    s_base[e] = before;
  }
  __syncthreads();
  int items[kScanItems];
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) {
    const int e = threadIdx.x * kScanItems + i;
    items[i] = e < B ? s_total[e] : 0;
  }
  BlockScan(scan_tmp).ExclusiveSum(items, items);
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) {
    const int e = threadIdx.x * kScanItems + i;
    if (e < B) {
      s_base[e] += items[i];
      if (tile == 0 && e < E) {
        p.counts[e] = s_total[e];
        p.offsets[e] = items[i] + s_total[e];
      }
    }
  }
  for (int i = threadIdx.x; i < kWarps * B; i += kThreads) s_warp[i / B][i % B] = 0;
  __syncthreads();

  const long long s0 = (long long)tile * kTileTokens * k;
  const long long s1 = min((long long)(tile + 1) * kTileTokens, p.T) * k;
  const int n = static_cast<int>(s1 - s0);
  const int per_warp = ((n + kWarps - 1) / kWarps + 31) / 32 * 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int w0 = warp * per_warp, w1 = min(n, w0 + per_warp);
  const unsigned lt_mask = (1u << lane) - 1u;

  for (int r = w0; r < w1; r += 32) {  // pass 1: per-warp bucket counts
    const int i = r + lane;
    const int ex = i < w1 ? p.experts[s0 + i] : -2;
    const int b = ex == -1 ? E : ex;
    const unsigned peers = __match_any_sync(0xffffffffu, b);
    if (i < w1 && (peers & lt_mask) == 0) s_warp[warp][b] += __popc(peers);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < B; b += kThreads) {
    int run = s_base[b];
    for (int w = 0; w < kWarps; ++w) {
      const int c = s_warp[w][b];
      s_warp[w][b] = run;
      run += c;
    }
  }
  __syncthreads();
  for (int r = w0; r < w1; r += 32) {  // pass 2: stable scatter
    const int i = r + lane;
    const int ex = i < w1 ? p.experts[s0 + i] : -2;
    const int b = ex == -1 ? E : ex;
    const unsigned peers = __match_any_sync(0xffffffffu, b);
    if (i < w1) {
      const int pos = s_warp[warp][b] + __popc(peers & lt_mask);
      p.permutation[pos] = static_cast<int32_t>(s0 + i);
      p.inverse[s0 + i] = pos;
    }
    __syncwarp();
    if (i < w1 && (peers & lt_mask) == 0) s_warp[warp][b] += __popc(peers);
    __syncwarp();
  }
}

template <typename scalar_t, int VPT, int LANES>
__global__ void __launch_bounds__(kThreads) route_backward_kernel(RouteBackwardParams p) {
  constexpr int GROUPS = kThreads / LANES;
  const int E = p.E, k = p.k;
  const int lane = threadIdx.x % LANES;
  const long long t = (long long)blockIdx.x * GROUPS + threadIdx.x / LANES;
  const bool active = t < p.T;
  const float tau = (active && p.temperature_tok) ? p.temperature_tok[t] : p.temperature;

  int ex[kMaxTopK];
  float g[kMaxTopK], w[kMaxTopK];
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j) {
    const bool ok = active && j < k;
    ex[j] = ok ? p.experts[t * k + j] : -1;
    g[j] = ok ? p.grad_weights[t * k + j] : 0.f;
    w[j] = ok ? p.weights[t * k + j] : 0.f;
  }
  float s[VPT], m = 0.f, sum = 1.f;
  if (!p.renormalize)
    load_scaled<scalar_t, VPT, LANES>(static_cast<const scalar_t*>(p.logits), p.bias, p.bias_token_stride,
                                      tau, t, E, lane, active, s, m, sum);
  const float inv_tau = 1.f / tau;
  float dot = 0.f;
  if (p.renormalize) {
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j) dot += ex[j] >= 0 ? g[j] * w[j] : 0.f;
  }
  const float inv_sum = 1.f / sum;
  float prob[VPT];
#pragma unroll
  for (int v = 0; v < VPT; ++v) prob[v] = p.renormalize ? 0.f : __expf(s[v] - m) * inv_sum;
  if (!p.renormalize) {
    // dot = sum over kept slots of g_j * p_{e_j}: the owning lane contributes each term.
    float part = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j)
#pragma unroll
      for (int v = 0; v < VPT; ++v)
        if (ex[j] >= 0 && ex[j] == v * LANES + lane) part += g[j] * prob[v];
    dot = group_sum<LANES>(part);  // every lane of the group takes part, active or not
  }
  if (!active) return;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int e = v * LANES + lane;
    if (e >= E) continue;
    float gs = 0.f;
    if (p.renormalize) {
#pragma unroll
      for (int j = 0; j < kMaxTopK; ++j)
        if (ex[j] == e) gs = w[j] * (g[j] - dot);
    } else {
      float ge = 0.f;
#pragma unroll
      for (int j = 0; j < kMaxTopK; ++j)
        if (ex[j] == e) ge = g[j];
      gs = prob[v] * (ge - dot);
    }
    p.grad_logits[t * E + e] = gs * inv_tau;
  }
}

// Pick (values per lane, lanes per token) so one token's logits sit in registers.
template <typename F>
void dispatch_shape(int E, F&& f) {
  if (E <= 4) return f(std::integral_constant<int, 4>{}, std::integral_constant<int, 1>{});
  if (E <= 8) return f(std::integral_constant<int, 4>{}, std::integral_constant<int, 2>{});
  if (E <= 16) return f(std::integral_constant<int, 4>{}, std::integral_constant<int, 4>{});
  if (E <= 32) return f(std::integral_constant<int, 4>{}, std::integral_constant<int, 8>{});
  if (E <= 64) return f(std::integral_constant<int, 4>{}, std::integral_constant<int, 16>{});
  if (E <= 128) return f(std::integral_constant<int, 4>{}, std::integral_constant<int, 32>{});
  if (E <= kMaxExperts) return f(std::integral_constant<int, 8>{}, std::integral_constant<int, 32>{});
  throw std::runtime_error("upsafe: sparse_route supports at most 256 experts");
}

}  // namespace

long long route_cuda_workspace_elems(long long T, int E) {
  return ((T + kTileTokens - 1) / kTileTokens) * (E + 1);
}

void route_cuda(const RouteParams& p, int32_t* workspace, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.T == 0) {
    check_cuda(cudaMemsetAsync(p.counts, 0, sizeof(int32_t) * p.E, stream), "sparse_route");
    check_cuda(cudaMemsetAsync(p.offsets, 0, sizeof(int32_t) * p.E, stream), "sparse_route");
    return;
  }
  const long long ws = route_cuda_workspace_elems(p.T, p.E);
  check_cuda(cudaMemsetAsync(workspace, 0, sizeof(int32_t) * ws, stream), "sparse_route");
  dispatch_shape(p.E, [&](auto vpt, auto lanes) {
    constexpr int VPT = decltype(vpt)::value, LANES = decltype(lanes)::value;
    constexpr int GROUPS = kThreads / LANES;
    UPSAFE_DISPATCH_FLOAT(p.dtype, scalar_t, [&] {
      route_kernel<scalar_t, VPT, LANES><<<ceil_div(p.T, GROUPS), kThreads, 0, stream>>>(p, workspace);
    });
  });
  check_launch("sparse_route (route_kernel)");
  const int n_tiles = ceil_div(p.T, kTileTokens);
  permute_kernel<<<n_tiles, kThreads, 0, stream>>>(p, workspace, n_tiles);
  check_launch("sparse_route (permute_kernel)");
}

void route_backward_cuda(const RouteBackwardParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.T == 0) return;
  dispatch_shape(p.E, [&](auto vpt, auto lanes) {
    constexpr int VPT = decltype(vpt)::value, LANES = decltype(lanes)::value;
    constexpr int GROUPS = kThreads / LANES;
    UPSAFE_DISPATCH_FLOAT(p.dtype, scalar_t, [&] {
      route_backward_kernel<scalar_t, VPT, LANES><<<ceil_div(p.T, GROUPS), kThreads, 0, stream>>>(p);
    });
  });
  check_launch("sparse_route_backward");
}

}  // namespace routing
}  // namespace upsafe
