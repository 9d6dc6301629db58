"""Grouped expert MLP over routed tokens (`torch.ops.upsafe.grouped_expert_mlp`)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _ext
from ._checks import check_tensor
from .routing import RoutingResult

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
MAX_CHUNKS = 4

# HF `hidden_act` names -> ours
HF_ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_tanh": "gelu_tanh",
    "gelu": "gelu",
}


def _as_chunks(name: str, w) -> list[Tensor]:
    if isinstance(w, Tensor):
        return [w]
    if isinstance(w, (list, tuple)) and all(isinstance(t, Tensor) for t in w) and len(w) > 0:
        return list(w)
    raise ValueError(f"grouped_expert_mlp: `{name}` must be a Tensor or a non-empty sequence of Tensors")


def grouped_expert_mlp(
    x: Tensor,
    routing: RoutingResult,
    w_gate_up: Tensor | Sequence[Tensor],
    w_down: Tensor | Sequence[Tensor],
    activation: str = "silu",
    *,
    gated: bool = True,
    b_in: Tensor | Sequence[Tensor] | None = None,
    b_out: Tensor | Sequence[Tensor] | None = None,
) -> Tensor:
    r"""Run every token through its routed experts and combine:

    .. math:: \text{out}_t = \sum_{j} w_{tj}\; \big(W^{down}_{e}\, a(W^{gate}_{e} x_t + b^{g}_e) \odot (W^{up}_{e} x_t + b^{u}_e) + b^{down}_e\big),\quad e = \text{experts}_{tj}

    (non-gated: :math:`W^{down}_e\, a(W^{up}_e x_t + b_e) + b^{down}_e`). Dropped slots (expert -1)
    cost nothing.

    Args:
        x: ``[T, H]`` float32/float16/bfloat16 tokens.
        routing: what :func:`sparse_route` returned for these T tokens.
        w_gate_up: ``[E, 2I, H]`` (gated: rows ``[0, I)`` gate, ``[I, 2I)`` up) or ``[E, I, H]``
            (non-gated) — the ``nn.Linear`` layout (out_features, in_features). May be a list of
            chunks ``[E_c, ...]`` concatenated over experts (at most 4), e.g. a frozen original MLP
            and trainable safety experts; each chunk gets its own gradient.
        w_down: ``[E, H, I]`` or chunks ``[E_c, H, I]`` matching ``w_gate_up``.
        activation: ``"silu"``, ``"gelu_tanh"`` or ``"gelu"`` (erf).
        gated: SwiGLU/GeGLU-style gated MLP (True) or a plain 2-layer MLP (False).
        b_in, b_out: optional biases ``[E, 2I|I]`` and ``[E, H]`` (or chunks), for GPT-2/NeoX MLPs.

    Differentiable in ``x``, the routing weights, and every weight/bias chunk (chunks with
    ``requires_grad=False`` get no gradient computed). On CUDA with bf16 and ``H``, ``I`` multiples
    of 8 the GEMMs are ``torch._grouped_mm`` and nothing synchronises with the host; other dtypes
    and shapes use a per-expert matmul loop (one host sync for the group sizes). Under
    ``torch.autocast`` the inputs are cast to the autocast dtype.
    """
    op = "grouped_expert_mlp"
    check_tensor(op, "x", x, dim=2)
    if not isinstance(routing, tuple) or len(routing) != 6:
        raise ValueError(f"{op}: `routing` must be the RoutingResult returned by sparse_route")
    routing = RoutingResult(*routing)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: `activation` must be one of {ACTIVATIONS}, got {activation!r}")
    w_in, w_out = _as_chunks("w_gate_up", w_gate_up), _as_chunks("w_down", w_down)
    bi = [] if b_in is None else _as_chunks("b_in", b_in)
    bo = [] if b_out is None else _as_chunks("b_out", b_out)
    if len(w_in) > MAX_CHUNKS:
        raise ValueError(f"{op}: at most {MAX_CHUNKS} weight chunks, got {len(w_in)}")
    T, H = x.shape
    if routing.weights.shape[0] != T:
        raise ValueError(f"{op}: `routing` is for {routing.weights.shape[0]} tokens but `x` has {T}")
    for i, (a, b) in enumerate(zip(w_in, w_out)):
        check_tensor(op, f"w_gate_up[{i}]", a, dim=3, device=x.device)
        check_tensor(op, f"w_down[{i}]", b, dim=3, device=x.device)
        if a.shape[-1] != H:
            raise ValueError(f"{op}: `w_gate_up[{i}]` must have in_features H={H} (last dim), got shape {tuple(a.shape)}")
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x = x.to(dt)
        w_in, w_out = [w.to(dt) for w in w_in], [w.to(dt) for w in w_out]
        bi, bo = [b.to(dt) for b in bi], [b.to(dt) for b in bo]
    else:
        for name, ts in (("w_gate_up", w_in), ("w_down", w_out), ("b_in", bi), ("b_out", bo)):
            for i, t in enumerate(ts):
                if t.dtype != x.dtype:
                    raise ValueError(f"{op}: `{name}[{i}]` has dtype {t.dtype} but `x` has {x.dtype}")
    _ext.require(op)
    tensors = [x, routing.weights, *w_in, *w_out, *bi, *bo]
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    out, _, _ = torch.ops.upsafe.grouped_expert_mlp.default(
        x, routing.weights, routing.experts, routing.permutation, routing.offsets, routing.inverse,
        w_in, w_out, bi, bo, activation, bool(gated), save,
    )
    return out


def activation_fn(name: str, v: Tensor) -> Tensor:
    """The expert MLP's activation by name ("silu", "gelu_tanh", "gelu"), as the kernels apply it."""
    if name == "silu":
        return torch.nn.functional.silu(v)
    return torch.nn.functional.gelu(v, approximate="tanh" if name == "gelu_tanh" else "none")


