// The whole op surface of upsafe_ext on one screen: every schema, one line of purpose each.
// Implementations register per family (csrc/<family>/*_op.cpp); fake/meta impls and autograd
// live beside the Python wrappers in upsafe_ext/ops/.
#include <torch/library.h>
#include <torch/version.h>

#ifdef UPSAFE_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

TORCH_LIBRARY(upsafe, m) {
  // softmax((logits+bias)/T) -> top-k -> (weights, experts, counts, permutation, offsets, inverse)
  m.def("sparse_route(Tensor logits, int k, float temperature, Tensor? temperature_per_token, "
        "Tensor? bias, bool renormalize, float min_weight) -> "
        "(Tensor weights, Tensor experts, Tensor counts, Tensor permutation, Tensor offsets, Tensor inverse)");
  // d(weights) -> d(logits + bias), fp32
  m.def("sparse_route_backward(Tensor grad_weights, Tensor logits, float temperature, "
        "Tensor? temperature_per_token, Tensor? bias, bool renormalize, Tensor weights, Tensor experts) -> Tensor");
  // sum_j w_j * down_e(act(gate_e(x)) * up_e(x)) over each token's routed experts; weights in chunks
  // of experts ([E_c, 2I|I, H], [E_c, H, I]); returns (out, pre-activations, expert outputs)
  m.def("grouped_expert_mlp(Tensor x, Tensor weights, Tensor experts, Tensor permutation, Tensor offsets, "
        "Tensor inverse, Tensor[] w_in, Tensor[] w_out, Tensor[] b_in, Tensor[] b_out, str activation, bool gated, "
        "bool save_for_backward) -> (Tensor, Tensor[], Tensor[])");
  // -> (dx, d routing weights, dw_in[], dw_out[], db_in[], db_out[]); empty for chunks not needing grads
  m.def("grouped_expert_mlp_backward(Tensor grad_out, Tensor x, Tensor weights, Tensor experts, Tensor permutation, "
        "Tensor offsets, Tensor inverse, Tensor[] w_in, Tensor[] w_out, Tensor[] b_in, Tensor[] b_out, Tensor[] h, "
        "Tensor[] y, str activation, bool gated, bool need_x, bool need_weights, bool[] need_w) -> "
        "(Tensor, Tensor, Tensor[], Tensor[], Tensor[], Tensor[])");
  // ESI, one launch over every tensor: accum += grad; with finalize accum := sigma*|accum| in place
  // and return the 8192-bin selection histogram of the scores (else an empty tensor)
  m.def("esi_accumulate_(Tensor(a!)[] accum, Tensor[] grads, float[]? sigma, bool finalize, bool invert) -> Tensor");
  // the selection histogram of existing (non-negative) scores
  m.def("esi_histogram(Tensor[] scores, bool invert) -> Tensor");
  // masks = bin(score) > threshold_bin; threshold-bin elements appended as sortable candidate keys
  m.def("esi_select(Tensor[] scores, int threshold_bin, int capacity, bool invert) -> (Tensor[] masks, "
        "Tensor candidates, Tensor count)");
  // masks[t].view(-1)[g - start_t] = true for every global index g (the chosen threshold candidates)
  m.def("esi_mark_(Tensor(a!)[] masks, Tensor indices) -> ()");
  // AdamW on compact state of the selected elements (SET): gather grad, update, scatter param
  m.def("esi_sparse_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor[] idx, Tensor(b!)[] m, Tensor(c!)[] v, "
        "Tensor(d!)[] master, float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()");
}

#if __has_include("generated/build_config.h")
#include "generated/build_config.h"
#endif
#ifndef UPSAFE_CUDA_ARCHS
#define UPSAFE_CUDA_ARCHS ""
#endif

// The Python module (build metadata for `upsafe_ext.info`); the standalone CMake build of the op
// library leaves it out.
#ifndef UPSAFE_NO_PYTHON
#include <Python.h>
#include <pybind11/pybind11.h>
namespace py = pybind11;

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "upsafe_ext compiled kernels (ops register under torch.ops.upsafe)";
  mod.def("build_info", [] {
    py::dict d;
#ifdef UPSAFE_WITH_CUDA
    d["with_cuda"] = true;
    d["cuda_archs"] = std::string(UPSAFE_CUDA_ARCHS);
    d["cuda_runtime_built"] = CUDART_VERSION;
#else
    d["with_cuda"] = false;
    d["cuda_archs"] = std::string("");
    d["cuda_runtime_built"] = 0;
#endif
    d["torch_built"] = std::string(TORCH_VERSION);
    return d;
  });
}
#endif  // UPSAFE_NO_PYTHON
