// Activation functions and their derivatives in fp32, shared by the CPU and CUDA kernels so both
// compute the same formula. Plain C++ (host/device), no torch.
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define UPSAFE_HD __host__ __device__ __forceinline__
#else
#define UPSAFE_HD inline
#endif

namespace upsafe {
namespace grouped_mlp {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// act: 0 silu, 1 gelu (tanh approximation), 2 gelu (erf)
UPSAFE_HD float act_fwd(int act, float x) {
  if (act == 0) return x / (1.f + expf(-x));
  if (act == 1) return 0.5f * x * (1.f + tanhf(kSqrt2OverPi * (x + 0.044715f * x * x * x)));
  return 0.5f * x * (1.f + erff(x * kInvSqrt2));
}

UPSAFE_HD float act_grad(int act, float x) {
  if (act == 0) {
    const float s = 1.f / (1.f + expf(-x));
    return s * (1.f + x * (1.f - s));
  }
  if (act == 1) {
    const float u = kSqrt2OverPi * (x + 0.044715f * x * x * x);
    const float t = tanhf(u);
    return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * 0.044715f * x * x);
  }
  return 0.5f * (1.f + erff(x * kInvSqrt2)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
}

}  // namespace grouped_mlp
}  // namespace upsafe
