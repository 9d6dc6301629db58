"""Saving and loading upcycled models (safetensors only).

* `save_upcycled(model, dir)` writes a standard HF folder, atomically and never over the folder the model
  came from: config.json says `"model_type": "upsafe_upcycled"` (base type under `base_model_type`, the
  upcycling under `upsafe_upcycle`), weights as safetensors. `AutoModelForCausalLM.from_pretrained(dir)` loads
  it once `upsafe_ext.upcycle` is imported (see `hf.py`); `load_upcycled(dir)` is a thin alias that also
  reads folders saved before that type existed (base model_type + `upsafe_upcycle`).
* `save_safety_adapter(model, dir)` writes only what upcycling added (router + safety experts) as
  `adapter_model.safetensors` + `adapter_config.json`, PEFT-style; `load_safety_adapter(base, dir)`
  upcycles a base model and loads them. The base model's weights are never written.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from ..saving import atomic_dir
from .config import CONFIG_KEY, UpcycleConfig
from .hf import UpsafeConfig, upsafe_config
from .model import get_upcycle_config, safety_moe_modules, upcycle_

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _require_upcycled(model, op):
    cfg = get_upcycle_config(model)
    if cfg is None or not safety_moe_modules(model):
        raise ValueError(f"{op}: the model is not upcycled (call upcycle_ first)")
    return cfg


def _source_of(model) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def save_upcycled(model, save_directory: str, tokenizer=None) -> str:
    """`model.save_pretrained(save_directory, safe_serialization=True)` (+ the tokenizer), written into a
    temporary sibling and renamed into place; refuses the folder the model was loaded from."""
    _require_upcycled(model, "save_upcycled")
    with atomic_dir(save_directory, inputs=[_source_of(model)], arg="save_directory") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return save_directory


def load_upcycled(directory: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Load a model written by `save_upcycled` (returns the model in eval mode): the same as
    `AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)`, and it also reads older folders whose
    config.json has the base model_type and an `upsafe_upcycle` entry."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    if not getattr(config, CONFIG_KEY, None):
        raise ValueError(f"load_upcycled: {directory} is not an upcycled model (config.json has no '{CONFIG_KEY}'); "
                         "use AutoModelForCausalLM.from_pretrained for plain models")
    if not isinstance(config, UpsafeConfig):
        config = upsafe_config(config)  # an older folder: model_type is the base type
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(directory, config=config, **kwargs)
    if device is not None:
        model.to(device)
    return model.eval()


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """Router + safety-expert tensors of every SafetyMoE, keyed by their full parameter names."""
    out = {}
    for mname, m in safety_moe_modules(model):
        for pname, p in m.named_parameters():
            if pname.startswith(("router.", "router_pool.", "safety_")):
                out[f"{mname}.{pname}"] = p.detach().contiguous().clone()  # no shared storage in safetensors
    return out


def save_safety_adapter(model, save_directory: str) -> str:
    """Write the router + safety-expert tensors and the upcycling (atomically; never over the model's source)."""
    cfg = _require_upcycled(model, "save_safety_adapter")
    meta = {"upcycle": cfg.to_dict(), "base_model_type": getattr(model.config, "model_type", None),
            "num_hidden_layers": getattr(model.config, "num_hidden_layers", None)}
    with atomic_dir(save_directory, inputs=[_source_of(model)], arg="save_directory") as tmp:
        save_file(adapter_state_dict(model), os.path.join(tmp, ADAPTER_WEIGHTS),
                  metadata={"format": "pt", "upsafe_ext": "safety_adapter"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(meta, f, indent=2)
    return save_directory


def load_safety_adapter(base_model, directory: str):
    """Upcycle `base_model` in place as recorded in the adapter and load the router + safety experts."""
    with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
        meta = json.load(f)
    mt = getattr(base_model.config, "model_type", None)
    if meta.get("base_model_type") not in (None, mt):
        raise ValueError(f"load_safety_adapter: adapter was made for model_type={meta['base_model_type']!r}, "
                         f"got {mt!r}")
    upcycle_(base_model, UpcycleConfig.from_dict(meta["upcycle"]))
    sd = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    params = dict(base_model.named_parameters())
    missing = [k for k in adapter_state_dict(base_model) if k not in sd]
    if missing:
        raise ValueError(f"load_safety_adapter: adapter lacks {missing[:8]}")
    with torch.no_grad():
        for k, v in sd.items():
            if k not in params or params[k].shape != v.shape:
                raise ValueError(f"load_safety_adapter: adapter tensor {k} {tuple(v.shape)} does not fit the model")
            params[k].copy_(v)
    return base_model
