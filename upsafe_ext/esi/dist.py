"""torch.distributed plumbing for ESI: wrapped-model detection, local shards, and the distributed
exact top-k selection.

Two layouts are supported (gloo or NCCL):

* **DDP** (``DistributedDataParallel``, or any replicated model with ``distributed=True``): every rank
  holds every weight. Each rank scores its block of prompts into fp32 accumulators (no gradient
  all-reduce), then every tensor's accumulator is *reduced to one owner rank* (tensors are assigned to
  ranks greedily by size), which turns it into scores. A rank's "shard" is the set of tensors it owns.
* **FSDP2** (``fully_shard``; 1-D device mesh, ``Shard(0)`` placements): each rank holds rows
  ``[r0, r1)`` of every weight, i.e. one contiguous flat range. FSDP's reduce-scatter sums (averages)
  the gradients of all ranks' prompts into the local shard, so accumulation and finalisation stay local;
  σ of the *full* tensor comes from all-reduced moments.

Selection (`distributed_select`): the ``[8192]`` histogram is all-reduced, every rank finds the same
threshold bin, marks its elements above it and collects its candidates in that bin as 64-bit keys
``(inverted low score bits << 40) | global index`` (the kernel's own key, with the local index rewritten
to the global one: tensor order as in ``named_parameters``, then flat index). Each rank keeps only its
``need`` smallest keys, these are all-gathered and sorted, and the first ``need`` win. The result is the
exact single-process top-k with the same tie rule (`upsafe_ext.ops.select_topk` runs the one-rank case
of this in one process).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..ops.esi import IDX_MASK, NUM_BINS, esi_histogram, threshold_bin

__all__ = ["world", "unwrap_model", "local_tensor", "shard_row_range", "ShardLayout", "distributed_select",
           "all_gather_varlen", "all_reduce_", "comm_device", "assign_owners"]


def world(group=None) -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return isinstance(t, DTensor)


def unwrap_model(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(module whose parameter names are the model's own, layout): layout is "ddp", "fsdp" or "single".

    DDP's ``module`` is unwrapped; an FSDP2 model (``fully_shard``) is its own module; torch.compile's
    ``_orig_mod`` is unwrapped too.
    """
    from torch.nn.parallel import DistributedDataParallel

    inner = model
    for _ in range(4):
        if isinstance(inner, DistributedDataParallel):
            return getattr(inner.module, "_orig_mod", inner.module), "ddp"
        if hasattr(inner, "_orig_mod") and isinstance(inner._orig_mod, torch.nn.Module):
            inner = inner._orig_mod
            continue
        break
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()
    if isinstance(inner, FSDPModule) or any(_is_dtensor(p) for p in inner.parameters()):
        return inner, "fsdp"
    return inner, "single"


def local_tensor(t: Tensor) -> Tensor:
    """The local piece of a DTensor (a view sharing its storage), or `t` itself."""
    return t.to_local() if _is_dtensor(t) else t


