"""UpcycleConfig: what `upcycle_` builds (PEFT-style config dataclass, JSON round-trip)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .._config import SerialisableConfig

CONFIG_VERSION = 1
CONFIG_KEY = "upsafe_upcycle"  # where the config lives inside model.config (saved in config.json)
ROUTER_GRADS = ("straight_through", "none")
ROUTINGS = ("token", "sequence")


@dataclass
class UpcycleConfig(SerialisableConfig):
    """How to turn a model's safety-critical MLPs into safety MoEs (UpSafe°C).

    Args:
        layers (list[int] | None): decoder-layer indices to upcycle. None = let `upcycle_` require
            them (use `scan_safety_layers(...).top(k)` to choose). Default None.
        num_safety_experts (int): safety experts added next to the original MLP (expert 0). Default 1.
        top_k (int): experts per token, over all experts. Default 1.
        init (str): "copy" (safety experts start as copies of the original MLP) or "copy+noise"
            (copies plus Gaussian noise of relative std `noise_std`). Default "copy".
        noise_std (float): relative noise for init="copy+noise". Default 0.01.
        router_init_margin (float): the router starts with bias +margin on the original MLP and zero
            weights, so every safety expert has probability ~e^-margin and is dropped by `min_weight`:
            the upcycled model computes exactly the base model until trained. Default 8.0.
        min_weight (float): routing probability below which a non-first choice is dropped. Default 0.01.
        safety_temperature (float): τ in [0, 1]; 0.5 = the trained router unchanged, 0 = base model,
            1 = every token through the safety experts. Default 0.5.
        router_temperature (float): softmax temperature of the router (sharpness), > 0. Default 1.0.
        train_general (bool): also train the original MLP (normally frozen). Default False.
        router_grad (str): how the LM loss reaches the router while training (ours).
            "straight_through": each chosen expert's weight is its router probability divided by a
            stop-gradient copy of the kept probability mass, so its value is exactly the renormalised
            weight (1 at top-1: the forward pass is unchanged, bit for bit) and its gradient is that of
            the probability. "none": the plain renormalised weight; at top-1 it is p/p = 1 and the
            router gets no gradient from the LM loss (only from auxiliary losses). Default
            "straight_through".
        routing (str): who decides where tokens go. "token" (the paper): the router picks experts for
            every token. "sequence" (ours): one decision per sequence, taken at the generation position
            (the last prompt token) from the base model's hidden states there: the routers of all upcycled
            layers are read at that position, their safety logits averaged, log(τ/(1-τ)) added, and if
            the result is > 0 the whole reply goes through the safety experts (τ=1 for that sequence),
            else through the original MLP (τ=0: exactly the base model). `generate` takes the decision
            itself; see `upsafe_ext.upcycle.sequence`. Default "token".

    Example:
        >>> cfg = UpcycleConfig(layers=[3, 4], num_safety_experts=1, top_k=1)
        >>> UpcycleConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    layers: list[int] | None = field(default=None, metadata={"help": "decoder-layer indices to upcycle"})
    num_safety_experts: int = field(default=1, metadata={"help": "safety experts per upcycled layer"})
    top_k: int = field(default=1, metadata={"help": "experts per token"})
    init: str = field(default="copy", metadata={"help": "'copy' or 'copy+noise'"})
    noise_std: float = field(default=0.01, metadata={"help": "relative init noise for 'copy+noise'"})
    router_init_margin: float = field(default=8.0, metadata={"help": "router bias on the original MLP at init"})
    min_weight: float = field(default=0.01, metadata={"help": "drop non-first choices below this probability"})
    safety_temperature: float = field(default=0.5, metadata={"help": "τ in [0, 1] at inference"})
    router_temperature: float = field(default=1.0, metadata={"help": "router softmax temperature (> 0)"})
    train_general: bool = field(default=False, metadata={"help": "also train the original MLP"})
    router_grad: str = field(default="straight_through",
                             metadata={"help": "'straight_through' (the LM loss reaches the router) or 'none'"})
    routing: str = field(default="token",
                         metadata={"help": "'token' (router per token) or 'sequence' (one decision per request)"})
    version: int = field(default=CONFIG_VERSION, metadata={"help": "config format version"})

    def __post_init__(self):
        if self.layers is not None:
            if isinstance(self.layers, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise ValueError(f"UpcycleConfig.layers must be a list of ints, got {self.layers!r}")
            if len(set(self.layers)) != len(self.layers) or len(self.layers) == 0:
                raise ValueError(f"UpcycleConfig.layers must be non-empty and unique, got {self.layers!r}")
            self.layers = sorted(self.layers)
        if not isinstance(self.num_safety_experts, int) or not 1 <= self.num_safety_experts <= 63:
            raise ValueError(f"UpcycleConfig.num_safety_experts must be an int in [1, 63], got {self.num_safety_experts!r}")
        E = self.num_safety_experts + 1
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= min(E, 8):
            raise ValueError(f"UpcycleConfig.top_k must be in [1, min(num_experts={E}, 8)], got {self.top_k!r}")
        if self.init not in ("copy", "copy+noise"):
            raise ValueError(f"UpcycleConfig.init must be 'copy' or 'copy+noise', got {self.init!r}")
        if not (isinstance(self.noise_std, (int, float)) and 0 <= self.noise_std < 1):
            raise ValueError(f"UpcycleConfig.noise_std must be in [0, 1), got {self.noise_std!r}")
        if not (isinstance(self.router_init_margin, (int, float)) and math.isfinite(self.router_init_margin)
                and self.router_init_margin >= 0):
            raise ValueError(f"UpcycleConfig.router_init_margin must be a finite float >= 0, got {self.router_init_margin!r}")
        if not 0 <= self.min_weight <= 1:
            raise ValueError(f"UpcycleConfig.min_weight must be in [0, 1], got {self.min_weight!r}")
        check_safety_temperature(self.safety_temperature, "UpcycleConfig.safety_temperature")
        if not (isinstance(self.router_temperature, (int, float)) and self.router_temperature > 0
                and math.isfinite(self.router_temperature)):
            raise ValueError(f"UpcycleConfig.router_temperature must be a finite float > 0, got {self.router_temperature!r}")

        if self.router_grad not in ROUTER_GRADS:
            raise ValueError(f"UpcycleConfig.router_grad must be one of {ROUTER_GRADS}, got {self.router_grad!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"UpcycleConfig.routing must be one of {ROUTINGS}, got {self.routing!r}")

    @property
    def num_experts(self) -> int:
        return self.num_safety_experts + 1


def check_safety_temperature(tau, name: str = "safety temperature") -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0.0 <= float(tau) <= 1.0):
        raise ValueError(f"{name} must be a float in [0, 1] (NaN is not allowed), got {tau!r}")
    return float(tau)
