// Op layer for the ESI kernels: list checks, the tile table (copied to the device once per call),
// allocation, and the device switch.
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../common/torch_utils.h"
#include "esi.h"

namespace upsafe {
namespace esi {
namespace {

using at::Tensor;

void check_list(const char* op, const char* name, at::TensorList ts, const Tensor& ref, c10::optional<at::ScalarType> dt) {
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK_VALUE(ts[i].device() == ref.device(), op, ": `", name, "[", i, "]` is on ", ts[i].device(),
                      " but `", name, "[0]` is on ", ref.device());
    TORCH_CHECK_VALUE(ts[i].is_contiguous(), op, ": `", name, "[", i, "]` must be contiguous");
    if (dt) TORCH_CHECK_VALUE(ts[i].scalar_type() == *dt, op, ": `", name, "[", i, "]` must be ", *dt, ", got ",
                              ts[i].scalar_type());
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Copies a host array of POD structs to `device` (a byte tensor kept alive by the caller).
template <typename Meta>
Tensor to_device(const std::vector<Meta>& v, const at::Device& device) {
  auto host = at::empty({static_cast<int64_t>(v.size() * sizeof(Meta))}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(host.data_ptr(), v.data(), v.size() * sizeof(Meta));
  return device.is_cpu() ? host : host.to(device, /*non_blocking=*/false);
}

struct Table {
  std::vector<TensorMeta> metas;
  long long tiles = 0;
  bool aligned = true;
};

Table build_table(at::TensorList acc, at::TensorList grads, const std::vector<Tensor>* masks,
                  c10::optional<at::ArrayRef<double>> sigma) {
  Table t;
  long long elems = 0;
  for (size_t i = 0; i < acc.size(); ++i) {
    TensorMeta m{};
    m.acc = acc[i].data_ptr<float>();
    m.grad = grads.empty() ? nullptr : grads[i].data_ptr();
    m.mask = masks ? static_cast<unsigned char*>((*masks)[i].data_ptr()) : nullptr;
    m.n = acc[i].numel();
    m.tile_begin = t.tiles;
    m.elem_begin = elems;
    m.sigma = sigma ? static_cast<float>((*sigma)[i]) : 1.f;
    t.aligned = t.aligned && m.n % 4 == 0 && aligned16(m.acc) && (!m.grad || (reinterpret_cast<uintptr_t>(m.grad) & 7u) == 0) &&
                (!m.mask || (reinterpret_cast<uintptr_t>(m.mask) & 3u) == 0);
    t.tiles += (m.n + kTile - 1) / kTile;
    elems += m.n;
    t.metas.push_back(m);
  }
  return t;
}

Tensor run_accumulate(const char* op, at::TensorList accum, at::TensorList grads, c10::optional<at::ArrayRef<double>> sigma,
                      bool finalize, bool hist_only, bool invert) {
  if (accum.empty()) return at::zeros({kBins}, at::kLong);
  const Tensor& ref = accum[0];
  check_list(op, "accum", accum, ref, at::kFloat);
  DType gd = DType::kFloat32;
  if (!hist_only) {
    TORCH_CHECK_VALUE(grads.size() == accum.size(), op, ": `grads` must have one tensor per accumulator (", accum.size(),
                      "), got ", grads.size());
    check_list(op, "grads", grads, ref, grads[0].scalar_type());
    gd = to_dtype(grads[0], op, "grads");
    for (size_t i = 0; i < accum.size(); ++i)
      TORCH_CHECK_VALUE(grads[i].numel() == accum[i].numel(), op, ": `grads[", i, "]` has ", grads[i].numel(),
                        " elements, `accum[", i, "]` has ", accum[i].numel());
  }
  if (finalize)
    TORCH_CHECK_VALUE(sigma.has_value() && sigma->size() == accum.size(), op,
                      ": finalize needs `sigma` with one value per tensor");
  Table t = build_table(accum, hist_only ? at::TensorList() : grads, nullptr, sigma);
  const bool want_hist = finalize || hist_only;
  Tensor hist = at::zeros({want_hist ? kBins : 0}, ref.options().dtype(at::kLong));
  MultiParams p{};
  p.n_tensors = static_cast<int>(t.metas.size());
  p.total_tiles = t.tiles;
  p.grad_dtype = gd;
  p.finalize = finalize;
  p.invert = invert;
  p.aligned = t.aligned;
  p.hist = want_hist ? reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>()) : nullptr;
  on_device(ref, op, [&] { p.metas = t.metas.data(); accumulate_cpu(p, t.metas.data()); },
            [&](void* stream) {
#ifdef UPSAFE_WITH_CUDA
              Tensor dev = to_device(t.metas, ref.device());
              p.metas = reinterpret_cast<const TensorMeta*>(dev.data_ptr());
              accumulate_cuda(p, stream);
#endif
            });
  return hist;
}

Tensor esi_accumulate_(at::TensorList accum, at::TensorList grads, c10::optional<at::ArrayRef<double>> sigma,
                       bool finalize, bool invert) {
  return run_accumulate("esi_accumulate_", accum, grads, sigma, finalize, false, invert);
}

Tensor esi_histogram(at::TensorList scores, bool invert) {
  return run_accumulate("esi_histogram", scores, {}, c10::nullopt, false, true, invert);
}

std::tuple<std::vector<Tensor>, Tensor, Tensor> esi_select(at::TensorList scores, int64_t threshold_bin,
                                                           int64_t capacity, bool invert) {
  constexpr const char* op = "esi_select";
  TORCH_CHECK_VALUE(threshold_bin >= -1 && threshold_bin < kBins, op, ": `threshold_bin` must be in [-1, ", kBins,
                    "), got ", threshold_bin);
  TORCH_CHECK_VALUE(capacity >= 0, op, ": `capacity` must be >= 0");
  std::vector<Tensor> masks;
  if (scores.empty()) return {masks, at::empty({capacity}, at::kLong), at::zeros({1}, at::kLong)};
  const Tensor& ref = scores[0];
  check_list(op, "scores", scores, ref, at::kFloat);
  for (const auto& s : scores) masks.push_back(at::empty(s.sizes(), s.options().dtype(at::kBool)));
  Tensor cand = at::empty({capacity}, ref.options().dtype(at::kLong));
  Tensor count = at::zeros({1}, ref.options().dtype(at::kLong));
  Table t = build_table(scores, {}, &masks, c10::nullopt);
  MultiParams p{};
  p.n_tensors = static_cast<int>(t.metas.size());
  p.total_tiles = t.tiles;
  p.invert = invert;
  p.aligned = t.aligned;
  p.threshold_bin = static_cast<int>(threshold_bin);
  p.cand_keys = reinterpret_cast<unsigned long long*>(cand.data_ptr<int64_t>());
  p.cand_count = reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>());
  p.cand_capacity = capacity;
  on_device(ref, op, [&] { p.metas = t.metas.data(); select_cpu(p, t.metas.data()); },
            [&](void* stream) {
#ifdef UPSAFE_WITH_CUDA
              Tensor dev = to_device(t.metas, ref.device());
              p.metas = reinterpret_cast<const TensorMeta*>(dev.data_ptr());
              select_cuda(p, stream);
#endif
            });
  return {masks, cand, count};
}

void esi_mark_(at::TensorList masks, const Tensor& indices) {
  constexpr const char* op = "esi_mark_";
  if (masks.empty() || indices.numel() == 0) return;
  const Tensor& ref = masks[0];
  check_list(op, "masks", masks, ref, at::kBool);
  UPSAFE_CHECK_DTYPE(op, indices, "indices", at::kLong);
  UPSAFE_CHECK_SAME_DEVICE(op, indices, "indices", ref);
  std::vector<TensorMeta> metas;
  long long elems = 0;
  for (const auto& m : masks) {
    TensorMeta t{};
    t.mask = static_cast<unsigned char*>(m.data_ptr());
    t.n = m.numel();
    t.elem_begin = elems;
    elems += t.n;
    metas.push_back(t);
  }
  Tensor idx = indices.contiguous();
  MarkParams p{nullptr, static_cast<int>(metas.size()), idx.data_ptr<int64_t>(), idx.numel()};
  on_device(ref, op,
            [&] {
              auto mn = idx.min().item<int64_t>(), mx = idx.max().item<int64_t>();
              TORCH_CHECK_VALUE(mn >= 0 && mx < elems, op, ": `indices` must be in [0, ", elems, ")");
              p.metas = metas.data();
              mark_cpu(p);
            },
            [&](void* stream) {
#ifdef UPSAFE_WITH_CUDA
              Tensor dev = to_device(metas, ref.device());
              p.metas = reinterpret_cast<const TensorMeta*>(dev.data_ptr());
              mark_cuda(p, stream);
#endif
            });
}

void esi_sparse_adamw_(at::TensorList params, at::TensorList grads, at::TensorList idx, at::TensorList m,
                       at::TensorList v, at::TensorList master, double lr, double beta1, double beta2, double eps,
                       double weight_decay, int64_t step) {
  constexpr const char* op = "esi_sparse_adamw_";
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && idx.size() == n && m.size() == n && v.size() == n && master.size() == n, op,
                    ": params, grads, idx, m, v, master must have the same length");
  TORCH_CHECK_VALUE(step >= 1, op, ": `step` must be >= 1");
  if (n == 0) return;
  const Tensor& ref = params[0];
  check_list(op, "params", params, ref, ref.scalar_type());
  check_list(op, "grads", grads, ref, ref.scalar_type());
  check_list(op, "idx", idx, ref, at::kInt);
  check_list(op, "m", m, ref, at::kFloat);
  check_list(op, "v", v, ref, at::kFloat);
  check_list(op, "master", master, ref, at::kFloat);
  std::vector<AdamMeta> metas;
  long long tiles = 0;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(grads[i].numel() == params[i].numel(), op, ": `grads[", i, "]` size differs from `params[", i, "]`");
    const long long k = idx[i].numel();
    TORCH_CHECK_VALUE(m[i].numel() == k && v[i].numel() == k && master[i].numel() == k, op, ": state of tensor ", i,
                      " must have one entry per selected index (", k, ")");
    metas.push_back(AdamMeta{params[i].data_ptr(), grads[i].data_ptr(), idx[i].data_ptr<int32_t>(),
                             m[i].data_ptr<float>(), v[i].data_ptr<float>(), master[i].data_ptr<float>(), k, tiles});
    tiles += (k + kTile - 1) / kTile;
  }
  AdamParams p{};
  p.n_tensors = static_cast<int>(n);
  p.total_tiles = tiles;
  p.dtype = to_dtype(ref, op, "params");
  p.lr = static_cast<float>(lr);
  p.beta1 = static_cast<float>(beta1);
  p.beta2 = static_cast<float>(beta2);
  p.eps = static_cast<float>(eps);
  p.weight_decay = static_cast<float>(weight_decay);
  p.bias_c1 = static_cast<float>(1.0 - std::pow(beta1, static_cast<double>(step)));
  p.bias_c2 = static_cast<float>(1.0 - std::pow(beta2, static_cast<double>(step)));
  on_device(ref, op, [&] { p.metas = metas.data(); sparse_adamw_cpu(p, metas.data()); },
            [&](void* stream) {
#ifdef UPSAFE_WITH_CUDA
              Tensor dev = to_device(metas, ref.device());
              p.metas = reinterpret_cast<const AdamMeta*>(dev.data_ptr());
              sparse_adamw_cuda(p, stream);
#endif
            });
}

}  // namespace
}  // namespace esi
}  // namespace upsafe

#define UPSAFE_ESI_IMPLS(m)                                             \
  m.impl("esi_accumulate_", &upsafe::esi::esi_accumulate_);             \
  m.impl("esi_histogram", &upsafe::esi::esi_histogram);                 \
  m.impl("esi_select", &upsafe::esi::esi_select);                       \
  m.impl("esi_mark_", &upsafe::esi::esi_mark_);                         \
  m.impl("esi_sparse_adamw_", &upsafe::esi::esi_sparse_adamw_);

TORCH_LIBRARY_IMPL(upsafe, CPU, m) { UPSAFE_ESI_IMPLS(m) }
#ifdef UPSAFE_WITH_CUDA
TORCH_LIBRARY_IMPL(upsafe, CUDA, m) { UPSAFE_ESI_IMPLS(m) }
#endif
