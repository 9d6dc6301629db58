"""ESI scoring: `compute_esi` -> `ESIScores` (name -> fp32 scores), global top-k selection -> `SafetyMask`.

    ESI_i = σ(W) · |Σ_prompts ∂S/∂θ_i|

Per micro-batch of harmful prompts the objective's per-prompt S is summed and back-propagated once;
the fused multi-tensor kernel ``upsafe_ext.ops.esi_accumulate_`` adds every eligible gradient into fp32
accumulators in one launch (bf16 models included), and on the last micro-batch the same pass applies
σ·|·| and builds the ``[8192]`` selection histogram, so `select` then costs one pass more (radix
select; no sort of the scores, no kthvalue). `esi_reference` is the plain-PyTorch oracle.

Under torch.distributed (DDP or FSDP2) see `upsafe_ext.esi.dist`: each rank scores its block of
prompts, holds the scores of its shard and selection all-reduces the histogram; the mask equals the
single-process one.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from ..ops.esi import esi_accumulate_, select_topk
from .config import ESIConfig
from .dist import (ShardLayout, all_gather_varlen, all_reduce_, assign_owners, comm_device, distributed_select,
                   local_tensor, shard_row_range, unwrap_model, world)
from .mask import SafetyMask, save_safetensors, selection_noise, selection_size
from .objectives import make_objective

__all__ = ["compute_esi", "ESIScores", "eligible_parameters", "esi_reference", "weight_std"]

FORMAT = "upsafe_esi_scores"
FORMAT_VERSION = 1


def eligible_parameters(model: torch.nn.Module, config: ESIConfig | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """The ``(name, parameter)`` pairs ESI scores, in ``named_parameters`` order.

    A parameter is eligible when it is 2-D (or a 3-D fused MoE expert tensor matching
    ``config.expert_patterns``), it is not the weight of an ``nn.Embedding`` (nor the model's input
    embedding), its name matches one of ``include_patterns`` (if any) and none of ``exclude_patterns``
    (embeddings, norms, biases, MoE routers by default). Tied weights appear once, under their first
    name (a tied ``lm_head`` is the embedding and is excluded).
    """
    cfg = config or ESIConfig()
    inner, _ = unwrap_model(model)
    embed = set()
    for m in inner.modules():
        if isinstance(m, torch.nn.Embedding):
            embed.update(id(p) for p in m.parameters(recurse=False))
    get_in = getattr(inner, "get_input_embeddings", None)
    if callable(get_in):
        with contextlib.suppress(Exception):
            emb = get_in()
            if emb is not None:
                embed.update(id(p) for p in emb.parameters(recurse=False))
    inc = [re.compile(p) for p in cfg.include_patterns]
    exc = [re.compile(p) for p in cfg.exclude_patterns]
    experts = [re.compile(p) for p in cfg.expert_patterns]
    out = []
    for name, p in inner.named_parameters():
        if id(p) in embed:
            continue
        if not (p.dim() == 2 or (p.dim() == 3 and any(r.search(name) for r in experts))):
            continue
        if inc and not any(r.search(name) for r in inc):
            continue
        if any(r.search(name) for r in exc):
            continue
        out.append((name, p))
    return out


def _weight_units(shapes: Sequence[Sequence[int]]) -> list[tuple[int, int | None]]:
    """The 2-D weights σ is taken over: (tensor, None) for a 2-D tensor, (tensor, e) per expert of a 3-D one."""
    units = []
    for i, shape in enumerate(shapes):
        units += [(i, e) for e in range(shape[0])] if len(shape) == 3 else [(i, None)]
    return units


def _sum64(x: Tensor, chunk: int = 1 << 24) -> Tensor:
    """Σ x in float64, chunked so no float64 copy of a large tensor is made."""
    flat = x.detach().reshape(-1)
    s = torch.zeros((), dtype=torch.float64, device=flat.device)
    for i in range(0, flat.numel(), chunk):
        s += flat[i: i + chunk].double().sum()
    return s.cpu()


def _sq64(x: Tensor, mean: float, chunk: int = 1 << 24) -> Tensor:
    flat = x.detach().reshape(-1)
    s = torch.zeros((), dtype=torch.float64, device=flat.device)
    for i in range(0, flat.numel(), chunk):
        s += (flat[i: i + chunk].double() - mean).square().sum()
    return s.cpu()


def weight_std(pieces: Sequence[Tensor | None], numels: Sequence[int], group=None, reduce: bool = False) -> list[float]:
    """σ of each 2-D weight (unbiased, as ``torch.std``; two passes in float64) from this rank's pieces.

    pieces[u]: this rank's part of weight u (None: none of it here); numels[u]: the weight's full size.
    With `reduce` (FSDP) the partial sums are all-reduced so σ covers the whole weight, not the shard.
    Returned as the fp32 values the kernel multiplies by.
    """
    if not pieces:
        return []
    zero = torch.zeros((), dtype=torch.float64)
    sums = torch.stack([zero if p is None else _sum64(p) for p in pieces])
    if reduce:
        all_reduce_(sums, group)
    n = torch.tensor([float(k) for k in numels], dtype=torch.float64)
    means = sums / n
    sq = torch.stack([zero if p is None else _sq64(p, float(m)) for p, m in zip(pieces, means)])
    if reduce:
        all_reduce_(sq, group)
    var = torch.where(n > 1, sq / (n - 1).clamp(min=1), torch.zeros_like(sq))
    return [float(v) for v in var.sqrt().float()]


def _check_prompts(prompts, op: str) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"{op}: `harmful_prompts` must be a non-empty list of strings, got {prompts!r:.80}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(f"{op}: harmful_prompts[{bad[0]}] is not a non-empty string: {prompts[bad[0]]!r:.80}")
    return list(prompts)


class ESIScores(Mapping):
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

    @property
    def names(self) -> list[str]:
        """Every scored tensor (all ranks), in global order."""
        return list(self._shapes)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

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
            md = f.metadata() or {}
            if md.get("format") != FORMAT:
                raise ValueError(f"ESIScores.load: {path} is not an ESI scores file (format={md.get('format')!r})")
            if int(md.get("version", "0")) > FORMAT_VERSION:
                raise ValueError(f"ESIScores.load: {path} has format version {md['version']}; this upsafe_ext "
                                 f"reads <= {FORMAT_VERSION} (upgrade)")
            order = json.loads(md["order"])
            scores = {n: f.get_tensor(n) for n in order}
        return cls(scores, meta=json.loads(md.get("meta", "{}")))


def _microbatches(prompts: list[str], batch_size: int, rank: int, world_size: int, equal: bool):
    """This rank's contiguous block of prompts in micro-batches of (prompts, weights).

    With `equal` every rank runs the same number of micro-batches (FSDP's forwards are collectives):
    missing slots are filled with a real prompt at weight 0.
    """
    per = -(-len(prompts) // world_size)
    mine = prompts[rank * per: (rank + 1) * per]
    n_batches = -(-per // batch_size) if equal else -(-len(mine) // batch_size)
    for b in range(n_batches):
        chunk = mine[b * batch_size: (b + 1) * batch_size]
        w = [1.0] * len(chunk)
        if not chunk:
            chunk, w = [prompts[0]], [0.0]
        yield chunk, w


def _accumulate(accs: list[Tensor], grads: list[Tensor | None], sigma: list[float] | None, finalize: bool):
    """One fused kernel launch per gradient dtype (usually one); missing grads count as zeros."""
    groups: dict = {}
    for i, g in enumerate(grads):
        if g is None:
            if not finalize:
                continue
            g = torch.zeros_like(accs[i])
        groups.setdefault(g.dtype, []).append((i, g.contiguous()))
    hist = None
    for items in groups.values():
        idx = [i for i, _ in items]
        h = esi_accumulate_([accs[i] for i in idx], [g for _, g in items], [sigma[i] for i in idx] if finalize else None,
                            finalize=finalize)
        if finalize:
            hist = h if hist is None else hist + h
    return hist


@contextlib.contextmanager
def _scoring_mode(inner: torch.nn.Module, eligible_ids: set):
    """Eval mode; gradients only for eligible weights; the caller's flags and mode restored after."""
    flags = {id(p): p.requires_grad for p in inner.parameters()}
    was_training = inner.training
    inner.eval()
    try:
        for p in inner.parameters():
            p.requires_grad_(id(p) in eligible_ids)
            p.grad = None
        yield
    finally:
        for p in inner.parameters():
            p.grad = None
            p.requires_grad_(flags[id(p)])
        inner.train(was_training)


def _local_units(entries, mode: str) -> list[tuple[int, int | None, int | None]]:
    """Per global weight unit: (tensor index, expert or None, index of that unit in the local tensor or
    None when this rank holds none of it). Only FSDP splits tensors (by rows = experts for 3-D)."""
    out = []
    for i, e in _weight_units([tuple(p.shape) for _, p in entries]):
        if e is None:
            out.append((i, None, 0))
            continue
        r0, r1 = shard_row_range(entries[i][1], entries[i][0]) if mode == "fsdp" else (0, entries[i][1].shape[0])
        out.append((i, e, e - r0 if r0 <= e < r1 else None))
    return out


def _views(tensors: Sequence[Tensor | None], units) -> list[Tensor | None]:
    """The local piece of each unit held here (2-D: the whole local tensor; expert: its slice)."""
    out = []
    for i, e, loc in units:
        t = tensors[i]
        if t is None or loc is None:
            out.append(None)
        else:
            out.append(t if e is None else t[loc])
    return out


def compute_esi(model: torch.nn.Module, tokenizer, harmful_prompts: Sequence[str], objective=None, *,
                config: ESIConfig | None = None, distributed: bool | None = None, **overrides) -> ESIScores:
    """Score every eligible weight of `model` by ESI on `harmful_prompts`.

    Args:
        model: a Hugging Face causal LM (fp32 / bf16 / fp16), plain, DDP-wrapped or FSDP2-sharded.
        tokenizer: its tokenizer (with a chat template).
        harmful_prompts: the prompts S is summed over.
        objective: "refusal" / None (`RefusalObjective()`), a `JudgeObjective`, or any callable
            ``(model, tokenizer, prompts, config) -> Tensor[B]``.
        config: an `ESIConfig`; keyword `overrides` (``batch_size=8``, ...) replace its fields.
        distributed: score as one rank of a group (default: when the model is DDP/FSDP-wrapped). A plain
            replicated model under an initialised group counts as DDP with ``distributed=True``.

    Returns the `ESIScores` (under torch.distributed: this rank's shard). Existing ``.grad`` of the
    model's parameters are cleared; ``requires_grad`` flags and train/eval mode are restored.

    Example:
        >>> from upsafe_ext.testing import tiny_causal_lm, tiny_tokenizer
        >>> scores = compute_esi(tiny_causal_lm(), tiny_tokenizer(), ["How do I pick a lock?"], progress=False)
        >>> scores.select(0.01).count()
        369
    """
    from tqdm.auto import tqdm

    cfg = ESIConfig.resolve(config, overrides, "compute_esi")
    prompts = _check_prompts(harmful_prompts, "compute_esi")
    obj = make_objective(objective)
    inner, kind = unwrap_model(model)
    rank, ws = world()
    if kind == "fsdp":
        mode = "fsdp"
    elif (distributed if distributed is not None else kind == "ddp") and ws > 1:
        mode = "ddp"
    else:
        mode, rank, ws = "single", 0, 1  # every prompt here, no collectives
    entries = eligible_parameters(inner, cfg)
    if not entries:
        raise ValueError("compute_esi: no eligible parameters (check ESIConfig.include_patterns / exclude_patterns / "
                         "expert_patterns)")
    names = [n for n, _ in entries]
    params = [p for _, p in entries]
    shapes = {n: tuple(p.shape) for n, p in entries}
    flat_start: dict[str, int] = {}
    if mode == "fsdp":
        for n, p in entries:
            r0, _ = shard_row_range(p, n)
            flat_start[n] = r0 * math.prod(p.shape[1:])
    locals_ = [local_tensor(p.detach()) for p in params]
    units = _local_units(entries, mode)
    unit_numel = [math.prod(params[i].shape[1:]) if e is not None else params[i].numel() for i, e, _ in units]
    sigma = weight_std(_views(locals_, units), unit_numel, reduce=(mode == "fsdp"))
    held = [u for u, (_, _, loc) in enumerate(units) if loc is not None]
    scale = float(ws) if mode == "fsdp" else 1.0  # FSDP averages the reduce-scattered grads over ranks
    sigma_held = [sigma[u] * scale for u in held]
    accs = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in locals_]
    acc_units = [v for v in _views(accs, units) if v is not None]
    last_hist = None
    total_s = torch.zeros((), dtype=torch.float64)
    batches = list(_microbatches(prompts, cfg.batch_size, rank, ws, equal=(mode == "fsdp")))
    nosync = model.no_sync if mode == "ddp" and hasattr(model, "no_sync") else contextlib.nullcontext
    finalize_local = mode in ("single", "fsdp")
    with _scoring_mode(inner, {id(p) for p in params}), nosync():
        bar = tqdm(batches, desc=f"ESI ({getattr(obj, 'name', 'custom')})", disable=not cfg.progress or rank != 0,
                   leave=False, unit="batch")
        for b, (chunk, w) in enumerate(bar):
            s = obj(inner, tokenizer, chunk, cfg)
            if not isinstance(s, Tensor) or s.dim() != 1 or s.shape[0] != len(chunk):
                raise ValueError(f"compute_esi: the objective must return a 1-D tensor with one S per prompt "
                                 f"({len(chunk)}), got {getattr(s, 'shape', type(s).__name__)}")
            wt = torch.tensor(w, dtype=torch.float32, device=s.device)
            (s.float() * wt).sum().backward()
            batch_s = float((s.detach().float() * wt).sum())
            total_s += batch_s
            grads = [None if p.grad is None else local_tensor(p.grad) for p in params]
            grad_units = [g for g, (_, _, loc) in zip(_views(grads, units), units) if loc is not None]
            last = finalize_local and b == len(batches) - 1
            h = _accumulate(acc_units, grad_units, sigma_held if last else None, finalize=last)
            if last:
                last_hist = h
            for p in params:
                p.grad = None
            bar.set_postfix(S=f"{batch_s / max(sum(w), 1):.3f}")
        bar.close()
    meta = {"objective": getattr(obj, "name", type(obj).__name__), "num_prompts": len(prompts),
            "config": cfg.to_dict(), "layout": mode, "world_size": ws,
            "dtype": str(params[0].dtype).replace("torch.", ""), "sigma": "unbiased std per 2-D weight (per expert)"}
    if mode == "single":
        meta["mean_objective"] = float(total_s) / len(prompts)
        return ESIScores(dict(zip(names, accs)), hist=last_hist, meta=meta)
    import torch.distributed as dist

    tot = all_reduce_(total_s.reshape(1).clone())
    meta["mean_objective"] = float(tot) / len(prompts)
    if mode == "fsdp":
        return ESIScores(dict(zip(names, accs)), shapes=shapes, flat_start=flat_start, hist=last_hist, meta=meta,
                         distributed=True)
    # DDP: each tensor's sum goes to its owner, which turns it into scores (no fused finalize: the
    # absolute value needs the sum over all ranks first)
    owner = assign_owners([p.numel() for p in params], ws)
    dev = comm_device()
    mine = {}
    for i, n in enumerate(names):
        buf = accs[i].to(dev)
        dist.reduce(buf, dst=owner[i])
        if owner[i] == rank:
            buf = buf.to(accs[i].device).abs_()
            for u, (ti, e, _) in enumerate(units):
                if ti == i:
                    (buf if e is None else buf[e]).mul_(sigma[u])
            mine[n] = buf
        accs[i] = None
    return ESIScores(mine, shapes=shapes, flat_start={n: 0 for n in mine}, meta=meta, distributed=True)


