"""grouped_expert_mlp: CPU and CUDA against the per-expert PyTorch reference, forward and backward."""
import pytest
import torch

from conftest import devices_for, requires_cuda_kernel
from upsafe_ext.ops import grouped_expert_mlp, grouped_expert_mlp_reference, sparse_route, sparse_route_reference

DEVICES = devices_for("grouped_expert_mlp")
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
       torch.float16: dict(atol=5e-3, rtol=5e-3)}


REL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def assert_rel_close(a, b, tol):
    """Norm-wise relative error, the right yardstick for low-precision sums over many terms."""
    a, b = a.float(), b.float()
    err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def make_weights(E_chunks, H, I, gated, dtype, device, bias=False, scale=0.3, trainable=(True,)):
    W = 2 * I if gated else I
    w_in, w_out, b_in, b_out = [], [], [], []
    for c, Ec in enumerate(E_chunks):
        rg = trainable[c] if c < len(trainable) else True
        w_in.append((torch.randn(Ec, W, H, device=device) * scale).to(dtype).requires_grad_(rg))
        w_out.append((torch.randn(Ec, H, I, device=device) * scale).to(dtype).requires_grad_(rg))
        if bias:
            b_in.append((torch.randn(Ec, W, device=device) * 0.1).to(dtype).requires_grad_(rg))
            b_out.append((torch.randn(Ec, H, device=device) * 0.1).to(dtype).requires_grad_(rg))
    return w_in, w_out, (b_in or None), (b_out or None)


CASES = [
    # T, H, I, chunks, k, gated, act, bias, min_weight
    (37, 16, 24, (4,), 2, True, "silu", False, 0.0),
    (64, 32, 48, (1, 2), 1, True, "silu", False, 0.0),         # safety MoE: frozen original + experts
    (50, 24, 40, (1, 1), 2, True, "gelu_tanh", False, 0.3),    # dropped slots
    (33, 12, 20, (3,), 2, False, "gelu", True, 0.0),           # NeoX-style, widths not multiples of 8
    (40, 16, 16, (2, 2, 1), 3, False, "gelu_tanh", True, 0.1),  # GPT-2-style, 3 chunks
    (9, 8, 8, (1,), 1, True, "silu", False, 0.0),               # E=1
    (20, 16, 8, (4,), 4, True, "silu", True, 0.0),              # k=E
]


def _route(T, E, k, mw, device, skew=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if skew:
        logits[:, 0] += 3.0  # most tokens pick expert 0; second choices keep fp16-representable weights
    logits = logits.to(device).requires_grad_()
    return logits, sparse_route(logits, k, min_weight=mw), sparse_route_reference(logits, k, min_weight=mw)


def _backward_op(g, x, r, w_in, w_out, b_in, b_out, act, gated, need_x, need_weights, need_w):
    """upsafe::grouped_expert_mlp_backward called directly (forward with saved activations first)."""
    det = lambda ts: [t.detach() for t in ts] if ts else []  # noqa: E731
    routing = (r.weights.detach(), r.experts, r.permutation, r.offsets, r.inverse)
    w_in, w_out, b_in, b_out = det(w_in), det(w_out), det(b_in), det(b_out)
    _, hs, ys = torch.ops.upsafe.grouped_expert_mlp.default(x.detach(), *routing, w_in, w_out, b_in, b_out, act, gated,
                                                            True)
    return torch.ops.upsafe.grouped_expert_mlp_backward.default(g, x.detach(), *routing, w_in, w_out, b_in, b_out, hs,
                                                                 ys, act, gated, need_x, need_weights, list(need_w))


def _reference_weight_grads(g, x, r_ref, w_in, w_out, b_in, b_out, act, gated):
    """Per chunk (d w_in, d w_out, d b_in, d b_out) of sum(out * g) from the plain-PyTorch reference
    (None for an absent bias), every chunk trainable."""
    leaf = lambda ts: [t.detach().clone().requires_grad_() for t in ts] if ts else None  # noqa: E731
    wi, wo, bi, bo = leaf(w_in), leaf(w_out), leaf(b_in), leaf(b_out)
    out = grouped_expert_mlp_reference(x.detach(), r_ref, wi, wo, act, gated=gated, b_in=bi, b_out=bo)
    flat = wi + wo + (bi or []) + (bo or [])
    grads = iter(torch.autograd.grad((out * g).sum(), flat, retain_graph=True))
    n = len(wi)
    gi, go = [next(grads) for _ in range(n)], [next(grads) for _ in range(n)]
    gbi = [next(grads) for _ in range(n)] if bi else [None] * n
    gbo = [next(grads) for _ in range(n)] if bo else [None] * n
    return list(zip(gi, go, gbi, gbo))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}H{c[1]}I{c[2]}C{len(c[3])}k{c[4]}{c[6]}")
