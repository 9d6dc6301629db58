// Op layer for grouped_expert_mlp: checks, the per-chunk pipeline and its backward.
//   forward, per weight chunk c:  gather(x) -> GEMM(w_in) -> activation(+bias) -> GEMM(w_out)
//   then one deterministic combine over all chunks (routing weights, output bias).
// GEMM core: torch._grouped_mm (CUTLASS, sync-free) for bf16 on CUDA with widths % 8 == 0;
// otherwise a per-expert at::mm loop, which reads the offsets on the host (one sync on CUDA).
// Set UPSAFE_GROUPED_GEMM=loop to force the loop (debugging / comparing).
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "../common/torch_utils.h"
#include "grouped_mlp.h"

namespace upsafe {
namespace grouped_mlp {
namespace {

constexpr const char* kOp = "grouped_expert_mlp";
using at::Tensor;

// Where the row kernels run. The default CUDA stream's handle is 0, so "no stream" cannot mean CPU.
struct Dev {
  bool cuda;
  void* stream;
};


Activation parse_activation(c10::string_view s) {
  if (s == "silu") return Activation::kSilu;
  if (s == "gelu_tanh") return Activation::kGeluTanh;
  if (s == "gelu") return Activation::kGelu;
  TORCH_CHECK_VALUE(false, kOp, ": `activation` must be 'silu', 'gelu_tanh' or 'gelu', got '", std::string(s), "'");
  return Activation::kSilu;
}

struct Ctx {
  Tensor x, weights, experts, perm, offsets, inverse;
  std::vector<Tensor> w_in, w_out, b_in, b_out;
  ChunkLayout layout{};
  int64_t T = 0, H = 0, I = 0, W = 0, E = 0, k = 0, M = 0;
  bool gated = true, gmm = false;
  Activation act = Activation::kSilu;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> host_offsets;  // filled only for the loop path
  int n() const { return layout.n_chunks; }
  int64_t chunk_experts(int c) const { return layout.first_expert[c + 1] - layout.first_expert[c]; }
};

bool env_forces_loop() {
  const char* v = std::getenv("UPSAFE_GROUPED_GEMM");
  return v && std::string(v) == "loop";
}

Ctx check(const Tensor& x, const Tensor& weights, const Tensor& experts, const Tensor& perm, const Tensor& offsets,
          const Tensor& inverse, at::TensorList w_in, at::TensorList w_out, at::TensorList b_in, at::TensorList b_out,
          c10::string_view activation, bool gated) {
  Ctx c;
  UPSAFE_CHECK_DIM(kOp, x, "x", 2);
  c.dtype = to_dtype(x, kOp, "x");
  c.T = x.size(0);
  c.H = x.size(1);
  UPSAFE_CHECK_DIM(kOp, experts, "experts", 2);
  c.k = experts.size(1);
  c.M = c.T * c.k;
  c.E = offsets.numel();
  TORCH_CHECK_VALUE(experts.size(0) == c.T, kOp, ": routing `experts` has ", experts.size(0), " rows, x has ", c.T);
  TORCH_CHECK_VALUE(weights.sizes() == experts.sizes() && weights.scalar_type() == at::kFloat, kOp,
                    ": routing `weights` must be float32 of shape ", experts.sizes());
  for (auto* pr : {&experts, &perm, &offsets, &inverse})
    TORCH_CHECK_VALUE(pr->scalar_type() == at::kInt, kOp, ": routing index tensors must be int32");
  TORCH_CHECK_VALUE(perm.numel() == c.M && inverse.numel() == c.M, kOp, ": routing permutation/inverse must have T*k=",
                    c.M, " entries");
  for (auto* pr : {&weights, &experts, &perm, &offsets, &inverse})
    UPSAFE_CHECK_SAME_DEVICE(kOp, (*pr), "routing", x);
  const int n = static_cast<int>(w_in.size());
  TORCH_CHECK_VALUE(n >= 1 && n <= kMaxChunks, kOp, ": `w_in` must hold 1..", kMaxChunks, " weight chunks, got ", n);
  TORCH_CHECK_VALUE(static_cast<int>(w_out.size()) == n, kOp, ": `w_out` must have as many chunks as `w_in` (", n, ")");
  TORCH_CHECK_VALUE(b_in.empty() || static_cast<int>(b_in.size()) == n, kOp, ": `b_in` must be empty or have ", n, " chunks");
  TORCH_CHECK_VALUE(b_out.empty() || static_cast<int>(b_out.size()) == n, kOp, ": `b_out` must be empty or have ", n, " chunks");
  c.gated = gated;
  c.act = parse_activation(activation);
  c.layout.n_chunks = n;
  int64_t e_acc = 0;
  for (int i = 0; i < n; ++i) {
    const Tensor& wi = w_in[i];
    const Tensor& wo = w_out[i];
    TORCH_CHECK_VALUE(wi.dim() == 3 && wo.dim() == 3, kOp, ": weight chunk ", i, " must be 3-D ([E, 2I or I, H] and [E, H, I])");
    TORCH_CHECK_VALUE(wi.scalar_type() == x.scalar_type() && wo.scalar_type() == x.scalar_type(), kOp,
                      ": weight chunk ", i, " dtype ", wi.scalar_type(), " differs from x dtype ", x.scalar_type());
    UPSAFE_CHECK_SAME_DEVICE(kOp, wi, "w_in", x);
    UPSAFE_CHECK_SAME_DEVICE(kOp, wo, "w_out", x);
    const int64_t Ec = wi.size(0);
    if (i == 0) {
      c.W = wi.size(1);
      TORCH_CHECK_VALUE(!gated || c.W % 2 == 0, kOp, ": gated `w_in` needs an even width (2I), got ", c.W);
      c.I = gated ? c.W / 2 : c.W;
    }
    TORCH_CHECK_VALUE(wi.size(1) == c.W && wi.size(2) == c.H, kOp, ": `w_in` chunk ", i, " must have shape [E_c, ",
                      c.W, ", ", c.H, "], got ", wi.sizes());
    TORCH_CHECK_VALUE(wo.size(0) == Ec && wo.size(1) == c.H && wo.size(2) == c.I, kOp, ": `w_out` chunk ", i,
                      " must have shape [", Ec, ", ", c.H, ", ", c.I, "], got ", wo.sizes());
    c.layout.first_expert[i] = static_cast<int>(e_acc);
    e_acc += Ec;
    c.w_in.push_back(wi);
    c.w_out.push_back(wo);
    if (!b_in.empty()) {
      TORCH_CHECK_VALUE(b_in[i].sizes() == at::IntArrayRef({Ec, c.W}) && b_in[i].scalar_type() == x.scalar_type(), kOp,
                        ": `b_in` chunk ", i, " must be [", Ec, ", ", c.W, "] of x's dtype");
      c.b_in.push_back(b_in[i].contiguous());
    }
    if (!b_out.empty()) {
      TORCH_CHECK_VALUE(b_out[i].sizes() == at::IntArrayRef({Ec, c.H}) && b_out[i].scalar_type() == x.scalar_type(), kOp,
                        ": `b_out` chunk ", i, " must be [", Ec, ", ", c.H, "] of x's dtype");
      c.b_out.push_back(b_out[i].contiguous());
    }
  }
  c.layout.first_expert[n] = static_cast<int>(e_acc);
  TORCH_CHECK_VALUE(e_acc == c.E, kOp, ": the weight chunks hold ", e_acc, " experts but the routing has ", c.E);
  c.x = x.contiguous();
  c.weights = weights.contiguous();
  c.experts = experts.contiguous();
  c.perm = perm.contiguous();
  c.offsets = offsets.contiguous();
  c.inverse = inverse.contiguous();
  c.gmm = x.is_cuda() && x.scalar_type() == at::kBFloat16 && c.H % 8 == 0 && c.I % 8 == 0 && !env_forces_loop();
  if (!c.gmm && c.M > 0) {
    auto ho = c.offsets.to(at::kCPU);  // the loop path needs the group sizes on the host
    c.host_offsets.assign(ho.data_ptr<int32_t>(), ho.data_ptr<int32_t>() + c.E);
  }
  return c;
}

// ---- GEMM strategies over a chunk's row buffer -------------------------------------------------
struct ChunkRows {
  Tensor offs;                 // [E_c] int32 device, relative to the chunk's first row
  std::vector<int64_t> host;   // E_c + 1 boundaries (loop path only)
};

// The first gather of a chunk fills `offs` for chunks after the first (the first uses `offsets` as is).
ChunkRows chunk_rows(const Ctx& c, int i) {
  ChunkRows r;
  const int e0 = c.layout.first_expert[i], e1 = c.layout.first_expert[i + 1];
  if (c.gmm) {
    r.offs = e0 == 0 ? c.offsets.narrow(0, e0, e1 - e0) : at::empty({e1 - e0}, c.offsets.options());
  } else {
    const int64_t start = e0 > 0 ? c.host_offsets[e0 - 1] : 0;
    r.host.push_back(0);
    for (int e = e0; e < e1; ++e) r.host.push_back(c.host_offsets[e] - start);
  }
  return r;
}

// out[r] = A[r] @ W[e(r)]^T   A [M, K], W [E_c, N, K] -> [M, N]
Tensor gemm_nt(const Ctx& c, const Tensor& A, const Tensor& W, const ChunkRows& r) {
  if (c.gmm) return at::_grouped_mm(A, W.transpose(1, 2), r.offs);
  Tensor out = at::empty({A.size(0), W.size(1)}, A.options());
  for (size_t e = 0; e + 1 < r.host.size(); ++e) {
    const int64_t s = r.host[e], n = r.host[e + 1] - s;
    if (n > 0) {
      Tensor o = out.narrow(0, s, n);
      at::mm_out(o, A.narrow(0, s, n), W[e].t());
    }
  }
  return out;
}

// out[r] = G[r] @ W[e(r)]   G [M, N], W [E_c, N, K] -> [M, K]
Tensor gemm_nn(const Ctx& c, const Tensor& G, const Tensor& W, const ChunkRows& r) {
  if (c.gmm) return at::_grouped_mm(G, W, r.offs);
  Tensor out = at::empty({G.size(0), W.size(2)}, G.options());
  for (size_t e = 0; e + 1 < r.host.size(); ++e) {
    const int64_t s = r.host[e], n = r.host[e + 1] - s;
    if (n > 0) {
      Tensor o = out.narrow(0, s, n);
      at::mm_out(o, G.narrow(0, s, n), W[e]);
    }
  }
  return out;
}

// out[e] = G[rows_e]^T @ A[rows_e]   G [M, N], A [M, K] -> [E_c, N, K] (0 for experts with no rows)
Tensor gemm_tn(const Ctx& c, int i, const Tensor& G, const Tensor& A, const ChunkRows& r, Dev stream) {
  const int64_t Ec = c.chunk_experts(i);
  if (c.gmm) {
    Tensor out = at::_grouped_mm(G.t(), A, r.offs);
#ifdef UPSAFE_WITH_CUDA
    ZeroParams z{out.data_ptr(), c.offsets.data_ptr<int32_t>(), Ec, G.size(1) * A.size(1),
                 c.layout.first_expert[i], c.layout.first_expert[i + 1], static_cast<int>(out.element_size()), true};
    zero_unwritten_cuda(z, stream.stream);
#endif
    return out;
  }
  (void)stream;
  Tensor out = at::zeros({Ec, G.size(1), A.size(1)}, G.options());
  for (int64_t e = 0; e < Ec; ++e) {
    const int64_t s = r.host[e], n = r.host[e + 1] - s;
    if (n > 0) {
      Tensor o = out[e];
      at::mm_out(o, G.narrow(0, s, n).t(), A.narrow(0, s, n));
    }
  }
  return out;
}

// ---- row stages, device-switched ---------------------------------------------------------------
void run_gather(const Ctx& c, int i, const Tensor& src, const float* scale, Tensor& out, Dev stream,
                ChunkRows* rows = nullptr) {
  int32_t* rel = (rows && c.gmm && c.layout.first_expert[i] > 0) ? rows->offs.data_ptr<int32_t>() : nullptr;
  GatherParams p{src.data_ptr(), c.perm.data_ptr<int32_t>(), c.offsets.data_ptr<int32_t>(), scale, out.data_ptr(),
                 rel, c.M, static_cast<int>(c.H), static_cast<int>(c.k), c.layout.first_expert[i],
                 c.layout.first_expert[i + 1], c.dtype};
  if (stream.cuda) {
#ifdef UPSAFE_WITH_CUDA
    gather_cuda(p, stream.stream);
#endif
  } else {
    gather_cpu(p);
  }
}

void run_activation(const Ctx& c, int i, const Tensor& h, const Tensor* grad_a, Tensor& a, Tensor* grad_h, Dev stream) {
  ActParams p{h.data_ptr(), c.b_in.empty() ? nullptr : c.b_in[i].data_ptr(), grad_a ? grad_a->data_ptr() : nullptr,
              a.data_ptr(), grad_h ? grad_h->data_ptr() : nullptr, c.offsets.data_ptr<int32_t>(), c.M,
              static_cast<int>(c.I), c.layout.first_expert[i], c.layout.first_expert[i + 1], c.gated, c.act, c.dtype};
  if (stream.cuda) {
#ifdef UPSAFE_WITH_CUDA
    activation_cuda(p, stream.stream);
#endif
  } else {
    activation_cpu(p);
  }
}

void run_combine(const Ctx& c, const std::vector<Tensor>& rows, const float* weights, bool with_bias, Tensor& out,
                 Dev stream) {
  CombineParams p{};
  for (int i = 0; i < c.n(); ++i) {
    p.rows[i] = rows[i].data_ptr();
    p.bias[i] = (with_bias && !c.b_out.empty()) ? c.b_out[i].data_ptr() : nullptr;
  }
  p.weights = weights;
  p.experts = c.experts.data_ptr<int32_t>();
  p.inverse = c.inverse.data_ptr<int32_t>();
  p.offsets = c.offsets.data_ptr<int32_t>();
  p.layout = c.layout;
  p.out = out.data_ptr();
  p.T = c.T;
  p.H = static_cast<int>(c.H);
  p.k = static_cast<int>(c.k);
  p.dtype = c.dtype;
  if (stream.cuda) {
#ifdef UPSAFE_WITH_CUDA
    combine_cuda(p, stream.stream);
#endif
  } else {
    combine_cpu(p);
  }
}

// Rows [count_c, M) of a chunk buffer are never written by the GEMMs: zero them before they leave
// the op (they are saved for backward and must be deterministic).
void zero_tail(const Ctx& c, int i, Tensor& buf, const ChunkRows& r, Dev stream) {
  if (c.gmm) {
#ifdef UPSAFE_WITH_CUDA
    ZeroParams z{buf.data_ptr(), c.offsets.data_ptr<int32_t>(), buf.size(0), buf.size(1), c.layout.first_expert[i],
                 c.layout.first_expert[i + 1], static_cast<int>(buf.element_size()), false};
    zero_unwritten_cuda(z, stream.stream);
#endif
    return;
  }
  (void)stream;
  const int64_t count = r.host.back();
  if (count < buf.size(0)) buf.narrow(0, count, buf.size(0) - count).zero_();
}

Dev stream_of(const Tensor& t) {
#ifdef UPSAFE_WITH_CUDA
  if (t.is_cuda()) return {true, static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream())};
#endif
  return {false, nullptr};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> grouped_expert_mlp(
    const Tensor& x, const Tensor& weights, const Tensor& experts, const Tensor& perm, const Tensor& offsets,
    const Tensor& inverse, at::TensorList w_in, at::TensorList w_out, at::TensorList b_in, at::TensorList b_out,
    c10::string_view activation, bool gated, bool save_for_backward) {
  Ctx c = check(x, weights, experts, perm, offsets, inverse, w_in, w_out, b_in, b_out, activation, gated);
  std::vector<Tensor> hs, ys;
  Tensor out = at::empty({c.T, c.H}, c.x.options());
  if (c.M == 0) {
    if (save_for_backward)
      for (int i = 0; i < c.n(); ++i) {
        hs.push_back(at::empty({0, c.W}, c.x.options()));
        ys.push_back(at::empty({0, c.H}, c.x.options()));
      }
    return {out, hs, ys};
  }
  on_device(c.x, kOp, [] {}, [](void*) {});  // device check (no kernel for this device -> clear error)
#ifdef UPSAFE_WITH_CUDA
  c10::OptionalDeviceGuard guard;
  if (c.x.is_cuda()) guard.reset_device(c.x.device());
#endif
  Dev stream = stream_of(c.x);
  std::vector<Tensor> y_rows;
  for (int i = 0; i < c.n(); ++i) {
    ChunkRows r = chunk_rows(c, i);
    Tensor xc = at::empty({c.M, c.H}, c.x.options());
    run_gather(c, i, c.x, nullptr, xc, stream, &r);
    Tensor h = gemm_nt(c, xc, c.w_in[i], r);
    Tensor a = at::empty({c.M, c.I}, c.x.options());
    run_activation(c, i, h, nullptr, a, nullptr, stream);
    Tensor y = gemm_nt(c, a, c.w_out[i], r);
    if (save_for_backward) {
      zero_tail(c, i, h, r, stream);
      zero_tail(c, i, y, r, stream);
      hs.push_back(h);
      ys.push_back(y);
    }
    y_rows.push_back(y);
  }
  run_combine(c, y_rows, c.weights.data_ptr<float>(), true, out, stream);
  return {out, hs, ys};
}

std::tuple<Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
grouped_expert_mlp_backward(const Tensor& grad_out, const Tensor& x, const Tensor& weights, const Tensor& experts,
                            const Tensor& perm, const Tensor& offsets, const Tensor& inverse, at::TensorList w_in,
                            at::TensorList w_out, at::TensorList b_in, at::TensorList b_out, at::TensorList hs,
                            at::TensorList ys, c10::string_view activation, bool gated, bool need_x, bool need_weights,
                            c10::List<bool> need_w) {
  Ctx c = check(x, weights, experts, perm, offsets, inverse, w_in, w_out, b_in, b_out, activation, gated);
  TORCH_CHECK_VALUE(static_cast<int>(hs.size()) == c.n() && static_cast<int>(ys.size()) == c.n() &&
                        static_cast<int>(need_w.size()) == c.n(),
                    "grouped_expert_mlp_backward: saved tensors / need_w must have one entry per chunk");
  Tensor g = grad_out.to(c.x.scalar_type()).contiguous();
  Tensor dx = at::zeros({c.T, c.H}, c.x.options());
  Tensor dweights = at::zeros({c.T, c.k}, c.x.options().dtype(at::kFloat));
  std::vector<Tensor> dw_in, dw_out, db_in, db_out;
  // a fresh empty tensor per unrequested slot: custom-op outputs may not alias each other
  auto none = [&c] { return at::empty({0}, c.x.options()); };
  if (c.M == 0) {
    for (int i = 0; i < c.n(); ++i) {
      const bool nw = need_w.get(i);
      dw_in.push_back(nw ? at::zeros_like(c.w_in[i]) : none());
      dw_out.push_back(nw ? at::zeros_like(c.w_out[i]) : none());
      db_in.push_back(nw && !c.b_in.empty() ? at::zeros_like(c.b_in[i]) : none());
      db_out.push_back(nw && !c.b_out.empty() ? at::zeros_like(c.b_out[i]) : none());
    }
    return {dx, dweights, dw_in, dw_out, db_in, db_out};
  }
#ifdef UPSAFE_WITH_CUDA
  c10::OptionalDeviceGuard guard;
  if (c.x.is_cuda()) guard.reset_device(c.x.device());
#endif
  Dev stream = stream_of(c.x);
  std::vector<Tensor> dx_rows;
  for (int i = 0; i < c.n(); ++i) {
    ChunkRows r = chunk_rows(c, i);
    Tensor dy = at::empty({c.M, c.H}, c.x.options());
    run_gather(c, i, g, c.weights.data_ptr<float>(), dy, stream, &r);  // dy = w * grad_out, permuted
    Tensor da = gemm_nn(c, dy, c.w_out[i], r);                     // [M, I]
    Tensor a = at::empty({c.M, c.I}, c.x.options());
    Tensor dh = at::empty({c.M, c.W}, c.x.options());
    run_activation(c, i, hs[i], &da, a, &dh, stream);
    const bool nw = need_w.get(i);
    if (nw) {
      dw_out.push_back(gemm_tn(c, i, dy, a, r, stream));
      Tensor xc = at::empty({c.M, c.H}, c.x.options());
      run_gather(c, i, c.x, nullptr, xc, stream);
      dw_in.push_back(gemm_tn(c, i, dh, xc, r, stream));
      auto seg_sum = [&](const Tensor& src, int64_t width) {
        Tensor acc = at::empty({c.chunk_experts(i), width}, c.x.options().dtype(at::kFloat));
        SegmentSumParams sp{src.data_ptr(), c.offsets.data_ptr<int32_t>(), acc.data_ptr<float>(), c.M,
                            static_cast<int>(width), c.layout.first_expert[i], c.layout.first_expert[i + 1], c.dtype};
        if (stream.cuda) {
#ifdef UPSAFE_WITH_CUDA
          segment_sum_cuda(sp, stream.stream);
#endif
        } else {
          segment_sum_cpu(sp);
        }
        return acc.to(c.x.scalar_type());
      };
      db_in.push_back(c.b_in.empty() ? none() : seg_sum(dh, c.W));
      db_out.push_back(c.b_out.empty() ? none() : seg_sum(dy, c.H));
    } else {
      dw_in.push_back(none());
      dw_out.push_back(none());
      db_in.push_back(none());
      db_out.push_back(none());
    }
    if (need_x) dx_rows.push_back(gemm_nn(c, dh, c.w_in[i], r));  // [M, H]
  }
  if (need_x) run_combine(c, dx_rows, nullptr, false, dx, stream);
  if (need_weights) {
    SlotDotParams sp{};
    sp.grad_out = g.data_ptr();
    for (int i = 0; i < c.n(); ++i) {
      sp.rows[i] = ys[i].data_ptr();
      sp.bias[i] = c.b_out.empty() ? nullptr : c.b_out[i].data_ptr();
    }
    sp.experts = c.experts.data_ptr<int32_t>();
    sp.inverse = c.inverse.data_ptr<int32_t>();
    sp.offsets = c.offsets.data_ptr<int32_t>();
    sp.layout = c.layout;
    sp.grad_weights = dweights.data_ptr<float>();
    sp.T = c.T;
    sp.H = static_cast<int>(c.H);
    sp.k = static_cast<int>(c.k);
    sp.dtype = c.dtype;
    if (stream.cuda) {
#ifdef UPSAFE_WITH_CUDA
      slot_dot_cuda(sp, stream.stream);
#endif
    } else {
      slot_dot_cpu(sp);
    }
  }
  return {dx, dweights, dw_in, dw_out, db_in, db_out};
}

}  // namespace
}  // namespace grouped_mlp
}  // namespace upsafe

TORCH_LIBRARY_IMPL(upsafe, CPU, m) {
  m.impl("grouped_expert_mlp", &upsafe::grouped_mlp::grouped_expert_mlp);
  m.impl("grouped_expert_mlp_backward", &upsafe::grouped_mlp::grouped_expert_mlp_backward);
}

#ifdef UPSAFE_WITH_CUDA
TORCH_LIBRARY_IMPL(upsafe, CUDA, m) {
  m.impl("grouped_expert_mlp", &upsafe::grouped_mlp::grouped_expert_mlp);
  m.impl("grouped_expert_mlp_backward", &upsafe::grouped_mlp::grouped_expert_mlp_backward);
}
#endif
