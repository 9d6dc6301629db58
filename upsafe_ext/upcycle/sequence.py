"""Per-sequence routing (``UpcycleConfig(routing="sequence")``, ours): one decision per request.

With per-token routing (the paper) every upcycled layer decides for every token, during the prompt and
during the reply. On SmolLM2 that decided worse than a single linear read-out of the base model at the
generation position (``benchmarks/probe_separability.py``): once a few positions of an ordinary request
go to the safety expert, the refusal feeds itself. Sequence routing takes that one decision:

* **Score.** The base model (τ=0) runs over the prompt. Each upcycled layer's routers read its own input: ``router``
  at the generation position (the last prompt token, where the first reply token is predicted) and
  ``router_pool`` averaged over the prompt's positions; their logits add up. The score is the mean over layers
  of (log-sum-exp of the safety logits - the original MLP's logit) / router temperature. (The pooled read-out
  was chosen on val: at the same ShareGPT over-refusal it raised safety on the unseen harmful val sets from
  0.82-0.85 to 0.95-0.98; ``benchmarks/sequence_routing_val.py``, records in ``benchmarks/val/``.)
* **Decision.** ``score + log(τ/(1-τ)) > 0``: the whole sequence (prompt and reply) goes through the safety
  experts (τ=1 for that sequence); otherwise through the original MLP (τ=0, exactly the base model). τ=0
  never and τ=1 always route to the safety experts, and the share routed can only grow with τ.
* **Training.** Stage 1 is unchanged (the safety experts learn refusals at τ=1). The routers are fitted
  jointly as one logistic probe on the concatenated read-outs (generation position and prompt mean) of every
  upcycled layer (:func:`fit_sequence_routers`), so "the mean over layers of the router scores" is exactly
  that probe. The LM loss does not train a sequence router.

``UpsafeForCausalLM.generate`` takes the decision itself (one extra forward over the prompt, stopped after
the last upcycled layer) and passes one τ ∈ {0, 1} per sequence to the calls it makes; ``forward`` without a
cache decides at the last attended position of its input. Teacher-forced prompt+reply inputs must get their
decision from the prompt: ``model(..., safety_temperature=sequence_routes(model, prompt_ids, prompt_mask))``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..train.config import SEQUENCE_L2
from .layer import current_tau, is_pure_tau, request_safety_temperature, request_tau, safety_moe_modules
from .scan import fit_probe_params, map_prompts

__all__ = ["generation_positions", "router_inputs", "sequence_scores", "sequence_routes", "decide",
           "prompt_router_inputs", "prompt_scores", "prompt_routes", "fit_sequence_routers", "set_sequence_routers"]


class _Stop(Exception):
    """Raised by the hook of the last SafetyMoE: nothing after it is needed for the decision."""


def generation_positions(attention_mask: Tensor) -> Tensor:
    """``[B]`` index of the last attended position of every row (the generation position of a prompt,
    with left or right padding)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"generation_positions: `attention_mask` must be [batch, seq], got {tuple(attention_mask.shape)}")
    m = attention_mask.bool()
    if not bool(m.any(-1).all()):
        raise ValueError("generation_positions: a row of `attention_mask` attends to nothing")
    return m.shape[1] - 1 - m.flip(-1).long().argmax(-1)


def _modules(model):
    mods = [m for _, m in safety_moe_modules(model)]
    if not mods:
        raise ValueError("sequence routing: the model has no SafetyMoE layers (call upcycle_ first)")
    return mods