def grouped_expert_mlp_reference(x, routing, w_gate_up, w_down, activation="silu", *, gated=True,
                                 b_in=None, b_out=None) -> Tensor:
    """Plain-PyTorch reference (a loop over experts, fp32 math); differentiable."""
    w_in = torch.cat(_as_chunks("w_gate_up", w_gate_up)).float()
    w_out = torch.cat(_as_chunks("w_down", w_down)).float()
    bi = torch.cat(_as_chunks("b_in", b_in)).float() if b_in is not None else None
    bo = torch.cat(_as_chunks("b_out", b_out)).float() if b_out is not None else None
    T, H = x.shape
    xf = x.float()
    out = xf.new_zeros(T, H)
    experts, weights = routing.experts.long(), routing.weights
    I = w_out.shape[-1]
    for e in range(w_in.shape[0]):
        tok, slot = torch.nonzero(experts == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = xf[tok] @ w_in[e].t()
        if bi is not None:
            h = h + bi[e]
        a = activation_fn(activation, h[:, :I]) * h[:, I:] if gated else activation_fn(activation, h)
        y = a @ w_out[e].t()
        if bo is not None:
            y = y + bo[e]
        out = out.index_add(0, tok, y * weights[tok, slot].unsqueeze(-1))
    return out.to(x.dtype)


# --- torch.library registrations ------------------------------------------------------------------
if _ext.loaded():

    @torch.library.register_fake("upsafe::grouped_expert_mlp")
    def _fake(x, weights, experts, permutation, offsets, inverse, w_in, w_out, b_in, b_out, activation, gated, save):
        T, H = x.shape
        M = T * experts.shape[1]
        hs = [x.new_empty((M, w.shape[1])) for w in w_in] if save else []
        ys = [x.new_empty((M, H)) for _ in w_in] if save else []
        return x.new_empty((T, H)), hs, ys

    @torch.library.register_fake("upsafe::grouped_expert_mlp_backward")
    def _fake_bwd(grad_out, x, weights, experts, permutation, offsets, inverse, w_in, w_out, b_in, b_out, hs, ys,
                  activation, gated, need_x, need_weights, need_w):
        def none():  # a fresh tensor per slot, like the kernel: outputs may not alias each other
            return x.new_empty((0,))
        dw_in = [torch.empty_like(w) if n else none() for w, n in zip(w_in, need_w)]
        dw_out = [torch.empty_like(w) if n else none() for w, n in zip(w_out, need_w)]
        db_in = [torch.empty_like(b) if n else none() for b, n in zip(b_in, need_w)] if b_in else [none() for _ in w_in]
        db_out = [torch.empty_like(b) if n else none() for b, n in zip(b_out, need_w)] if b_out else [none() for _ in w_in]
        return (x.new_empty(x.shape), x.new_empty(weights.shape, dtype=torch.float32), dw_in, dw_out, db_in, db_out)

    def _setup_context(ctx, inputs, output):
        (x, weights, experts, perm, offsets, inverse, w_in, w_out, b_in, b_out, activation, gated, _save) = inputs
        _, hs, ys = output
        ctx.activation, ctx.gated = activation, gated
        ctx.n, ctx.has_bi, ctx.has_bo = len(w_in), len(b_in) > 0, len(b_out) > 0
        ctx.save_for_backward(x, weights, experts, perm, offsets, inverse, *w_in, *w_out, *b_in, *b_out, *hs, *ys)

    def _backward(ctx, grad_out, _ghs, _gys):
        n = ctx.n
        saved = list(ctx.saved_tensors)
        x, weights, experts, perm, offsets, inverse = saved[:6]
        rest = saved[6:]
        w_in, rest = rest[:n], rest[n:]
        w_out, rest = rest[:n], rest[n:]
        b_in, rest = (rest[:n], rest[n:]) if ctx.has_bi else ([], rest)
        b_out, rest = (rest[:n], rest[n:]) if ctx.has_bo else ([], rest)
        hs, ys = rest[:n], rest[n:2 * n]
        if not hs:
            raise RuntimeError("grouped_expert_mlp: backward needs the forward to run with grad enabled")
        nig = ctx.needs_input_grad
        need_w = [bool(nig[6][i] or nig[7][i] or (ctx.has_bi and nig[8][i]) or (ctx.has_bo and nig[9][i]))
                  for i in range(n)]
        dx, dweights, dw_in, dw_out, db_in, db_out = torch.ops.upsafe.grouped_expert_mlp_backward.default(
            grad_out, x, weights, experts, perm, offsets, inverse, w_in, w_out, b_in, b_out, hs, ys,
            ctx.activation, ctx.gated, bool(nig[0]), bool(nig[1]), need_w,
        )
        pick = lambda grads, flags: [g if f else None for g, f in zip(grads, flags)]  # noqa: E731
        return (
            dx if nig[0] else None, dweights if nig[1] else None, None, None, None, None,
            pick(dw_in, nig[6]), pick(dw_out, nig[7]),
            pick(db_in, nig[8]) if ctx.has_bi else [], pick(db_out, nig[9]) if ctx.has_bo else [],
            None, None, None,
        )

    torch.library.register_autograd("upsafe::grouped_expert_mlp", _backward, setup_context=_setup_context)
