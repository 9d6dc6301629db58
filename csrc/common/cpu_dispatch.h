// CPU-side dtype dispatch for the kernel families' *_cpu.cpp files: calls f(T{}) with T = float,
// c10::Half or c10::BFloat16. The default throws: a new dtype is added here on purpose.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdexcept>

#include "dispatch.h"

namespace upsafe {

template <typename F>
void dispatch_cpu(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(c10::Half{});
    case DType::kBFloat16: return f(c10::BFloat16{});
  }
  throw std::runtime_error(std::string("upsafe: unsupported dtype ") + dtype_name(d));
}

}  // namespace upsafe
