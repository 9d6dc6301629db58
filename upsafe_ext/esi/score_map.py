"""`ESIScores`: the name -> fp32 scores mapping `compute_esi` returns (upsafe_ext.esi.scores), its exact
global top-k / seeded random selection into a `SafetyMask`, gathering a sharded copy, and its
safetensors file (format ``upsafe_esi_scores``).

Under torch.distributed each rank holds its shard; see `upsafe_ext.esi.dist` for the layout and the
collective selection.
"""
from __future__ import annotations

import json
import math
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from ..ops.esi import select_topk
from .dist import ShardLayout, all_gather_varlen, distributed_select, world
from .mask import SafetyMask, ShapeIndex, check_file_format, save_safetensors, selection_noise, selection_size

__all__ = ["ESIScores", "FORMAT", "FORMAT_VERSION"]

FORMAT = "upsafe_esi_scores"
FORMAT_VERSION = 1


class ESIScores(ShapeIndex, Mapping):
    """ESI scores: a mapping parameter name -> fp32 score tensor of the parameter's shape.

    Under torch.distributed each rank holds only its shard: ``scores[name]`` is the local piece (FSDP2:
    rows ``[r0, r1)`` of the full tensor; DDP: whole tensors, only those this rank owns) and
    `select`, `random_mask`, `full` and `save` are collectives (call them on every rank).

    Args:
        scores: ``{name: fp32 tensor}`` (this rank's pieces).
        shapes: full shapes of every scored tensor, in order (default: the scores' shapes).
        flat_start: per local name, the flat index of its first element in the full tensor (default 0).
        hist: the selection histogram of these scores (largest-first), if the finalize pass built it.
        meta: JSON-serialisable description (objective, prompts, config, ...).
        group: the process group (distributed only).

    Example:
        >>> s = ESIScores({"w": torch.tensor([[0.1, 0.5], [0.3, 0.2]])})
        >>> s.select(k=2).dense("w").tolist()
        [[False, True], [True, False]]
    """

    def __init__(self, scores: Mapping[str, Tensor], *, shapes: Mapping[str, Sequence[int]] | None = None,
                 flat_start: Mapping[str, int] | None = None, hist: Tensor | None = None, meta: dict | None = None,
                 distributed: bool = False, group=None):
        for n, t in scores.items():
            if not isinstance(t, Tensor) or t.dtype != torch.float32:
                raise ValueError(f"ESIScores: scores[{n!r}] must be an fp32 tensor, got {getattr(t, 'dtype', type(t))}")
        self._scores = dict(scores)
        self._shapes = {n: tuple(s) for n, s in (shapes or {n: t.shape for n, t in scores.items()}).items()}
        missing = [n for n in self._scores if n not in self._shapes]
        if missing:
            raise ValueError(f"ESIScores: `shapes` lacks {missing[:5]}")
        self._flat_start = {n: int((flat_start or {}).get(n, 0)) for n in self._scores}
        self._hist = hist
        self.meta = dict(meta or {})
        self.distributed = bool(distributed)
        self.group = group
        if not self.distributed:
            for n, t in self._scores.items():
                if tuple(t.shape) != self._shapes[n]:
                    raise ValueError(f"ESIScores: scores[{n!r}] has shape {tuple(t.shape)}, expected {self._shapes[n]}")

    # -- mapping -----------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._scores[name]
        except KeyError:
            raise KeyError(f"ESIScores: no scores for {name!r}" + (" on this rank" if self.distributed else "")
                           + f" ({len(self._scores)} tensors, e.g. {list(self._scores)[:3]})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._scores)

    def __len__(self) -> int:
        return len(self._scores)

    def numel(self) -> int:
        """Eligible weights in total (all ranks)."""
        return sum(math.prod(s) for s in self._shapes.values())

    def layout(self) -> ShardLayout:
        return ShardLayout(self.names, self._shapes, list(self._scores), self._flat_start)

    def to(self, device) -> "ESIScores":
        return ESIScores({n: t.to(device) for n, t in self._scores.items()}, shapes=self._shapes,
                         flat_start=self._flat_start, hist=self._hist, meta=self.meta, distributed=self.distributed,
                         group=self.group)

    def __repr__(self):
        return (f"ESIScores(tensors={len(self._shapes)}, weights={self.numel()}, objective={self.meta.get('objective')!r}"
                f"{', distributed' if self.distributed else ''})")

    # -- selection ---------------------------------------------------------------------------------
    def _mask_from_local(self, masks: Sequence[Tensor], meta: dict) -> SafetyMask:
        if not self.distributed:
            return SafetyMask.from_dense({n: m for n, m in zip(self._scores, masks)}, meta=meta)
        lay = self.layout()
        parts = [m.reshape(-1).nonzero().squeeze(1).cpu() + lay.elem_begin[n] + self._flat_start[n]
                 for n, m in zip(self._scores, masks)]
        mine = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        allg = torch.cat(all_gather_varlen(mine, self.group))
        return SafetyMask.from_global_indices(self._shapes, allg, meta=meta)

    def _select_local(self, scores: list[Tensor], k: int, largest: bool, hist: Tensor | None) -> list[Tensor]:
        if self.distributed:
            return distributed_select(scores, self.layout(), k, largest=largest, hist=hist, group=self.group)
        return select_topk(scores, k, largest=largest, hist=hist) if scores else []

    def select(self, fraction: float | None = None, *, k: int | None = None, largest: bool = True) -> SafetyMask:
        """The exact global top-k weights as a `SafetyMask` (k = round(fraction · eligible weights)).

        `fraction` defaults to the scoring config's (0.01). ``largest=False`` picks the k lowest scores
        (a control). Ties at the threshold go to the lower global index: tensor order (as in
        ``named_parameters``), then flat index. Radix select over the histogram; never a full sort.
        """
        if fraction is None and k is None:
            fraction = self.meta.get("config", {}).get("fraction", 0.01)
        k = selection_size(k, fraction, self.numel(), "ESIScores.select")
        scores = list(self._scores.values())
        masks = self._select_local(scores, k, largest, self._hist if largest else None)
        meta = {"selection": "top" if largest else "bottom", "k": k, "total": self.numel(),
                "objective": self.meta.get("objective"), "num_prompts": self.meta.get("num_prompts")}
        return self._mask_from_local(masks, meta)

    def random_mask(self, fraction: float | None = None, *, k: int | None = None, seed: int = 0) -> SafetyMask:
        """A seeded uniformly random mask of exactly k weights over the same tensors (the control).

        Identical for any sharding and to ``SafetyMask.random_like(self.shapes, k, seed=seed)``.
        """
        if fraction is None and k is None:
            fraction = self.meta.get("config", {}).get("fraction", 0.01)
        k = selection_size(k, fraction, self.numel(), "ESIScores.random_mask")
        noise = []
        for n, t in self._scores.items():
            full = selection_noise(n, self._shapes[n], seed).reshape(-1)
            s = self._flat_start[n]
            noise.append(full[s: s + t.numel()].reshape(t.shape).to(t.device))
        masks = self._select_local(noise, k, True, None)
        return self._mask_from_local(masks, {"selection": "random", "seed": int(seed), "k": k, "total": self.numel()})

    # -- gathering and files -----------------------------------------------------------------------
    def full(self) -> "ESIScores":
        """Single-process scores with every full tensor (a collective under torch.distributed)."""
        if not self.distributed:
            return self
        out = {}
        for n in self.names:
            numel = math.prod(self._shapes[n])
            piece = self._scores.get(n)
            if piece is None:
                piece_flat, start = torch.zeros(0), torch.tensor([-1], dtype=torch.int64)
            else:
                piece_flat, start = piece.reshape(-1).float().cpu(), torch.tensor([self._flat_start[n]], dtype=torch.int64)
            starts = all_gather_varlen(start, self.group)
            pieces = all_gather_varlen(piece_flat, self.group)
            full = torch.zeros(numel, dtype=torch.float32)
            for s, p in zip(starts, pieces):
                if int(s) >= 0 and p.numel():
                    full[int(s): int(s) + p.numel()] = p
            out[n] = full.view(self._shapes[n])
        return ESIScores(out, shapes=self._shapes, meta=self.meta)

    def save(self, path: str) -> str:
        """Write the (full) scores as safetensors; under torch.distributed gathers them and rank 0 writes."""
        full = self.full()
        if world(self.group)[0] != 0 and self.distributed:
            return path
        tensors = {n: t.detach().contiguous().cpu().clone() for n, t in full._scores.items()}
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "order": json.dumps(self.names),
                "meta": json.dumps(self.meta)}
        return save_safetensors(tensors, path, meta)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> "ESIScores":
        """Read scores written by `save` (single-process, full tensors)."""
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as f:
            md = check_file_format(f.metadata(), FORMAT, FORMAT_VERSION, path, "ESIScores.load", "an ESI scores file")
            order = json.loads(md["order"])
            scores = {n: f.get_tensor(n) for n in order}
        return cls(scores, meta=json.loads(md.get("meta", "{}")))
