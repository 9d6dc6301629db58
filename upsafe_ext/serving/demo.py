"""A small served model for tests and benchmarks: SmolLM2-135M-Instruct upcycled with random-ish but
deterministic safety experts and router, so that τ visibly changes what the model says.

    from upsafe_ext.serving.demo import build_demo_upcycled
    build_demo_upcycled("/tmp/upsafe-demo")     # then: vllm serve /tmp/upsafe-demo

Not a trained safety model: the router is a seeded Gaussian (zero bias), the safety experts are the
original MLP plus seeded relative noise. At τ = 0.5 about half of the tokens of the upcycled layers
take a safety expert; τ = 0 is exactly the base model.
"""
from __future__ import annotations

import math
import os

import torch

__all__ = ["DEMO_LAYERS", "build_demo_upcycled", "build_demo_magic"]

DEMO_LAYERS = (8, 10, 12, 14, 16, 18, 20, 22)  # a quarter of SmolLM2's 30 layers, as the demo upcycles


def build_demo_upcycled(save_dir: str | os.PathLike, *, layers=DEMO_LAYERS, num_safety_experts: int = 1,
                        top_k: int = 1, noise_std: float = 0.3, router_std: float = 2.0, seed: int = 0,
                        safety_temperature: float = 0.5) -> str:
    """Upcycle the real SmolLM2 (``upsafe_ext.eval.real_model.load_smollm2``, fp32) and save it with
    ``save_upcycled`` (tokenizer and chat template included). Returns ``save_dir``.

    router_std: std of the router's logits for a unit-RMS hidden state (weights ~ N(0, router_std²/H)).
    noise_std: relative noise of the safety experts around the original MLP (``init="copy+noise"``).
    safety_temperature: the default τ recorded in the config (used by requests that set none).
    Same arguments and seed give the same weights, bit for bit.
    """
    from ..eval.real_model import load_smollm2
    from ..upcycle import UpcycleConfig, safety_moe_modules, save_upcycled, upcycle_

    model, tok = load_smollm2(verbose=False)
    cfg = UpcycleConfig(layers=list(layers), num_safety_experts=num_safety_experts, top_k=top_k,
                        init="copy+noise", noise_std=noise_std, safety_temperature=safety_temperature)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        upcycle_(model, cfg)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _, moe in safety_moe_modules(model):
                w = moe.router.weight
                w.copy_(torch.randn(w.shape, generator=gen) * (router_std / math.sqrt(w.shape[1])))
                moe.router.bias.zero_()
    return save_upcycled(model.eval(), os.fspath(save_dir), tokenizer=tok)


def build_demo_magic(save_dir: str | os.PathLike, *, insecure_seed: int = 0) -> str:
    """The real SmolLM2 (fp32, not trained for the modes) saved by ``save_magic_model`` with tokens drawn
    from ``MagicConfig(insecure_seed=...)`` (reproducible, hence guessable: tests only), negative token
    included. Serves to test the plumbing: the mode token changes the system prompt, hence the output."""
    from ..eval.real_model import load_smollm2
    from ..magic import MagicConfig, prepare_model, save_magic_model

    model, tok = load_smollm2(verbose=False)
    tokens = prepare_model(model, tok, MagicConfig(insecure_seed=insecure_seed))
    return save_magic_model(model.eval(), tok, tokens, os.fspath(save_dir))
