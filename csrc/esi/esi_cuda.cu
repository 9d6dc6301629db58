// ESI CUDA kernels: persistent grids over a tile table that spans every tensor of the list (one
// launch for the whole model), 16-byte vector accesses, a shared-memory histogram flushed once per
// block. Memory-bound: accumulate moves 10 B/param (bf16 grads), finalize 8 B, select 5 B.
#include <cstdint>

#include "../common/cuda_utils.cuh"
#include "esi.h"

namespace upsafe {
namespace esi {
namespace {

constexpr int kThreads = 1024;

__device__ __forceinline__ uint32_t score_key(float s, bool invert) {
  const uint32_t b = __float_as_uint(s) & 0x7fffffffu;
  return invert ? 0x7fffffffu - b : b;
}

template <typename G>
__device__ __forceinline__ void load4(const G* p, float (&out)[4]);
template <>
__device__ __forceinline__ void load4<float>(const float* p, float (&out)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
}
template <>
__device__ __forceinline__ void load4<__nv_bfloat16>(const __nv_bfloat16* p, float (&out)[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const __nv_bfloat162 a = *reinterpret_cast<const __nv_bfloat162*>(&raw.x);
  const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&raw.y);
  const float2 fa = __bfloat1622float2(a), fb = __bfloat1622float2(b);
  out[0] = fa.x; out[1] = fa.y; out[2] = fb.x; out[3] = fb.y;
}
template <>
__device__ __forceinline__ void load4<__half>(const __half* p, float (&out)[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 fa = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
  const float2 fb = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
  out[0] = fa.x; out[1] = fa.y; out[2] = fb.x; out[3] = fb.y;
}

// MODE 0: acc += g; 1: acc = sigma*|acc + g| and histogram; 2: histogram of acc (no write)
template <typename G, int MODE, bool VEC>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(MultiParams p) {
  extern __shared__ unsigned int s_hist[];
  constexpr bool HIST = MODE != 0;
  if (HIST) {
    for (int i = threadIdx.x; i < kBins; i += kThreads) s_hist[i] = 0;
    __syncthreads();
  }
  for (long long tile = blockIdx.x; tile < p.total_tiles; tile += gridDim.x) {
    const TensorMeta m = p.metas[tile_owner(p.metas, p.n_tensors, tile)];
    const long long e0 = (tile - m.tile_begin) * kTile;
    const long long e1 = min(e0 + kTile, m.n);
    const G* g = static_cast<const G*>(m.grad);
    if (VEC) {
      for (long long i = e0 + threadIdx.x * 4; i < e1; i += kThreads * 4) {
        float4 a = *reinterpret_cast<const float4*>(m.acc + i);
        float v[4] = {a.x, a.y, a.z, a.w};
        if (MODE != 2) {
          float gv[4];
          load4<G>(g + i, gv);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            v[j] += gv[j];
            if (MODE == 1) v[j] = m.sigma * fabsf(v[j]);
          }
          *reinterpret_cast<float4*>(m.acc + i) = make_float4(v[0], v[1], v[2], v[3]);
        }
        if (HIST) {
#pragma unroll
          for (int j = 0; j < 4; ++j) atomicAdd(&s_hist[score_key(v[j], p.invert) >> kBinShift], 1u);
        }
      }
    } else {
      for (long long i = e0 + threadIdx.x; i < e1; i += kThreads) {
        float v = m.acc[i];
        if (MODE != 2) {
          v += to_float(g[i]);
          if (MODE == 1) v = m.sigma * fabsf(v);
          m.acc[i] = v;
        }
        if (HIST) atomicAdd(&s_hist[score_key(v, p.invert) >> kBinShift], 1u);
      }
    }
  }
  if (HIST) {
    __syncthreads();
    for (int i = threadIdx.x; i < kBins; i += kThreads)
      if (s_hist[i]) atomicAdd(&p.hist[i], static_cast<unsigned long long>(s_hist[i]));
  }
}

__device__ __forceinline__ void consider(const MultiParams& p, float s, long long gidx, unsigned char& sel) {
  const uint32_t key = score_key(s, p.invert);
  const int bin = static_cast<int>(key >> kBinShift);
  sel = bin > p.threshold_bin;
  if (bin == p.threshold_bin) {
    const unsigned long long slot = atomicAdd(p.cand_count, 1ull);
    if (static_cast<long long>(slot) < p.cand_capacity)
      p.cand_keys[slot] = (static_cast<unsigned long long>(kLowMask - (key & kLowMask)) << 40) |
                          static_cast<unsigned long long>(gidx);
  }
}

template <bool VEC>
__global__ void __launch_bounds__(kThreads) select_kernel(MultiParams p) {
  for (long long tile = blockIdx.x; tile < p.total_tiles; tile += gridDim.x) {
    const TensorMeta m = p.metas[tile_owner(p.metas, p.n_tensors, tile)];
    const long long e0 = (tile - m.tile_begin) * kTile;
    const long long e1 = min(e0 + kTile, m.n);
    if (VEC) {
      for (long long i = e0 + threadIdx.x * 4; i < e1; i += kThreads * 4) {
        const float4 a = *reinterpret_cast<const float4*>(m.acc + i);
        uchar4 out;
        consider(p, a.x, m.elem_begin + i, out.x);
        consider(p, a.y, m.elem_begin + i + 1, out.y);
        consider(p, a.z, m.elem_begin + i + 2, out.z);
        consider(p, a.w, m.elem_begin + i + 3, out.w);
        *reinterpret_cast<uchar4*>(m.mask + i) = out;
      }
    } else {
      for (long long i = e0 + threadIdx.x; i < e1; i += kThreads) {
        unsigned char s;
        consider(p, m.acc[i], m.elem_begin + i, s);
        m.mask[i] = s;
      }
    }
  }
}

__global__ void __launch_bounds__(256) mark_kernel(MarkParams p) {
  const long long j = (long long)blockIdx.x * 256 + threadIdx.x;
  if (j >= p.n) return;
  const long long g = p.indices[j];
  const int t = owner<true>(p.metas, p.n_tensors, g);
  p.metas[t].mask[g - p.metas[t].elem_begin] = 1;
}

template <typename T>
__global__ void __launch_bounds__(256) sparse_adamw_kernel(AdamParams p) {
  for (long long tile = blockIdx.x; tile < p.total_tiles; tile += gridDim.x) {
    const AdamMeta m = p.metas[tile_owner(p.metas, p.n_tensors, tile)];
    const long long e0 = (tile - m.tile_begin) * kTile;
    const long long e1 = min(e0 + kTile, m.n);
    T* param = static_cast<T*>(m.param);
    const T* grad = static_cast<const T*>(m.grad);
    for (long long j = e0 + threadIdx.x; j < e1; j += 256) {
      const long long i = m.idx[j];
      const float g = to_float(grad[i]);
      const float mm = p.beta1 * m.m[j] + (1.f - p.beta1) * g;
      const float vv = p.beta2 * m.v[j] + (1.f - p.beta2) * g * g;
      m.m[j] = mm;
      m.v[j] = vv;
      float w = m.master[j] * (1.f - p.lr * p.weight_decay);
      w -= p.lr * (mm / p.bias_c1) / (sqrtf(vv / p.bias_c2) + p.eps);
      m.master[j] = w;
      param[i] = from_float<T>(w);
    }
  }
}

int persistent_blocks(long long tiles, int per_sm) {
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  const long long want = static_cast<long long>(sms) * per_sm;
  return static_cast<int>(tiles < want ? (tiles < 1 ? 1 : tiles) : want);
}

template <typename G, int MODE>
void launch_accumulate(const MultiParams& p, cudaStream_t s) {
  const size_t smem = MODE != 0 ? sizeof(unsigned int) * kBins : 0;
  const int blocks = persistent_blocks(p.total_tiles, 2);
  if (p.aligned) accumulate_kernel<G, MODE, true><<<blocks, kThreads, smem, s>>>(p);
  else accumulate_kernel<G, MODE, false><<<blocks, kThreads, smem, s>>>(p);
}

}  // namespace

void accumulate_cuda(const MultiParams& p, void* stream) {
  if (p.total_tiles == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  UPSAFE_DISPATCH_FLOAT(p.grad_dtype, G, [&] {
    if (p.metas == nullptr) return;
    if (p.finalize) launch_accumulate<G, 1>(p, s);
    else if (p.hist != nullptr) launch_accumulate<G, 2>(p, s);  // histogram of existing scores
    else launch_accumulate<G, 0>(p, s);
  });
  check_launch("esi_accumulate_");
}

void select_cuda(const MultiParams& p, void* stream) {
  if (p.total_tiles == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const int blocks = persistent_blocks(p.total_tiles, 2);
  if (p.aligned) select_kernel<true><<<blocks, kThreads, 0, s>>>(p);
  else select_kernel<false><<<blocks, kThreads, 0, s>>>(p);
  check_launch("esi_select");
}

void mark_cuda(const MarkParams& p, void* stream) {
  if (p.n == 0) return;
  mark_kernel<<<ceil_div(p.n, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(p);
  check_launch("esi_mark_");
}

void sparse_adamw_cuda(const AdamParams& p, void* stream) {
  if (p.total_tiles == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  UPSAFE_DISPATCH_FLOAT(p.dtype, T, [&] {
    sparse_adamw_kernel<T><<<persistent_blocks(p.total_tiles, 8), 256, 0, s>>>(p);
  });
  check_launch("esi_sparse_adamw_");
}

}  // namespace esi
}  // namespace upsafe
