"""What a serving request may carry, and what a saved upcycled folder tells the server (no vLLM here).

A request chooses its safety temperature τ with ``SamplingParams(extra_args={"safety_temperature": τ})``
(offline) or ``extra_body={"vllm_xargs": {"safety_temperature": τ}}`` (OpenAI-compatible server).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..upcycle.config import CONFIG_KEY, UpcycleConfig, check_safety_temperature

SAFETY_TEMPERATURE_KEY = "safety_temperature"


def parse_safety_temperature(extra_args: Mapping[str, Any] | None) -> float | None:
    """τ from a request's ``extra_args``: a float in [0, 1], or None when the request sets none.

    Raises ValueError (vLLM answers HTTP 400 with the message) for anything else: a string, a bool,
    NaN, a value outside [0, 1]. A JSON number is accepted as int or float.
    """
    if not extra_args or SAFETY_TEMPERATURE_KEY not in extra_args:
        return None
    tau = extra_args[SAFETY_TEMPERATURE_KEY]
    if tau is None:
        return None
    if isinstance(tau, float) and not math.isfinite(tau):
        raise ValueError(f"extra_args['{SAFETY_TEMPERATURE_KEY}'] must be a float in [0, 1], got {tau!r}")
    return check_safety_temperature(tau, f"extra_args['{SAFETY_TEMPERATURE_KEY}'] (vllm_xargs)")


@dataclass(frozen=True)
class ServingModelInfo:
    """What the server needs from a saved upcycled folder's config.

    upcycle: the UpcycleConfig recorded at save time (layers, experts, top_k, routing knobs).
    default_safety_temperature: τ for requests that set none (the saved ``safety_temperature``).
    """

    upcycle: UpcycleConfig
    default_safety_temperature: float


def serving_model_info(hf_config) -> ServingModelInfo | None:
    """Read the upcycling record from an HF config object (or a config.json dict); None if plain."""
    get = hf_config.get if isinstance(hf_config, Mapping) else (lambda k, d=None: getattr(hf_config, k, d))
    d = get(CONFIG_KEY, None)
    if not d:
        return None
    if not isinstance(d, Mapping):  # a config object (e.g. an UpcycleConfig kept on the HF config)
        d = d.to_dict() if hasattr(d, "to_dict") else dict(vars(d))
    cfg = UpcycleConfig.from_dict(dict(d))
    if cfg.routing != "token":
        raise ValueError(f"upsafe_ext serving: this model routes per sequence (UpcycleConfig.routing="
                         f"{cfg.routing!r}), which the vLLM plugin does not implement (it routes per token); serve "
                         "it with Hugging Face `generate` (which takes the decision), or save a routing='token' model")
    return ServingModelInfo(cfg, float(cfg.safety_temperature))