def test_forward_backward_fp32(device, case):
    T, H, I, chunks, k, gated, act, bias, mw = case
    E = sum(chunks)
    x = torch.randn(T, H, device=device, requires_grad=True)
    logits, r, r_ref = _route(T, E, k, mw, device)
    w_in, w_out, b_in, b_out = make_weights(chunks, H, I, gated, torch.float32, device, bias, trainable=(False,))
    out = grouped_expert_mlp(x, r, w_in, w_out, act, gated=gated, b_in=b_in, b_out=b_out)
    ref = grouped_expert_mlp_reference(x, r_ref, w_in, w_out, act, gated=gated, b_in=b_in, b_out=b_out)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    params = [x, logits] + [t for ts in (w_in, w_out, b_in or [], b_out or []) for t in ts if t.requires_grad]
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), params)
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-4)
    # the frozen chunk: the backward kernel is asked for no gradient of it and returns none (an empty tensor),
    # while the trainable chunks get the reference's weight gradients
    need_w = [w.requires_grad for w in w_in]
    assert need_w[0] is False and all(need_w[1:])
    _, _, dw_in, dw_out, db_in, db_out = _backward_op(g, x, r, w_in, w_out, b_in, b_out, act, gated, True, True, need_w)
    ref_w = _reference_weight_grads(g, x, r_ref, w_in, w_out, b_in, b_out, act, gated)
    for c in range(len(chunks)):
        for got, want in zip((dw_in[c], dw_out[c], db_in[c], db_out[c]), ref_w[c]):
            if not need_w[c] or want is None:
                assert got.numel() == 0, f"chunk {c}: a gradient nobody asked for"
            else:
                torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunks,skew", [((4,), False), ((1, 3), True), ((2, 2), False)])