def shard_row_range(p: Tensor, name: str) -> tuple[int, int]:
    """Rows ``[r0, r1)`` of dim 0 that this rank holds of an FSDP2 parameter (all rows otherwise).

    FSDP2 shards dim 0 like ``torch.chunk``: chunk = ceil(rows / world), rank r holds
    ``[r·chunk, min((r+1)·chunk, rows))``. Only 1-D meshes with a ``Shard(0)`` placement are supported.
    """
    if not _is_dtensor(p):
        return 0, (p.shape[0] if p.dim() else 1)
    from torch.distributed.tensor import Shard

    placements = tuple(p.placements)
    if p.device_mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"ESI: parameter {name!r} is a DTensor with placements {placements} on a "
                         f"{p.device_mesh.ndim}-D mesh; only FSDP2's Shard(0) on a 1-D mesh is supported")
    n = p.device_mesh.size()
    coord = p.device_mesh.get_local_rank()
    rows = p.shape[0]
    chunk = -(-rows // n) if rows else 0
    r0 = min(coord * chunk, rows)
    r1 = min(r0 + chunk, rows)
    local = p.to_local()
    if local.shape[0] != r1 - r0 or tuple(local.shape[1:]) != tuple(p.shape[1:]):
        raise ValueError(f"ESI: parameter {name!r}: local shard shape {tuple(local.shape)} does not match the "
                         f"torch.chunk layout rows [{r0}, {r1}) of {tuple(p.shape)}")
    return r0, r1


def assign_owners(numels: Sequence[int], world_size: int) -> list[int]:
    """Deterministic greedy size balancing: largest tensor first to the least-loaded rank (lowest rank
    on ties). Every rank computes the same assignment."""
    load = [0] * world_size
    owner = [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda j: (-numels[j], j)):
        r = min(range(world_size), key=lambda q: (load[q], q))
        owner[i] = r
        load[r] += numels[i]
    return owner


def comm_device(group=None) -> torch.device:
    """Where collectives' tensors must live: CPU for gloo, the current CUDA device for NCCL."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(t: Tensor, group=None) -> Tensor:
    """Sum-all-reduce `t` in place, via the backend's device when `t` lives elsewhere."""
    import torch.distributed as dist

    dev = comm_device(group)
    if t.device == dev:
        dist.all_reduce(t, group=group)
    else:
        buf = t.to(dev)
        dist.all_reduce(buf, group=group)
        t.copy_(buf)
    return t


def all_gather_varlen(t: Tensor, group=None) -> list[Tensor]:
    """All-gather 1-D tensors of different lengths (one per rank), in rank order, on `t`'s device."""
    import torch.distributed as dist

    _, ws = world(group)
    home, dev = t.device, comm_device(group)
    t = t.to(dev)
    n = torch.tensor([t.numel()], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(ws)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s.item()) for s in sizes]
    width = max(sizes) if sizes else 0
    padded = torch.zeros(width, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    out = [torch.zeros_like(padded) for _ in range(ws)]
    dist.all_gather(out, padded, group=group)
    return [o[:s].to(home) for o, s in zip(out, sizes)]


@dataclass
class ShardLayout:
    """Where this rank's score tensors sit in the global element order.

    names: every eligible parameter, in order; shapes: their full shapes; local: names this rank holds
    (a piece of); flat_start: for each local name, the flat index (in the full tensor) of the local
    piece's first element. The global index of element i of the local piece of `name` is
    ``elem_begin[name] + flat_start[name] + i``.
    """

    names: list
    shapes: dict
    local: list
    flat_start: dict

    def __post_init__(self):
        self.elem_begin = {}
        total = 0
        for n in self.names:
            self.elem_begin[n] = total
            total += math.prod(self.shapes[n])
        self.total = total

    def local_offsets(self, local_numels: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(start of each local tensor in the concatenated local order, its global start)."""
        starts, gstarts, acc = [], [], 0
        for n, k in zip(self.local, local_numels):
            starts.append(acc)
            gstarts.append(self.elem_begin[n] + self.flat_start[n])
            acc += k
        return torch.tensor(starts, dtype=torch.int64), torch.tensor(gstarts, dtype=torch.int64)


def _local_to_global(idx: Tensor, starts: Tensor, gstarts: Tensor) -> Tensor:
    t = torch.searchsorted(starts, idx, right=True) - 1
    return gstarts[t] + (idx - starts[t])


def _global_to_local(gidx: Tensor, starts: Tensor, gstarts: Tensor, numels: Tensor) -> Tensor:
    """Local concatenated index of each global index held here (others dropped)."""
    nonempty = numels > 0  # an empty piece can share its global start with the next tensor's piece
    starts, gstarts, numels = starts[nonempty], gstarts[nonempty], numels[nonempty]
    if gidx.numel() == 0 or starts.numel() == 0:
        return gidx.new_empty(0)
    order = torch.argsort(gstarts)
    gs, ls, ns = gstarts[order], starts[order], numels[order]
    t = (torch.searchsorted(gs, gidx, right=True) - 1).clamp(min=0)
    off = gidx - gs[t]
    keep = (off >= 0) & (off < ns[t])
    return (ls[t] + off)[keep]


def distributed_select(scores: Sequence[Tensor], layout: ShardLayout, k: int, largest: bool = True,
                       hist: Tensor | None = None, group=None) -> list[Tensor]:
    """Exact global top-`k` over the scores of all ranks; returns this rank's bool masks.

    scores: this rank's local score pieces (fp32, in ``layout.local`` order); hist: their local
    (not yet reduced) histogram if the finalize pass built it (for ``largest=True``).
    """
    scores = list(scores)
    if not 0 <= k <= layout.total:
        raise ValueError(f"select: `k` must be in [0, {layout.total}], got {k}")
    dev = scores[0].device if scores else torch.device("cpu")
    invert = not largest
    if k == 0 or k == layout.total:
        return [torch.full_like(s, k == layout.total, dtype=torch.bool) for s in scores]
    local_hist = (hist if hist is not None and largest else esi_histogram(scores, invert=invert) if scores
                  else torch.zeros(NUM_BINS, dtype=torch.int64))
    h = all_reduce_(local_hist.to(torch.int64).clone(), group).cpu().tolist()
    threshold, above = threshold_bin(h, k)
    need = k - above
    local_count = int(local_hist[threshold].item())
    starts, gstarts = layout.local_offsets([s.numel() for s in scores])
    if scores:
        masks, cand, count = torch.ops.upsafe.esi_select.default(scores, threshold, local_count, invert)
        if int(count.item()) != local_count:
            raise RuntimeError(f"select: histogram says {local_count} local candidates, select found {int(count.item())}")
        cand = cand[:local_count].cpu()
        gidx = _local_to_global(cand & IDX_MASK, starts, gstarts)
        keys = (cand & ~IDX_MASK) | gidx
        keys = torch.sort(keys).values[:need]  # a rank never contributes more than `need` winners
    else:
        masks, keys = [], torch.zeros(0, dtype=torch.int64)
    allk = torch.cat(all_gather_varlen(keys.cpu(), group))
    chosen = torch.sort(allk).values[:need] & IDX_MASK
    if scores:
        numels = torch.tensor([s.numel() for s in scores], dtype=torch.int64)
        mine = _global_to_local(chosen, starts, gstarts, numels)
        if mine.numel():
            torch.ops.upsafe.esi_mark_.default(masks, mine.to(dev))
    return list(masks)
