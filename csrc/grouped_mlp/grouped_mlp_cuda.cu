// CUDA kernels for the non-GEMM stages of the grouped expert MLP. Every row-parallel kernel reads
// its chunk's row count from `offsets` on the device and exits early past it: no host sync.
// Memory-bound throughout: 16-byte vector loads where the width and pointers allow.
#include <cstdint>

#include "../common/cuda_utils.cuh"
#include "activation_math.h"
#include "grouped_mlp.h"

namespace upsafe {
namespace grouped_mlp {
namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) VecT {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ VecT<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const VecT<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const VecT<T, N>& v) {
  *reinterpret_cast<VecT<T, N>*>(p) = v;
}

__device__ __forceinline__ int chunk_start(const int32_t* offsets, int e_begin) {
  return e_begin > 0 ? offsets[e_begin - 1] : 0;
}

// first expert e in [lo, hi) whose inclusive offset exceeds pos
__device__ __forceinline__ int expert_of_pos(const int32_t* offsets, int lo, int hi, int pos) {
  while (lo < hi - 1) {
    const int mid = (lo + hi - 1) / 2;
    if (offsets[mid] > pos) hi = mid + 1; else lo = mid + 1;
  }
  return lo;
}

__device__ __forceinline__ int chunk_of_expert(const ChunkLayout& L, int e) {
  int c = 0;
#pragma unroll
  for (int i = 1; i < kMaxChunks; ++i)
    if (i < L.n_chunks && e >= L.first_expert[i]) c = i;
  return c;
}

constexpr int kRowThreads = 128;

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads) gather_kernel(GatherParams p) {
  const int start = chunk_start(p.offsets, p.e_begin);
  const int count = p.offsets[p.e_end - 1] - start;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  if (p.rel_offsets && blockIdx.x == 0)
    for (int e = p.e_begin + threadIdx.x; e < p.e_end; e += kRowThreads) p.rel_offsets[e - p.e_begin] = p.offsets[e] - start;
  for (long long r = blockIdx.x; r < count; r += gridDim.x) {
    const int slot = p.permutation[start + r];
    const long long t = slot / p.k;
    const float s = p.scale ? p.scale[slot] : 1.f;
    const T* src = x + t * p.H;
    T* dst = out + r * p.H;
    for (int c = threadIdx.x * VEC; c < p.H; c += kRowThreads * VEC) {
      VecT<T, VEC> v = load_vec<T, VEC>(src + c);
      if (p.scale) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v.v[i] = from_float<T>(to_float(v.v[i]) * s);
      }
      store_vec<T, VEC>(dst + c, v);
    }
  }
}

template <typename T, int VEC, bool BACKWARD>
__global__ void __launch_bounds__(kRowThreads) activation_kernel(ActParams p) {
  const int start = chunk_start(p.offsets, p.e_begin);
  const int count = p.offsets[p.e_end - 1] - start;
  const int W = p.gated ? 2 * p.I : p.I;
  const int act = static_cast<int>(p.act);
  const T* h = static_cast<const T*>(p.h);
  const T* bias = static_cast<const T*>(p.bias);
  const T* ga = static_cast<const T*>(p.grad_a);
  T* a = static_cast<T*>(p.a);
  T* gh = static_cast<T*>(p.grad_h);
  for (long long r = blockIdx.x; r < count; r += gridDim.x) {
    const T* brow = nullptr;
    if (bias) brow = bias + (long long)(expert_of_pos(p.offsets, p.e_begin, p.e_end, start + r) - p.e_begin) * W;
    const T* hrow = h + r * W;
    for (int c = threadIdx.x * VEC; c < p.I; c += kRowThreads * VEC) {
      const VecT<T, VEC> g = load_vec<T, VEC>(hrow + c);
      VecT<T, VEC> u, bg, bu, grad, out_a, out_g, out_u;
      if (p.gated) u = load_vec<T, VEC>(hrow + p.I + c);
      if (brow) {
        bg = load_vec<T, VEC>(brow + c);
        if (p.gated) bu = load_vec<T, VEC>(brow + p.I + c);
      }
      if (BACKWARD) grad = load_vec<T, VEC>(ga + r * p.I + c);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float gv = to_float(g.v[i]) + (brow ? to_float(bg.v[i]) : 0.f);
        const float fg = act_fwd(act, gv);
        float uv = 1.f;
        if (p.gated) uv = to_float(u.v[i]) + (brow ? to_float(bu.v[i]) : 0.f);
        out_a.v[i] = from_float<T>(fg * uv);
        if (BACKWARD) {
          const float d = to_float(grad.v[i]);
          out_g.v[i] = from_float<T>(d * uv * act_grad(act, gv));
          if (p.gated) out_u.v[i] = from_float<T>(d * fg);
        }
      }
      store_vec<T, VEC>(a + r * p.I + c, out_a);
      if (BACKWARD) {
        store_vec<T, VEC>(gh + r * W + c, out_g);
        if (p.gated) store_vec<T, VEC>(gh + r * W + p.I + c, out_u);
      }
    }
  }
}

