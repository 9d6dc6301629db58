"""The ``vllm.general_plugins`` entry point: tells vLLM which class serves a saved upcycled folder.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers) before it
reads a model's config. It also puts the magic-token chat renderer in place of vLLM's "hf" renderer. The class is given as a ``"module:Class"`` string, so vLLM imports our model
module (and with it vLLM's model code and our kernels) only when such a model is actually served.
"""
from __future__ import annotations

MODEL_CLASS = "upsafe_ext.serving.vllm_model:UpsafeLlamaForCausalLM"
# architectures served by MODEL_CLASS
# (config.json "architectures" of a folder written by save_upcycled; "model_type": "upsafe_upcycled")
ARCHITECTURES = ("UpsafeForCausalLM",)
# vLLM's renderer of Hugging Face tokenizers, with the per-request magic-token mode (a no-op for folders
# without magic_tokens.json, which only refuses a `safety_mode` kwarg); see upsafe_ext/serving/vllm_magic.py
RENDERER = ("hf", "upsafe_ext.serving.vllm_magic", "UpsafeHfRenderer")


def register() -> None:
    import importlib

    from vllm import ModelRegistry

    # registers the "upsafe_upcycled" config with transformers' AutoConfig, so vLLM can read config.json
    importlib.import_module("upsafe_ext.upcycle")

    for arch in ARCHITECTURES:
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, MODEL_CLASS)

    from vllm.renderers.registry import RENDERER_REGISTRY

    mode, module, cls = RENDERER
    if RENDERER_REGISTRY.renderers.get(mode) != (module, cls):
        RENDERER_REGISTRY.register(mode, module, cls)
