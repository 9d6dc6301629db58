// Grouped expert MLP: the non-GEMM stages (row gather = the permutation, activation with bias,
// deterministic weighted combine, routing-weight gradient, per-expert bias gradient). The GEMMs
// run in the op layer (torch._grouped_mm for bf16 on CUDA, else a per-expert mm loop).
//
// Experts may come in several weight chunks (e.g. the frozen original MLP and the trainable safety
// experts): chunk c owns experts [e_begin, e_end) and a row buffer [M = T*k, ...] whose rows
// [0, count_c) hold, in permutation order, the slots routed to its experts. count_c and every row's
// expert are read from `offsets` on the device, so nothing here needs a host synchronisation.
#pragma once
#include <cstdint>

#include "../common/dispatch.h"

namespace upsafe {
namespace grouped_mlp {

enum class Activation : int { kSilu = 0, kGeluTanh = 1, kGelu = 2 };
constexpr int kMaxChunks = 4;

struct ChunkLayout {
  int n_chunks;
  int first_expert[kMaxChunks + 1];  // chunk c = experts [first_expert[c], first_expert[c+1])
};

// out[r] = x[perm[start + r] / k] * (scale ? scale[perm[start + r]] : 1) for r < count
struct GatherParams {
  const void* x;               // [T, H]
  const int32_t* permutation;  // [T*k]
  const int32_t* offsets;      // [E] inclusive cumulative counts
  const float* scale;          // [T*k] per-slot scale (routing weights) or nullptr
  void* out;                   // [M, H]
  int32_t* rel_offsets;        // [e_end - e_begin] out: offsets relative to the chunk start, or nullptr
  long long M;
  int H, k, e_begin, e_end;
  DType dtype;
};

// gated: a = act(h[:, :I] + b[:I]) * (h[:, I:] + b[I:]); else a = act(h + b). Backward (grad_a set):
// writes grad_h and recomputes a.
struct ActParams {
  const void* h;        // [M, W], W = 2I (gated) or I
  const void* bias;     // [E_c, W] (chunk-local experts) or nullptr
  const void* grad_a;   // [M, I] or nullptr (forward)
  void* a;              // [M, I] out
  void* grad_h;         // [M, W] out (backward)
  const int32_t* offsets;
  long long M;
  int I, e_begin, e_end;
  bool gated;
  Activation act;
  DType dtype;
};

// out[t] = sum_j w[t,j] * (rows_c[inverse[t*k+j] - start_c] + bias_c[e]) over kept slots; fp32 sums
// in slot order (deterministic). weights == nullptr means 1.
struct CombineParams {
  const void* rows[kMaxChunks];  // [M, H] per chunk
  const void* bias[kMaxChunks];  // [E_c, H] per chunk or nullptr
  const float* weights;          // [T, k] or nullptr
  const int32_t* experts;        // [T, k]
  const int32_t* inverse;        // [T*k]
  const int32_t* offsets;        // [E]
  ChunkLayout layout;
  void* out;                     // [T, H]
  long long T;
  int H, k;
  DType dtype;
};

// grad_weights[t, j] = <grad_out[t], rows_c[row] + bias_c[e]> for kept slots, 0 for dropped ones.
struct SlotDotParams {
  const void* grad_out;          // [T, H]
  const void* rows[kMaxChunks];
  const void* bias[kMaxChunks];
  const int32_t* experts;
  const int32_t* inverse;
  const int32_t* offsets;
  ChunkLayout layout;
  float* grad_weights;           // [T, k] out
  long long T;
  int H, k;
  DType dtype;
};

// out[e - e_begin, :] = sum over the chunk rows of expert e of g[r, :] (bias gradients), fp32 sums.
struct SegmentSumParams {
  const void* g;        // [M, W]
  const int32_t* offsets;
  float* out;           // [E_c, W]
  long long M;
  int W, e_begin, e_end;
  DType dtype;
};

void gather_cpu(const GatherParams& p);
void activation_cpu(const ActParams& p);
void combine_cpu(const CombineParams& p);
void slot_dot_cpu(const SlotDotParams& p);
void segment_sum_cpu(const SegmentSumParams& p);

#ifdef UPSAFE_WITH_CUDA
void gather_cuda(const GatherParams& p, void* stream);
void activation_cuda(const ActParams& p, void* stream);
void combine_cuda(const CombineParams& p, void* stream);
void slot_dot_cuda(const SlotDotParams& p, void* stream);
void segment_sum_cuda(const SegmentSumParams& p, void* stream);
#endif

}  // namespace grouped_mlp
}  // namespace upsafe

namespace upsafe {
namespace grouped_mlp {
// Zero what grouped GEMMs leave unwritten, so op outputs never expose uninitialised memory:
// rows [count_c, M) of a chunk row buffer [M, W] (tail), or the [R] slice of every expert with no
// rows in a per-expert buffer [E_c, R] (empty).
struct ZeroParams {
  void* buf;
  const int32_t* offsets;
  long long rows;   // M (tail) or E_c (empty)
  long long width;  // W (tail) or R (empty)
  int e_begin, e_end;
  int elem_bytes;
  bool per_expert;  // false: tail rows; true: empty experts
};
#ifdef UPSAFE_WITH_CUDA
void zero_unwritten_cuda(const ZeroParams& p, void* stream);
#endif
}  // namespace grouped_mlp
}  // namespace upsafe
