"""`upcycle_`: swap safety-critical MLPs for SafetyMoE in place (torchao `quantize_`-style), and the
safety-temperature controls."""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .config import UpcycleConfig
from .layer import SafetyMoE, validate_tau
from .mlp import extract_mlp, find_decoder_layers

log = logging.getLogger("upsafe_ext")

CONFIG_KEY = "upsafe_upcycle"  # where the config lives inside model.config (saved in config.json)


def safety_moe_modules(model: nn.Module) -> list[tuple[str, SafetyMoE]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SafetyMoE)]


def upcycled_layers(model: nn.Module) -> list[int]:
    _, layers = find_decoder_layers(model)
    return [i for i, layer in enumerate(layers) if isinstance(layer.mlp, SafetyMoE)]


def upcycle_(model: nn.Module, config: UpcycleConfig, *, verify: bool = True) -> nn.Module:
    """Turn the MLPs of ``config.layers`` into :class:`SafetyMoE` modules, in place.

    The original MLP becomes expert 0 (frozen), ``config.num_safety_experts`` safety experts start as
    its copies, and the router starts with all mass on expert 0, so the model computes exactly what it
    did before (checked numerically on random inputs when ``verify``). Records the config in
    ``model.config`` so ``save_pretrained``/``load_upcycled`` round-trip it.

    Raises ValueError for: no layers given, an index out of range, a layer already upcycled, an MLP
    structure we don't support (the message lists the supported ones).
    """
    if not isinstance(config, UpcycleConfig):
        raise ValueError(f"upcycle_: `config` must be an UpcycleConfig, got {type(config).__name__}")
    if config.layers is None:
        raise ValueError("upcycle_: UpcycleConfig.layers is None; pass layer indices, e.g. from "
                         "scan_safety_layers(model, tokenizer, harmful, benign).top(k)")
    _, layers = find_decoder_layers(model)
    n = len(layers)
    bad = [i for i in config.layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"upcycle_: layer indices {bad} out of range for a model with {n} decoder layers")
    already = [i for i in config.layers if isinstance(layers[i].mlp, SafetyMoE)]
    if already or getattr(model.config, CONFIG_KEY, None):
        raise ValueError(f"upcycle_: the model is already upcycled (layers {already or upcycled_layers(model)}); "
                         "upcycling twice is not supported")
    for i in config.layers:
        old = layers[i].mlp
        base = extract_mlp(old, model.config)
        new = SafetyMoE(base, config)
        new.train(old.training)
        if verify:
            _verify_equivalent(old, new, i)
        layers[i].mlp = new
        log.info("upcycled layer %d: %s", i, new.extra_repr())
    model.config.__dict__[CONFIG_KEY] = config.to_dict()  # a plain dict: JSON-serialisable in config.json
    return model


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


def set_safety_temperature(model: nn.Module, tau) -> None:
    """Set τ on every SafetyMoE: a float in [0, 1] (0 = base model, 0.5 = trained router, 1 = safety
    experts only) or a ``[batch]`` tensor of per-request temperatures for the next forward calls."""
    tau = validate_tau(tau)
    mods = safety_moe_modules(model)
    if not mods:
        raise ValueError("set_safety_temperature: the model has no SafetyMoE layers (call upcycle_ first)")
    for _, m in mods:
        m.safety_temperature = tau


@contextlib.contextmanager
def safety_temperature(model: nn.Module, tau):
    """``with safety_temperature(model, 0.0): ...`` runs with τ and restores the previous values."""
    mods = safety_moe_modules(model)
    before = [m.safety_temperature for _, m in mods]
    set_safety_temperature(model, tau)
    try:
        yield model
    finally:
        for (_, m), t in zip(mods, before):
            m.safety_temperature = t


def set_kernel_preference(model: nn.Module, preference: str) -> None:
    """"auto" (our kernels) or "torch" (the pure-PyTorch reference path, for debugging)."""
    if preference not in ("auto", "torch"):
        raise ValueError(f"set_kernel_preference: `preference` must be 'auto' or 'torch', got {preference!r}")
    for _, m in safety_moe_modules(model):
        m.use_reference = preference == "torch"


def routing_summary(model: nn.Module) -> dict[str, float]:
    """Fraction of tokens (first choice) sent to safety experts by each SafetyMoE in the last forward."""
    out = {}
    for name, m in safety_moe_modules(model):
        if m.last_experts is not None and m.last_experts.numel():
            first = m.last_experts[..., 0]
            out[name] = float((first >= 1).float().mean())
    return out


def get_upcycle_config(model: nn.Module) -> UpcycleConfig | None:
    d = getattr(model.config, CONFIG_KEY, None)
    return UpcycleConfig.from_dict(d) if d else None
