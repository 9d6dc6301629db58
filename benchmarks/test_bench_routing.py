"""pytest-benchmark suite for sparse_route (`pytest benchmarks/ --benchmark-only`)."""
import pytest
import torch

from upsafe_ext.ops import sparse_route, sparse_route_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(16384, 4, 1), (16384, 128, 8)] if DEV == "cuda" else [(4096, 8, 2)]


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("T,E,k", SHAPES)
@pytest.mark.parametrize("impl", ["upsafe", "reference"])
def test_sparse_route(benchmark, impl, T, E, k):
    x = torch.randn(T, E, device=DEV, dtype=torch.bfloat16)
    fn = sparse_route if impl == "upsafe" else sparse_route_reference

    def step():
        out = fn(x, k, temperature=0.7)
        _sync()
        return out

    out = benchmark(step)
    assert out.weights.shape == (T, k)
