// CUDA routing in three launches, no atomics on global memory and no memset:
//   route   one thread per token streams its E logits once: online softmax (running max and sum)
//           and an insertion top-k in registers; a block is one tile of kTileTokens tokens and
//           writes its expert histogram row (shared-memory atomics only)
//   scan    one block turns the [tiles, E+1] histogram into per-tile bucket bases (column scans)
//           plus the per-expert counts and grouped-GEMM offsets
//   permute one block per tile scatters its slots stably (warp match_any ranks peers)
// Earlier design (a sub-warp per token with shuffle top-k, global atomics into the tile histogram)
// measured 50 µs at T=16384, E=128, k=8 on an H100 in a CUDA graph: the atomics dominated.
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

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Streams row t once. Returns the softmax statistics and the k best (scaled logit, expert).
template <typename scalar_t, int VEC>
__device__ __forceinline__ void scan_row(const scalar_t* __restrict__ row, const float* __restrict__ brow, float inv_tau,
                                         int E, int k, float& m, float& sum, bool& nan_seen,
                                         float (&bs)[kMaxTopK], int (&bi)[kMaxTopK]) {
  m = -INFINITY;
  sum = 0.f;
  nan_seen = false;
#pragma unroll
  for (int j = 0; j < kMaxTopK; ++j) { bs[j] = -INFINITY; bi[j] = INT_MAX; }
  float kth_s = -INFINITY;  // the current k-th best, kept in scalars: indexing bs[k - 1] with a
  int kth_i = INT_MAX;      // run-time k would move the arrays to local memory
  for (int e0 = 0; e0 < E; e0 += VEC) {
    const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(row + e0);
#pragma unroll
    for (int u = 0; u < VEC; ++u) {
      const int e = e0 + u;
      if (VEC > 1 || e < E) {
        float z = to_float(pk.v[u]);
        if (brow) z += brow[e];
        const float s = z * inv_tau;
        if (isnan(s)) {
          nan_seen = true;
        } else if (s > m) {
          sum = sum * __expf(m - s) + 1.f;
          m = s;
        } else {
          sum += __expf(s - m);
        }
        // insertion top-k: most experts fail the first test against the current k-th
        if (ranks_before(s, e, kth_s, kth_i)) {
          float cs = s;
          int ci = e;
#pragma unroll
          for (int j = 0; j < kMaxTopK; ++j) {
            if (j < k && ranks_before(cs, ci, bs[j], bi[j])) {
              const float ts = bs[j]; const int ti = bi[j];
              bs[j] = cs; bi[j] = ci; cs = ts; ci = ti;
            }
            if (j == k - 1) { kth_s = bs[j]; kth_i = bi[j]; }
          }
        }
      }
    }
  }
  if (nan_seen) m = NAN;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kTileTokens) route_kernel(RouteParams p, int32_t* __restrict__ tile_hist) {
  __shared__ int s_hist[kMaxExperts + 1];
  const int E = p.E, k = p.k;
  for (int i = threadIdx.x; i <= E; i += kTileTokens) s_hist[i] = 0;
  __syncthreads();
  const long long t = (long long)blockIdx.x * kTileTokens + threadIdx.x;
  if (t < p.T) {
    const float tau = p.temperature_tok ? p.temperature_tok[t] : p.temperature;
    const float* brow = p.bias ? p.bias + t * p.bias_token_stride : nullptr;
    float m, sum, bs[kMaxTopK];
    int bi[kMaxTopK];
    bool nan_seen;
    scan_row<scalar_t, VEC>(static_cast<const scalar_t*>(p.logits) + t * E, brow, 1.f / tau, E, k, m, sum, nan_seen,
                            bs, bi);
    const float inv_sum = 1.f / sum;
    float prob[kMaxTopK];
    int sel[kMaxTopK];
    float kept = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j) {
      prob[j] = 0.f;
      sel[j] = -1;
      if (j < k) {
        const float pj = __expf(bs[j] - m) * inv_sum;
        const bool keep = (j == 0) || !(pj < p.min_weight);
        sel[j] = keep ? bi[j] : -1;
        prob[j] = keep ? pj : 0.f;
        kept += prob[j];
      }
    }
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
  for (int i = threadIdx.x; i <= E; i += kTileTokens) tile_hist[(long long)blockIdx.x * (E + 1) + i] = s_hist[i];
}

// One block: tile_hist[tile][b] := bucket_start[b] + sum_{tile' < tile} hist[tile'][b]; counts, offsets.
constexpr int kScanThreads = 512;  // >= kMaxExperts + 1 buckets, one per thread in the bucket scan

