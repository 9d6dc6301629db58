"""SafetyMask: which weights are safety-critical, per parameter, stored packed.

Each parameter's selection is kept in whichever form is smaller: a bit set (``ceil(n/8)`` bytes, uint8,
least-significant bit first) or sorted flat indices (int32, 4 bytes per selected weight; int64 for
tensors of 2^31 or more elements). A 1%-mask of a large matrix is stored as indices (0.04 B/weight), a
dense one as bits (0.125 B/weight). Files are safetensors: one tensor per parameter named
``bits/<param>`` or ``idx/<param>``, plus JSON metadata with every parameter's shape (order kept).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from ..ops.esi import select_topk
from ..saving import atomic_file
from .dist import unwrap_model, world

__all__ = ["SafetyMask", "pack_bits", "unpack_bits", "selection_size", "selection_noise", "save_safetensors"]

FORMAT = "upsafe_esi_mask"
FORMAT_VERSION = 1
_INT32_LIMIT = 2 ** 31


def pack_bits(flat: Tensor) -> Tensor:
    """bool ``[n]`` -> uint8 ``[ceil(n/8)]``, bit j of byte b = element 8b + j."""
    n = flat.numel()
    x = torch.zeros(((n + 7) // 8) * 8, dtype=torch.uint8, device=flat.device)
    x[:n] = flat.reshape(-1).to(torch.uint8)
    x = x.view(-1, 8)
    out = x[:, 0].clone()
    for j in range(1, 8):
        out |= x[:, j] << j
    return out


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """uint8 ``[ceil(n/8)]`` -> bool ``[n]`` (inverse of `pack_bits`)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 1).reshape(-1)[:n].bool()


def selection_size(k: int | None, fraction: float | None, total: int, op: str) -> int:
    """How many of `total` weights a selection takes: exactly one of `k` (a count) or `fraction`."""
    if (k is None) == (fraction is None):
        raise ValueError(f"{op}: pass exactly one of `k` and `fraction`")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= total:
            raise ValueError(f"{op}: `k` must be an int in [0, {total}], got {k!r}")
        return k
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"{op}: `fraction` must be a float in [0, 1], got {fraction!r}")
    return int(round(fraction * total))  # Python round: half to even


def selection_noise(name: str, shape: Sequence[int], seed: int) -> Tensor:
    """Uniform [0, 1) noise for a tensor, seeded from (seed, name): same on every rank and layout."""
    s = int.from_bytes(hashlib.sha256(f"{seed}\x00{name}".encode()).digest()[:8], "big") >> 1
    return torch.rand(tuple(shape), generator=torch.Generator().manual_seed(s))


