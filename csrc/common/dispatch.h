// Framework-free dtype tags and dispatch switches shared by the .cu launchers.
// The .cpp op layer maps at::ScalarType -> upsafe::DType; device code never sees torch types.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace upsafe {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

}  // namespace upsafe

// UPSAFE_DISPATCH_FLOAT(dtype, scalar_t, ...) for device code: binds scalar_t to float, __half or
// __nv_bfloat16 (include cuda_fp16.h / cuda_bf16.h first). The default throws: a new dtype must be
// added here on purpose, never fall through silently.
#define UPSAFE_DISPATCH_FLOAT(DTYPE, NAME, ...)                                  \
  [&] {                                                                          \
    switch (DTYPE) {                                                             \
      case ::upsafe::DType::kFloat32: { using NAME = float; return __VA_ARGS__(); } \
      case ::upsafe::DType::kFloat16: { using NAME = __half; return __VA_ARGS__(); } \
      case ::upsafe::DType::kBFloat16: { using NAME = __nv_bfloat16; return __VA_ARGS__(); } \
    }                                                                            \
    throw std::runtime_error(std::string("upsafe: unsupported dtype ") +         \
                             ::upsafe::dtype_name(DTYPE));                       \
  }()

// Dispatch a runtime int onto a compile-time constant from a fixed list; default throws.
#define UPSAFE_CASE_INT(V, NAME, ...) case V: { constexpr int NAME = V; return __VA_ARGS__(); }
