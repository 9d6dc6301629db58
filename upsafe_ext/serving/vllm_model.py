"""vLLM model for a saved upcycled Llama-family checkpoint (SmolLM2, Llama, ...), per-request τ.

Everything but the upcycled MLPs is vLLM's own Llama (attention with its paged KV cache, RMSNorm,
rotary, fused gate_up MLPs, tied LM head). Each upcycled layer's MLP becomes :class:`SafetyMoEMLP`,
whose parameters carry the checkpoint's names (``router.weight``, ``general_in_proj``,
``safety_in_proj``, ...) so vLLM's default loader fills them, and whose forward is one opaque custom
op, ``torch.ops.upsafe_serving.safety_moe``: router GEMM -> ``upsafe_ext.ops.sparse_route`` with each
token's safety-temperature bias -> ``upsafe_ext.ops.grouped_expert_mlp``.

Per-token τ: vLLM lays the scheduled tokens out request by request in batch-row order, and the
attention metadata of the step holds ``query_start_loc`` (``[num_reqs + 1]`` token offsets). Row ``i``'s
τ comes from :func:`upsafe_ext.serving.request_tau.active_tracker` (the request's ``extra_args``) or the
saved default. The lookup runs inside the custom op, so it happens on every step even when vLLM
compiled the model with torch.compile (a Python read in traced code would be frozen into the graph).
"""
from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.models.llama import LlamaForCausalLM

from ..ops import grouped_expert_mlp, sparse_route
from ..ops.grouped_mlp import HF_ACTIVATIONS
from ..upcycle.config import UpcycleConfig
from ..upcycle.layer import safety_logit
from .params import serving_model_info
from .request_tau import active_tracker

__all__ = ["SafetyMoEMLP", "UpsafeLlamaForCausalLM", "token_routing_bias"]


# --- per-token routing bias from the step's requests ---------------------------------------------
class _BiasCache:
    key: tuple | None = None
    value: torch.Tensor | None = None


def _query_start_loc() -> torch.Tensor | None:
    """``[num_reqs + 1]`` token offsets of this step's requests (None outside a real step)."""
    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if isinstance(md, list):  # dual-batch overlap: one dict per micro-batch (not used on CPU)
        md = md[0] if len(md) == 1 else None
    if not isinstance(md, dict):
        return None
    for m in md.values():
        qsl = getattr(m, "query_start_loc", None)
        if isinstance(qsl, torch.Tensor):
            return qsl
    return None


def _bias_row(tau: float, num_experts: int) -> list[float]:
    general, safety = safety_logit(tau)  # the same numbers the HF SafetyMoE uses for a float τ
    return [general] + [safety] * (num_experts - 1)


def token_routing_bias(num_tokens: int, num_experts: int, default_tau: float,
                       device: torch.device) -> torch.Tensor | None:
    """The routing bias for this step's ``num_tokens`` flattened tokens.

    None when every token runs at τ = 0.5 (the trained router unchanged), ``[E]`` when all share one
    τ (bit-identical to the HF model at that float τ), else ``[num_tokens, E]``: token t of request
    row i gets row i's τ; padding tokens past the last request get ``default_tau``.
    """
    tracker = active_tracker()
    qsl = _query_start_loc()
    num_reqs = 0 if qsl is None else qsl.numel() - 1
    taus = (tracker.request_temperatures(num_reqs, default_tau) if tracker is not None
            else [default_tau] * num_reqs)
    counts = qsl.diff().tolist() if num_reqs else []
    padding = num_tokens - sum(counts)
    used = {t for t, c in zip(taus, counts) if c > 0} | ({default_tau} if padding > 0 or not counts else set())
    if padding < 0:
        raise RuntimeError(f"safety_moe: the step schedules {sum(counts)} tokens but the MLP got {num_tokens}")
    if used == {0.5}:
        return None
    key = (id(tracker), getattr(tracker, "step", -1), tuple(taus), tuple(counts), num_tokens, num_experts,
           default_tau, str(device))
    if _BiasCache.key == key:
        return _BiasCache.value
    if len(used) == 1:
        bias = torch.tensor(_bias_row(next(iter(used)), num_experts), dtype=torch.float32, device=device)
    else:
        rows = torch.tensor([_bias_row(t, num_experts) for t in taus + [default_tau]], dtype=torch.float32,
                            device=device)  # [num_reqs + 1, E]; the last row is for padding
        row_of_token = torch.repeat_interleave(torch.arange(num_reqs, device=device),
                                               torch.tensor(counts, device=device))
        if padding:
            row_of_token = torch.cat([row_of_token, torch.full((padding,), num_reqs, device=device)])
        bias = rows.index_select(0, row_of_token)
    _BiasCache.key, _BiasCache.value = key, bias
    return bias


