"""SafetyMoE: an upcycled MLP = the original MLP (expert 0, frozen) + safety experts + a router.

Runs on our kernels: `sparse_route` (temperature-scaled top-k with the safety-temperature bias) and
`grouped_expert_mlp` (the original MLP and the safety experts as two weight chunks, so each keeps its
own requires_grad and nothing is copied per forward).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math

import torch
from torch import Tensor, nn

from ..ops import grouped_expert_mlp, grouped_expert_mlp_reference, sparse_route, sparse_route_reference
from ..ops.grouped_mlp import activation_fn
from .config import UpcycleConfig, check_safety_temperature
from .mlp import MLPWeights, extract_mlp, find_decoder_layers

log = logging.getLogger("upsafe_ext")

# τ of the current call (a float or a [batch] tensor), set by `request_safety_temperature` around one
# forward: per thread and per asyncio task, so concurrent requests on one model never see each other's τ.
# None = use each SafetyMoE's own `safety_temperature` (the config default or `set_safety_temperature`).
_REQUEST_TAU: contextvars.ContextVar = contextvars.ContextVar("upsafe_safety_temperature", default=None)


def safety_logit(tau: float) -> tuple[float, float]:
    """(bias on the original MLP, bias on every safety expert) for safety temperature τ.

    Rescaling the router probabilities by (1-τ) for the original MLP and τ for the safety experts,
    then renormalising, equals adding log(τ/(1-τ)) to the safety logits. τ=0 and τ=1 are the limits:
    only the original MLP, or only the safety experts.
    """
    if tau <= 0.0:
        return 0.0, -math.inf
    if tau >= 1.0:
        return -math.inf, 0.0
    return 0.0, math.log(tau / (1.0 - tau))


class SafetyMoE(nn.Module):
    """Drop-in replacement for a decoder layer's MLP (input/output ``[..., H]``).

    Parameters (names say what they are, for optimizers and adapters):
      ``router.weight [E, H]``, ``router.bias [E]`` (+ ``router_pool.weight [E, H]`` with routing="sequence");
      ``general_in_proj [1, 2I|I, H]``, ``general_out_proj [1, H, I]`` (+ ``general_in_bias``,
      ``general_out_bias`` for biased MLPs) — the original MLP, frozen unless ``train_general``;
      ``safety_in_proj [N, 2I|I, H]``, ``safety_out_proj [N, H, I]`` (+ biases) — the safety experts.

    Runtime state: ``safety_temperature`` (the default τ: a float, or a ``[batch]`` tensor; a τ given to
    the model call, see :func:`request_safety_temperature`, takes precedence),
    ``last_experts`` (the routing of the last forward, ``[..., k]``, -1 = dropped),
    ``router_logits`` (kept during training for the auxiliary losses).
    """

    def __init__(self, base: MLPWeights, config: UpcycleConfig):
        super().__init__()
        H = base.w_in.shape[1]
        N, E = config.num_safety_experts, config.num_experts
        self.hidden_size = H
        self.intermediate_size = base.w_out.shape[1]
        self.gated = base.gated
        self.activation = base.activation
        self.num_experts = E
        self.top_k = config.top_k
        self.min_weight = config.min_weight
        self.router_temperature = config.router_temperature
        self.router_grad = config.router_grad
        self.routing = config.routing
        dt, dev = base.w_in.dtype, base.w_in.device
        self.router = nn.Linear(H, E, bias=True, dtype=dt, device=dev)
        # routing="sequence" (ours): the one decision per request also reads the mean of this layer's input
        # over the prompt (see upsafe_ext.upcycle.sequence); per-token routing has no such weight
        self.router_pool = nn.Linear(H, E, bias=False, dtype=dt, device=dev) if config.routing == "sequence" else None
        with torch.no_grad():
            self.router.weight.zero_()
            self.router.bias.zero_()
            self.router.bias[0] = config.router_init_margin
            if self.router_pool is not None:
                self.router_pool.weight.zero_()
        train_general = bool(config.train_general)
        self.general_in_proj = nn.Parameter(base.w_in[None].contiguous(), requires_grad=train_general)
        self.general_out_proj = nn.Parameter(base.w_out[None].contiguous(), requires_grad=train_general)

        def copies(w: Tensor) -> Tensor:
            w = w[None].repeat(N, *([1] * w.dim())).contiguous()
            if config.init == "copy+noise" and config.noise_std > 0:
                w = w + torch.randn_like(w) * config.noise_std * w.float().std().to(w.dtype)
            return w

        self.safety_in_proj = nn.Parameter(copies(base.w_in))
        self.safety_out_proj = nn.Parameter(copies(base.w_out))
        self.has_bias = base.b_in is not None or base.b_out is not None
        if self.has_bias:
            b_in = base.b_in if base.b_in is not None else torch.zeros(base.w_in.shape[0], dtype=dt, device=dev)
            b_out = base.b_out if base.b_out is not None else torch.zeros(H, dtype=dt, device=dev)
            self.general_in_bias = nn.Parameter(b_in[None].clone(), requires_grad=train_general)
            self.general_out_bias = nn.Parameter(b_out[None].clone(), requires_grad=train_general)
            self.safety_in_bias = nn.Parameter(b_in[None].repeat(N, 1).clone())
            self.safety_out_bias = nn.Parameter(b_out[None].repeat(N, 1).clone())
        self.dropout = nn.Dropout(base.dropout) if base.dropout > 0 else None
        self.safety_temperature: float | Tensor = config.safety_temperature
        self.use_reference = False  # True: pure-PyTorch path (debugging, compiler fallback)
        self.last_experts: Tensor | None = None
        self.router_logits: Tensor | None = None
        self._bias_cache: tuple | None = None

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, experts={self.num_experts} "
                f"(1 original + {self.num_experts - 1} safety), top_k={self.top_k}, act={self.activation}, "
                f"gated={self.gated}, safety_temperature={self._tau_repr()}")

    def _tau_repr(self):
        t = self.safety_temperature
        return f"tensor[{t.numel()}]" if isinstance(t, Tensor) else f"{t:g}"

    # -- safety temperature -> routing bias -------------------------------------------------------------
    def _routing_bias(self, batch: int, seq: int, device) -> Tensor | None:
        tau = current_tau(self)
        E = self.num_experts
        if isinstance(tau, Tensor):
            if tau.numel() != batch:
                raise ValueError(f"SafetyMoE: a per-request safety temperature (`safety_temperature`) has "
                                 f"{tau.numel()} entries but the batch has {batch} sequences")
            # float64 like `safety_logit`, so a request's bias is bit-identical to a scalar τ call
            t = tau.to(device=device, dtype=torch.float64).reshape(batch, 1)
            gen = torch.where(t >= 1.0, torch.full_like(t, -math.inf), torch.zeros_like(t))
            saf = torch.where(t >= 1.0, torch.zeros_like(t), torch.log(t / (1.0 - t)))
            per_seq = torch.cat([gen, saf.expand(batch, E - 1)], dim=1).float()  # [B, E]
            return per_seq.repeat_interleave(seq, dim=0)  # [B*S, E]
        if self.routing == "sequence" and not is_pure_tau(tau):
            raise ValueError(f"SafetyMoE: this model routes per sequence (UpcycleConfig.routing='sequence'), so "
                             f"each sequence needs a decision, not the shared τ={tau:g}: call the model's "
                             "`generate`, or pass `safety_temperature=upsafe_ext.upcycle.sequence_routes(model, "
                             "input_ids, attention_mask)` (one 0/1 value per sequence) to the call")
        if tau == 0.5:
            return None
        key = (float(tau), str(device), E)
        cache = self._bias_cache  # read once: another thread may replace it (never mutated in place)
        if cache is None or cache[0] != key:
            g, s = safety_logit(float(tau))
            b = torch.full((E,), s, device=device, dtype=torch.float32)  # a fill kernel, no host copy
            b[0] = g
            cache = (key, b)
            self._bias_cache = cache
        return cache[1]

    def chunks(self):
        w_in = [self.general_in_proj, self.safety_in_proj]
        w_out = [self.general_out_proj, self.safety_out_proj]
        b_in = [self.general_in_bias, self.safety_in_bias] if self.has_bias else None
        b_out = [self.general_out_bias, self.safety_out_bias] if self.has_bias else None
        return w_in, w_out, b_in, b_out

    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        batch = shape[0] if len(shape) == 3 else 1
        seq = x.shape[0] // max(batch, 1)
        logits = self.router(x)  # bf16/fp16/fp32: sparse_route accumulates in fp32 (no cast kernel)
        bias = self._routing_bias(batch, seq, x.device)
        route = sparse_route_reference if self.use_reference else sparse_route
        straight_through = self.router_grad == "straight_through" and logits.requires_grad
        r = route(logits, self.top_k, temperature=self.router_temperature, bias=bias, min_weight=self.min_weight,
                  renormalize=not straight_through)
        if straight_through:
            # value: the renormalised weight (exactly 1 at top-1, p/p); gradient: that of the kept
            # probabilities, so the LM loss trains the router even at top-1 (see UpcycleConfig.router_grad)
            r = r._replace(weights=r.weights / r.weights.sum(-1, keepdim=True).detach())
        w_in, w_out, b_in, b_out = self.chunks()
        mlp = grouped_expert_mlp_reference if self.use_reference else grouped_expert_mlp
        out = mlp(x, r, w_in, w_out, self.activation, gated=self.gated, b_in=b_in, b_out=b_out)
        self.last_experts = r.experts.detach().view(*shape[:-1], self.top_k)
        self.router_logits = logits.view(*shape[:-1], self.num_experts) if (self.training and torch.is_grad_enabled()) else None
        if self.dropout is not None:
            out = self.dropout(out)
        return out.view(shape)

    # -- what the general expert alone computes (the base model's MLP) -----------------------------------
    def base_forward(self, hidden_states: Tensor) -> Tensor:
        """The original MLP alone (exactly what the layer computed before upcycling)."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        h = x @ self.general_in_proj[0].t()
        if self.has_bias:
            h = h + self.general_in_bias[0]
        I = self.intermediate_size
        a = activation_fn(self.activation, h[:, :I]) * h[:, I:] if self.gated else activation_fn(self.activation, h)
        y = a @ self.general_out_proj[0].t()
        if self.has_bias:
            y = y + self.general_out_bias[0]
        return y.view(shape)

    def safety_parameters(self):
        return [p for n, p in self.named_parameters() if n.startswith("safety_")]

    def router_parameters(self):
        pool = list(self.router_pool.parameters()) if self.router_pool is not None else []
        return list(self.router.parameters()) + pool


