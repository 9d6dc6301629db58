"""Saving and loading upcycled models (safetensors only).

* `save_upcycled(model, dir)` writes a standard HF folder (config.json records the upcycling under
  `upsafe_upcycle`, weights as safetensors); `load_upcycled(dir)` rebuilds the model class from the
  config, upcycles it the same way and loads the weights (AutoModelForCausalLM cannot build SafetyMoE
  modules by itself: this function is the documented hook).
* `save_safety_adapter(model, dir)` writes only what upcycling added (router + safety experts) as
  `adapter_model.safetensors` + `adapter_config.json`, PEFT-style; `load_safety_adapter(base, dir)`
  upcycles a base model and loads them. The base model's weights are never written.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from .config import UpcycleConfig
from .model import CONFIG_KEY, get_upcycle_config, safety_moe_modules, upcycle_

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _require_upcycled(model, op):
    cfg = get_upcycle_config(model)
    if cfg is None or not safety_moe_modules(model):
        raise ValueError(f"{op}: the model is not upcycled (call upcycle_ first)")
    return cfg


def save_upcycled(model, save_directory: str, tokenizer=None) -> str:
    """`model.save_pretrained(save_directory, safe_serialization=True)` (+ the tokenizer)."""
    _require_upcycled(model, "save_upcycled")
    os.makedirs(save_directory, exist_ok=True)
    model.save_pretrained(save_directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    return save_directory


def _read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for name in files:
            sd.update(load_file(os.path.join(directory, name)))
        return sd
    raise FileNotFoundError(f"load_upcycled: no model.safetensors (or index) in {directory}; only safetensors "
                            "checkpoints are supported")


def load_upcycled(directory: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Load a model written by `save_upcycled` (returns the model in eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    d = getattr(config, CONFIG_KEY, None)
    if not d:
        raise ValueError(f"load_upcycled: {directory} is not an upcycled model (config.json has no '{CONFIG_KEY}'); "
                         "use AutoModelForCausalLM.from_pretrained for plain models")
    cfg = UpcycleConfig.from_dict(d)
    delattr(config, CONFIG_KEY)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    upcycle_(model, cfg, verify=False)
    sd = _read_state_dict(directory)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in missing if k not in tied and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"load_upcycled: checkpoint does not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if device is not None:
        model.to(device)
    return model.eval()


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """Router + safety-expert tensors of every SafetyMoE, keyed by their full parameter names."""
    out = {}
    for mname, m in safety_moe_modules(model):
        for pname, p in m.named_parameters():
            if pname.startswith("router.") or pname.startswith("safety_"):
                out[f"{mname}.{pname}"] = p.detach().contiguous().clone()  # no shared storage in safetensors
    return out


def save_safety_adapter(model, save_directory: str) -> str:
    cfg = _require_upcycled(model, "save_safety_adapter")
    os.makedirs(save_directory, exist_ok=True)
    save_file(adapter_state_dict(model), os.path.join(save_directory, ADAPTER_WEIGHTS),
              metadata={"format": "pt", "upsafe_ext": "safety_adapter"})
    meta = {"upcycle": cfg.to_dict(), "base_model_type": getattr(model.config, "model_type", None),
            "num_hidden_layers": getattr(model.config, "num_hidden_layers", None)}
    with open(os.path.join(save_directory, ADAPTER_CONFIG), "w") as f:
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
