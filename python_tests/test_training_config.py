"""Training settings: `UpSafeTrainConfig` (one serialisable config for both UpSafe°C stages, old keyword
style kept), the shared optimiser defaults, and SparseAdamW leaving the caller's frozen weights alone."""
from __future__ import annotations

import json

import pytest
import torch
from magic_fixtures import one_torch_thread  # noqa: F401  (autouse: one intra-op thread on a shared machine)

from upsafe_ext.testing import tiny_model
from upsafe_ext.train.config import ADAM_BETAS, FULL_SFT_LR, SPARSE_LR, UpSafeTrainConfig


def test_config_round_trip_and_validation():
    cfg = UpSafeTrainConfig(stage1_lr=2e-4, sup_tokens=4, system="", autocast="bf16")
    assert UpSafeTrainConfig.from_dict(cfg.to_dict()) == cfg and cfg.autocast_dtype() is torch.bfloat16
    for bad, match in (({"route": "x"}, "route"), ({"stage2_lr": 0.0}, "stage2_lr"), ({"max_steps": 0}, "max_steps"),
                       ({"warm_start": 1}, "warm_start"), ({"system": 3}, "system")):
        with pytest.raises(ValueError, match=match):
            UpSafeTrainConfig(**bad)


def test_shared_defaults_live_in_one_place():
    from upsafe_ext.esi import SparseTrainConfig
    from upsafe_ext.magic import MagicTrainConfig

    assert SparseTrainConfig().lr == SPARSE_LR and SparseTrainConfig().betas == ADAM_BETAS
    assert MagicTrainConfig().learning_rate == FULL_SFT_LR


def test_stage_config_keeps_the_keyword_style():
    from upsafe_ext.train.upsafe import stage_config

    cfg = stage_config(None, {"lr": 3e-3, "lb_coef": 0.5, "autocast_dtype": torch.float16, "max_steps": 2}, 2, "s")
    assert (cfg.stage2_lr, cfg.stage2_lb_coef, cfg.autocast, cfg.max_steps) == (3e-3, 0.5, "fp16", 2)
    assert cfg.stage1_lr == UpSafeTrainConfig().stage1_lr
    with pytest.raises(ValueError, match="unknown keyword"):
        stage_config(None, {"lrr": 1.0}, 1, "stage1")


def test_stages_take_a_config_or_keywords_alike():
    from upsafe_ext.train.upsafe import stage1
    from upsafe_ext.upcycle import UpcycleConfig, upcycle_

    logs = []
    for kw in ({"config": UpSafeTrainConfig(stage1_lr=1e-3, max_steps=2, batch_size=2, progress=False)},
               {"lr": 1e-3, "max_steps": 2, "batch_size": 2, "progress": False}):
        model, tok = tiny_model()
        upcycle_(model, UpcycleConfig(layers=[1]))
        logs.append(stage1(model, tok, ["a", "b", "c"], responses=["no"] * 3, **kw))
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]


def test_spa_never_unfreezes_what_the_caller_froze():
    from upsafe_ext.esi import SafetyMask, run_set, run_spa

    model, tok = tiny_model()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith("q_proj.weight")}
    mask = SafetyMask.random_like(shapes, fraction=0.05)
    frozen = model.model.layers[0].mlp.down_proj.weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    run_spa(model, tok, mask, [("hi", "hello")] * 2, max_steps=2, batch_size=2, lr=1e-2, progress=False)
    assert torch.equal(frozen, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    run_set(model, tok, mask, ["how to x"] * 2, max_steps=1, batch_size=2, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored after training


def test_demo_config_round_trips_and_names_bad_fields():
    from upsafe_ext.upcycle import DemoConfig

    cfg = DemoConfig.quick(split="val", device="cpu", dtype="bf16")
    assert DemoConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="DemoConfig.split"):
        DemoConfig(split="train")
