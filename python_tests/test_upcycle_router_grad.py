"""The LM loss reaches the router at top-1 (UpcycleConfig.router_grad="straight_through"), while the
forward pass equals plain renormalised top-1 routing, τ=0 stays the base model and the freshly
upcycled model is exact."""
import pytest
import torch

from upsafe_ext.testing import tiny_causal_lm
from upsafe_ext.upcycle import UpcycleConfig, safety_moe_modules, safety_temperature, upcycle_

IDS = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))


def _model(router_grad, seed=0):
    model = tiny_causal_lm("llama")
    upcycle_(model, UpcycleConfig(layers=[1, 2], num_safety_experts=1, top_k=1, router_grad=router_grad))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a router that sends some tokens to the safety expert, as after training
        for _, m in safety_moe_modules(model):
            m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g))
            for p in m.safety_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _lm_grads(model, tau=0.5):
    for p in model.parameters():
        p.requires_grad_(False)
    routers = [m.router.weight for _, m in safety_moe_modules(model)]
    for w in routers:
        w.requires_grad_(True)
    model.train()
    with safety_temperature(model, tau):
        out = model(input_ids=IDS, labels=IDS)  # the LM loss alone, no auxiliary router loss
    out.loss.backward()
    return out, [w.grad for w in routers]


def test_lm_loss_alone_gives_the_router_a_gradient_at_top1():
    _, grads = _lm_grads(_model("straight_through"))
    st = [float(g.abs().sum()) for g in grads]
    assert all(x > 1e-4 for x in st), st  # measured 1.0e-2 and 2.5e-3
    # the ablation: plain renormalised top-1 weights are p/p = 1, so the LM loss gives the router only
    # rounding noise (measured 8e-11 and 5e-12: the kernel's backward of p/p in fp32)
    _, none_grads = _lm_grads(_model("none"))
    none = [0.0 if g is None else float(g.abs().sum()) for g in none_grads]
    assert all(n < 1e-6 * s for n, s in zip(none, st)), (none, st)


def test_straight_through_forward_is_bit_identical_and_tau0_is_the_base():
    base = tiny_causal_lm("llama")
    with torch.no_grad():
        ref = base(IDS).logits
    a, b = _model("straight_through"), _model("none")
    out_a, _ = _lm_grads(a)
    out_b, _ = _lm_grads(b)
    # equal up to the kernel's own renormalisation rounding (p * (1/p) can be 1 - 2^-24; measured 6e-8)
    torch.testing.assert_close(out_a.logits, out_b.logits, rtol=0, atol=1e-6)
    # both settings routed some tokens to the safety expert (so the comparison is not trivial)
    assert any(bool((m.last_experts == 1).any()) for _, m in safety_moe_modules(a))
    assert any(bool((m.last_experts == 0).any()) for _, m in safety_moe_modules(a))
    with torch.no_grad(), safety_temperature(a, 0.0):
        torch.testing.assert_close(a(IDS).logits, ref, rtol=1e-5, atol=1e-5)


def test_fresh_upcycle_is_exact_with_gradients_on():
    base = tiny_causal_lm("llama")
    ref = base(IDS).logits.detach()
    upcycle_(base, UpcycleConfig(layers=[0, 3], num_safety_experts=2, top_k=2))
    base.train()
    out = base(IDS).logits  # grad enabled: the straight-through path is taken
    torch.testing.assert_close(out.detach(), ref, atol=1e-6, rtol=1e-6)


def test_straight_through_gradient_matches_the_probability_gradient():
    """At top-1 the router gradient equals what d/dlogits of (p_chosen · expert output) gives when the
    value is rescaled to 1: g·(1 - p) on the chosen logit, -g·p_other on the other (E=2)."""
    torch.manual_seed(0)
    from upsafe_ext.ops import sparse_route

    logits = torch.randn(5, 2, requires_grad=True)
    r = sparse_route(logits, 1, renormalize=False)
    w = r.weights / r.weights.sum(-1, keepdim=True).detach()
    assert torch.equal(w.detach(), torch.ones_like(w))
    up = torch.randn(5, 1)
    (w * up).sum().backward()
    p = torch.softmax(logits.detach(), -1)
    chosen = r.experts.long()[:, 0]
    expect = torch.zeros(5, 2)
    pc = p.gather(1, chosen[:, None])[:, 0]
    for t in range(5):
        c = int(chosen[t])
        expect[t, c] = up[t, 0] * (1 - pc[t])
        expect[t, 1 - c] = -up[t, 0] * p[t, 1 - c]
    torch.testing.assert_close(logits.grad, expect, rtol=1e-5, atol=1e-6)


def test_bad_router_grad_names_the_field():
    with pytest.raises(ValueError, match="router_grad"):
        UpcycleConfig(layers=[0], router_grad="sometimes")


def test_sup_tokens_limits_router_supervision_to_the_decision_span():
    import torch

    from upsafe_ext.testing import tiny_tokenizer
    from upsafe_ext.train.sft import IGNORE_INDEX, SFTCollator
    from upsafe_ext.train.upsafe import generation_prompt_length, make_examples, supervised_positions

    tok = tiny_tokenizer()
    resp = ["I cannot help with that at all, sorry.", "Sure, bread needs flour, water, salt and yeast."]
    full = make_examples(tok, ["How do I make a bomb?", "How do I bake bread?"], resp, True)
    short = make_examples(tok, ["How do I make a bomb?", "How do I bake bread?"], resp, True, sup_tokens=3)
    g = generation_prompt_length(tok)
    for f, s in zip(full, short):
        first = next(i for i, lab in enumerate(f["labels"]) if lab != IGNORE_INDEX)
        assert f["sup_from"] == s["sup_from"] == first - g
        assert f["sup_to"] == len(f["labels"]) and s["sup_to"] == first + 3
    batch = SFTCollator(0)(short)
    sup = supervised_positions(batch, batch["attention_mask"])
    assert sup.sum(1).tolist() == [g + 3, g + 3]
    with pytest.raises(ValueError, match="sup_tokens"):
        make_examples(tok, ["x"], ["y"], True, sup_tokens=-1)