def save_safetensors(tensors: dict, path: str, metadata: dict) -> str:
    """Write a safetensors file atomically (a temporary sibling renamed over `path`). Returns `path`."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def check_file_format(metadata: dict | None, fmt: str, version: int, path: str, op: str, what: str) -> dict:
    """The safetensors `metadata` of one of our files, checked: its format tag is `fmt` and its version is at
    most `version` (a newer file asks for an upgrade). ValueError naming `op` otherwise."""
    md = metadata or {}
    if md.get("format") != fmt:
        raise ValueError(f"{op}: {path} is not {what} (format={md.get('format')!r})")
    if int(md.get("version", "0")) > version:
        raise ValueError(f"{op}: {path} has format version {md['version']}; this upsafe_ext reads <= {version} "
                         "(upgrade)")
    return md


class ShapeIndex:
    """`names` and `shapes` of a per-tensor container keeping ``self._shapes`` (name -> full shape, in
    global order); shared by `SafetyMask` and `ESIScores`."""

    _shapes: dict

    @property
    def names(self) -> list[str]:
        """Every tensor covered (all ranks), in global order."""
        return list(self._shapes)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)


class SafetyMask(ShapeIndex):
    """A selection of individual weights per parameter tensor (e.g. the top-1% ESI weights).

    Build one with ``ESIScores.select(...)``, ``SafetyMask.from_dense({...})``, ``SafetyMask.random_like``
    or ``SafetyMask.load(path, model)``.

    Args:
        shapes: ``{parameter name: full shape}`` of every tensor the mask covers (order kept).
        indices: ``{parameter name: flat indices}`` of the selected weights (missing names: none).
        meta: JSON-serialisable description (how it was selected).

    Example:
        >>> m = SafetyMask({"w": (2, 3)}, {"w": torch.tensor([1, 5])})
        >>> m.count(), m.dense("w").tolist()
        (2, [[False, True, False], [False, False, True]])
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], indices: Mapping[str, Tensor] | None = None,
                 meta: dict | None = None):
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in shapes.items():
            if not isinstance(name, str):
                raise ValueError(f"SafetyMask: parameter names must be str, got {name!r}")
            self._shapes[name] = tuple(int(s) for s in shape)
        indices = dict(indices or {})
        unknown = sorted(set(indices) - set(self._shapes))
        if unknown:
            raise ValueError(f"SafetyMask: `indices` has parameters not in `shapes`: {unknown[:5]}")
        self._packed: dict[str, tuple[str, Tensor]] = {}
        self._counts: dict[str, int] = {}
        for name, shape in self._shapes.items():
            n = math.prod(shape)
            idx = indices.get(name)
            idx = torch.zeros(0, dtype=torch.int64) if idx is None else torch.as_tensor(idx).reshape(-1).to("cpu",
                                                                                                              torch.int64)
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                idx = torch.unique(idx)  # sorted, deduplicated
            if idx.numel():
                if int(idx[0]) < 0 or int(idx[-1]) >= n:
                    raise ValueError(f"SafetyMask: indices of {name!r} must be in [0, {n}), got "
                                     f"[{int(idx[0])}, {int(idx[-1])}]")
            self._set(name, idx)
        self.meta = dict(meta or {})

    def _set(self, name: str, idx: Tensor | None = None, flat: Tensor | None = None) -> None:
        """Store `name` from sorted unique int64 indices or a flat bool mask, in the smaller form."""
        n = math.prod(self._shapes[name])
        k = int(idx.numel()) if idx is not None else int(torch.count_nonzero(flat))
        width = 4 if n < _INT32_LIMIT else 8
        if width * k <= (n + 7) // 8:
            if idx is None:
                idx = flat.nonzero().squeeze(1)
            self._packed[name] = ("idx", idx.to(torch.int32 if width == 4 else torch.int64).contiguous())
        else:
            if flat is None:
                flat = torch.zeros(n, dtype=torch.bool)
                flat[idx] = True
            self._packed[name] = ("bits", pack_bits(flat))
        self._counts[name] = k

    # -- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, masks: Mapping[str, Tensor], meta: dict | None = None) -> "SafetyMask":
        """From ``{name: bool tensor of the parameter's shape}``."""
        out = cls({n: tuple(getattr(m, "shape", ())) for n, m in masks.items()}, {}, meta)
        for name, m in masks.items():
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                raise ValueError(f"SafetyMask.from_dense: masks[{name!r}] must be a bool tensor, got "
                                 f"{getattr(m, 'dtype', type(m).__name__)}")
            out._set(name, flat=m.detach().reshape(-1).cpu())
        return out

    @classmethod
    def from_global_indices(cls, shapes: Mapping[str, Sequence[int]], gidx: Tensor,
                            meta: dict | None = None) -> "SafetyMask":
        """From indices into the concatenation of all tensors (in `shapes` order, each flattened)."""
        names = list(shapes)
        sizes = torch.tensor([math.prod(shapes[n]) for n in names], dtype=torch.int64)
        starts = torch.cumsum(sizes, 0) - sizes
        gidx = torch.sort(torch.as_tensor(gidx, dtype=torch.int64).reshape(-1).cpu()).values
        if gidx.numel() and (int(gidx[0]) < 0 or int(gidx[-1]) >= int(sizes.sum())):
            raise ValueError(f"SafetyMask.from_global_indices: indices must be in [0, {int(sizes.sum())})")
        t = torch.searchsorted(starts, gidx, right=True) - 1
        idx = {}
        for i, n in enumerate(names):
            sel = gidx[t == i]
            idx[n] = sel - starts[i]
        return cls(shapes, idx, meta)

    @classmethod
    def random_like(cls, shapes: "SafetyMask | Mapping[str, Sequence[int]]", k: int | None = None, *,
                    fraction: float | None = None, seed: int = 0) -> "SafetyMask":
        """A seeded uniformly random mask over the same tensors (the control for an ESI mask).

        Pass a `SafetyMask` to get one of the same size (`k` = its count), or shapes with `k` / `fraction`.
        Exactly k weights, chosen as the top-k of per-element uniform noise (each tensor's noise seeded
        from (`seed`, name), so it does not depend on the tensor order or sharding).
        """
        if isinstance(shapes, SafetyMask):
            k = shapes.count() if k is None and fraction is None else k
            shapes = shapes.shapes
        shapes = {n: tuple(s) for n, s in shapes.items()}
        total = sum(math.prod(s) for s in shapes.values())
        k = selection_size(k, fraction, total, "SafetyMask.random_like")
        noise = [selection_noise(n, s, seed) for n, s in shapes.items()]
        masks = select_topk(noise, k) if noise else []
        return cls.from_dense(dict(zip(shapes, masks)),
                              meta={"selection": "random", "seed": int(seed), "k": int(k), "total": int(total)})

    # -- queries -----------------------------------------------------------------------------------
    def __contains__(self, name) -> bool:
        return name in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def _check(self, name: str) -> None:
        if name not in self._shapes:
            raise KeyError(f"SafetyMask: no parameter {name!r} (the mask covers {len(self._shapes)} tensors, "
                           f"e.g. {self.names[:3]})")

    def count(self, name: str | None = None) -> int:
        """Selected weights in `name`, or in all tensors."""
        if name is None:
            return sum(self._counts.values())
        self._check(name)
        return self._counts[name]

    def numel(self, name: str | None = None) -> int:
        """Elements covered (selected or not) in `name`, or in all tensors."""
        if name is None:
            return sum(math.prod(s) for s in self._shapes.values())
        self._check(name)
        return math.prod(self._shapes[name])

    @property
    def fraction(self) -> float:
        total = self.numel()
        return self.count() / total if total else 0.0

    def indices(self, name: str) -> Tensor:
        """Sorted flat int64 indices of the selected weights of `name` (CPU)."""
        self._check(name)
        kind, data = self._packed[name]
        if kind == "idx":
            return data.to(torch.int64)
        return unpack_bits(data, self.numel(name)).nonzero().squeeze(1)

    def dense(self, name: str, device: torch.device | str | None = None) -> Tensor:
        """bool tensor of the parameter's shape, True where selected."""
        self._check(name)
        kind, data = self._packed[name]
        n = self.numel(name)
        if kind == "bits":
            flat = unpack_bits(data, n)
        else:
            flat = torch.zeros(n, dtype=torch.bool)
            flat[data.long()] = True
        return flat.view(self._shapes[name]).to(device or "cpu")

    def storage(self, name: str) -> str:
        """"bits" or "idx": how `name` is stored."""
        self._check(name)
        return self._packed[name][0]

    def nbytes(self) -> int:
        """Bytes of the packed representation."""
        return sum(d.numel() * d.element_size() for _, d in self._packed.values())

    def overlap(self, other: "SafetyMask") -> int:
        """Weights selected in both masks (tensors present in both)."""
        total = 0
        for n in self.names:
            if n in other and self.count(n) and other.count(n):
                total += int(torch.isin(self.indices(n), other.indices(n)).sum())
        return total

    def __eq__(self, other) -> bool:
        if not isinstance(other, SafetyMask) or self._shapes != other._shapes:
            return False
        return all(torch.equal(self.indices(n), other.indices(n)) for n in self.names)

    def __repr__(self):
        return (f"SafetyMask(count={self.count()}, tensors={len(self)}, fraction={self.fraction:.4%}, "
                f"packed={self.nbytes()} bytes)")

    # -- models ------------------------------------------------------------------------------------
    def validate(self, model: torch.nn.Module) -> None:
        """Raise ValueError unless every masked parameter exists in `model` with the same shape."""
        inner, _ = unwrap_model(model)
        params = dict(inner.named_parameters(remove_duplicate=False))
        missing = [n for n in self.names if n not in params]
        bad = [(n, tuple(params[n].shape), s) for n, s in self._shapes.items()
               if n in params and tuple(params[n].shape) != s]
        if missing or bad:
            lines = [f"parameter {n!r} is not in the model" for n in missing[:5]]
            lines += [f"parameter {n!r} has shape {m} in the model but {s} in the mask" for n, m, s in bad[:5]]
            more = len(missing) + len(bad) - len(lines)
            raise ValueError("SafetyMask does not fit this model: " + "; ".join(lines)
                             + (f"; and {more} more" if more > 0 else ""))

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """Write a safetensors file (under torch.distributed only rank 0 writes). Returns `path`."""
        if world()[0] != 0:
            return path
        tensors = {f"{kind}/{name}": data.contiguous().clone() for name, (kind, data) in self._packed.items()}
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION),
                "shapes": json.dumps([[n, list(s)] for n, s in self._shapes.items()]),
                "counts": json.dumps([self._counts[n] for n in self._shapes]),
                "meta": json.dumps(self.meta)}
        return save_safetensors(tensors, path, meta)

    @classmethod
    def load(cls, path: str, model: torch.nn.Module | None = None) -> "SafetyMask":
        """Read a file written by `save`; with `model`, also check that it fits (`validate`)."""
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            md = check_file_format(f.metadata(), FORMAT, FORMAT_VERSION, path, "SafetyMask.load", "a SafetyMask file")
            shapes = {n: tuple(s) for n, s in json.loads(md["shapes"])}
            keys = set(f.keys())
            indices = {}
            for name in shapes:
                if f"idx/{name}" in keys:
                    indices[name] = f.get_tensor(f"idx/{name}").to(torch.int64)
                elif f"bits/{name}" in keys:
                    indices[name] = unpack_bits(f.get_tensor(f"bits/{name}"), math.prod(shapes[name])).nonzero().squeeze(1)
                else:
                    raise ValueError(f"SafetyMask.load: {path} has no data for parameter {name!r}")
        out = cls(shapes, indices, json.loads(md.get("meta", "{}")))
        if model is not None:
            out.validate(model)
        return out