struct SlotRef {
  const void* row;
  const void* bias;
  float w;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads) combine_kernel(CombineParams p) {
  __shared__ SlotRef s_ref[8];
  T* out = static_cast<T*>(p.out);
  for (long long t = blockIdx.x; t < p.T; t += gridDim.x) {
    __syncthreads();
    if (threadIdx.x < p.k) {
      const long long slot = t * p.k + threadIdx.x;
      const int e = p.experts[slot];
      SlotRef ref{nullptr, nullptr, 0.f};
      if (e >= 0) {
        const int c = chunk_of_expert(p.layout, e);
        const int e0 = p.layout.first_expert[c];
        const long long row = p.inverse[slot] - chunk_start(p.offsets, e0);
        ref.row = static_cast<const T*>(p.rows[c]) + row * p.H;
        ref.bias = p.bias[c] ? static_cast<const T*>(p.bias[c]) + (long long)(e - e0) * p.H : nullptr;
        ref.w = p.weights ? p.weights[slot] : 1.f;
      }
      s_ref[threadIdx.x] = ref;
    }
    __syncthreads();
    for (int c = threadIdx.x * VEC; c < p.H; c += kRowThreads * VEC) {
      float acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
      for (int j = 0; j < p.k; ++j) {
        const SlotRef ref = s_ref[j];
        if (!ref.row) continue;
        const VecT<T, VEC> v = load_vec<T, VEC>(static_cast<const T*>(ref.row) + c);
        VecT<T, VEC> b;
        if (ref.bias) b = load_vec<T, VEC>(static_cast<const T*>(ref.bias) + c);
#pragma unroll
        for (int i = 0; i < VEC; ++i)
          acc[i] += ref.w * (to_float(v.v[i]) + (ref.bias ? to_float(b.v[i]) : 0.f));
      }
      VecT<T, VEC> o;
#pragma unroll
      for (int i = 0; i < VEC; ++i) o.v[i] = from_float<T>(acc[i]);
      store_vec<T, VEC>(out + t * p.H + c, o);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256) slot_dot_kernel(SlotDotParams p) {
  const long long slot = (long long)blockIdx.x * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (slot >= p.T * p.k) return;
  const int e = p.experts[slot];
  float acc = 0.f;
  if (e >= 0) {
    const int c = chunk_of_expert(p.layout, e);
    const int e0 = p.layout.first_expert[c];
    const long long row = p.inverse[slot] - chunk_start(p.offsets, e0);
    const T* y = static_cast<const T*>(p.rows[c]) + row * p.H;
    const T* b = p.bias[c] ? static_cast<const T*>(p.bias[c]) + (long long)(e - e0) * p.H : nullptr;
    const T* g = static_cast<const T*>(p.grad_out) + (slot / p.k) * p.H;
    for (int h = lane; h < p.H; h += 32) acc += to_float(g[h]) * (to_float(y[h]) + (b ? to_float(b[h]) : 0.f));
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.grad_weights[slot] = acc;
}

template <typename T>
__global__ void __launch_bounds__(256) segment_sum_kernel(SegmentSumParams p) {
  const int e = p.e_begin + blockIdx.x;
  const int col = blockIdx.y * 256 + threadIdx.x;
  if (col >= p.W) return;
  const int start = chunk_start(p.offsets, p.e_begin);
  const int r0 = (e > 0 ? p.offsets[e - 1] : 0) - start, r1 = p.offsets[e] - start;
  const T* g = static_cast<const T*>(p.g);
  float acc = 0.f;
  for (long long r = r0; r < r1; ++r) acc += to_float(g[r * p.W + col]);
  p.out[(long long)blockIdx.x * p.W + col] = acc;
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

inline int row_grid(long long rows) {
  return static_cast<int>(rows < 1 ? 1 : (rows < 65535LL * 8 ? rows : 65535LL * 8));
}

// Calls f(VEC) with a 16-byte vector width when every pointer is aligned and `width` divides.
template <typename T, typename F>
void with_vec(int width, std::initializer_list<const void*> ptrs, F&& f) {
  constexpr int V = 16 / sizeof(T);
  bool ok = width % V == 0;
  for (const void* q : ptrs) ok = ok && (q == nullptr || aligned16(q));
  if (ok) f(std::integral_constant<int, V>{});
  else f(std::integral_constant<int, 1>{});
}

}  // namespace

void gather_cuda(const GatherParams& p, void* stream) {
  if (p.M == 0) return;
  UPSAFE_DISPATCH_FLOAT(p.dtype, T, [&] {
    with_vec<T>(p.H, {p.x, p.out}, [&](auto v) {
      gather_kernel<T, decltype(v)::value>
          <<<row_grid(p.M), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
    });
  });
  check_launch("grouped_expert_mlp (gather)");
}

void activation_cuda(const ActParams& p, void* stream) {
  if (p.M == 0) return;
  UPSAFE_DISPATCH_FLOAT(p.dtype, T, [&] {
    with_vec<T>(p.I, {p.h, p.bias, p.grad_a, p.a, p.grad_h}, [&](auto v) {
      constexpr int V = decltype(v)::value;
      auto s = static_cast<cudaStream_t>(stream);
      if (p.grad_a) activation_kernel<T, V, true><<<row_grid(p.M), kRowThreads, 0, s>>>(p);
      else activation_kernel<T, V, false><<<row_grid(p.M), kRowThreads, 0, s>>>(p);
    });
  });
  check_launch("grouped_expert_mlp (activation)");
}

void combine_cuda(const CombineParams& p, void* stream) {
  if (p.T == 0) return;
  UPSAFE_DISPATCH_FLOAT(p.dtype, T, [&] {
    with_vec<T>(p.H, {p.out, p.rows[0], p.rows[1], p.rows[2], p.rows[3], p.bias[0], p.bias[1], p.bias[2], p.bias[3]},
                [&](auto v) {
                  combine_kernel<T, decltype(v)::value>
                      <<<row_grid(p.T), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
                });
  });
  check_launch("grouped_expert_mlp (combine)");
}

void slot_dot_cuda(const SlotDotParams& p, void* stream) {
  if (p.T == 0) return;
  UPSAFE_DISPATCH_FLOAT(p.dtype, T, [&] {
    slot_dot_kernel<T><<<ceil_div(p.T * p.k, 8), 256, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
  check_launch("grouped_expert_mlp (routing-weight grad)");
}

void segment_sum_cuda(const SegmentSumParams& p, void* stream) {
  if (p.e_end <= p.e_begin) return;
  dim3 grid(p.e_end - p.e_begin, ceil_div(p.W, 256));
  UPSAFE_DISPATCH_FLOAT(p.dtype, T, [&] {
    segment_sum_kernel<T><<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
  check_launch("grouped_expert_mlp (bias grad)");
}

}  // namespace grouped_mlp
}  // namespace upsafe

namespace upsafe {
namespace grouped_mlp {
namespace {
__global__ void zero_unwritten_kernel(ZeroParams p) {
  const int start = p.e_begin > 0 ? p.offsets[p.e_begin - 1] : 0;
  long long r0, r1;
  if (p.per_expert) {
    const int e = p.e_begin + blockIdx.y;
    const int n = p.offsets[e] - (e > 0 ? p.offsets[e - 1] : 0);
    if (n > 0) return;
    r0 = blockIdx.y;
    r1 = r0 + 1;
  } else {
    r0 = p.offsets[p.e_end - 1] - start;
    r1 = p.rows;
  }
  const long long bytes_per_row = p.width * p.elem_bytes;
  char* base = static_cast<char*>(p.buf);
  const long long total = (r1 - r0) * bytes_per_row;
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
  if (bytes_per_row % 16 == 0) {  // buffers come from the caching allocator: 16-byte aligned rows
    uint4* b = reinterpret_cast<uint4*>(base + r0 * bytes_per_row);
    for (long long i = tid; i < total / 16; i += stride) b[i] = make_uint4(0, 0, 0, 0);
  } else {
    for (long long i = tid; i < total; i += stride) base[r0 * bytes_per_row + i] = 0;
  }
}
}  // namespace

void zero_unwritten_cuda(const ZeroParams& p, void* stream) {
  if (p.rows == 0 || p.width == 0) return;
  dim3 grid(264, p.per_expert ? static_cast<unsigned>(p.e_end - p.e_begin) : 1u);
  zero_unwritten_kernel<<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(p);
  check_launch("grouped_expert_mlp (zero unwritten)");
}
}  // namespace grouped_mlp
}  // namespace upsafe