__global__ void __launch_bounds__(kScanThreads) scan_kernel(RouteParams p, int32_t* __restrict__ tile_hist, int n_tiles) {
  using BlockScan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename BlockScan::TempStorage scan_tmp;
  __shared__ int s_total[kMaxExperts + 1];
  const int B = p.E + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int b = warp; b < B; b += kScanThreads / 32) {  // column scans, one warp per bucket
    int running = 0;
    for (int t0 = 0; t0 < n_tiles; t0 += 32) {
      const int tile = t0 + lane;
      const int v = tile < n_tiles ? tile_hist[(long long)tile * B + b] : 0;
      int incl = v;
#pragma unroll
      for (int off = 1; off < 32; off *= 2) {
        const int n = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += n;
      }
      if (tile < n_tiles) tile_hist[(long long)tile * B + b] = running + incl - v;
      running += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) s_total[b] = running;
  }
  __syncthreads();
  const int b = threadIdx.x;
  int start = b < B ? s_total[b] : 0;
  BlockScan(scan_tmp).ExclusiveSum(start, start);
  if (b < p.E) {
    p.counts[b] = s_total[b];
    p.offsets[b] = start + s_total[b];
  }
  __syncthreads();
  if (b < B) s_total[b] = start;
  __syncthreads();
  for (long long i = threadIdx.x; i < (long long)n_tiles * B; i += kScanThreads) tile_hist[i] += s_total[i % B];
}

__global__ void __launch_bounds__(kTileTokens) permute_kernel(RouteParams p, const int32_t* __restrict__ tile_base) {
  constexpr int kWarps = kTileTokens / 32;
  __shared__ int s_warp[kWarps][kMaxExperts + 1];
  const int E = p.E, B = E + 1, k = p.k;
  const int tile = blockIdx.x;
  for (int i = threadIdx.x; i < kWarps * B; i += kTileTokens) s_warp[i / B][i % B] = 0;
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
  for (int b = threadIdx.x; b < B; b += kTileTokens) {
    int run = tile_base[(long long)tile * B + b];
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

template <typename scalar_t, int VEC>
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
  float m, sum, bs[kMaxTopK];
  int bi[kMaxTopK];
  bool nan_seen;
  scan_row<scalar_t, VEC>(row, brow, inv_tau, E, 1, m, sum, nan_seen, bs, bi);
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

// 4 logits per load when rows allow it (16 B fp32, 8 B half/bf16). 8 bf16 per load unrolls the
// insertion top-k 64 times and ptxas moves the top-k arrays to the stack (64 B frame): measured
// with -Xptxas -v, so the width stays at 4.
template <typename scalar_t, typename F>
void with_row_vec(int E, const void* base, F&& f) {
  constexpr int V = 4;
  if (E % V == 0 && (reinterpret_cast<uintptr_t>(base) % (V * sizeof(scalar_t))) == 0)
    f(std::integral_constant<int, V>{});
  else f(std::integral_constant<int, 1>{});
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
  if (p.E > kMaxExperts) throw std::runtime_error("upsafe: sparse_route supports at most 256 experts");
  const int n_tiles = ceil_div(p.T, kTileTokens);
  UPSAFE_DISPATCH_FLOAT(p.dtype, scalar_t, [&] {
    with_row_vec<scalar_t>(p.E, p.logits, [&](auto v) {
      route_kernel<scalar_t, decltype(v)::value><<<n_tiles, kTileTokens, 0, stream>>>(p, workspace);
    });
  });
  check_launch("sparse_route (route_kernel)");
  scan_kernel<<<1, kScanThreads, 0, stream>>>(p, workspace, n_tiles);
  check_launch("sparse_route (scan_kernel)");
  permute_kernel<<<n_tiles, kTileTokens, 0, stream>>>(p, workspace);
  check_launch("sparse_route (permute_kernel)");
}

void route_backward_cuda(const RouteBackwardParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.T == 0) return;
  UPSAFE_DISPATCH_FLOAT(p.dtype, scalar_t, [&] {
    with_row_vec<scalar_t>(p.E, p.logits, [&](auto v) {
      route_backward_kernel<scalar_t, decltype(v)::value>
          <<<ceil_div(p.T, kTileTokens), kTileTokens, 0, stream>>>(p);
    });
  });
  check_launch("sparse_route_backward");
}

}  // namespace routing
}  // namespace upsafe
