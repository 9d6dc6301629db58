// CUDA routing in three launches, no global atomics and no memset:
//   route    a group of LANES threads per token holds its logits in registers (softmax and top-k by
//            shuffles); a block is one tile of kTileTokens tokens and writes its expert histogram
//            column (bucket-major, shared-memory atomics only)
//   colscan  one warp per bucket: exclusive prefix over tiles, coalesced, plus bucket totals
//   permute  one block per tile: bucket starts (block scan of the totals), then a stable scatter of
//            the tile's slots (warp match_any ranks peers), counts and offsets from block 0
// History on the H100 (T=16384, E=128, k=8, CUDA-graph times): sub-warp per token with global
// atomics into per-tile histograms, 50 µs; one thread per token (online softmax, insertion
// top-k) 176 µs: at 16K tokens that is ~4 warps per SM and the serial chain is latency-bound.
#include <cub/block/block_scan.cuh>

#include <cfloat>
#include <climits>

#include "../common/cuda_utils.cuh"
#include "routing.h"

namespace upsafe {
namespace routing {
namespace {

__device__ __forceinline__ bool ranks_before(float a, int ia, float b, int ib) {
  // NaN first, then larger, ties -> lower index; ib == INT_MAX marks an empty slot.
  if (ib == INT_MAX) return ia != INT_MAX;
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

// One token's scaled logits s = (z + b) / tau in registers: lane `lane` of the group holds experts
// v * LANES + lane (coalesced across the group). Returns the softmax max and sum (NaN if any s is NaN).
template <typename scalar_t, int VPT, int LANES>
__device__ __forceinline__ void load_scaled(const scalar_t* __restrict__ row, const float* brow, float inv_tau, int E,
                                            int lane, bool active, float (&s)[VPT], float& m, float& sum) {
  float mx = -INFINITY;
  int nan_flag = 0;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const int e = v * LANES + lane;
    if (active && e < E) {
      float z = to_float(row[e]);
      if (brow) z += brow[e];
      s[v] = z * inv_tau;
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

// A block is one tile of kTileTokens tokens; a group of LANES threads handles one token at a time.
template <typename scalar_t, int VPT, int LANES>
__global__ void __launch_bounds__(1024) route_kernel(RouteParams p, int32_t* __restrict__ hist, int n_tiles) {
  constexpr int kThreads = (kTileTokens * LANES < 1024) ? kTileTokens * LANES : 1024;
  constexpr int kGroups = kThreads / LANES;
  __shared__ int s_hist[kMaxExperts + 1];
  const int E = p.E, k = p.k;
  for (int i = threadIdx.x; i <= E; i += kThreads) s_hist[i] = 0;
  __syncthreads();
  const int lane = threadIdx.x % LANES;
  for (int tt = threadIdx.x / LANES; tt < kTileTokens; tt += kGroups) {
    const long long t = (long long)blockIdx.x * kTileTokens + tt;
    const bool active = t < p.T;  // inactive groups still take part in the shuffles
    const float tau = (active && p.temperature_tok) ? p.temperature_tok[t] : p.temperature;
    const float* brow = (active && p.bias) ? p.bias + t * p.bias_token_stride : nullptr;
    float s[VPT], m, sum;
    load_scaled<scalar_t, VPT, LANES>(static_cast<const scalar_t*>(p.logits) + (active ? t : 0) * E, brow, 1.f / tau,
                                      E, lane, active, s, m, sum);
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
  }
  __syncthreads();
  for (int b = threadIdx.x; b <= E; b += kThreads) hist[(long long)b * n_tiles + blockIdx.x] = s_hist[b];  // bucket-major
}

// One warp per bucket: hist[b][:] := exclusive prefix over tiles (in place), totals[b] := sum.
__global__ void __launch_bounds__(256) colscan_kernel(int32_t* __restrict__ hist, int32_t* __restrict__ totals, int B,
                                                      int n_tiles) {
  const int b = blockIdx.x * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= B) return;
  int32_t* row = hist + (long long)b * n_tiles;
  int running = 0;
  for (int t0 = 0; t0 < n_tiles; t0 += 32) {
    const int tile = t0 + lane;
    const int v = tile < n_tiles ? row[tile] : 0;
    int incl = v;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int n = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += n;
    }
    if (tile < n_tiles) row[tile] = running + incl - v;
    running += __shfl_sync(0xffffffffu, incl, 31);
  }
  if (lane == 0) totals[b] = running;
}

constexpr int kPermuteThreads = 256;

// One block per tile: bucket starts from the totals (block scan), this tile's bases, then a stable
// scatter of the tile's slots, each warp owning a contiguous run and ranking peers with match_any.
__global__ void __launch_bounds__(kPermuteThreads) permute_kernel(RouteParams p, const int32_t* __restrict__ hist,
                                                                  const int32_t* __restrict__ totals, int n_tiles) {
  constexpr int kWarps = kPermuteThreads / 32;
  constexpr int kItems = (kMaxExperts + 1 + kPermuteThreads - 1) / kPermuteThreads;
  using BlockScan = cub::BlockScan<int, kPermuteThreads>;
  __shared__ typename BlockScan::TempStorage scan_tmp;
  __shared__ int s_warp[kWarps][kMaxExperts + 1];
  __shared__ int s_base[kMaxExperts + 1];
  const int E = p.E, B = E + 1, k = p.k;
  const int tile = blockIdx.x;
  int items[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int b = threadIdx.x * kItems + i;
    items[i] = b < B ? totals[b] : 0;
  }
  int starts[kItems];
  BlockScan(scan_tmp).ExclusiveSum(items, starts);
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int b = threadIdx.x * kItems + i;
    if (b < B) {
      s_base[b] = starts[i] + hist[(long long)b * n_tiles + tile];
      if (tile == 0 && b < E) {
        p.counts[b] = items[i];
        p.offsets[b] = starts[i] + items[i];
      }
    }
  }
  for (int i = threadIdx.x; i < kWarps * B; i += kPermuteThreads) s_warp[i / B][i % B] = 0;
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
  for (int b = threadIdx.x; b < B; b += kPermuteThreads) {
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

// Streams row t once (backward of the plain convention): online softmax max and sum.
template <typename scalar_t>
__device__ __forceinline__ void softmax_stats(const scalar_t* __restrict__ row, const float* __restrict__ brow,
                                              float inv_tau, int E, float& m, float& sum) {
  m = -INFINITY;
  sum = 0.f;
  bool nan_seen = false;
  for (int e = 0; e < E; ++e) {
    float z = to_float(row[e]);
    if (brow) z += brow[e];
    const float s = z * inv_tau;
    if (isnan(s)) {
      nan_seen = true;
    } else if (s > m) {
      sum = sum * __expf(m - s) + 1.f;
      m = s;
    } else if (s != -INFINITY) {  // exp(-inf - -inf) would be NaN; the term is 0
      sum += __expf(s - m);
    }
  }
  if (nan_seen) m = NAN;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kTileTokens) route_backward_kernel(RouteBackwardParams p) {
  const long long t = (long long)blockIdx.x * kTileTokens + threadIdx.x;
  if (t >= p.T) return;
  const int E = p.E, k = p.k;
  const float tau = p.temperature_tok ? p.temperature_tok[t] : p.temperature;
  const float inv_tau = 1.f / tau;
  float* out = p.grad_logits + t * E;
  int ex[kMaxTopK];
  float g[kMaxTopK], w[kMaxTopK];
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j) {
    ex[j] = j < k ? p.experts[t * k + j] : -1;
    g[j] = j < k ? p.grad_weights[t * k + j] : 0.f;
    w[j] = j < k ? p.weights[t * k + j] : 0.f;
  }
  if (p.renormalize) {
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j) dot += ex[j] >= 0 ? g[j] * w[j] : 0.f;
    for (int e = 0; e < E; ++e) out[e] = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j)
      if (ex[j] >= 0) out[ex[j]] = w[j] * (g[j] - dot) * inv_tau;
    return;
  }
  // plain: dz_e = p_e (g~_e - sum_kept g_j p_{e_j}) / tau, p recomputed with the same streaming pass
  const scalar_t* row = static_cast<const scalar_t*>(p.logits) + t * E;
  const float* brow = p.bias ? p.bias + t * p.bias_token_stride : nullptr;
  float m, sum;
  softmax_stats<scalar_t>(row, brow, inv_tau, E, m, sum);
  const float inv_sum = 1.f / sum;
  auto prob_of = [&](int e) {
    float z = to_float(row[e]);
    if (brow) z += brow[e];
    return __expf(z * inv_tau - m) * inv_sum;
  };
  float dot = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j)
    if (ex[j] >= 0) dot += g[j] * prob_of(ex[j]);
  for (int e = 0; e < E; ++e) out[e] = -prob_of(e) * dot * inv_tau;
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j)
    if (ex[j] >= 0) out[ex[j]] += prob_of(ex[j]) * g[j] * inv_tau;
}

