import os

import pytest
import torch

from upsafe_ext import _ext

HAS_CUDA = torch.cuda.is_available()


def cuda_kernel(op: str) -> bool:
    """Ask the dispatcher, not a guess: is there a CUDA kernel for upsafe::<op> and a GPU to run it?"""
    return HAS_CUDA and _ext.has_kernel(op, "cuda")


def devices_for(op: str):
    devs = ["cpu"]
    if cuda_kernel(op):
        devs.append("cuda")
    return devs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("UPSAFE_SKIP_SLOW") == "1":
        skip = pytest.mark.skip(reason="UPSAFE_SKIP_SLOW=1")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
