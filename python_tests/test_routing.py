"""sparse_route: CPU and CUDA kernels against the plain-PyTorch reference, forward and backward."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import devices_for, requires_cuda_kernel, runnable_devices
from upsafe_ext.ops import sparse_route, sparse_route_reference

DEVICES = devices_for("sparse_route")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_route_equal(out, ref, atol=2e-6):
    w, ex, counts, perm, offs, inv = out
    torch.testing.assert_close(w, ref.weights.to(w.device).float(), atol=atol, rtol=1e-5, equal_nan=True)
    for name in ("experts", "counts", "permutation", "offsets", "inverse"):
        a, b = getattr(out, name), getattr(ref, name).to(w.device)
        assert a.dtype == torch.int32, name
        assert torch.equal(a, b), f"{name} differs from the reference"


def check_permutation_invariants(out, T, E, k):
    ex = out.experts.cpu().flatten()
    perm, inv, offs = out.permutation.cpu().long(), out.inverse.cpu().long(), out.offsets.cpu().long()
    assert torch.equal(torch.sort(perm).values, torch.arange(T * k))
    assert torch.equal(inv[perm], torch.arange(T * k))
    kept = int((ex >= 0).sum())
    assert int(offs[-1]) == kept
    start = 0
    for e in range(E):
        seg = perm[start: offs[e]]
        assert bool((ex[seg] == e).all())
        assert bool((seg[1:] > seg[:-1]).all()), "permutation must be stable within an expert"
        start = int(offs[e])


SHAPES = [(1, 1, 1), (7, 4, 1), (83, 4, 2), (300, 8, 2), (257, 5, 3), (513, 64, 8), (129, 128, 8),
          (600, 256, 8), (64, 33, 4), (1000, 2, 2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k", SHAPES)
def test_forward_matches_reference(device, dtype, T, E, k):
    x = torch.randn(T, E, device=device).to(dtype)
    for kwargs in (dict(), dict(temperature=0.3, min_weight=0.1), dict(renormalize=False, temperature=2.0)):
        out = sparse_route(x, k, **kwargs)
        ref = sparse_route_reference(x.cpu(), k, **kwargs)
        assert_route_equal(out, ref)
        check_permutation_invariants(out, T, E, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias_kind", ["vector", "matrix"])
def test_bias_and_per_token_temperature(device, bias_kind):
    T, E, k = 300, 6, 2
    x = torch.randn(T, E, device=device)
    bias = torch.randn(E, device=device) if bias_kind == "vector" else torch.randn(T, E, device=device)
    bias[..., 3] = -math.inf  # expert 3 can never be chosen
    tau = torch.rand(T, device=device) + 0.05
    out = sparse_route(x, k, temperature=tau, bias=bias, min_weight=0.02)
    ref = sparse_route_reference(x.cpu(), k, temperature=tau.cpu(), bias=bias.cpu(), min_weight=0.02)
    assert_route_equal(out, ref)
    assert not bool((out.experts == 3).any())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("bias_kind", [None, "vector", "matrix"])
@pytest.mark.parametrize("T,E,k", [(37, 4, 2), (70, 16, 3), (20, 130, 8), (9, 3, 3)])
def test_backward_matches_reference(device, renormalize, bias_kind, T, E, k):
    x = torch.randn(T, E, device=device, dtype=torch.float32, requires_grad=True)
    bias = None
    if bias_kind:
        bias = torch.randn(E if bias_kind == "vector" else (T, E), device=device, requires_grad=True)
    tau = torch.rand(T, device=device) + 0.2
    g = torch.randn(T, k, device=device)
    inputs = [x] + ([bias] if bias is not None else [])
    out = sparse_route(x, k, temperature=tau, bias=bias, renormalize=renormalize, min_weight=0.03)
    grads = torch.autograd.grad((out.weights * g).sum(), inputs)
    ref = sparse_route_reference(x, k, temperature=tau, bias=bias, renormalize=renormalize, min_weight=0.03)
    ref_grads = torch.autograd.grad((ref.weights * g).sum(), inputs)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_low_precision_logits(device):
    x = torch.randn(64, 8, device=device).bfloat16().requires_grad_()
    out = sparse_route(x, 2)
    out.weights.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    ref_x = x.detach().clone().requires_grad_()
    sparse_route_reference(ref_x, 2).weights.sum().backward()
    torch.testing.assert_close(x.grad.float(), ref_x.grad.float(), atol=1e-2, rtol=0)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 700), E=st.integers(1, 256), data=st.data())
def test_hypothesis_shapes(T, E, data):
    k = data.draw(st.integers(1, min(E, 8)))
    tau = data.draw(st.floats(0.05, 5.0))
    mw = data.draw(st.sampled_from([0.0, 0.01, 0.2]))
    for device in runnable_devices("sparse_route"):
        x = (torch.randn(T, E) * 3).round()  # rounded: plenty of exact ties
        out = sparse_route(x.to(device), k, temperature=tau, min_weight=mw)
        assert_route_equal(out, sparse_route_reference(x, k, temperature=tau, min_weight=mw))


@pytest.mark.parametrize("device", DEVICES)
def test_ties_break_to_lower_index(device):
    x = torch.zeros(5, 6, device=device)
    out = sparse_route(x, 3)
    assert out.experts.tolist() == [[0, 1, 2]] * 5
    torch.testing.assert_close(out.weights, torch.full((5, 3), 1 / 3, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_k_equals_e_and_single_expert(device):
    x = torch.randn(50, 4, device=device)
    out = sparse_route(x, 4)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(50, device=device))
    assert out.counts.tolist() == [50] * 4
    one = sparse_route(torch.randn(9, 1, device=device), 1)
    assert one.experts.flatten().tolist() == [0] * 9 and one.weights.flatten().tolist() == [1.0] * 9


@pytest.mark.parametrize("device", DEVICES)
def test_empty_input(device):
    out = sparse_route(torch.empty(0, 8, device=device), 2)
    assert out.weights.shape == (0, 2) and out.permutation.shape == (0,)
    assert out.counts.tolist() == [0] * 8 and out.offsets.tolist() == [0] * 8


@pytest.mark.parametrize("device", DEVICES)
def test_min_weight_makes_routing_sparse(device):
    x = torch.randn(400, 8, device=device) * 4
    full = sparse_route(x, 2, temperature=0.25)
    sparse = sparse_route(x, 2, temperature=0.25, min_weight=0.2)
    dropped = sparse.experts[:, 1] == -1
    assert 0 < int(dropped.sum()) < 400, "at a low temperature most second choices fall below 0.2"
    assert bool((sparse.experts[:, 0] >= 0).all()), "the first choice is always kept"
    torch.testing.assert_close(sparse.weights[dropped, 0], torch.ones(int(dropped.sum()), device=device))
    assert int(sparse.offsets[-1]) == 800 - int(dropped.sum()) < int(full.offsets[-1])


@pytest.mark.parametrize("device", DEVICES)
def test_infinities(device):
    x = torch.randn(4, 5, device=device)
    x[0, 2] = -math.inf
    x[1] = -math.inf
    x[1, 4] = 0.0  # one finite logit: all mass there
    out = sparse_route(x, 2, renormalize=False)
    ref = sparse_route_reference(x.cpu(), 2, renormalize=False)
    assert_route_equal(out, ref)
    assert out.experts[1, 0] == 4 and out.weights[1, 0] == 1.0 and out.weights[1, 1] == 0.0
    assert 2 not in out.experts[0].tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_policy(device):
    x = torch.randn(6, 4, device=device)
    x[2, 1] = math.nan
    out = sparse_route(x, 2)  # documented: NaN propagates to that token only, no sync
    assert bool(torch.isnan(out.weights[2]).all())
    assert out.experts[2, 0] == 1, "NaN ranks highest, as in torch.sort"
    assert bool(torch.isfinite(out.weights[[0, 1, 3, 4, 5]]).all())
    with pytest.raises(ValueError, match="logits.*NaN"):
        sparse_route(x, 2, check_finite=True)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    base = torch.randn(16, 300, device=device)
    x = base.t()  # [300, 16], column-major
    assert not x.is_contiguous()
    assert_route_equal(sparse_route(x, 3), sparse_route_reference(x.contiguous().cpu(), 3))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: sparse_route(torch.randn(4, 4).int(), 1), "logits.*dtype"),
        (lambda: sparse_route(torch.randn(4), 1), "logits.*2-D"),
        (lambda: sparse_route(torch.randn(4, 300), 1), "logits.*256 experts"),
        (lambda: sparse_route(torch.randn(4, 4), 5), "`k`"),
        (lambda: sparse_route(torch.randn(4, 16), 9), "`k`"),
        (lambda: sparse_route(torch.randn(4, 4), 1, temperature=0.0), "temperature"),
        (lambda: sparse_route(torch.randn(4, 4), 1, temperature=float("nan")), "temperature"),
        (lambda: sparse_route(torch.randn(4, 4), 1, temperature=torch.zeros(4)), "temperature.*> 0"),
        (lambda: sparse_route(torch.randn(4, 4), 1, temperature=torch.ones(3)), "temperature.*shape"),
        (lambda: sparse_route(torch.randn(4, 4), 1, bias=torch.zeros(5)), "bias.*shape"),
        (lambda: sparse_route(torch.randn(4, 4), 1, bias=torch.zeros(4, device="meta")), "bias.*meta"),
        (lambda: sparse_route(torch.randn(4, 4), 1, min_weight=1.5), "min_weight"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cpp_checks_also_raise_value_error():
    with pytest.raises(ValueError, match="k"):
        torch.ops.upsafe.sparse_route.default(torch.randn(4, 4), 7, 1.0, None, None, True, 0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, requires_grad):
    x = torch.randn(40, 6, device=device, requires_grad=requires_grad)
    b = torch.randn(6, device=device, requires_grad=requires_grad)
    tau = torch.rand(40, device=device) + 0.5
    for args in [(x, 2, 1.0, None, None, True, 0.0), (x, 3, 0.5, tau, b, False, 0.05)]:
        torch.library.opcheck(torch.ops.upsafe.sparse_route.default, args)


@pytest.mark.parametrize("device", devices_for("sparse_route", "sparse_route_backward"))
@pytest.mark.parametrize("renormalize", [True, False])
def test_opcheck_backward(device, renormalize):
    # the backward op has no derivative of its own (no double backward): checked without requires_grad
    x = torch.randn(40, 6, device=device)
    b = torch.randn(40, 6, device=device)
    tau = torch.rand(40, device=device) + 0.5
    for t, tt, bias in [(1.0, None, None), (0.5, tau, b), (2.0, None, b[0])]:
        w, ex = torch.ops.upsafe.sparse_route.default(x, 3, t, tt, bias, renormalize, 0.05)[:2]
        g = torch.randn_like(w)
        torch.library.opcheck(torch.ops.upsafe.sparse_route_backward.default, (g, x, t, tt, bias, renormalize, w, ex))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def f(x, b):
        r = sparse_route(x, 2, temperature=0.5, bias=b)
        return (r.weights * 2).sum(-1), r.offsets

    x = torch.randn(64, 8, device=device, requires_grad=True)
    b = torch.zeros(8, device=device)
    eager = f(x, b)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, b)
    torch.testing.assert_close(compiled[0], eager[0])
    assert torch.equal(compiled[1], eager[1])
    compiled[0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@requires_cuda_kernel("sparse_route")
@pytest.mark.parametrize("T,E,k", [(16384, 4, 1), (16384, 128, 8), (65536, 8, 2), (3000, 256, 8)])
def test_cuda_matches_cpu_and_is_deterministic(T, E, k):
    x = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
    a = sparse_route(x, k, temperature=0.7, min_weight=0.01)
    b = sparse_route(x, k, temperature=0.7, min_weight=0.01)
    for u, v in zip(a, b):
        assert torch.equal(u, v), "CUDA routing must be bitwise deterministic"
    assert_route_equal(a, sparse_route(x.cpu(), k, temperature=0.7, min_weight=0.01))


@requires_cuda_kernel("sparse_route")
def test_cuda_no_host_sync():
    x = torch.randn(4096, 8, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        r = sparse_route(x, 2, temperature=0.5, bias=torch.zeros(8, device="cuda"))
        r.weights.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