def test_low_precision_forward_backward(device, dtype, chunks, skew):
    T, H, I, k = 96, 64, 128, 2
    E = sum(chunks)
    x = torch.randn(T, H, device=device).to(dtype).requires_grad_()
    with torch.no_grad():
        _, r, _ = _route(T, E, k, 0.0, device, skew=skew)
    w_in, w_out, _, _ = make_weights(chunks, H, I, True, dtype, device, scale=0.1)
    out = grouped_expert_mlp(x, r, w_in, w_out)
    assert out.dtype == dtype
    ref = grouped_expert_mlp_reference(x.float(), r, [w.float() for w in w_in], [w.float() for w in w_out])
    assert_rel_close(out, ref, REL[dtype])
    out.float().pow(2).sum().backward()
    xf = x.detach().float().requires_grad_()
    wf = [w.detach().float().requires_grad_() for w in w_in]
    grouped_expert_mlp_reference(xf, r, wf, [w.float() for w in w_out]).pow(2).sum().backward()
    assert_rel_close(x.grad, xf.grad, REL[dtype])
    for a, b in zip(w_in, wf):
        assert_rel_close(a.grad, b.grad, REL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_experts_and_all_to_one(device):
    T, H, I = 50, 16, 32
    x = torch.randn(T, H, device=device, requires_grad=True)
    logits = torch.full((T, 4), -10.0, device=device)
    logits[:, 2] = 5.0  # every token to expert 2; experts 0, 1, 3 get nothing
    r = sparse_route(logits, 1)
    w_in, w_out, _, _ = make_weights((4,), H, I, True, torch.float32, device)
    out = grouped_expert_mlp(x, r, w_in, w_out)
    torch.testing.assert_close(out, grouped_expert_mlp_reference(x, r, w_in, w_out), **TOL[torch.float32])
    out.sum().backward()
    for e in (0, 1, 3):
        assert bool((w_in[0].grad[e] == 0).all()) and bool((w_out[0].grad[e] == 0).all())
    assert bool((w_in[0].grad[2] != 0).any())


@pytest.mark.parametrize("device", DEVICES)
def test_empty_input(device):
    x = torch.empty(0, 16, device=device, requires_grad=True)
    r = sparse_route(torch.empty(0, 2, device=device), 1)
    w_in, w_out, _, _ = make_weights((2,), 16, 8, True, torch.float32, device)
    out = grouped_expert_mlp(x, r, w_in, w_out)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert w_in[0].grad.abs().sum() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    T, H, I = 300, 32, 64
    x = torch.randn(T, H, device=device)
    _, r, _ = _route(T, 4, 2, 0.0, device)
    w_in, w_out, _, _ = make_weights((1, 3), H, I, True, torch.float32, device)
    outs = [grouped_expert_mlp(x, r, w_in, w_out) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    T, H, I = 20, 8, 16
    x = torch.randn(T, H, device=device, requires_grad=requires_grad)
    r = sparse_route(torch.randn(T, 3, device=device), 2, min_weight=0.2)
    w_in, w_out, b_in, b_out = make_weights((1, 2), H, I, True, torch.float32, device, bias=True,
                                            trainable=(False, requires_grad))
    args = (x, r.weights, r.experts, r.permutation, r.offsets, r.inverse, w_in, w_out, b_in, b_out, "silu", True,
            requires_grad)
    torch.library.opcheck(torch.ops.upsafe.grouped_expert_mlp.default, args)


@pytest.mark.parametrize("device", devices_for("grouped_expert_mlp", "grouped_expert_mlp_backward"))
@pytest.mark.parametrize("need", [(True, True, (False, True)), (False, True, (True, False)),
                                  (True, False, (False, False))], ids=["x_w_chunk1", "w_chunk0", "x_only"])
def test_opcheck_backward(device, need):
    # the backward op has no derivative of its own (no double backward): checked without requires_grad
    need_x, need_weights, need_w = need
    T, H, I = 20, 8, 16
    x = torch.randn(T, H, device=device)
    r = sparse_route(torch.randn(T, 3, device=device), 2, min_weight=0.2)
    w_in, w_out, b_in, b_out = make_weights((1, 2), H, I, True, torch.float32, device, bias=True, trainable=(False,))
    w_in, w_out, b_in, b_out = ([t.detach() for t in ts] for ts in (w_in, w_out, b_in, b_out))
    routing = (r.weights, r.experts, r.permutation, r.offsets, r.inverse)
    out, hs, ys = torch.ops.upsafe.grouped_expert_mlp.default(x, *routing, w_in, w_out, b_in, b_out, "silu", True, True)
    g = torch.randn_like(out)
    args = (g, x, *routing, w_in, w_out, b_in, b_out, hs, ys, "silu", True, need_x, need_weights, list(need_w))
    torch.library.opcheck(torch.ops.upsafe.grouped_expert_mlp_backward.default, args)
    # what comes back: the requested weight gradients (= the reference's), empty tensors for the rest
    _, _, dw_in, dw_out, db_in, db_out = torch.ops.upsafe.grouped_expert_mlp_backward.default(*args)
    ref_w = _reference_weight_grads(g, x, r, w_in, w_out, b_in, b_out, "silu", True)
    for c, want_c in enumerate(ref_w):
        for got, want in zip((dw_in[c], dw_out[c], db_in[c], db_out[c]), want_c):
            if need_w[c]:
                torch.testing.assert_close(got, want, atol=5e-5, rtol=5e-4)
            else:
                assert got.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    T, H, I = 32, 16, 32
    x = torch.randn(T, H, device=device, requires_grad=True)
    router = torch.randn(H, 3, device=device, requires_grad=True)
    w_in, w_out, _, _ = make_weights((1, 2), H, I, True, torch.float32, device, trainable=(False, True))

    def layer(x, router):
        r = sparse_route(x @ router, 1, bias=torch.tensor([0.0, 0.5, 0.5], device=device))
        return grouped_expert_mlp(x, r, w_in, w_out)

    eager = layer(x, router)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, router)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert router.grad is not None and w_in[1].grad is not None and w_in[0].grad is None


def test_autocast_bf16_cpu():
    T, H, I = 24, 16, 32
    x = torch.randn(T, H)
    r = sparse_route(torch.randn(T, 2), 1)
    w_in, w_out, _, _ = make_weights((2,), H, I, True, torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = grouped_expert_mlp(x, r, w_in, w_out)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w_in[0].grad.dtype == torch.float32 and bool(w_in[0].grad.abs().sum() > 0)
    torch.testing.assert_close(out.float(), grouped_expert_mlp_reference(x, r, w_in, w_out), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(w_down=[torch.randn(2, 8, 7)]), "w_out"),
        (lambda a: a.update(w_gate_up=[torch.randn(2, 32, 8).double()]), "w_gate_up.*dtype"),
        (lambda a: a.update(w_gate_up=[torch.randn(3, 32, 8)], w_down=[torch.randn(3, 8, 16)]), "experts"),
        (lambda a: a.update(activation="relu"), "activation"),
        (lambda a: a.update(x=torch.randn(5, 8)), "tokens"),
        (lambda a: a.update(w_gate_up=[torch.randn(2, 32, 9)]), "in_features"),
    ],
)
def test_bad_input(mutate, match):
    args = dict(x=torch.randn(10, 8), routing=sparse_route(torch.randn(10, 2), 1),
                w_gate_up=[torch.randn(2, 32, 8)], w_down=[torch.randn(2, 8, 16)], activation="silu")
    mutate(args)
    with pytest.raises(ValueError, match=match):
        grouped_expert_mlp(**args)


@requires_cuda_kernel("grouped_expert_mlp")
def test_cuda_bf16_grouped_mm_path_no_sync_and_matches_loop(monkeypatch):
    T, H, I = 512, 256, 512
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(T, 3, device="cuda", requires_grad=True)
    w_in, w_out, _, _ = make_weights((1, 2), H, I, True, torch.bfloat16, "cuda", scale=0.05, trainable=(False, True))
    bias = torch.tensor([0.0, 0.3, 0.3], device="cuda")  # (a host->device copy: made before the check)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        r = sparse_route(logits, 1, bias=bias)
        out = grouped_expert_mlp(x, r, w_in, w_out)
        out.float().pow(2).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    grads = (x.grad.clone(), logits.grad.clone(), w_in[1].grad.clone())
    monkeypatch.setenv("UPSAFE_GROUPED_GEMM", "loop")
    for t in (x, logits, w_in[1]):
        t.grad = None
    r = sparse_route(logits, 1, bias=bias)  # a fresh graph for the second backward
    out2 = grouped_expert_mlp(x, r, w_in, w_out)
    out2.float().pow(2).sum().backward()
    torch.testing.assert_close(out, out2, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, (x.grad, logits.grad, w_in[1].grad)):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)