// (values per lane, lanes per token): enough lanes per token that T=16K tokens fill the GPU
template <typename F>
void dispatch_shape(int E, F&& f) {
  using std::integral_constant;
  if (E <= 2) return f(integral_constant<int, 1>{}, integral_constant<int, 2>{});
  if (E <= 4) return f(integral_constant<int, 2>{}, integral_constant<int, 2>{});
  if (E <= 8) return f(integral_constant<int, 2>{}, integral_constant<int, 4>{});
  if (E <= 16) return f(integral_constant<int, 2>{}, integral_constant<int, 8>{});
  if (E <= 32) return f(integral_constant<int, 2>{}, integral_constant<int, 16>{});
  if (E <= 64) return f(integral_constant<int, 2>{}, integral_constant<int, 32>{});
  if (E <= 128) return f(integral_constant<int, 4>{}, integral_constant<int, 32>{});
  if (E <= kMaxExperts) return f(integral_constant<int, 8>{}, integral_constant<int, 32>{});
  throw std::runtime_error("upsafe: sparse_route supports at most 256 experts");
}

}  // namespace

long long route_cuda_workspace_elems(long long T, int E) {
  return ((T + kTileTokens - 1) / kTileTokens) * (E + 1) + (E + 1);  // bucket-major tile histogram + totals
}

