"""ESI: configs, eligibility, scoring vs the plain-PyTorch reference, selection vs a sort, masks.

The judge objective is tested in test_esi_judge.py, SET / SPA, plots and the CLI in test_esi_train.py,
distributed (DDP / FSDP2) checks in test_esi_distributed.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from upsafe_ext.esi import (ESIConfig, ESIScores, RefusalObjective, SafetyMask, SparseTrainConfig, compute_esi,
                            eligible_parameters, esi_reference)
from upsafe_ext.esi.mask import pack_bits, unpack_bits
from upsafe_ext.ops.esi import select_topk_reference
from upsafe_ext.testing import tiny_causal_lm
from esi_fixtures import PROMPTS, tiny_mixtral, untied_llama, llama_scores, tok  # noqa: F401  (fixtures)


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,field", [
    ({"batch_size": 0}, "batch_size"), ({"fraction": 0.0}, "fraction"), ({"fraction": 1.5}, "fraction"),
    ({"max_length": 1}, "max_length"), ({"exclude_patterns": ["("]}, "exclude_patterns"),
    ({"include_patterns": "q_proj"}, "include_patterns"), ({"seed": -1}, "seed"), ({"system": 3}, "system"),
    ({"expert_patterns": [1]}, "expert_patterns"), ({"progress": "yes"}, "progress"),
])
def test_esi_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"ESIConfig.{field}"):
        ESIConfig(**kw)


@pytest.mark.parametrize("kw,field", [
    ({"lr": 0.0}, "lr"), ({"weight_decay": -1.0}, "weight_decay"), ({"betas": (0.9,)}, "betas"),
    ({"betas": (0.9, 1.0)}, r"betas\[1\]"), ({"eps": 0}, "eps"), ({"max_steps": 0}, "max_steps"),
    ({"lr_schedule": "step"}, "lr_schedule"), ({"train_norm_bias": 1}, "train_norm_bias"),
])
def test_train_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"SparseTrainConfig.{field}"):
        SparseTrainConfig(**kw)


def test_configs_round_trip_and_tolerate_newer_keys():
    cfg = ESIConfig(batch_size=3, include_patterns=["v_proj"], system="be nice")
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d and ESIConfig.from_dict(d) == cfg
    with pytest.warns(UserWarning, match="newer"):
        assert ESIConfig.from_dict({**d, "future_knob": 1}) == cfg
    t = SparseTrainConfig(lr=3e-4, betas=[0.8, 0.95])
    assert SparseTrainConfig.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    with pytest.raises(ValueError, match="not a SparseTrainConfig"):
        SparseTrainConfig.from_dict(d)


# --------------------------------------------------------------------------------------------------
# eligibility
# --------------------------------------------------------------------------------------------------
def test_eligible_parameters_llama_tied_and_untied():
    tied = [n for n, _ in eligible_parameters(tiny_causal_lm("llama"))]
    assert len(tied) == 4 * 7 and all(n.startswith("model.layers.") for n in tied)
    assert not any("norm" in n or "embed" in n for n in tied)  # the tied lm_head is the embedding
    untied = [n for n, _ in eligible_parameters(untied_llama())]
    assert untied == tied + ["lm_head.weight"]
    only_v = [n for n, _ in eligible_parameters(untied_llama(), ESIConfig(include_patterns=["v_proj"]))]
    assert only_v == [f"model.layers.{i}.self_attn.v_proj.weight" for i in range(4)]


def test_eligible_parameters_gpt2_and_moe():
    g = [n for n, _ in eligible_parameters(tiny_causal_lm("gpt2"))]
    assert {n.split(".", 3)[-1] for n in g} == {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                                "mlp.c_proj.weight"}
    moe = dict(eligible_parameters(tiny_mixtral()))
    assert "model.layers.0.mlp.experts.gate_up_proj" in moe and moe["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3
    assert not any(n.endswith("mlp.gate.weight") for n in moe)  # the router
    assert "lm_head.weight" in moe


# --------------------------------------------------------------------------------------------------
# scoring vs reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_scores_equal_reference_refusal(tok, family):
    model = tiny_causal_lm(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scores = compute_esi(model, tok, PROMPTS, batch_size=2, progress=False)  # 3 micro-batches (2, 2, 1)
    ref = esi_reference(model, tok, PROMPTS, batch_size=2)
    assert list(scores) == list(ref) and len(scores) > 0
    for n in ref:
        assert scores[n].dtype == torch.float32
        assert torch.equal(scores[n], ref[n]), n  # same fp32 adds and σ·|·|: bit for bit
    assert sum(int((s > 0).sum()) for s in scores.values()) > 0.9 * scores.numel()
    for n, p in model.named_parameters():  # weights, grads and flags left as found
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad == flags[n]
    assert scores.meta["objective"] == "refusal" and scores.meta["num_prompts"] == len(PROMPTS)


def test_scores_equal_reference_bf16_untied_and_moe(tok):
    m = untied_llama(dtype=torch.bfloat16)
    s = compute_esi(m, tok, PROMPTS, batch_size=2, progress=False)
    ref = esi_reference(m, tok, PROMPTS, batch_size=2)
    assert "lm_head.weight" in s
    for n in ref:
        assert s[n].dtype == torch.float32 and torch.equal(s[n], ref[n]), n
    moe = tiny_mixtral()
    s = compute_esi(moe, tok, PROMPTS, batch_size=3, progress=False)
    ref = esi_reference(moe, tok, PROMPTS, batch_size=3)
    for n in ref:
        assert torch.equal(s[n], ref[n]), n
    # σ per expert for fused 3-D expert tensors, checked against autograd (no ESI code): expert e's scores
    # are std(W[e]) · |Σ ∂S/∂W[e]|, not std(W) · |...| of the whole tensor.
    obj = RefusalObjective("I can't help with that.")
    s5 = compute_esi(moe, tok, PROMPTS, obj, batch_size=5, progress=False)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    gu = moe.model.layers[0].mlp.experts.gate_up_proj
    assert gu.shape[0] == 3
    (grad,) = torch.autograd.grad(obj(moe, tok, PROMPTS, ESIConfig()).sum(), [gu])
    for e in range(3):
        want = float(gu[e].detach().double().std()) * grad[e].abs()
        torch.testing.assert_close(s5[name][e], want, rtol=1e-5, atol=1e-9)
        whole = float(gu.detach().double().std()) * grad[e].abs()
        assert not torch.allclose(s5[name][e], whole, rtol=1e-3, atol=0), "σ must be per expert"


def test_scores_formula_by_hand(tok):
    """σ·|Σ ∂S/∂θ| with autograd on the summed objective, no ESI code involved."""
    model = tiny_causal_lm("llama")
    obj = RefusalObjective("I can't help with that.")
    s = compute_esi(model, tok, PROMPTS, obj, batch_size=5, progress=False)
    total = obj(model, tok, PROMPTS, ESIConfig()).sum()
    names = list(s)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(total, [params[n] for n in names])
    for n, g in zip(names, grads):
        want = float(params[n].detach().double().std()) * g.abs()
        torch.testing.assert_close(s[n], want, rtol=1e-5, atol=1e-9)


def test_refusal_objective_is_the_log_likelihood(tok):
    model = tiny_causal_lm("llama")
    obj = RefusalObjective(lambda p: "No. " + p[:5])
    s = obj(model, tok, PROMPTS[:2], ESIConfig())
    for i, p in enumerate(PROMPTS[:2]):
        prefix = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids_p = tok(prefix, add_special_tokens=False)["input_ids"]
        ids_r = tok("No. " + p[:5] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids_p + ids_r])
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0, len(ids_p) - 1: -1]
        want = logp.gather(1, torch.tensor(ids_r)[:, None]).sum()
        torch.testing.assert_close(s[i], want, rtol=1e-5, atol=1e-4)




# --------------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.01, 0.0137, 0.5, 1.0])
@pytest.mark.parametrize("largest", [True, False])
def test_select_equals_sort_reference(llama_scores, fraction, largest):
    mask = llama_scores.select(fraction, largest=largest)
    k = round(fraction * llama_scores.numel())
    assert mask.count() == k
    want = select_topk_reference(list(llama_scores.values()), k, largest=largest)
    for n, w in zip(llama_scores, want):
        assert torch.equal(mask.dense(n), w)
    assert mask.meta["selection"] == ("top" if largest else "bottom")


def test_select_ties_and_never_sorts_everything(monkeypatch):
    shapes = {"a": (37, 13), "b": (100,), "c": (8, 8)}
    g = torch.Generator().manual_seed(0)
    scores = ESIScores({n: (torch.rand(s, generator=g) * 5).floor() for n, s in shapes.items()})  # heavy ties
    total = scores.numel()
    real_sort = torch.sort

    def guarded_sort(x, *a, **kw):
        assert x.numel() < total, "select must not sort all scores"
        return real_sort(x, *a, **kw)

    def forbidden(*a, **kw):
        raise AssertionError("kthvalue / topk must not be used")

    monkeypatch.setattr(torch, "sort", guarded_sort)
    monkeypatch.setattr(torch, "kthvalue", forbidden)
    monkeypatch.setattr(torch, "topk", forbidden)
    masks = {k: scores.select(k=k) for k in (1, 50, 300, total - 3)}
    monkeypatch.undo()
    for k, m in masks.items():
        want = select_topk_reference(list(scores.values()), k)
        assert all(torch.equal(m.dense(n), w) for n, w in zip(shapes, want))
    # documented tie order: equal scores go to the lower global index (tensor order, then flat index)
    flat = torch.ones(10)
    m = ESIScores({"x": flat.clone(), "y": flat.clone()}).select(k=12)
    assert m.indices("x").tolist() == list(range(10)) and m.indices("y").tolist() == [0, 1]


def test_random_mask_is_seeded_and_same_size(llama_scores):
    top = llama_scores.select(0.02)
    r1, r2 = llama_scores.random_mask(0.02, seed=1), llama_scores.random_mask(0.02, seed=1)
    r3 = llama_scores.random_mask(0.02, seed=2)
    assert r1 == r2 and r1 != r3 and r1.count() == top.count() == r3.count()
    assert SafetyMask.random_like(top, seed=1) == r1
    assert SafetyMask.random_like(llama_scores.shapes, fraction=0.02, seed=1) == r1
    # a random mask spreads over tensors roughly by size; ESI concentrates
    assert sum(1 for n in r1 if r1.count(n) > 0) > sum(1 for n in top if top.count(n) > 0)


def test_select_errors(llama_scores):
    with pytest.raises(ValueError, match="`fraction`"):
        llama_scores.select(1.5)
    with pytest.raises(ValueError, match="`k`"):
        llama_scores.select(k=llama_scores.numel() + 1)
    with pytest.raises(ValueError, match="exactly one"):
        llama_scores.select(0.1, k=3)
    with pytest.raises(ValueError, match="fp32"):
        ESIScores({"w": torch.zeros(3, dtype=torch.float64)})


def test_scores_save_load_safetensors(llama_scores, tmp_path):
    p = llama_scores.save(str(tmp_path / "s.safetensors"))
    with open(p, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    assert header["__metadata__"]["format"] == "upsafe_esi_scores"
    back = ESIScores.load(p)
    assert list(back) == list(llama_scores)
    assert all(torch.equal(back[n], llama_scores[n]) for n in back)
    assert back.meta["objective"] == "refusal" and back.select(0.01) == llama_scores.select(0.01)
    with pytest.raises(ValueError, match="not an ESI scores file"):
        ESIScores.load(llama_scores.select(0.01).save(str(tmp_path / "m.safetensors")))


# --------------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_pack_bits_round_trip(n):
    x = torch.rand(n) < 0.3
    p = pack_bits(x)
    assert p.dtype == torch.uint8 and p.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(p, n), x)
    if n >= 8:
        y = torch.zeros(n, dtype=torch.bool)
        y[[0, 3]] = True
        assert pack_bits(y)[0].item() == 0b1001


def test_mask_storage_picks_the_smaller_form(tmp_path):
    sparse = torch.zeros(64, 64, dtype=torch.bool)
    sparse.view(-1)[[5, 77, 4000]] = True
    dense = torch.rand(40, 40) < 0.5
    m = SafetyMask.from_dense({"s": sparse, "d": dense, "e": torch.zeros(3, 3, dtype=torch.bool)})
    assert m.storage("s") == "idx" and m.storage("d") == "bits"
    assert m.nbytes() == 3 * 4 + (1600 + 7) // 8 + 0
    assert m.count() == 3 + int(dense.sum()) and m.count("e") == 0
    assert torch.equal(m.dense("s"), sparse) and torch.equal(m.dense("d"), dense)
    assert m.indices("s").tolist() == [5, 77, 4000]
    p = m.save(str(tmp_path / "m.safetensors"))
    back = SafetyMask.load(p)
    assert back == m and back.storage("d") == "bits" and back.names == ["s", "d", "e"]
    g = SafetyMask.from_global_indices(m.shapes, torch.tensor([4096 + 1600 + 2, 5, 4096 + 3]))
    assert g.indices("s").tolist() == [5] and g.indices("d").tolist() == [3] and g.indices("e").tolist() == [2]


def test_mask_load_onto_a_mismatched_model_is_a_clear_error(llama_scores, tmp_path):
    p = llama_scores.select(0.01).save(str(tmp_path / "m.safetensors"))
    SafetyMask.load(p, model=tiny_causal_lm("llama"))  # fits
    with pytest.raises(ValueError, match=r"q_proj.weight' has shape \(64, 64\) in the model but \(32, 32\)"):
        SafetyMask.load(p, model=tiny_causal_lm("llama", hidden=64, heads=4, kv_heads=2))
    with pytest.raises(ValueError, match="is not in the model"):
        SafetyMask.load(p, model=tiny_causal_lm("gpt2"))
    with pytest.raises(ValueError, match="must be in"):
        SafetyMask({"w": (2, 2)}, {"w": torch.tensor([4])})
    with pytest.raises(KeyError, match="no parameter"):
        SafetyMask({"w": (2, 2)}).dense("v")
