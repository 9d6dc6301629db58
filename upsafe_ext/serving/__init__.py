"""Serving upcycled models with per-request safety temperature (see docs/serving.md).

    vllm serve SAVED_DIR                                   # after `bash scripts/bootstrap.sh --vllm`
    client.chat.completions.create(..., extra_body={"vllm_xargs": {"safety_temperature": 0.3}})

Layers (one name through the stack): ``params`` (what a request may carry, no vLLM import) ->
``request_tau`` (a vLLM logits processor that validates τ at the API boundary and tracks each running
request's τ by its batch row) -> ``vllm_model`` (vLLM's Llama with the upcycled MLPs replaced by our
routing + grouped-expert ops, reading the per-token τ inside one opaque custom op) -> ``vllm_plugin``
(the ``vllm.general_plugins`` entry point that registers the architecture and the chat renderer).
The magic-token mode (``chat_template_kwargs={"safety_mode": ...}``): ``magic_mode`` (mode parsing,
sanitising + placement, the endpoint rules; no vLLM import) -> ``vllm_magic`` (vLLM's HF renderer with
the mode token placed, and the ``MagicGuard`` ASGI middleware).

Importing this package does not import vLLM; the vLLM modules need the serving venv.
"""
from .params import SAFETY_TEMPERATURE_KEY, ServingModelInfo, parse_safety_temperature, serving_model_info

__all__ = ["SAFETY_TEMPERATURE_KEY", "parse_safety_temperature", "ServingModelInfo", "serving_model_info"]