void route_cuda(const RouteParams& p, int32_t* workspace, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.T == 0) {
    check_cuda(cudaMemsetAsync(p.counts, 0, sizeof(int32_t) * p.E, stream), "sparse_route");
    check_cuda(cudaMemsetAsync(p.offsets, 0, sizeof(int32_t) * p.E, stream), "sparse_route");
    return;
  }
  const int n_tiles = ceil_div(p.T, kTileTokens);
  const int B = p.E + 1;
  int32_t* hist = workspace;
  int32_t* totals = workspace + (long long)n_tiles * B;
  dispatch_shape(p.E, [&](auto vpt, auto lanes) {
    constexpr int VPT = decltype(vpt)::value, LANES = decltype(lanes)::value;
    constexpr int kThreads = (kTileTokens * LANES < 1024) ? kTileTokens * LANES : 1024;
    UPSAFE_DISPATCH_FLOAT(p.dtype, scalar_t, [&] {
      route_kernel<scalar_t, VPT, LANES><<<n_tiles, kThreads, 0, stream>>>(p, hist, n_tiles);
    });
  });
  check_launch("sparse_route (route_kernel)");
  colscan_kernel<<<ceil_div(B, 8), 256, 0, stream>>>(hist, totals, B, n_tiles);
  check_launch("sparse_route (colscan_kernel)");
  permute_kernel<<<n_tiles, kPermuteThreads, 0, stream>>>(p, hist, totals, n_tiles);
  check_launch("sparse_route (permute_kernel)");
}

void route_backward_cuda(const RouteBackwardParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.T == 0) return;
  UPSAFE_DISPATCH_FLOAT(p.dtype, scalar_t, [&] {
    route_backward_kernel<scalar_t><<<ceil_div(p.T, kTileTokens), kTileTokens, 0, stream>>>(p);
  });
  check_launch("sparse_route_backward");
}

}  // namespace routing
}  // namespace upsafe
