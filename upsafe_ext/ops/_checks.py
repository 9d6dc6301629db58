"""Argument checks shared by the op wrappers: each raises ValueError naming the argument."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(op: str, name: str, t, *, dim: int | None = None, dtypes=FLOAT_DTYPES, device=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: `{name}` must be {dim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: `{name}` must have dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: `{name}` is on {t.device} but the inputs are on {device}")
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{op}: `{name}` is on unsupported device {t.device} (cpu or cuda)")


def check_int(op: str, name: str, v, lo: int, hi: int):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{op}: `{name}` must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"{op}: `{name}` must be in [{lo}, {hi}], got {v}")


def data_checks_enabled() -> bool:
    """Value checks that read tensor data (and so sync a GPU) are skipped while compiling."""
    return not torch.compiler.is_compiling()
