"""ESI kernels: accumulate/finalize, histogram, exact top-k selection, sparse AdamW vs references."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import devices_for, requires_cuda_kernel
from upsafe_ext.ops import esi_accumulate_, esi_histogram, select_topk, select_topk_reference, sparse_adamw_
from upsafe_ext.ops.esi import NUM_BINS, threshold_bin

DEVICES = devices_for("esi_accumulate_", "esi_histogram")
SELECT_DEVICES = devices_for("esi_histogram", "esi_select", "esi_mark_")
ADAMW_DEVICES = devices_for("esi_sparse_adamw_")
SIZES = [(1000,), (37, 13), (8192 * 2 + 5,), (3,), (64, 64)]


def reference_hist(scores, invert=False):
    bits = torch.cat([s.reshape(-1) for s in scores]).view(torch.int32).long() & 0x7FFFFFFF
    if invert:
        bits = 0x7FFFFFFF - bits
    return torch.bincount(bits >> 18, minlength=NUM_BINS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_accumulate_and_finalize(device, gdtype):
    acc = [torch.zeros(s, device=device) for s in SIZES]
    ref = [torch.zeros(s, device=device) for s in SIZES]
    for _ in range(3):
        gs = [torch.randn(s, device=device).to(gdtype) for s in SIZES]
        esi_accumulate_(acc, gs)
        ref = [r + g.float() for r, g in zip(ref, gs)]
    for a, r in zip(acc, ref):
        assert torch.equal(a, r)
    gs = [torch.randn(s, device=device).to(gdtype) for s in SIZES]
    sigma = [0.5, 2.0, 1.0, 3.0, 0.25]
    hist = esi_accumulate_(acc, gs, sigma, finalize=True)
    ref = [s * (r + g.float()).abs() for s, r, g in zip(sigma, ref, gs)]
    for a, r in zip(acc, ref):
        assert torch.equal(a, r)
    assert torch.equal(hist.cpu(), reference_hist([r.cpu() for r in ref]))
    assert torch.equal(esi_histogram(acc, invert=True).cpu(), reference_hist([r.cpu() for r in ref], invert=True))


@pytest.mark.parametrize("device", DEVICES)
def test_misaligned_views_take_the_scalar_path(device):
    base = torch.zeros(1001, device=device)
    acc = [base[1:]]  # contiguous but 4 bytes off 16-byte alignment
    g = torch.randn(1000, device=device)
    esi_accumulate_(acc, [g])
    assert torch.equal(base[1:], g) and base[0] == 0


@pytest.mark.parametrize("device", SELECT_DEVICES)
@pytest.mark.parametrize("largest", [True, False])
def test_select_matches_sort_reference(device, largest):
    scores = [torch.rand(s, device=device) * (i + 1) for i, s in enumerate(SIZES)]
    total = sum(s.numel() for s in scores)
    for k in [1, 7, 100, total // 100, total // 2, total - 1, total, 0]:
        got = select_topk(scores, k, largest=largest)
        want = select_topk_reference(scores, k, largest=largest)
        assert sum(int(m.sum()) for m in got) == k
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", SELECT_DEVICES)
def test_select_ties_go_to_lower_global_index(device):
    scores = [torch.zeros(100, device=device), torch.full((50,), 3.0, device=device), torch.zeros(20, device=device)]
    for k, largest in [(10, True), (60, True), (120, True), (30, False), (115, False)]:
        got = select_topk(scores, k, largest=largest)
        for a, b in zip(got, select_topk_reference(scores, k, largest=largest)):
            assert torch.equal(a, b)
    got = select_topk(scores, 60)  # all 50 threes, then the first 10 zeros of tensor 0
    assert int(got[0][:10].sum()) == 10 and int(got[0][10:].sum()) == 0 and int(got[2].sum()) == 0


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=4), frac=st.floats(0, 1),
       quantize=st.booleans(), largest=st.booleans())
def test_select_hypothesis(sizes, frac, quantize, largest):
    scores = [torch.rand(n) for n in sizes]
    if quantize:  # many exact ties
        scores = [(s * 8).floor() for s in scores]
    k = int(round(frac * sum(sizes)))
    for a, b in zip(select_topk(scores, k, largest), select_topk_reference(scores, k, largest)):
        assert torch.equal(a, b)


def adamw_reference(p, g, m, v, lr, b1, b2, eps, wd, step):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p * (1 - lr * wd)
    p = p - lr * (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + eps)
    return p, m, v


@pytest.mark.parametrize("device", ADAMW_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_adamw(device, dtype):
    params = [torch.randn(s, device=device).to(dtype) for s in [(40, 30), (20000,)]]
    before = [p.clone() for p in params]
    idx = [torch.randperm(p.numel(), device=device)[: p.numel() // 10].sort().values.int() for p in params]
    m = [torch.zeros(i.numel(), device=device) for i in idx]
    v = [torch.zeros(i.numel(), device=device) for i in idx]
    master = [p.reshape(-1)[i.long()].float() for p, i in zip(params, idx)]
    ref = [(w.clone(), mm.clone(), vv.clone()) for w, mm, vv in zip(master, m, v)]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    for step in (1, 2, 3):
        grads = [torch.randn_like(p) for p in params]
        sparse_adamw_(params, grads, idx, m, v, master, step=step, **hp)
        ref = [adamw_reference(w, g.reshape(-1)[i.long()].float(), mm, vv, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"],
                               hp["weight_decay"], step) for (w, mm, vv), g, i in zip(ref, grads, idx)]
    for p, b, i, w, (rw, rm, rv) in zip(params, before, idx, master, ref):
        torch.testing.assert_close(w, rw, atol=1e-6, rtol=1e-5)
        keep = torch.ones(p.numel(), dtype=torch.bool, device=device)
        keep[i.long()] = False
        assert torch.equal(p.reshape(-1)[keep], b.reshape(-1)[keep]), "unselected weights must be bitwise unchanged"
        assert torch.equal(p.reshape(-1)[i.long()], w.to(dtype))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: esi_accumulate_([torch.zeros(3)], []), "one tensor per accumulator"),
        (lambda: esi_accumulate_([torch.zeros(3).double()], [torch.zeros(3)]), "accum.*Float"),
        (lambda: esi_accumulate_([torch.zeros(3)], [torch.zeros(4)]), "elements"),
        (lambda: esi_accumulate_([torch.zeros(3)], [torch.zeros(3)], finalize=True), "sigma"),
        (lambda: select_topk([torch.rand(5)], 6), "`k`"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# torch.library.opcheck on every ESI op (schema incl. declared mutations, fake/meta impl, autograd
# registration, AOT dispatch). None of them is differentiable (no autograd formula is registered: they
# are optimizer / selection kernels), so they are checked on inputs without requires_grad only.
@pytest.mark.parametrize("device", devices_for("esi_accumulate_"))
@pytest.mark.parametrize("finalize", [False, True])
def test_opcheck_accumulate(device, finalize):
    acc = [torch.rand(100, device=device), torch.rand(7, device=device)]
    gs = [torch.randn(100, device=device), torch.randn(7, device=device)]
    sigma = [1.0, 2.0] if finalize else None
    torch.library.opcheck(torch.ops.upsafe.esi_accumulate_.default, (acc, gs, sigma, finalize, False))
    gs16 = [g.bfloat16() for g in gs]
    torch.library.opcheck(torch.ops.upsafe.esi_accumulate_.default, (acc, gs16, sigma, finalize, True))


@pytest.mark.parametrize("device", devices_for("esi_histogram"))
@pytest.mark.parametrize("invert", [False, True])
def test_opcheck_histogram(device, invert):
    scores = [torch.rand(50, device=device), torch.rand(3, 4, device=device)]
    torch.library.opcheck(torch.ops.upsafe.esi_histogram.default, (scores, invert))


def _select_args(device, invert, k=40):
    scores = [(torch.rand(300, device=device) * 4).floor(), torch.rand(17, 5, device=device)]  # ties at the threshold
    hist = esi_histogram(scores, invert=invert).cpu().tolist()
    tb, _ = threshold_bin(hist, k)
    return scores, tb, int(hist[tb])


@pytest.mark.parametrize("device", devices_for("esi_select"))
@pytest.mark.parametrize("invert", [False, True])
def test_opcheck_select(device, invert):
    scores, tb, capacity = _select_args(device, invert)
    assert capacity > 1
    torch.library.opcheck(torch.ops.upsafe.esi_select.default, (scores, tb, capacity, invert))


@pytest.mark.parametrize("device", devices_for("esi_mark_"))
def test_opcheck_mark(device):
    masks = [torch.zeros(300, dtype=torch.bool, device=device), torch.rand(17, 5, device=device) < 0.3]
    idx = torch.tensor([0, 5, 299, 300 + 7, 300 + 84], dtype=torch.int64, device=device)  # both tensors, both ends
    torch.library.opcheck(torch.ops.upsafe.esi_mark_.default, (masks, idx))
    # and the op does what its schema says: the global indices are set, nothing else changes
    want = [m.clone() for m in masks]
    want[0][[0, 5, 299]] = True
    want[1].view(-1)[[7, 84]] = True
    torch.ops.upsafe.esi_mark_.default(masks, idx)
    assert all(torch.equal(a, b) for a, b in zip(masks, want))


@pytest.mark.parametrize("device", devices_for("esi_sparse_adamw_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_sparse_adamw(device, dtype):
    params = [torch.randn(40, 30, device=device).to(dtype), torch.randn(500, device=device).to(dtype)]
    grads = [torch.randn_like(p) for p in params]
    idx = [torch.randperm(p.numel(), device=device)[: p.numel() // 4].sort().values.int() for p in params]
    m = [torch.randn(i.numel(), device=device) * 0.1 for i in idx]
    v = [torch.rand(i.numel(), device=device) * 0.1 for i in idx]
    master = [p.reshape(-1)[i.long()].float() for p, i in zip(params, idx)]
    args = (params, grads, idx, m, v, master, 1e-2, 0.9, 0.99, 1e-8, 0.1, 3)
    torch.library.opcheck(torch.ops.upsafe.esi_sparse_adamw_.default, args)


@requires_cuda_kernel("esi_accumulate_")
def test_cuda_matches_cpu_large():
    sizes = [(4096, 1024), (1000003,), (11008, 64)]
    acc = [torch.zeros(s, device="cuda") for s in sizes]
    g = [torch.randn(s, device="cuda").bfloat16() for s in sizes]
    hist = esi_accumulate_(acc, g, [1.0, 0.5, 2.0], finalize=True)
    acc_cpu = [torch.zeros(s) for s in sizes]
    hist_cpu = esi_accumulate_(acc_cpu, [t.cpu() for t in g], [1.0, 0.5, 2.0], finalize=True)
    assert torch.equal(hist.cpu(), hist_cpu)
    k = sum(a.numel() for a in acc) // 100
    for a, b in zip(select_topk(acc, k, hist=hist), select_topk(acc_cpu, k, hist=hist_cpu)):
        assert torch.equal(a.cpu(), b)
