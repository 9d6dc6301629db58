"""Low-rank adapters (LoRA, arXiv 2106.09685) for the methods' SFT loops: an in-place module swap
(torchao-style) that is exact at init, and a merge back into plain ``nn.Linear`` layers.

    from upsafe_ext.train.lora import add_lora, merge_lora, merged_lora
    names = add_lora(model, rank=16, alpha=32)   # every q/k/v/o/gate/up/down projection; base weights frozen
    ...train: only the adapters' lora_A / lora_B have requires_grad...
    with merged_lora(model):                     # a plain model for a checkpoint, adapters kept afterwards
        model.save_pretrained("ckpt")
    merge_lora(model)                            # for good: W <- W + (alpha / rank) * B @ A

``LoraLinear(x) = base(x) + (alpha / rank) * (x @ A^T) @ B^T`` with ``A`` Kaiming-uniform and
``B = 0``, so the adapted model equals the base model until the first step (PEFT's default init).
Merging leaves no trace of the adapters: the saved model has the original parameter names and
loads in any Hugging Face code. The base weights are frozen while an adapter wraps them; merging
restores each base layer's own ``requires_grad``.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["LORA_TARGETS", "LoraLinear", "add_lora", "merge_lora", "merged_lora", "lora_parameters",
           "check_lora_args"]

LORA_TARGETS = r"(q|k|v|o|gate|up|down)_proj$"
"""Default target regex (``re.search`` on module names): every attention and MLP projection of a
Llama-style decoder, as PEFT's "all-linear" minus the LM head."""


def check_lora_args(rank, alpha, targets, labels=("add_lora: `rank`", "add_lora: `alpha`", "add_lora: `targets`")):
    """Raise a ValueError naming the argument (its label in `labels`) when `rank`, `alpha` or `targets`
    is invalid."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{labels[0]} must be a positive int, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{labels[1]} must be a finite number > 0, got {alpha!r}")
    if not isinstance(targets, str) or not targets:
        raise ValueError(f"{labels[2]} must be a non-empty regex str, got {targets!r}")
    try:
        re.compile(targets)
    except re.error as exc:
        raise ValueError(f"{labels[2]} is not a valid regex ({exc}): {targets!r}") from None


class LoraLinear(nn.Module):
    """``base(x) + scaling * (x @ lora_A^T) @ lora_B^T``; ``base`` is the wrapped ``nn.Linear`` (frozen)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoraLinear: `base` must be an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.rank = int(rank)
        self.scaling = float(alpha) / self.rank
        self.base_requires_grad = base.weight.requires_grad
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(self.rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        base.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return self.base(x) + (x @ a.t() @ b.t()) * self.scaling

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` with ``W + scaling * B @ A`` (and the base bias); the base is not changed."""
        w = self.base.weight
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=w.device, dtype=w.dtype)
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        out.weight.copy_((w.float() + delta).to(w.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        out.requires_grad_(self.base_requires_grad)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def add_lora(model: nn.Module, rank: int = 16, alpha: float = 32.0, targets: str = LORA_TARGETS) -> list[str]:
    """Wrap every ``nn.Linear`` of `model` whose name matches `targets` (``re.search``) in a
    :class:`LoraLinear`, in place; returns the wrapped names. The model's output is unchanged until
    the adapters train. Raises a ValueError when nothing matches or the model already has adapters."""
    check_lora_args(rank, alpha, targets)
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("add_lora: the model already has LoRA adapters; merge_lora(model) first")
    pat = re.compile(targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pat.search(n)]
    if not names:
        raise ValueError(f"add_lora: `targets` {targets!r} matches no nn.Linear of the model "
                         "(check it against model.named_modules())")
    for n in names:
        parent, child = _parent(model, n)
        setattr(parent, child, LoraLinear(getattr(parent, child), rank, alpha))
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (``lora_A``, ``lora_B`` of every :class:`LoraLinear`), in module order."""
    return [p for m in model.modules() if isinstance(m, LoraLinear) for p in (m.lora_A, m.lora_B)]


def _wrapped(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def merge_lora(model: nn.Module) -> int:
    """Replace every :class:`LoraLinear` by a plain ``nn.Linear`` holding the merged weight, in place;
    returns how many were merged (0 when the model has no adapters)."""
    wrapped = _wrapped(model)
    for n, m in wrapped:
        parent, child = _parent(model, n)
        setattr(parent, child, m.merged_linear())
    return len(wrapped)


@contextmanager
def merged_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model holds merged plain layers (e.g. to save a checkpoint with the usual
    parameter names); on exit the adapters are back, untouched, and training can go on."""
    wrapped = _wrapped(model)
    for n, m in wrapped:
        parent, child = _parent(model, n)
        setattr(parent, child, m.merged_linear())
    try:
        yield model
    finally:
        for n, m in wrapped:
            parent, child = _parent(model, n)
            setattr(parent, child, m)
