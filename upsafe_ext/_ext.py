"""Loads the compiled extension (`upsafe_ext._C`) and answers which kernels it holds.

Loading is forgiving, as in torchao: if the .so is missing or was built against another torch,
the Python API still imports and only the kernel calls fail, with the reason.
"""
from __future__ import annotations

import warnings

import torch

_C = None
LOAD_ERROR: Exception | None = None
try:  # the .so registers every op under torch.ops.upsafe on import
    from . import _C  # type: ignore[attr-defined,no-redef]
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    LOAD_ERROR = exc
    warnings.warn(
        f"upsafe_ext: compiled kernels not available ({exc}); install with "
        "`pip install --no-build-isolation -e .` against the torch you run",
        RuntimeWarning,
        stacklevel=2,
    )


def loaded() -> bool:
    return _C is not None


def require(op: str) -> None:
    if _C is None:
        raise RuntimeError(f"upsafe_ext.ops.{op}: the compiled extension did not load: {LOAD_ERROR}")


def has_kernel(op: str, device_type: str) -> bool:
    """True when torch's dispatcher holds an upsafe kernel for `op` on `device_type` ('cpu'/'cuda')."""
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"upsafe::{op}", key)


def build_info() -> dict:
    return dict(_C.build_info()) if _C is not None else {"with_cuda": False, "error": str(LOAD_ERROR)}
