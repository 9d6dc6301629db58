"""Baselines the benchmarks time against. Each is checked against our op in the same run before it
is timed (see `check_close`), so a benchmark never times a different computation than it claims."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def act_fn(name):
    if name == "silu":
        return F.silu
    return lambda v: F.gelu(v, approximate="tanh" if name == "gelu_tanh" else "none")


def per_expert_loop(x, experts, weights, w_gate_up, w_down, activation="silu"):
    """(a) eager loop over experts in the input dtype (nonzero per expert: syncs)."""
    T, H = x.shape
    I = w_down.shape[-1]
    out = torch.zeros_like(x)
    act = act_fn(activation)
    for e in range(w_gate_up.shape[0]):
        tok, slot = torch.nonzero(experts == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w_gate_up[e].t()
        y = (act(h[:, :I]) * h[:, I:]) @ w_down[e].t()
        out.index_add_(0, tok, y * weights[tok, slot, None].to(y.dtype))
    return out


def hf_grouped_mm_pipeline(x, experts, weights, w_gate_up, w_down, activation="silu"):
    """(b) the transformers-style grouped_mm MoE path: stable sort by expert, gather,
    torch._grouped_mm(gate_up), activation, torch._grouped_mm(down), weight, index_add_."""
    T, H = x.shape
    k = experts.shape[1]
    E = w_gate_up.shape[0]
    I = w_down.shape[-1]
    flat = experts.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    tok = order // k
    xs = x[tok]
    h = torch._grouped_mm(xs, w_gate_up.transpose(1, 2), offs)
    a = act_fn(activation)(h[:, :I]) * h[:, I:]
    y = torch._grouped_mm(a, w_down.transpose(1, 2), offs)
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, tok, y)


def dense_mlp(x, w_gate_up, w_down, activation="silu"):
    """(c) one dense gated MLP of the same sizes on the same tokens (expert 0's weights)."""
    I = w_down.shape[-1]
    h = x @ w_gate_up[0].t()
    return (act_fn(activation)(h[:, :I]) * h[:, I:]) @ w_down[0].t()


def check_close(name, got, want, tol=3e-2):
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-9)).item()
    if not err < tol:
        raise AssertionError(f"{name}: relative error {err:.3e} vs our op (>= {tol}); not timing a wrong baseline")
    return err