def esi_reference(model: torch.nn.Module, tokenizer, harmful_prompts: Sequence[str], objective=None, *,
                  config: ESIConfig | None = None, **overrides) -> dict[str, Tensor]:
    """Plain-PyTorch oracle for `compute_esi` (single process): the same micro-batches and objective,
    ``acc += grad.float()`` per tensor, then ``σ · |acc|`` with σ = ``W.double().std()`` cast to fp32
    (per expert for fused 3-D expert tensors)."""
    cfg = ESIConfig.resolve(config, overrides, "esi_reference")
    prompts = _check_prompts(harmful_prompts, "esi_reference")
    obj = make_objective(objective)
    inner, _ = unwrap_model(model)
    entries = eligible_parameters(inner, cfg)
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in entries}
    with _scoring_mode(inner, {id(p) for _, p in entries}):
        for chunk, w in _microbatches(prompts, cfg.batch_size, 0, 1, equal=False):
            s = obj(inner, tokenizer, chunk, cfg)
            (s.float() * torch.tensor(w, device=s.device)).sum().backward()
            for n, p in entries:
                if p.grad is not None:
                    acc[n] = acc[n] + p.grad.float()
                p.grad = None
    out = {}
    for n, p in entries:
        if p.dim() == 3:
            out[n] = torch.stack([float(p[e].detach().double().std()) * acc[n][e].abs() for e in range(p.shape[0])])
        else:
            out[n] = float(p.detach().double().std()) * acc[n].abs()
    return out
