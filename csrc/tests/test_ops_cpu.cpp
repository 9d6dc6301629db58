// Standalone C++ check of the op library (CMake build, no Python): calls upsafe::sparse_route
// through the dispatcher and compares it with a direct loop implementation of the same formula.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("upsafe::sparse_route", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                    const at::Tensor&, int64_t, double, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, bool, double)>();
  at::manual_seed(0);
  const int64_t T = 1000, E = 16, k = 3;
  const double tau = 0.7;
  auto logits = at::randn({T, E});
  auto [w, ex, counts, perm, offs, inv] = op.call(logits, k, tau, std::nullopt, std::nullopt, true, 0.0);
  auto L = logits.accessor<float, 2>();
  auto W = w.accessor<float, 2>();
  auto X = ex.accessor<int32_t, 2>();
  int failures = 0;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> order(E);
    for (int e = 0; e < E; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return L[t][a] > L[t][b]; });
    double sum_sel = 0;
    for (int j = 0; j < k; ++j) sum_sel += std::exp(L[t][order[j]] / tau);
    for (int j = 0; j < k; ++j) {
      const double want = std::exp(L[t][order[j]] / tau) / sum_sel;
      if (X[t][j] != order[j] || std::fabs(W[t][j] - want) > 1e-5) ++failures;
    }
  }
  const int total = offs[E - 1].item<int>();
  if (total != T * k) ++failures;
  std::printf("sparse_route CPU: %d mismatches over %lld tokens\n", failures, (long long)T);
  return failures == 0 ? 0 : 1;
}
