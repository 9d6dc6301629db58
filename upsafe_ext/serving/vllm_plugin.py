"""The ``vllm.general_plugins`` entry point: tells vLLM which class serves a saved upcycled folder.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers) before it
reads a model's config. The class is given as a ``"module:Class"`` string, so vLLM imports our model
module (and with it vLLM's model code and our kernels) only when such a model is actually served.
"""
from __future__ import annotations

MODEL_CLASS = "upsafe_ext.serving.vllm_model:UpsafeLlamaForCausalLM"
# architectures served by MODEL_CLASS
# (config.json "architectures" of a folder written by save_upcycled; "model_type": "upsafe_upcycled")
ARCHITECTURES = ("UpsafeForCausalLM",)


def register() -> None:
    import importlib

    from vllm import ModelRegistry

    # registers the "upsafe_upcycled" config with transformers' AutoConfig, so vLLM can read config.json
    importlib.import_module("upsafe_ext.upcycle")

    for arch in ARCHITECTURES:
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, MODEL_CLASS)