@torch.no_grad()
def router_inputs(model, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """``[B, L, 2, H]`` fp32: the input of each of the L SafetyMoE layers, computed by the base model (τ=0), at
    every row's generation position (``[:, :, 0]``) and averaged over its attended positions (``[:, :, 1]``).
    The forward stops after the last SafetyMoE layer."""
    mods = _modules(model)
    if input_ids.dim() != 2:
        raise ValueError(f"router_inputs: `input_ids` must be [batch, seq], got {tuple(input_ids.shape)}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    if mask.shape != input_ids.shape:
        raise ValueError(f"router_inputs: `attention_mask` {tuple(mask.shape)} does not match `input_ids` "
                         f"{tuple(input_ids.shape)}")
    pos = generation_positions(mask)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    weight = mask.float()[..., None]
    got: dict[int, Tensor] = {}

    def hook(i):
        def fn(module, args):
            x = args[0].float()
            got[i] = torch.stack([x[rows, pos], (x * weight).sum(1) / weight.sum(1)], dim=1)
            if len(got) == len(mods):
                raise _Stop
        return fn

    hooks = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(mods)]
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate numbers a left-padded prompt
    try:
        with request_safety_temperature(0.0):
            model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    if len(got) != len(mods):
        raise ValueError(f"router_inputs: only {len(got)} of {len(mods)} SafetyMoE layers ran in the forward")
    return torch.stack([got[i] for i in range(len(mods))], dim=1)


def scores_from_inputs(model, x: Tensor) -> Tensor:
    """``[B]`` sequence scores from ``router_inputs`` (see the module docstring)."""
    out = []
    for i, m in enumerate(_modules(model)):
        logits = m.router(x[:, i, 0].to(m.router.weight.dtype)).float()
        if m.router_pool is not None:
            logits = logits + m.router_pool(x[:, i, 1].to(m.router_pool.weight.dtype)).float()
        logits = logits / m.router_temperature
        out.append(torch.logsumexp(logits[:, 1:], dim=-1) - logits[:, 0])
    return torch.stack(out, dim=1).mean(1)


@torch.no_grad()
def sequence_scores(model, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """``[B]`` fp32: how strongly the routers send each prompt to the safety experts (> 0 at τ=0.5)."""
    return scores_from_inputs(model, router_inputs(model, input_ids, attention_mask))


@torch.no_grad()
def sequence_routes(model, input_ids: Tensor, attention_mask: Tensor | None = None, tau=None) -> Tensor:
    """``[B]`` float64 of 0.0 (original MLP) and 1.0 (safety experts): the decision for each prompt at
    safety temperature ``tau`` (a float or one per sequence; None = the τ in effect: the call's, else the
    model's default). Pass it as ``safety_temperature=`` to the forward calls of those sequences."""
    mods = _modules(model)
    batch = input_ids.shape[0]
    t = request_tau(current_tau(mods[0]) if tau is None else tau, batch, input_ids.device, name="tau")
    if not isinstance(t, Tensor):
        t = torch.full((batch,), t, dtype=torch.float64, device=input_ids.device)
    if is_pure_tau(t):
        return t.clone()
    return decide(sequence_scores(model, input_ids, attention_mask), t)


def decide(score: Tensor, tau: Tensor) -> Tensor:
    """``[B]`` float64 1.0 where ``score + log(τ/(1-τ)) > 0`` (τ per sequence, float64), else 0.0."""
    bias = torch.log(tau) - torch.log1p(-tau)  # -inf at τ=0, +inf at τ=1
    return (score.double().to(tau.device) + bias > 0).double()


@torch.no_grad()
def prompt_router_inputs(model, tokenizer, prompts: Sequence[str], *, system: str | None = None,
                         batch_size: int = 16, max_length: int = 256, progress: bool = True) -> Tensor:
    """``router_inputs`` of one-turn chats (rendered and left-padded as generation does): ``[n, L, 2, H]``."""
    return map_prompts(model, tokenizer, prompts, lambda x, mask: router_inputs(model, x, mask), system=system,
                       batch_size=batch_size, max_length=max_length, progress=progress, desc="router inputs")


@torch.no_grad()
def prompt_scores(model, tokenizer, prompts: Sequence[str], *, system: str | None = None, batch_size: int = 16,
                  progress: bool = True) -> Tensor:
    """``[n]`` float64 sequence scores of one-turn chats. The score does not depend on τ, so one pass serves
    every τ: ``decide(score, tau)`` is the route (as ``generate`` would take it on the same prompt)."""
    if not len(prompts):
        return torch.empty(0, dtype=torch.float64)
    x = prompt_router_inputs(model, tokenizer, prompts, system=system, batch_size=batch_size, progress=progress)
    return scores_from_inputs(model, x.to(next(model.parameters()).device)).cpu().double()


@torch.no_grad()
def prompt_routes(model, tokenizer, prompts: Sequence[str], tau, *, system: str | None = None,
                  batch_size: int = 16, scores: dict | None = None, progress: bool = True) -> Tensor:
    """``[n]`` float64 0/1: the decision for one-turn chats at safety temperature ``tau`` (a float).

    scores: a cache, prompt -> ``prompt_scores``, filled in for the prompts it lacks (the score does not
    depend on τ, so one dict serves every τ of a sweep; it holds for the routers as they are and for one
    `system`: start a new dict after changing either)."""
    from .config import check_safety_temperature

    tau = check_safety_temperature(tau, "prompt_routes: `tau`")
    if tau in (0.0, 1.0):  # no decision to take: skip the forward passes
        return torch.full((len(prompts),), tau, dtype=torch.float64)
    scores = {} if scores is None else scores
    missing = list(dict.fromkeys(p for p in prompts if p not in scores))
    if missing:
        scores.update(zip(missing, prompt_scores(model, tokenizer, missing, system=system, batch_size=batch_size,
                                                 progress=progress).tolist()))
    score = torch.tensor([scores[p] for p in prompts], dtype=torch.float64)
    return decide(score, torch.full((len(prompts),), tau, dtype=torch.float64))


@torch.no_grad()
def fit_sequence_routers(model, tokenizer, harmful: Sequence[str], benign: Sequence[str], *, l2: float = SEQUENCE_L2,
                         system: str | None = None, batch_size: int = 16, max_length: int = 256,
                         progress: bool = True) -> dict:
    """Fit every router for sequence routing: one logistic probe (``scan.fit_probe_params``, L2 ``l2`` on
    standardised features) on the concatenated router inputs at the generation position of `harmful`
    (label 1) and `benign` (label 0) prompts, split across the layers so that the sequence score is that
    probe's logit. Returns {"n_harmful", "n_benign", "train_accuracy", "train_bce"}."""
    harmful, benign = list(harmful), list(benign)
    if not harmful or not benign:
        raise ValueError(f"fit_sequence_routers: needs harmful and benign prompts, got {len(harmful)} and {len(benign)}")
    x = prompt_router_inputs(model, tokenizer, harmful + benign, system=system, batch_size=batch_size,
                             max_length=max_length, progress=progress)
    y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    return {"n_harmful": len(harmful), "n_benign": len(benign), **set_sequence_routers(model, x, y, l2)}


@torch.no_grad()
def set_sequence_routers(model, x: Tensor, y: Tensor, l2: float = SEQUENCE_L2) -> dict:
    """The fit of :func:`fit_sequence_routers` from router inputs ``x [n, L, 2, H]`` (``prompt_router_inputs``)
    and labels ``y [n]`` (1 = harmful). Sets every router; returns {"train_accuracy", "train_bce"}."""
    mods = _modules(model)
    if x.dim() != 4 or x.shape[1] != len(mods) or x.shape[2] != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"set_sequence_routers: `x` must be [n, {len(mods)} layers, 2, H] and `y` [n], got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if any(m.router_pool is None for m in mods):
        raise ValueError("set_sequence_routers: the model routes per token (UpcycleConfig.routing='token'); "
                         "upcycle with routing='sequence'")
    L, H = x.shape[1], x.shape[3]
    w, b = fit_probe_params(x.reshape(len(y), L * 2 * H), y.float(), l2=l2)
    w = w.view(L, 2, H)
    for i, m in enumerate(mods):
        n_safety = m.router.weight.shape[0] - 1
        m.router.weight.zero_()
        m.router.bias.zero_()
        m.router_pool.weight.zero_()
        # mean over layers of (logsumexp of n identical safety logits - 0) = sum_i w_i.x_i + b
        m.router.weight[1:] = (L * m.router_temperature * w[i, 0]).to(m.router.weight)
        m.router_pool.weight[1:] = (L * m.router_temperature * w[i, 1]).to(m.router_pool.weight)
        m.router.bias[1:] = m.router_temperature * (float(b) - math.log(n_safety))
    score = scores_from_inputs(model, x.to(mods[0].router.weight.device)).cpu()
    y = y.float().cpu()
    return {"train_accuracy": float(((score > 0).float() == y).float().mean()),
            "train_bce": float(torch.nn.functional.binary_cross_entropy_with_logits(score, y))}
