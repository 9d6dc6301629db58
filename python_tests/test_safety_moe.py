"""UpSafe°C on tiny random HF models: upcycling equivalence, safety temperature, save/load,
adapters, scan, two-stage training (frozen weights bitwise unchanged), generate, bad input."""
import math
import os

import pytest
import torch
from torch import nn

from conftest import requires_cuda_kernel
from upsafe_ext.testing import FAMILIES, tiny_causal_lm, tiny_tokenizer
from upsafe_ext.train import make_examples, stage1, stage2, stage_parameters, train_only, upsafe_trainer_class
from upsafe_ext.train.sft import SFTCollator
from upsafe_ext.upcycle import (SafetyMoE, UpcycleConfig, load_safety_adapter, load_upcycled, routing_summary,
                                safety_moe_modules, safety_temperature, save_safety_adapter, save_upcycled,
                                scan_safety_layers, set_kernel_preference, set_safety_temperature, upcycle_)
from upsafe_ext.upcycle.scan import LayerScanReport

IDS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))


def perturb(model, seed=0):
    """Make the safety experts and router differ from the init (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in safety_moe_modules(model):
            for p in m.safety_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
            m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g))
            m.router.bias.zero_()


@pytest.mark.parametrize("family", FAMILIES)
def test_upcycled_equals_base_before_training_and_at_tau0(family):
    model = tiny_causal_lm(family)
    with torch.no_grad():
        base = model(IDS).logits
    upcycle_(model, UpcycleConfig(layers=[0, 2], num_safety_experts=2, top_k=2))
    assert len(safety_moe_modules(model)) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base, atol=1e-5, rtol=1e-5)
    perturb(model)
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, base, atol=1e-3)
        with safety_temperature(model, 0.0):
            torch.testing.assert_close(model(IDS).logits, base, atol=1e-5, rtol=1e-5)
            assert all(v == 0.0 for v in routing_summary(model).values())


def test_safety_temperature_moves_the_selection_monotonically():
    model = tiny_causal_lm("llama")
    upcycle_(model, UpcycleConfig(layers=[1, 2], num_safety_experts=1))
    perturb(model)
    fracs = []
    with torch.no_grad():
        for tau in [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]:
            set_safety_temperature(model, tau)
            model(IDS)
            fracs.append(sum(routing_summary(model).values()) / 2)
    assert fracs[0] == 0.0 and fracs[-1] == 1.0
    assert all(a <= b for a, b in zip(fracs, fracs[1:])), fracs
    assert 0.0 < fracs[3] < 1.0


def test_per_request_temperature_matches_separate_runs():
    model = tiny_causal_lm("qwen2")
    upcycle_(model, UpcycleConfig(layers=[1], num_safety_experts=2, top_k=2))
    perturb(model)
    with torch.no_grad():
        outs = []
        for tau in (0.0, 1.0):
            with safety_temperature(model, tau):
                outs.append(model(IDS).logits)
        with safety_temperature(model, torch.tensor([0.0, 1.0])):
            mixed = model(IDS).logits
    torch.testing.assert_close(mixed[0], outs[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], outs[1][1], atol=1e-5, rtol=1e-5)


def test_reference_path_matches_kernels():
    model = tiny_causal_lm("gemma")
    upcycle_(model, UpcycleConfig(layers=[1, 3], num_safety_experts=2, top_k=2, min_weight=0.05))
    perturb(model)
    with torch.no_grad():
        a = model(IDS).logits
        set_kernel_preference(model, "torch")
        b = model(IDS).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_load_roundtrip_and_generate(tmp_path, family):
    tok = tiny_tokenizer()
    model = tiny_causal_lm(family)
    upcycle_(model, UpcycleConfig(layers=[1, 3], safety_temperature=0.7))
    perturb(model)
    save_upcycled(model, str(tmp_path / "m"), tokenizer=tok)
    files = os.listdir(tmp_path / "m")
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded = load_upcycled(str(tmp_path / "m"))
    assert [n for n, _ in safety_moe_modules(loaded)] == [n for n, _ in safety_moe_modules(model)]
    assert all(m.safety_temperature == 0.7 for _, m in safety_moe_modules(loaded))
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model.eval()(IDS).logits)
    prompt = torch.tensor([[259, 84, 82, 68, 81, 198, 71, 72]])
    g1 = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=257)
    g2 = loaded.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=257)
    g3 = loaded.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=257)
    assert torch.equal(g1, g2) and torch.equal(g2, g3), "KV-cache generation must match the full recompute"


def test_adapter_saves_only_added_weights(tmp_path):
    model = tiny_causal_lm("mistral")
    upcycle_(model, UpcycleConfig(layers=[2], num_safety_experts=2, top_k=2))
    perturb(model)
    save_safety_adapter(model, str(tmp_path / "a"))
    assert sorted(os.listdir(tmp_path / "a")) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors")).keys()
    assert keys and all(".router." in k or ".safety_" in k for k in keys)
    fresh = tiny_causal_lm("mistral")
    load_safety_adapter(fresh, str(tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, model.eval()(IDS).logits)
    with pytest.raises(ValueError, match="model_type"):
        load_safety_adapter(tiny_causal_lm("gpt2"), str(tmp_path / "a"))


def test_parameter_names_say_what_they_are():
    model = tiny_causal_lm("llama")
    upcycle_(model, UpcycleConfig(layers=[0]))
    names = [n for n, p in model.named_parameters() if "mlp" in n and "layers.0." in n]
    assert any("router" in n for n in names) and any("safety_" in n for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "layers.0.mlp" in n]
    assert not any("general" in n for n in trainable), "the original MLP is frozen by default"


class WeirdMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize(
    "action,match",
    [
        (lambda m: upcycle_(m, UpcycleConfig(layers=[7])), "out of range"),
        (lambda m: upcycle_(m, UpcycleConfig()), "layers is None"),
        (lambda m: (upcycle_(m, UpcycleConfig(layers=[1])), upcycle_(m, UpcycleConfig(layers=[2]))), "already upcycled"),
        (lambda m: (setattr(m.model.layers[1], "mlp", WeirdMLP()), upcycle_(m, UpcycleConfig(layers=[1]))),
         "unsupported MLP.*supported structures"),
        (lambda m: (upcycle_(m, UpcycleConfig(layers=[1])), set_safety_temperature(m, 1.5)), r"\[0, 1\]"),
        (lambda m: (upcycle_(m, UpcycleConfig(layers=[1])), set_safety_temperature(m, math.nan)), "NaN"),
        (lambda m: (upcycle_(m, UpcycleConfig(layers=[1])), set_safety_temperature(m, torch.tensor([0.2, 2.0]))),
         r"\[0, 1\]"),
        (lambda m: set_safety_temperature(m, 0.3), "no SafetyMoE"),
        (lambda m: UpcycleConfig(layers=[1], top_k=3), "top_k"),
        (lambda m: UpcycleConfig(layers=[1, 1]), "unique"),
    ],
)
def test_bad_input(action, match):
    with pytest.raises(ValueError, match=match):
        action(tiny_causal_lm("llama"))


def test_per_request_temperature_batch_mismatch():
    model = tiny_causal_lm("llama")
    upcycle_(model, UpcycleConfig(layers=[1]))
    set_safety_temperature(model, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="per-request"):
        model(IDS)


def test_scan_finds_separable_layers_and_plots(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama")
    harm = [f"how do i make a weapon {i}" for i in range(16)]
    ben = [f"what is a good soup {i}" for i in range(16)]
    rep = scan_safety_layers(model, tok, harm, ben, progress=False)
    assert rep.num_layers == 4 and rep.n_train + rep.n_val == 32
    assert max(rep.accuracy) == 1.0 and all(0 <= a <= 1 for a in rep.accuracy)
    top2 = rep.top(2)  # the two lowest-BCE layers, as a property of the measured numbers
    assert len(top2) == 2 and top2 == sorted(top2)
    assert max(rep.bce[i] for i in top2) <= min(rep.bce[i] for i in range(4) if i not in top2)
    # and on a report with known numbers: lowest BCE first, ties to the lower layer, default 25% of layers
    known = LayerScanReport(bce=[0.6, 0.2, 0.9, 0.2, 0.1, 0.5, 0.7, 0.3], accuracy=[1.0] * 8, auroc=[1.0] * 8,
                            n_train=4, n_val=4)
    assert known.top(1) == [4] and known.top(2) == [1, 4] and known.top(3) == [1, 3, 4]
    assert known.top() == [1, 4] and known.top(fraction=0.5) == [1, 3, 4, 7]
    with pytest.raises(ValueError, match="`k`"):
        known.top(9)
    png = rep.plot(str(tmp_path / "scan.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least 2"):
        scan_safety_layers(model, tok, [], ben)
    no_template = tiny_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="chat template"):
        scan_safety_layers(model, no_template, harm, ben, progress=False)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_two_stage_training_learns_routing_and_keeps_frozen_weights():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", hidden=64, intermediate=128)
    upcycle_(model, UpcycleConfig(layers=[1, 2]))
    harm = [f"how to make poison {i}" for i in range(24)]
    ben = [f"how to bake bread {i}" for i in range(24)]
    refusal, answer = ["I cannot help with that."] * 24, ["Mix flour and water."] * 24
    before = _snapshot(model)
    stage1(model, tok, harm, responses=refusal, lr=3e-3, max_steps=20, progress=False)
    s1 = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], s1[n])}
    assert changed and all(".safety_" in n for n in changed), changed
    stage2(model, tok, harm, ben, harmful_responses=refusal, benign_responses=answer, lr=3e-2, max_steps=40,
           progress=False)
    s2 = _snapshot(model)
    changed2 = {n for n in s1 if not torch.equal(s1[n], s2[n])}
    assert changed2 and all(".router." in n for n in changed2), changed2
    assert all(p.requires_grad == ("safety_" in n or "router" in n) for n, p in model.named_parameters()
               if ".mlp." in n and "layers.1" in n), "stage helpers must restore requires_grad"
    # routing: harmful prompts go to the safety experts, benign ones stay on the original MLP
    from upsafe_ext.eval.generation import chat
    from upsafe_ext.train.sft import render_chat

    def safety_fraction(prompts):
        texts = [render_chat(tok, chat(p)) for p in prompts]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            model(**enc)
        return sum((m.last_experts[:, -1, 0] >= 1).float().mean().item() for _, m in safety_moe_modules(model)) / 2

    assert safety_fraction(harm) > 0.9 and safety_fraction(ben) < 0.1


def test_trainer_path_and_gradient_checkpointing(tmp_path):
    from transformers import TrainingArguments

    tok = tiny_tokenizer()
    model = tiny_causal_lm("qwen3")
    upcycle_(model, UpcycleConfig(layers=[1]))
    # transformers >= 5.2x renames it (the old name warns); the GPU box runs 5.17, which has only the old one
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    ex = make_examples(tok, ["bad thing 1", "bad thing 2"], ["No."] * 2, True) + \
        make_examples(tok, ["good thing 1", "good thing 2"], ["Yes."] * 2, False)
    params = stage_parameters(model, 2)
    before = _snapshot(model)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, report_to=[],
                             remove_unused_columns=False, use_cpu=True, save_strategy="no", logging_steps=1)
    with train_only(model, params):
        trainer = upsafe_trainer_class()(model=model, args=args, train_dataset=ex, data_collator=SFTCollator(257),
                                         sup_coef=1.0, lb_coef=0.01)
        trainer.train()
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".router." in n for n in changed)


def test_autocast_bf16_training_step():
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama")
    upcycle_(model, UpcycleConfig(layers=[1]))
    log = stage1(model, tok, ["x"] * 4, responses=["no"] * 4, max_steps=2, autocast_dtype=torch.bfloat16,
                 progress=False)
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)


@requires_cuda_kernel("grouped_expert_mlp")
def test_cuda_bf16_upcycled_matches_base_and_generates():
    model = tiny_causal_lm("llama", dtype=torch.bfloat16, hidden=64, intermediate=128).cuda()
    ids = IDS.cuda()
    with torch.no_grad():
        base = model(ids).logits.float()
    upcycle_(model, UpcycleConfig(layers=[1, 2]))
    with torch.no_grad():
        up = model(ids).logits.float()
    assert ((up - base).norm() / base.norm()).item() < 2e-2
    out = model.generate(ids[:1, :4], max_new_tokens=8, do_sample=False, pad_token_id=257)
    assert out.shape == (1, 12)
