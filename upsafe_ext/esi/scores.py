"""ESI scoring: `compute_esi` -> `ESIScores` (name -> fp32 scores), global top-k selection -> `SafetyMask`.

    ESI_i = σ(W) · |Σ_prompts ∂S/∂θ_i|

Per micro-batch of harmful prompts the objective's per-prompt S is summed and back-propagated once;
the fused multi-tensor kernel ``upsafe_ext.ops.esi_accumulate_`` adds every eligible gradient into fp32
accumulators in one launch (bf16 models included), and on the last micro-batch the same pass applies
σ·|·| and builds the ``[8192]`` selection histogram, so `select` then costs one pass more (radix
select; no sort of the scores, no kthvalue). `esi_reference` is the plain-PyTorch oracle.

Under torch.distributed (DDP or FSDP2) see `upsafe_ext.esi.dist`: each rank scores its block of
prompts, holds the scores of its shard and selection all-reduces the histogram; the mask equals the
single-process one. The `ESIScores` class (selection, gathering, files) is in `upsafe_ext.esi.score_map`.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Sequence

import torch
from torch import Tensor

from ..ops.esi import esi_accumulate_
from .config import ESIConfig
from .dist import (all_reduce_, assign_owners, comm_device, local_tensor, shard_row_range, unwrap_model,
                   world)
from .objectives import make_objective
from .score_map import FORMAT, FORMAT_VERSION, ESIScores

__all__ = ["compute_esi", "ESIScores", "eligible_parameters", "esi_reference", "weight_std", "FORMAT",
           "FORMAT_VERSION"]


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
