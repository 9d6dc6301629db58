"""The upcycled model as a Hugging Face model of its own type, and τ as an argument of each call.

* ``config.json`` says ``"model_type": "upsafe_upcycled"`` (plus ``"base_model_type"``, e.g. ``"llama"``, and
  the upcycling under ``"upsafe_upcycle"``), so plain transformers refuses the folder instead of loading the
  base architecture with random MLPs. Importing ``upsafe_ext.upcycle`` registers the type with ``AutoConfig``
  and ``AutoModelForCausalLM``: ``from_pretrained`` then builds the model on the meta device, SafetyMoE
  layers included, and loads every tensor from the checkpoint (a missing one is an error).
* In memory the classes are subclasses of the base ones, made once per base class and cached: the config of
  an upcycled Llama is an ``UpsafeConfig`` *and* a ``LlamaConfig`` (its ``model_type`` attribute stays
  ``"llama"``, so everything transformers decides from it is unchanged; only the JSON says
  ``"upsafe_upcycled"``), the model an ``UpsafeForCausalLM`` *and* a ``LlamaForCausalLM``. ``upcycle_`` turns
  a model into that class in place (``as_upsafe_model``): no weight moves, no name changes.
* ``model(..., safety_temperature=τ)`` and ``model.generate(..., safety_temperature=τ)``: a float, or one value
  per sequence (list or 1-D tensor). ``generate`` keeps a per-sequence τ among its model inputs, so beam search
  and ``num_return_sequences`` expand it like the attention mask; each forward sets it for its own thread or
  task only (``request_safety_temperature``), never on the modules.
"""
from __future__ import annotations

import functools
import inspect

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .config import CONFIG_KEY, UpcycleConfig
from .layer import (current_tau, is_pure_tau, request_safety_temperature, request_tau, safety_moe_modules,
                    swap_in_safety_moe)

MODEL_TYPE = "upsafe_upcycled"  # config.json's model_type
BASE_TYPE_KEY = "base_model_type"  # config.json: the base architecture's model_type
ARCHITECTURE = "UpsafeForCausalLM"  # config.json's architectures[0], whatever the base


class UpsafeConfig(PreTrainedConfig):
    """The config of an upcycled model: registered with ``AutoConfig`` for ``model_type="upsafe_upcycled"``.

    ``UpsafeConfig.from_dict`` (what ``AutoConfig`` calls) returns an instance of the subclass for the base
    architecture named by ``base_model_type`` (see :func:`upsafe_config_class`); build one from a base config
    with :func:`upsafe_config`.
    """

    model_type = MODEL_TYPE
    upsafe_base_class = None  # the base config class, on the per-base subclasses

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        d = dict(config_dict)
        saved_type = d.pop("model_type", None)
        base_type = d.pop(BASE_TYPE_KEY, None)
        if saved_type not in (None, MODEL_TYPE) and base_type is None:
            base_type = saved_type  # a folder saved before model_type "upsafe_upcycled" existed
        if not d.get(CONFIG_KEY):
            raise ValueError(f"UpsafeConfig: the config has no '{CONFIG_KEY}' (not an upcycled model)")
        if cls is UpsafeConfig:
            if base_type not in CONFIG_MAPPING:
                raise ValueError(f"UpsafeConfig: `{BASE_TYPE_KEY}`={base_type!r} is not a model type this "
                                 "transformers knows; the folder needs the base architecture's model_type there")
            return upsafe_config_class(CONFIG_MAPPING[base_type]).from_dict(d, **kwargs)
        if base_type not in (None, cls.model_type):
            raise ValueError(f"UpsafeConfig: `{BASE_TYPE_KEY}`={base_type!r} does not match this class's "
                             f"base model_type {cls.model_type!r}")
        return super().from_dict(d, **kwargs)

    def to_dict(self):
        out = super().to_dict()
        if type(self) is not UpsafeConfig:
            out[BASE_TYPE_KEY] = type(self).model_type
            out["model_type"] = MODEL_TYPE
        return out

    def __reduce_ex__(self, protocol):  # made at run time, so pickled as (base class, state), see `rebuild`
        if type(self).upsafe_base_class is None:
            return super().__reduce_ex__(protocol)
        return (rebuild, ("config", type(self).upsafe_base_class), *super().__reduce_ex__(protocol)[2:])


