"""`upcycle_`: swap safety-critical MLPs for SafetyMoE in place (torchao `quantize_`-style), and the
safety-temperature controls."""
from __future__ import annotations

import contextlib

from torch import nn

from .config import CONFIG_KEY, UpcycleConfig
from .hf import as_upsafe_model
from .layer import SafetyMoE, safety_moe_modules, swap_in_safety_moe, validate_tau
from .mlp import find_decoder_layers

__all__ = ["safety_moe_modules", "upcycled_layers", "upcycle_", "set_safety_temperature", "safety_temperature",
           "set_kernel_preference", "routing_summary", "get_upcycle_config"]


def upcycled_layers(model: nn.Module) -> list[int]:
    _, layers = find_decoder_layers(model)
    return [i for i, layer in enumerate(layers) if isinstance(layer.mlp, SafetyMoE)]


def upcycle_(model: nn.Module, config: UpcycleConfig, *, verify: bool = True) -> nn.Module:
    """Turn the MLPs of ``config.layers`` into :class:`SafetyMoE` modules, in place.

    The original MLP becomes expert 0 (frozen), ``config.num_safety_experts`` safety experts start as
    its copies, and the router starts with all mass on expert 0, so the model computes exactly what it
    did before (checked numerically on random inputs when ``verify``). Records the config in
    ``model.config`` so ``save_pretrained``/``load_upcycled`` round-trip it. A Hugging Face causal LM
    becomes an ``UpsafeForCausalLM`` (a subclass of its own class, see ``upsafe_ext.upcycle.hf``): its
    ``forward`` and ``generate`` take ``safety_temperature=`` per call, and ``save_pretrained`` writes a
    folder that ``AutoModelForCausalLM.from_pretrained`` loads as the upcycled model.

    Raises ValueError for: no layers given, an index out of range, a layer already upcycled, an MLP
    structure we don't support (the message lists the supported ones).
    """
    if not isinstance(config, UpcycleConfig):
        raise ValueError(f"upcycle_: `config` must be an UpcycleConfig, got {type(config).__name__}")
    if config.layers is None:
        raise ValueError("upcycle_: UpcycleConfig.layers is None; pass layer indices, e.g. from "
                         "scan_safety_layers(model, tokenizer, harmful, benign).top(k)")
    if getattr(model.config, CONFIG_KEY, None):
        raise ValueError(f"upcycle_: the model is already upcycled (layers {upcycled_layers(model)}); "
                         "upcycling twice is not supported")
    swap_in_safety_moe(model, config, verify=verify)
    model.config.__dict__[CONFIG_KEY] = config.to_dict()  # a plain dict: JSON-serialisable in config.json
    return as_upsafe_model(model)


def set_safety_temperature(model: nn.Module, tau) -> None:
    """Set the default τ of every SafetyMoE: a float in [0, 1] (0 = base model, 0.5 = trained router,
    1 = safety experts only) or a ``[batch]`` tensor of per-request temperatures for the next forward calls.

    This is model state, shared by every caller: to serve requests (threads, beam search, several return
    sequences) pass τ to the call instead, ``model(..., safety_temperature=τ)`` or
    ``model.generate(..., safety_temperature=τ)``, which takes precedence over this default."""
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
