// Expected Safety Impact: multi-tensor kernels over every eligible weight in one launch.
//   accumulate: acc += grad (fp32 accumulators, grads fp32/fp16/bf16); with `finalize` the same pass
//               writes score = sigma_t * |acc + grad| in place and builds the selection histogram
//   histogram:  the selection histogram of existing scores
//   select:     mask = key(score) bin > threshold bin; elements in the threshold bin are appended as
//               candidates (sorted afterwards on the device) -> exact top-k with deterministic ties
//   sparse_adamw: Adam on compact per-selected-element state (SET), gather-update-scatter in one pass
// key(s) = fp32 bit pattern of s >= 0 (monotone in s; NaN ranks above +inf), or its complement for
// smallest-first; bin = key >> kBinShift.
#pragma once
#include <cstdint>

#include "../common/dispatch.h"

namespace upsafe {
namespace esi {

constexpr int kBinShift = 18;                        // 13-bit bins: 8 exponent + 5 mantissa bits
constexpr int kBins = 1 << (31 - kBinShift);         // 8192
constexpr uint32_t kLowMask = (1u << kBinShift) - 1;
constexpr int kTile = 8192;                          // elements per tile; tiles never straddle tensors

struct TensorMeta {
  float* acc;            // [n] fp32 accumulator / score (in place)
  const void* grad;      // [n] gradient (accumulate) or nullptr
  unsigned char* mask;   // [n] bool out (select) or nullptr
  long long n;
  long long tile_begin;  // first tile of this tensor in the global tile numbering
  long long elem_begin;  // global index of element 0 (parameter order)
  float sigma;           // std of the weight tensor (finalize)
};

struct MultiParams {
  const TensorMeta* metas;  // [n_tensors] on the kernel's device
  int n_tensors;
  long long total_tiles;
  DType grad_dtype;
  bool finalize;            // accumulate: also write scores + histogram
  bool invert;              // smallest-first keys
  bool aligned;             // every pointer 16-byte aligned and n % 4 == 0 -> vector path
  unsigned long long* hist; // [kBins] out (atomically added; zero it first)
  // select only
  int threshold_bin;
  unsigned long long* cand_keys;   // [capacity] out: ((kLowMask - low) << 40) | global index
  unsigned long long* cand_count;  // [1] out (zero it first)
  long long cand_capacity;
};

// SET optimizer step over the selected elements only. Per tensor: idx [n] int32 flat indices, fp32
// compact m, v, master; param and grad full tensors of dtype `dtype`.
struct AdamMeta {
  void* param;
  const void* grad;
  const int32_t* idx;
  float* m;
  float* v;
  float* master;
  long long n;
  long long tile_begin;
};
struct AdamParams {
  const AdamMeta* metas;
  int n_tensors;
  long long total_tiles;
  DType dtype;
  float lr, beta1, beta2, eps, weight_decay, bias_c1, bias_c2;  // bias_c* = 1 - beta^step
};

// masks[t][i] = true for every global index g = elem_begin[t] + i in `indices`
struct MarkParams {
  const TensorMeta* metas;
  int n_tensors;
  const int64_t* indices;
  long long n;
};

#ifdef __CUDACC__
#define UPSAFE_ESI_HD __host__ __device__ __forceinline__
#else
#define UPSAFE_ESI_HD inline
#endif

// Index of the tensor owning global tile `tile` (or global element `elem`), metas sorted by
// tile_begin / elem_begin; shared by the CPU and CUDA kernels.
template <bool BY_ELEMENT, typename Meta>
UPSAFE_ESI_HD int owner(const Meta* metas, int n, long long key) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    long long begin;
    if constexpr (BY_ELEMENT) begin = metas[mid].elem_begin; else begin = metas[mid].tile_begin;
    if (begin <= key) lo = mid; else hi = mid - 1;
  }
  return lo;
}
template <typename Meta>
UPSAFE_ESI_HD int tile_owner(const Meta* metas, int n, long long tile) { return owner<false>(metas, n, tile); }

void accumulate_cpu(const MultiParams& p, const TensorMeta* metas);
void mark_cpu(const MarkParams& p);
void select_cpu(const MultiParams& p, const TensorMeta* metas);
void sparse_adamw_cpu(const AdamParams& p, const AdamMeta* metas);

#ifdef UPSAFE_WITH_CUDA
void accumulate_cuda(const MultiParams& p, void* stream);
void select_cuda(const MultiParams& p, void* stream);
void mark_cuda(const MarkParams& p, void* stream);
void sparse_adamw_cuda(const AdamParams& p, void* stream);
#endif

}  // namespace esi
}  // namespace upsafe
