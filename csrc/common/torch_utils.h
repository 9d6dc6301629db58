// Torch-side helpers for the op layer (.cpp files only): argument checks that raise ValueError
// naming the argument, dtype mapping to the framework-free tags, and the CUDA stream/guard.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "dispatch.h"

#ifdef UPSAFE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace upsafe {

inline DType to_dtype(const at::Tensor& t, const char* op, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, op, ": `", arg, "` must be float32, float16 or bfloat16, got ",
                        t.scalar_type());
  }
  return DType::kFloat32;
}

#define UPSAFE_CHECK_DIM(op, t, name, d)                                                         \
  TORCH_CHECK_VALUE((t).dim() == (d), op, ": `", name, "` must be ", d, "-D, got shape ",        \
                    (t).sizes())
#define UPSAFE_CHECK_DTYPE(op, t, name, dt)                                                      \
  TORCH_CHECK_VALUE((t).scalar_type() == (dt), op, ": `", name, "` must be ", dt, ", got ",      \
                    (t).scalar_type())
#define UPSAFE_CHECK_SAME_DEVICE(op, t, name, ref)                                               \
  TORCH_CHECK_VALUE((t).device() == (ref).device(), op, ": `", name, "` is on ", (t).device(),   \
                    " but the inputs are on ", (ref).device())

// Runs `cpu()` or `cuda(stream)` by the device of `ref`; a CUDA tensor in a build without CUDA
// kernels is a clear error, never a crash.
template <typename CpuFn, typename CudaFn>
void on_device(const at::Tensor& ref, const char* op, CpuFn&& cpu, CudaFn&& cuda) {
  if (ref.is_cpu()) {
    cpu();
    return;
  }
#ifdef UPSAFE_WITH_CUDA
  if (ref.is_cuda()) {
    c10::cuda::CUDAGuard guard(ref.device());
    cuda(static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()));
    return;
  }
#else
  (void)cuda;
#endif
  TORCH_CHECK_VALUE(false, op, ": no kernel for device ", ref.device(),
                    " in this build (python -m upsafe_ext.info lists the compiled kernels)");
}

}  // namespace upsafe