# --- the op: opaque to torch.compile, so the τ lookup runs on every step ----------------------------
@torch.library.custom_op("upsafe_serving::safety_moe", mutates_args=())
def safety_moe(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor,
               w_in: list[torch.Tensor], w_out: list[torch.Tensor], b_in: list[torch.Tensor],
               b_out: list[torch.Tensor], top_k: int, min_weight: float, router_temperature: float,
               activation: str, gated: bool, default_tau: float) -> torch.Tensor:
    """``[T, H] -> [T, H]``: the upcycled MLP over a step's flattened tokens at each request's τ."""
    logits = torch.nn.functional.linear(x, router_weight, router_bias)  # [T, E]
    bias = token_routing_bias(x.shape[0], router_weight.shape[0], default_tau, x.device)
    route = sparse_route(logits, top_k, temperature=router_temperature, bias=bias, min_weight=min_weight,
                         renormalize=True)
    return grouped_expert_mlp(x, route, w_in, w_out, activation, gated=gated, b_in=b_in or None,
                              b_out=b_out or None)


@safety_moe.register_fake
def _safety_moe_fake(x, router_weight, router_bias, w_in, w_out, b_in, b_out, top_k, min_weight,
                     router_temperature, activation, gated, default_tau):
    return torch.empty_like(x)


class SafetyMoEMLP(nn.Module):
    """vLLM-side twin of :class:`upsafe_ext.upcycle.SafetyMoE` (same parameter names and layout).

    ``router.weight [E, H]``, ``router.bias [E]``, ``general_in_proj [1, 2I, H]``,
    ``general_out_proj [1, H, I]``, ``safety_in_proj [N, 2I, H]``, ``safety_out_proj [N, H, I]``
    (+ ``*_bias`` for MLPs with biases). Inference only; no tensor parallelism.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, config: UpcycleConfig,
                 default_tau: float, bias: bool = False):
        super().__init__()
        if hidden_act not in HF_ACTIVATIONS:
            raise ValueError(f"SafetyMoEMLP: unsupported hidden_act {hidden_act!r}; supported: {sorted(HF_ACTIVATIONS)}")
        H, I, E = hidden_size, intermediate_size, config.num_experts
        N = E - 1
        self.activation = HF_ACTIVATIONS[hidden_act]
        self.top_k, self.min_weight = config.top_k, float(config.min_weight)
        self.router_temperature = float(config.router_temperature)
        self.default_tau = float(default_tau)
        self.router = nn.Linear(H, E, bias=True)

        def param(*shape):
            return nn.Parameter(torch.empty(*shape), requires_grad=False)

        self.general_in_proj, self.general_out_proj = param(1, 2 * I, H), param(1, H, I)
        self.safety_in_proj, self.safety_out_proj = param(N, 2 * I, H), param(N, H, I)
        self.has_bias = bias
        if bias:
            self.general_in_bias, self.general_out_bias = param(1, 2 * I), param(1, H)
            self.safety_in_bias, self.safety_out_bias = param(N, 2 * I), param(N, H)

    def extra_repr(self) -> str:
        return (f"experts={self.router.out_features}, top_k={self.top_k}, act={self.activation}, "
                f"default_tau={self.default_tau:g}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b_in = [self.general_in_bias, self.safety_in_bias] if self.has_bias else []
        b_out = [self.general_out_bias, self.safety_out_bias] if self.has_bias else []
        return torch.ops.upsafe_serving.safety_moe(
            x, self.router.weight, self.router.bias, [self.general_in_proj, self.safety_in_proj],
            [self.general_out_proj, self.safety_out_proj], b_in, b_out, self.top_k, self.min_weight,
            self.router_temperature, self.activation, True, self.default_tau)


class UpsafeLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's ``LlamaForCausalLM`` with the saved config's upcycled layers as :class:`SafetyMoEMLP`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        info = serving_model_info(config)
        if info is None:
            raise ValueError("UpsafeLlamaForCausalLM: the model's config.json records no upcycling "
                             "('upsafe_upcycle'); serve a folder written by upsafe_ext's save_upcycled")
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise ValueError("UpsafeLlamaForCausalLM: tensor parallelism is not supported (the safety MoE "
                             "layers are not sharded); use --tensor-parallel-size 1")
        self.upcycle_config = info.upcycle
        layers = self.model.layers
        n = len(layers)
        bad = [i for i in info.upcycle.layers or [] if not 0 <= i < n]
        if bad or not info.upcycle.layers:
            raise ValueError(f"UpsafeLlamaForCausalLM: upcycled layers {info.upcycle.layers} do not fit a "
                             f"model with {n} layers")
        for i in info.upcycle.layers:
            if not self.model.start_layer <= i < self.model.end_layer:
                continue  # another pipeline stage owns it
            layers[i].mlp = SafetyMoEMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                                         info.upcycle, info.default_safety_temperature,
                                         bias=bool(getattr(config, "mlp_bias", False)))
