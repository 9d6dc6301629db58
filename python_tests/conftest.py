import os

import pytest
import torch

from upsafe_ext import _ext

HAS_CUDA = torch.cuda.is_available()


def cuda_kernel(op: str) -> bool:
    """Ask the dispatcher, not a guess: is there a CUDA kernel for upsafe::<op> and a GPU to run it?"""
    return HAS_CUDA and _ext.has_kernel(op, "cuda")


def cuda_skip_reason(*ops: str) -> str:
    """Why the CUDA case of the upsafe ops cannot run here ("" when it can)."""
    if not HAS_CUDA:
        return "no CUDA device"
    for op in ops:
        if not _ext.has_kernel(op, "cuda"):
            return f"upsafe::{op} has no CUDA kernel in this build"
    return ""


def requires_cuda_kernel(*ops: str):
    """skipif mark for a CUDA-only test of the upsafe ops `ops`, naming the reason."""
    reason = cuda_skip_reason(*ops)
    return pytest.mark.skipif(bool(reason), reason=reason or "runs on CUDA")


def devices_for(*ops: str):
    """Device parametrisation for a test of the upsafe ops `ops`: "cpu", and a "cuda" case that is always
    generated and reported as skipped (with the reason) where there is no GPU or no CUDA kernel for one
    of the ops in this build -- never silently dropped."""
    return ["cpu", pytest.param("cuda", marks=requires_cuda_kernel(*ops))]


def runnable_devices(*ops: str) -> list[str]:
    """The devices the ops can run on here, as plain strings (for loops inside one test)."""
    return ["cpu"] + ([] if cuda_skip_reason(*ops) else ["cuda"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("UPSAFE_SKIP_SLOW") == "1":
        skip = pytest.mark.skip(reason="UPSAFE_SKIP_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
