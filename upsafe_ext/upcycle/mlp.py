"""Finding decoder layers and reading MLP weights out of Hugging Face models, by module structure.

Supported MLP shapes (any family whose MLP has one of them works):
  gated    `gate_proj`, `up_proj`, `down_proj` nn.Linear (Llama, Qwen2/3, Mistral, Gemma, OLMo, ...)
  gated    fused `gate_up_proj` + `down_proj` nn.Linear (Phi-3 style)
  plain    `dense_h_to_4h`, `dense_4h_to_h` nn.Linear (GPT-NeoX, Pythia)
  plain    `c_fc`, `c_proj` HF Conv1D (GPT-2)
The activation comes from the module (`act_fn`/`act`) class, cross-checked numerically by
`upcycle_` against the original MLP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED = ("gate_proj+up_proj+down_proj (Llama/Qwen/Mistral/Gemma...)", "gate_up_proj+down_proj (Phi-3)",
             "dense_h_to_4h+dense_4h_to_h (GPT-NeoX)", "c_fc+c_proj Conv1D (GPT-2)")


@dataclass
class MLPWeights:
    """An MLP as stacked tensors in the grouped_expert_mlp layout (copies, detached)."""

    gated: bool
    activation: str           # silu | gelu_tanh | gelu
    w_in: torch.Tensor        # [2I | I, H]
    w_out: torch.Tensor       # [H, I]
    b_in: torch.Tensor | None  # [2I | I]
    b_out: torch.Tensor | None  # [H]
    dropout: float = 0.0


def _activation_of(mod: nn.Module, config) -> str:
    act = getattr(mod, "act_fn", None) or getattr(mod, "act", None)
    name = type(act).__name__ if act is not None else ""
    if name in ("SiLUActivation", "SiLU", "SwiGLU"):
        return "silu"
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation", "GELUPytorchTanh"):
        return "gelu_tanh"
    if name == "GELU":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    if name in ("GELUActivation",):
        return "gelu"
    from ..ops.grouped_mlp import HF_ACTIVATIONS

    for key in ("hidden_act", "hidden_activation", "activation_function"):
        v = getattr(config, key, None)
        if isinstance(v, str) and v in HF_ACTIVATIONS:
            return HF_ACTIVATIONS[v]
    raise ValueError(f"upcycle_: unsupported MLP activation {name or '(none)'}; supported: SiLU, GELU (tanh or erf)")


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _is_conv1d(m) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "weight") and hasattr(m, "nf")


def extract_mlp(mod: nn.Module, config) -> MLPWeights:
    """Read an MLP's weights (detached copies) in our layout, or raise ValueError if unsupported."""
    g = lambda n: getattr(mod, n, None)  # noqa: E731
    drop = g("dropout")
    p_drop = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
    if _is_linear(g("gate_proj")) and _is_linear(g("up_proj")) and _is_linear(g("down_proj")):
        gp, up, dp = g("gate_proj"), g("up_proj"), g("down_proj")
        if (gp.bias is None) != (up.bias is None):
            raise ValueError("upcycle_: gate_proj and up_proj must both have or both lack a bias")
        b_in = torch.cat([gp.bias, up.bias]).detach().clone() if gp.bias is not None else None
        return MLPWeights(True, _activation_of(mod, config), torch.cat([gp.weight, up.weight]).detach().clone(),
                          dp.weight.detach().clone(), b_in,
                          dp.bias.detach().clone() if dp.bias is not None else None, p_drop)
    if _is_linear(g("gate_up_proj")) and _is_linear(g("down_proj")):
        gu, dp = g("gate_up_proj"), g("down_proj")
        return MLPWeights(True, _activation_of(mod, config), gu.weight.detach().clone(), dp.weight.detach().clone(),
                          gu.bias.detach().clone() if gu.bias is not None else None,
                          dp.bias.detach().clone() if dp.bias is not None else None, p_drop)
    if _is_linear(g("dense_h_to_4h")) and _is_linear(g("dense_4h_to_h")):
        a, b = g("dense_h_to_4h"), g("dense_4h_to_h")
        return MLPWeights(False, _activation_of(mod, config), a.weight.detach().clone(), b.weight.detach().clone(),
                          a.bias.detach().clone() if a.bias is not None else None,
                          b.bias.detach().clone() if b.bias is not None else None, p_drop)
    if _is_conv1d(g("c_fc")) and _is_conv1d(g("c_proj")):
        a, b = g("c_fc"), g("c_proj")  # Conv1D stores [in, out]
        return MLPWeights(False, _activation_of(mod, config), a.weight.detach().t().contiguous(),
                          b.weight.detach().t().contiguous(), a.bias.detach().clone(), b.bias.detach().clone(), p_drop)
    raise ValueError(f"upcycle_: unsupported MLP module {type(mod).__name__} (children: "
                     f"{[n for n, _ in mod.named_children()]}); supported structures: {', '.join(SUPPORTED)}")


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the first one whose length is config.num_hidden_layers and
    whose items have an `mlp` child."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            if all(hasattr(layer, "mlp") for layer in mod):
                return name, mod
    raise ValueError(f"upcycle_: could not find the decoder layers of {type(model).__name__} "
                     "(a ModuleList of config.num_hidden_layers blocks with an `mlp` attribute)")
