// Op layer for sparse_route: argument checks, allocation, and the device switch to the launchers.
#include <torch/library.h>

#include "../common/torch_utils.h"
#include "routing.h"

namespace upsafe {
namespace routing {
namespace {

constexpr const char* kOp = "sparse_route";

struct Common {
  at::Tensor logits, bias, tptok;
  long long T;
  int E;
};

Common check_common(const char* op, const at::Tensor& logits, double temperature,
                    const c10::optional<at::Tensor>& tptok, const c10::optional<at::Tensor>& bias) {
  UPSAFE_CHECK_DIM(op, logits, "logits", 2);
  to_dtype(logits, op, "logits");
  const long long T = logits.size(0);
  const long long E = logits.size(1);
  TORCH_CHECK_VALUE(E >= 1 && E <= kMaxExperts, op, ": `logits` must have 1..", kMaxExperts,
                    " experts (dim 1), got ", E);
  TORCH_CHECK_VALUE(temperature > 0.0, op, ": `temperature` must be > 0, got ", temperature);
  Common c{logits.contiguous(), at::Tensor(), at::Tensor(), T, static_cast<int>(E)};
  if (bias.has_value()) {
    const auto& b = *bias;
    UPSAFE_CHECK_DTYPE(op, b, "bias", at::kFloat);
    UPSAFE_CHECK_SAME_DEVICE(op, b, "bias", logits);
    TORCH_CHECK_VALUE((b.dim() == 1 && b.size(0) == E) || (b.dim() == 2 && b.size(0) == T && b.size(1) == E),
                      op, ": `bias` must have shape [E]=[", E, "] or [T, E]=[", T, ", ", E, "], got ",
                      b.sizes());
    c.bias = b.contiguous();
  }
  if (tptok.has_value()) {
    const auto& tt = *tptok;
    UPSAFE_CHECK_DTYPE(op, tt, "temperature", at::kFloat);
    UPSAFE_CHECK_SAME_DEVICE(op, tt, "temperature", logits);
    TORCH_CHECK_VALUE(tt.dim() == 1 && tt.size(0) == T, op,
                      ": a per-token `temperature` must have shape [T]=[", T, "], got ", tt.sizes());
    c.tptok = tt.contiguous();
  }
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_route(
    const at::Tensor& logits_in, int64_t k, double temperature, const c10::optional<at::Tensor>& tptok,
    const c10::optional<at::Tensor>& bias, bool renormalize, double min_weight) {
  Common c = check_common(kOp, logits_in, temperature, tptok, bias);
  TORCH_CHECK_VALUE(k >= 1 && k <= std::min<int64_t>(c.E, kMaxTopK), kOp, ": `k` must be in [1, min(E, ",
                    kMaxTopK, ")] = [1, ", std::min<int64_t>(c.E, kMaxTopK), "], got ", k);
  TORCH_CHECK_VALUE(min_weight >= 0.0 && min_weight <= 1.0, kOp, ": `min_weight` must be in [0, 1], got ",
                    min_weight);
  const auto i32 = c.logits.options().dtype(at::kInt);
  auto weights = at::empty({c.T, k}, c.logits.options().dtype(at::kFloat));
  auto experts = at::empty({c.T, k}, i32);
  auto counts = at::empty({c.E}, i32);
  auto offsets = at::empty({c.E}, i32);
  auto permutation = at::empty({c.T * k}, i32);
  auto inverse = at::empty({c.T * k}, i32);

  RouteParams p{};
  p.logits = c.logits.data_ptr();
  p.bias = c.bias.defined() ? c.bias.data_ptr<float>() : nullptr;
  p.bias_token_stride = (c.bias.defined() && c.bias.dim() == 2) ? c.E : 0;
  p.temperature_tok = c.tptok.defined() ? c.tptok.data_ptr<float>() : nullptr;
  p.temperature = static_cast<float>(temperature);
  p.min_weight = static_cast<float>(min_weight);
  p.renormalize = renormalize;
  p.T = c.T;
  p.E = c.E;
  p.k = static_cast<int>(k);
  p.dtype = to_dtype(c.logits, kOp, "logits");
  p.weights = weights.data_ptr<float>();
  p.experts = experts.data_ptr<int32_t>();
  p.counts = counts.data_ptr<int32_t>();
  p.offsets = offsets.data_ptr<int32_t>();
  p.permutation = permutation.data_ptr<int32_t>();
  p.inverse = inverse.data_ptr<int32_t>();

  on_device(c.logits, kOp, [&] { route_cpu(p); },
            [&](void* stream) {
#ifdef UPSAFE_WITH_CUDA
              auto ws = at::empty({route_cuda_workspace_elems(c.T, c.E)}, i32);
              route_cuda(p, ws.data_ptr<int32_t>(), stream);
#endif
            });
  return {weights, experts, counts, permutation, offsets, inverse};
}

at::Tensor sparse_route_backward(const at::Tensor& grad_weights, const at::Tensor& logits_in,
                                 double temperature, const c10::optional<at::Tensor>& tptok,
                                 const c10::optional<at::Tensor>& bias, bool renormalize,
                                 const at::Tensor& weights, const at::Tensor& experts) {
  constexpr const char* op = "sparse_route_backward";
  Common c = check_common(op, logits_in, temperature, tptok, bias);
  UPSAFE_CHECK_DTYPE(op, experts, "experts", at::kInt);
  UPSAFE_CHECK_DIM(op, experts, "experts", 2);
  TORCH_CHECK_VALUE(experts.size(0) == c.T, op, ": `experts` must have T rows");
  const int64_t k = experts.size(1);
  auto g = grad_weights.to(at::kFloat).contiguous();
  auto w = weights.contiguous();
  auto ex = experts.contiguous();
  TORCH_CHECK_VALUE(g.sizes() == ex.sizes() && w.sizes() == ex.sizes(), op,
                    ": `grad_weights`, `weights` and `experts` must share shape [T, k]");
  auto grad = at::empty({c.T, c.E}, c.logits.options().dtype(at::kFloat));
  RouteBackwardParams p{};
  p.grad_weights = g.data_ptr<float>();
  p.logits = c.logits.data_ptr();
  p.bias = c.bias.defined() ? c.bias.data_ptr<float>() : nullptr;
  p.bias_token_stride = (c.bias.defined() && c.bias.dim() == 2) ? c.E : 0;
  p.temperature_tok = c.tptok.defined() ? c.tptok.data_ptr<float>() : nullptr;
  p.temperature = static_cast<float>(temperature);
  p.renormalize = renormalize;
  p.T = c.T;
  p.E = c.E;
  p.k = static_cast<int>(k);
  p.dtype = to_dtype(c.logits, op, "logits");
  p.weights = w.data_ptr<float>();
  p.experts = ex.data_ptr<int32_t>();
  p.grad_logits = grad.data_ptr<float>();
  on_device(c.logits, op, [&] { route_backward_cpu(p); },
            [&](void* stream) {
#ifdef UPSAFE_WITH_CUDA
              route_backward_cuda(p, stream);
#endif
            });
  return grad;
}

}  // namespace
}  // namespace routing
}  // namespace upsafe

TORCH_LIBRARY_IMPL(upsafe, CPU, m) {
  m.impl("sparse_route", &upsafe::routing::sparse_route);
  m.impl("sparse_route_backward", &upsafe::routing::sparse_route_backward);
}

#ifdef UPSAFE_WITH_CUDA
TORCH_LIBRARY_IMPL(upsafe, CUDA, m) {
  m.impl("sparse_route", &upsafe::routing::sparse_route);
  m.impl("sparse_route_backward", &upsafe::routing::sparse_route_backward);
}
#endif
