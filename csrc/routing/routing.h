// Temperature-scaled sparse top-k routing: plain parameter structs and launchers.
// No torch types here: the .cu side compiles against CUDA/CCCL only, the .cpp side fills these.
#pragma once
#include <cstdint>

#include "../common/dispatch.h"

namespace upsafe {
namespace routing {

// Forward: p = softmax((logits + bias) / tau) over E experts, top-k by the scaled logits
// (ties -> lower expert index, NaN ranks highest), slots j>0 with p < min_weight dropped
// (expert -1, weight 0), weights renormalised over the kept slots when `renormalize`.
// The permutation lists slot ids (t*k + j) grouped by expert, stable in slot order; dropped slots
// follow all kept ones (a virtual bucket E), so every output has a static shape.
struct RouteParams {
  const void* logits;            // [T, E], dtype `dtype`, contiguous
  const float* bias;             // [E] (bias_token_stride 0) or [T, E]; nullptr = none
  long long bias_token_stride;   // 0 or E
  const float* temperature_tok;  // [T] or nullptr: then `temperature` is used
  float temperature;
  float min_weight;
  bool renormalize;
  long long T;
  int E;
  int k;
  DType dtype;
  float* weights;       // [T, k] out
  int32_t* experts;     // [T, k] out, -1 where dropped
  int32_t* counts;      // [E] out, kept slots per expert
  int32_t* offsets;     // [E] out, inclusive cumulative counts (torch._grouped_mm `offs` format)
  int32_t* permutation; // [T*k] out, slot ids sorted by expert (stable), dropped slots last
  int32_t* inverse;     // [T*k] out, slot id -> position in `permutation`
};

// Backward to the pre-temperature logits z = logits + bias:
//   renormalize: dz_e = w_e (g_e - sum_j g_j w_j) / tau for kept e, 0 elsewhere
//   plain:       dz_e = p_e (g~_e - sum_{kept j} g_j p_{e_j}) / tau over all E (p recomputed)
struct RouteBackwardParams {
  const float* grad_weights;     // [T, k]
  const void* logits;            // [T, E] (plain mode only; may be nullptr when renormalize)
  const float* bias;             // as in RouteParams
  long long bias_token_stride;
  const float* temperature_tok;  // [T] or nullptr
  float temperature;
  bool renormalize;
  long long T;
  int E;
  int k;
  DType dtype;
  const float* weights;     // [T, k] forward output
  const int32_t* experts;   // [T, k] forward output
  float* grad_logits;       // [T, E] out, fp32
};

// CPU implementations (routing_cpu.cpp), parallel over tokens.
void route_cpu(const RouteParams& p);
void route_backward_cpu(const RouteBackwardParams& p);

#ifdef UPSAFE_WITH_CUDA
// CUDA implementations (routing_cuda.cu). `workspace` holds route_cuda_workspace_elems(T, E) int32
// (fully written by the kernels: no memset). No host synchronisation.
void route_cuda(const RouteParams& p, int32_t* workspace, void* stream);
void route_backward_cuda(const RouteBackwardParams& p, void* stream);
long long route_cuda_workspace_elems(long long T, int E);
#endif

constexpr int kMaxTopK = 8;
constexpr int kMaxExperts = 256;
constexpr int kTileTokens = 128;  // permutation tile (tokens) on both CPU and CUDA

}  // namespace routing
}  // namespace upsafe