def rebuild(kind: str, base: type):
    """An empty ``UpsafeConfig`` (kind "config") or ``UpsafeForCausalLM`` (kind "model") for the base class
    ``base``: how pickle and deepcopy recreate these run-time classes before restoring their state."""
    cls = upsafe_config_class(base) if kind == "config" else upsafe_model_class(base)
    return cls.__new__(cls)


@functools.cache
def upsafe_config_class(base: type) -> type:
    """The ``UpsafeConfig`` subclass for the base config class ``base`` (one class per base, cached), registered
    with ``AutoModelForCausalLM`` (to the ``UpsafeForCausalLM`` of the base's causal LM) when it has one."""
    if issubclass(base, UpsafeConfig):
        return base
    cls = type("UpsafeConfig", (UpsafeConfig, base), {"model_type": base.model_type, "upsafe_base_class": base,
                                                      "__module__": __name__, "__qualname__": "UpsafeConfig",
                                                      "__doc__": UpsafeConfig.__doc__})
    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING.get(base, None)
    if causal_lm is not None:
        AutoModelForCausalLM.register(cls, _model_class(causal_lm, cls), exist_ok=True)
    return cls


def upsafe_config(base_config: PreTrainedConfig, upcycle: UpcycleConfig | dict | None = None) -> UpsafeConfig:
    """A copy of ``base_config`` as an ``UpsafeConfig`` (the upcycling from ``upcycle``, else from the config)."""
    d = base_config.to_dict()
    d.pop("model_type", None)
    if upcycle is not None:
        d[CONFIG_KEY] = upcycle.to_dict() if isinstance(upcycle, UpcycleConfig) else dict(upcycle)
    if not d.get(CONFIG_KEY):
        raise ValueError(f"upsafe_config: `upcycle` is None and the config has no '{CONFIG_KEY}'")
    return upsafe_config_class(type(base_config)).from_dict(d)


def upcycle_config_of(config) -> UpcycleConfig:
    d = getattr(config, CONFIG_KEY, None)
    if not d:
        raise ValueError(f"UpsafeForCausalLM: config has no '{CONFIG_KEY}' (not an upcycled model's config)")
    return UpcycleConfig.from_dict(d)


def batch_size_of(args, kwargs) -> int | None:
    """Rows of the first of input_ids / inputs_embeds / inputs given (positionally or by name), else None."""
    for x in (args[0] if args else None, kwargs.get("input_ids"), kwargs.get("inputs"), kwargs.get("inputs_embeds")):
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return x.shape[0]
    return None


class UpsafeForCausalLMMixin:
    """What ``UpsafeForCausalLM`` adds to its base class (see :func:`upsafe_model_class`)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        swap_in_safety_moe(self, upcycle_config_of(config), verify=False)  # on meta inside from_pretrained

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """The base ``from_pretrained``, but a checkpoint that lacks a tensor of the model is an error (a
        SafetyMoE left at its init would silently be the base model)."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise ValueError(f"{ARCHITECTURE}.from_pretrained: the checkpoint lacks {len(missing)} tensors of the "
                             f"upcycled model, e.g. {missing[:6]}")
        return (model, info) if want_info else model

    def _upsafe_forward(self, *args, safety_temperature=None, **kwargs):
        tau = call_tau(self, args, kwargs, safety_temperature, "forward")
        if tau is None:
            return super().forward(*args, **kwargs)
        with request_safety_temperature(tau):
            return super().forward(*args, **kwargs)

    def __reduce_ex__(self, protocol):  # see UpsafeConfig.__reduce_ex__
        return (rebuild, ("model", type(self).upsafe_base_class), *super().__reduce_ex__(protocol)[2:])

    def generate(self, *args, safety_temperature=None, **kwargs):
        """``GenerationMixin.generate``, plus ``safety_temperature``: a float in [0, 1] or one per input
        sequence (list or 1-D tensor); beams and return sequences of a sequence share its τ."""
        tau = call_tau(self, args, kwargs, safety_temperature, "generate")
        if tau is not None:
            kwargs["safety_temperature"] = tau
        return super().generate(*args, **kwargs)


def routes_per_sequence(model) -> bool:
    """True for a model upcycled with ``UpcycleConfig(routing="sequence")``."""
    return (getattr(model.config, CONFIG_KEY, None) or {}).get("routing", "token") == "sequence"