def is_pure_tau(tau) -> bool:
    """True when τ needs no per-sequence decision: 0 or 1, or a per-sequence tensor of only 0s and 1s."""
    if isinstance(tau, Tensor):
        return bool(((tau == 0) | (tau == 1)).all())
    return tau is not None and float(tau) in (0.0, 1.0)


def current_tau(module: SafetyMoE):
    """The τ a forward of `module` would use now: the call's (``request_safety_temperature``), else the
    module's default."""
    tau = _REQUEST_TAU.get()
    return module.safety_temperature if tau is None else tau


def safety_moe_modules(model: nn.Module) -> list[tuple[str, SafetyMoE]]:
    """(name, module) of every SafetyMoE in `model`, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SafetyMoE)]


@torch.compiler.disable  # a host check of the values: runs eagerly, so compiled callers validate too
def check_tau_tensor(tau: Tensor, name: str = "safety temperature") -> Tensor:
    if tau.dim() != 1 or not tau.is_floating_point():
        raise ValueError(f"{name}: a per-request tensor must be a 1-D float tensor [batch], got "
                         f"{tuple(tau.shape)} {tau.dtype}")
    if not bool(((tau >= 0) & (tau <= 1)).all()):
        raise ValueError(f"{name}: every per-request value must be in [0, 1] (NaN is not allowed), got "
                         f"{tau.detach().cpu().tolist()}")
    return tau.detach()


def validate_tau(tau, name: str = "safety temperature"):
    return check_tau_tensor(tau, name) if isinstance(tau, Tensor) else check_safety_temperature(tau, name)


def request_tau(tau, batch: int | None, device=None, name: str = "safety_temperature"):
    """τ given to one model call, validated: a float in [0, 1], or a list / 1-D tensor with one value per
    sequence (``batch`` entries; None skips the length check), returned as a float64 tensor on ``device``."""
    if isinstance(tau, Tensor) and tau.dim() == 0:
        tau = float(tau)
    if isinstance(tau, (list, tuple)):
        if not tau or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in tau):
            raise ValueError(f"`{name}` must be a float in [0, 1] or one float per sequence, got {tau!r}")
        tau = torch.tensor([float(t) for t in tau], dtype=torch.float64)
    if not isinstance(tau, Tensor):
        return check_safety_temperature(tau, f"`{name}`")
    tau = check_tau_tensor(tau, f"`{name}`")
    if batch is not None and tau.numel() != batch:
        raise ValueError(f"`{name}` has {tau.numel()} values but the batch has {batch} sequences (give one "
                         "per sequence, or a single float)")
    return tau.to(device=device, dtype=torch.float64) if device is not None else tau.double()


@contextlib.contextmanager
def request_safety_temperature(tau):
    """Every SafetyMoE run inside the block (in this thread / task) uses ``tau`` (already validated, see
    :func:`request_tau`) instead of its default. What ``model(..., safety_temperature=τ)`` uses."""
    token = _REQUEST_TAU.set(tau)
    try:
        yield
    finally:
        _REQUEST_TAU.reset(token)


def swap_in_safety_moe(model: nn.Module, config: UpcycleConfig, *, verify: bool = True) -> list[int]:
    """Replace the MLPs of ``config.layers`` by SafetyMoE modules built from them (on the MLP's device:
    on ``meta`` nothing is allocated or initialised). Returns the layer indices."""
    _, layers = find_decoder_layers(model)
    n = len(layers)
    bad = [i for i in config.layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"upcycle_: layer indices {bad} out of range for a model with {n} decoder layers")
    already = [i for i in config.layers if isinstance(layers[i].mlp, SafetyMoE)]
    if already:
        raise ValueError(f"upcycle_: the model is already upcycled (layers {already}); upcycling twice is "
                         "not supported")
    for i in config.layers:
        old = layers[i].mlp
        new = SafetyMoE(extract_mlp(old, model.config), config)
        new.train(old.training)
        if verify:
            _verify_equivalent(old, new, i)
        layers[i].mlp = new
        log.info("upcycled layer %d: %s", i, new.extra_repr())
    return list(config.layers)


@torch.no_grad()
def _verify_equivalent(old: nn.Module, new: SafetyMoE, index: int):
    p = new.general_in_proj
    x = torch.randn(2, 3, new.hidden_size, device=p.device, dtype=p.dtype)
    was = old.training
    old.eval()
    want = old(x)
    old.train(was)
    got = new.base_forward(x)
    tol = 1e-4 if p.dtype == torch.float32 else 3e-2
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()
    if not err < tol:
        raise ValueError(f"upcycle_: layer {index}: our reading of {type(old).__name__} does not reproduce it "
                         f"(relative error {err:.2e}); this MLP variant is not supported")
