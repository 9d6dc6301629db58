"""Temperature-scaled sparse top-k routing (`torch.ops.upsafe.sparse_route`)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _ext
from ._checks import check_int, check_tensor, data_checks_enabled

MAX_EXPERTS = 256
MAX_TOP_K = 8


class RoutingResult(NamedTuple):
    """What `sparse_route` returns; everything the grouped expert GEMM needs, with static shapes.

    weights:     [T, k] float32 routing weights (0 for dropped slots)
    experts:     [T, k] int32 chosen experts, best first (-1 for dropped slots)
    counts:      [E] int32 kept slots per expert
    permutation: [T*k] int32 slot ids (t*k + j) sorted by expert, stable; the dropped slots follow
                 the kept ones, so rows [0, offsets[-1]) are the ones to compute
    offsets:     [E] int32 inclusive cumulative counts (the `offs` of `torch._grouped_mm`)
    inverse:     [T*k] int32 slot id -> its row in `permutation` (for a gather-based combine)
    """

    weights: Tensor
    experts: Tensor
    counts: Tensor
    permutation: Tensor
    offsets: Tensor
    inverse: Tensor


def sparse_route(
    logits: Tensor,
    k: int,
    temperature: float | Tensor = 1.0,
    bias: Tensor | None = None,
    renormalize: bool = True,
    min_weight: float = 0.0,
    *,
    check_finite: bool = False,
) -> RoutingResult:
    r"""Route each token to its top-``k`` experts at a softmax temperature.

    With :math:`z = \text{logits} + \text{bias}` and :math:`s = z / \tau`:

    .. math:: p = \operatorname{softmax}(s),\qquad S = \operatorname{topk}_k(s),\qquad
              w_j = p_{S_j} \;/\; \textstyle\sum_{i \in S'} p_i \ \text{(if renormalize)}

    Selection compares the scaled logits ``s`` in fp32: ties go to the lower expert index, NaN
    ranks highest (as in ``torch.sort``), so the result is deterministic. A chosen slot ``j > 0``
    whose probability ``p`` is below ``min_weight`` is dropped (expert ``-1``, weight 0, left out of
    the counts and the permutation): every token keeps its first choice, and the weights are
    renormalised over the kept set ``S'``.

    Args:
        logits: ``[T, E]`` float32/float16/bfloat16 router logits, ``1 <= E <= 256``; any strides.
        k: experts per token, ``1 <= k <= min(E, 8)``.
        temperature: a float ``> 0``, or a ``[T]`` tensor of per-token temperatures (requests in one
            batch at different temperatures). Not differentiated.
        bias: ``[E]`` or ``[T, E]`` added to the logits before the temperature; ``-inf`` removes an
            expert. Differentiable.
        renormalize: renormalise the kept weights to sum to 1 (else they are the raw probabilities).
        min_weight: probability below which a non-first slot is dropped, in ``[0, 1]``.
        check_finite: NaN policy. By default NaN propagates without a device sync: a token whose
            logits hold a NaN (or ``+inf``, or are all ``-inf``) gets NaN weights, exactly as
            ``torch.softmax`` would. ``check_finite=True`` raises ``ValueError`` instead (syncs).

    Returns:
        :class:`RoutingResult`; only ``weights`` carries gradients (to ``logits`` and ``bias``).
    """
    op = "sparse_route"
    check_tensor(op, "logits", logits, dim=2)
    T, E = logits.shape
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"{op}: `logits` must have 1..{MAX_EXPERTS} experts (dim 1), got {E}")
    check_int(op, "k", k, 1, min(E, MAX_TOP_K))
    if isinstance(min_weight, bool) or not isinstance(min_weight, (int, float)) or not 0.0 <= min_weight <= 1.0:
        raise ValueError(f"{op}: `min_weight` must be a float in [0, 1], got {min_weight!r}")
    t_tok = None
    t_scalar = 1.0
    if isinstance(temperature, Tensor):
        check_tensor(op, "temperature", temperature, dim=1, device=logits.device)
        if temperature.shape[0] != T:
            raise ValueError(f"{op}: a per-token `temperature` must have shape [T]=[{T}], got {tuple(temperature.shape)}")
        t_tok = temperature.detach().float().contiguous()
        if data_checks_enabled() and T > 0 and not bool((t_tok > 0).all()):
            raise ValueError(f"{op}: every per-token `temperature` must be > 0 (NaN is not allowed)")
    else:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature > 0 and math.isfinite(temperature)
        ):
            raise ValueError(f"{op}: `temperature` must be a finite float > 0 or a [T] tensor, got {temperature!r}")
        t_scalar = float(temperature)
    if bias is not None:
        check_tensor(op, "bias", bias, device=logits.device)
        if tuple(bias.shape) not in ((E,), (T, E)):
            raise ValueError(f"{op}: `bias` must have shape [E]=[{E}] or [T, E]=[{T}, {E}], got {tuple(bias.shape)}")
        bias = bias.float()
    if check_finite and data_checks_enabled() and T > 0 and bool(torch.isnan(logits).any()):
        raise ValueError(f"{op}: `logits` contains NaN (check_finite=True)")
    _ext.require(op)
    out = torch.ops.upsafe.sparse_route.default(
        logits, k, t_scalar, t_tok, bias, bool(renormalize), float(min_weight)
    )
    return RoutingResult(*out)


def sparse_route_reference(
    logits: Tensor,
    k: int,
    temperature: float | Tensor = 1.0,
    bias: Tensor | None = None,
    renormalize: bool = True,
    min_weight: float = 0.0,
) -> RoutingResult:
    """Plain-PyTorch reference for :func:`sparse_route` (same semantics; differentiable)."""
    T, E = logits.shape
    z = logits.float()
    if bias is not None:
        z = z + bias.float()
    tau = temperature.float()[:, None] if isinstance(temperature, Tensor) else float(temperature)
    s = z / tau
    probs = torch.softmax(s, dim=-1)
    order = torch.sort(s.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    p_sel = probs.gather(1, order)
    keep = ~(p_sel.detach() < min_weight)
    keep[:, 0] = True
    w = torch.where(keep, p_sel, torch.zeros_like(p_sel))
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    experts = torch.where(keep, order, torch.full_like(order, -1)).to(torch.int32)
    flat = experts.flatten().long()
    bucket = torch.where(flat < 0, torch.full_like(flat, E), flat)
    perm = torch.sort(bucket, stable=True).indices
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    counts = torch.bincount(flat[flat >= 0], minlength=E)[:E]
    return RoutingResult(
        w, experts, counts.to(torch.int32), perm.to(torch.int32), counts.cumsum(0).to(torch.int32),
        inverse.to(torch.int32),
    )


# --- torch.library registrations (fake impls for torch.compile, autograd) -------------------------
if _ext.loaded():

    @torch.library.register_fake("upsafe::sparse_route")
    def _sparse_route_fake(logits, k, temperature, temperature_per_token, bias, renormalize, min_weight):
        T, E = logits.shape
        torch._check(1 <= k <= min(E, MAX_TOP_K), lambda: "sparse_route: `k` out of range")
        f32 = dict(dtype=torch.float32, device=logits.device)
        i32 = dict(dtype=torch.int32, device=logits.device)
        return (
            logits.new_empty((T, k), **f32), logits.new_empty((T, k), **i32), logits.new_empty((E,), **i32),
            logits.new_empty((T * k,), **i32), logits.new_empty((E,), **i32), logits.new_empty((T * k,), **i32),
        )

    @torch.library.register_fake("upsafe::sparse_route_backward")
    def _sparse_route_backward_fake(grad_weights, logits, temperature, tptok, bias, renormalize, weights, experts):
        return logits.new_empty(logits.shape, dtype=torch.float32)

    def _setup_context(ctx, inputs, output):
        logits, _k, temperature, tptok, bias, renormalize, _min_weight = inputs
        weights, experts = output[0], output[1]
        ctx.temperature = temperature
        ctx.renormalize = renormalize
        ctx.bias_is_vector = bias is not None and bias.dim() == 1
        ctx.save_for_backward(logits, tptok, bias, weights, experts)

    def _backward(ctx, grad_weights, *_unused):
        logits, tptok, bias, weights, experts = ctx.saved_tensors
        if grad_weights is None:
            return None, None, None, None, None, None, None
        grad = torch.ops.upsafe.sparse_route_backward.default(
            grad_weights, logits, ctx.temperature, tptok, bias, ctx.renormalize, weights, experts
        )
        g_logits = grad.to(logits.dtype) if ctx.needs_input_grad[0] else None
        g_bias = None
        if bias is not None and ctx.needs_input_grad[4]:
            g_bias = grad.sum(0) if ctx.bias_is_vector else grad
        return g_logits, None, None, None, g_bias, None, None

    torch.library.register_autograd("upsafe::sparse_route", _backward, setup_context=_setup_context)