def call_tau(model, args, kwargs, safety_temperature, op: str):
    """The τ of one ``forward`` / ``generate`` call: ``safety_temperature`` validated (None: the model's default),
    and for a sequence-routed model the decision per sequence (``sequence_tau``)."""
    tau = None if safety_temperature is None else request_tau(safety_temperature, batch_size_of(args, kwargs),
                                                              model.device)
    return sequence_tau(model, args, kwargs, tau, op) if routes_per_sequence(model) else tau


def sequence_tau(model, args, kwargs, tau, op: str):
    """τ for a call of a sequence-routed model: τ itself when it needs no decision (0, 1, or 0/1 per sequence),
    else the decision per sequence (``sequence.sequence_routes``) on the call's input ids."""
    from .sequence import sequence_routes

    # the modules are looked up only when the call gives no τ (generate's steps always give one)
    effective = current_tau(safety_moe_modules(model)[0][1]) if tau is None else tau
    if is_pure_tau(effective):
        return tau
    ids = next((x for x in (args[0] if args else None, kwargs.get("input_ids"), kwargs.get("inputs"))
                if isinstance(x, torch.Tensor)), None)
    if ids is None or ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(f"{ARCHITECTURE}.{op}: this model routes per sequence (UpcycleConfig.routing='sequence') "
                         "and decides from the prompt's token ids: pass `input_ids` [batch, seq] (not "
                         "`inputs_embeds`), or pass `safety_temperature` as 0/1 per sequence")
    past = kwargs.get("past_key_values")
    if past is not None and (past.get_seq_length() if hasattr(past, "get_seq_length") else len(past)) > 0:
        raise ValueError(f"{ARCHITECTURE}.{op}: this model routes per sequence (UpcycleConfig.routing='sequence') "
                         "and takes the decision at the end of the prompt, which a call continuing from "
                         "`past_key_values` cannot see: pass `safety_temperature` as the 0/1 per sequence that "
                         "upsafe_ext.upcycle.sequence_routes(model, prompt_ids, prompt_mask) gave for the prompt")
    return sequence_routes(model, ids, kwargs.get("attention_mask"), effective)


def _forward_signature(base_forward) -> inspect.Signature:
    """The base forward's signature plus keyword ``safety_temperature`` (generate and Trainer read it)."""
    sig = inspect.signature(base_forward)
    params = list(sig.parameters.values())
    tau = inspect.Parameter("safety_temperature", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
    return sig.replace(parameters=params[:at] + [tau] + params[at:])


def upsafe_model_class(base: type) -> type:
    """``UpsafeForCausalLM`` for the causal-LM class ``base``: a subclass of it (one per base, cached)."""
    if issubclass(base, UpsafeForCausalLMMixin):
        return base
    if not (issubclass(base, PreTrainedModel) and issubclass(base, GenerationMixin)):
        raise ValueError(f"upsafe_model_class: {base.__name__} is not a Hugging Face causal LM")
    return _model_class(base, upsafe_config_class(base.config_class))


@functools.cache
def _model_class(base: type, config_class: type) -> type:
    def forward(self, *args, safety_temperature=None, **kwargs):
        return UpsafeForCausalLMMixin._upsafe_forward(self, *args, safety_temperature=safety_temperature, **kwargs)

    forward.__signature__ = _forward_signature(base.forward)
    forward.__doc__ = (f"{base.__name__}.forward, plus `safety_temperature`: a float in [0, 1] or one per "
                       "sequence (list or 1-D tensor); None = the model's default τ.")
    return type(ARCHITECTURE, (UpsafeForCausalLMMixin, base),
                {"config_class": config_class, "forward": forward, "upsafe_base_class": base, "__module__": __name__,
                 "__qualname__": ARCHITECTURE})


def as_upsafe_model(model):
    """Make an upcycled HF causal LM an ``UpsafeForCausalLM`` in place (same object, modules and weights;
    only the Python class of the model and its config change). Other modules are returned unchanged."""
    if isinstance(model, UpsafeForCausalLMMixin) or not (isinstance(model, PreTrainedModel)
                                                         and isinstance(model, GenerationMixin)):
        return model
    cls = upsafe_model_class(type(model))
    model.config.__class__ = upsafe_config_class(type(model.config))
    model.__class__ = cls
    return model


def register_auto_classes() -> None:
    """Register ``model_type="upsafe_upcycled"`` with ``AutoConfig`` (done on import; idempotent)."""
    AutoConfig.register(MODEL_TYPE, UpsafeConfig, exist_ok=True)


register_auto_classes()
