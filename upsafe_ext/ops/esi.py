"""ESI kernels: fused multi-tensor score accumulation, histogram radix selection, sparse AdamW.

Scores are non-negative fp32; their bit patterns order like the values, so an 8192-bin histogram of
the top 13 bits (built for free in the finalize pass) finds the bin holding the k-th largest score,
one more pass writes the masks and collects that bin's elements as candidates, and a sort of the
candidates alone settles the exact top-k. Ties at the threshold go to the lower global index
(tensor order as given, then flat index): deterministic, never a full sort, never kthvalue.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _ext

NUM_BINS = 8192
IDX_MASK = (1 << 40) - 1


def esi_accumulate_(accum: Sequence[Tensor], grads: Sequence[Tensor], sigma: Sequence[float] | None = None,
                    finalize: bool = False, invert: bool = False) -> Tensor | None:
    """``accum[i] += grads[i]`` for every tensor in one launch (fp32 accumulators; grads fp32/fp16/bf16,
    one dtype for the list). With ``finalize``: ``accum[i] = sigma[i] * |accum[i] + grads[i]|`` in place
    and the selection histogram ``[8192] int64`` of the scores is returned."""
    _ext.require("esi_accumulate_")
    hist = torch.ops.upsafe.esi_accumulate_.default(
        list(accum), list(grads), None if sigma is None else [float(s) for s in sigma], bool(finalize), bool(invert)
    )
    return hist if finalize else None


def esi_histogram(scores: Sequence[Tensor], invert: bool = False) -> Tensor:
    """The ``[8192] int64`` selection histogram of non-negative fp32 scores (one pass)."""
    _ext.require("esi_histogram")
    return torch.ops.upsafe.esi_histogram.default(list(scores), bool(invert))


def threshold_bin(hist: list[int], k: int) -> tuple[int, int]:
    """The histogram bin holding the k-th largest element, and how many elements lie in higher bins."""
    above = 0
    for b in range(len(hist) - 1, -1, -1):
        if above + hist[b] >= k:
            return b, above
        above += hist[b]
    return len(hist) - 1, above


def select_topk(scores: Sequence[Tensor], k: int, largest: bool = True, hist: Tensor | None = None) -> list[Tensor]:
    """Bool masks (one per score tensor) selecting exactly the global top-``k`` scores.

    ``largest=False`` selects the k smallest. Ties at the threshold go to the lower global index.
    Pass ``hist`` if the finalize pass already built it (then this costs one more pass over the scores).
    """
    scores = list(scores)
    total = sum(s.numel() for s in scores)
    if not 0 <= k <= total:
        raise ValueError(f"select_topk: `k` must be in [0, {total}], got {k}")
    if k == 0 or k == total:
        return [torch.full_like(s, k == total, dtype=torch.bool) for s in scores]
    invert = not largest
    if hist is None:
        hist = esi_histogram(scores, invert=invert)
    h = hist.cpu().tolist()
    threshold, above = threshold_bin(h, k)
    need = k - above
    masks, cand, count = torch.ops.upsafe.esi_select.default(scores, threshold, int(h[threshold]), invert)
    n = int(count.item())
    if n != h[threshold]:
        raise RuntimeError(f"select_topk: histogram says {h[threshold]} candidates, select found {n} (scores changed?)")
    chosen = torch.sort(cand[:n]).values[:need] & IDX_MASK
    torch.ops.upsafe.esi_mark_.default(masks, chosen)
    return masks


def select_topk_reference(scores: Sequence[Tensor], k: int, largest: bool = True) -> list[Tensor]:
    """Sort-based reference for :func:`select_topk` (same tie rule)."""
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    order = torch.sort(flat, descending=largest, stable=True).indices[:k]
    sel = torch.zeros_like(flat, dtype=torch.bool)
    sel[order] = True
    out, i = [], 0
    for s in scores:
        out.append(sel[i: i + s.numel()].view(s.shape))
        i += s.numel()
    return out


def sparse_adamw_(params: Sequence[Tensor], grads: Sequence[Tensor], idx: Sequence[Tensor], m: Sequence[Tensor],
                  v: Sequence[Tensor], master: Sequence[Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, step: int) -> None:
    """One AdamW step on the selected elements only: ``idx[i]`` int32 flat indices into ``params[i]``,
    compact fp32 ``m``/``v``/``master`` of the same length. Params outside ``idx`` are not touched."""
    _ext.require("esi_sparse_adamw_")
    torch.ops.upsafe.esi_sparse_adamw_.default(list(params), list(grads), list(idx), list(m), list(v), list(master),
                                              float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                                              int(step))


if _ext.loaded():

    @torch.library.register_fake("upsafe::esi_accumulate_")
    def _acc_fake(accum, grads, sigma, finalize, invert):
        dev = accum[0].device if accum else "cpu"
        return torch.empty((NUM_BINS if finalize else 0,), dtype=torch.int64, device=dev)

    @torch.library.register_fake("upsafe::esi_histogram")
    def _hist_fake(scores, invert):
        return torch.empty((NUM_BINS,), dtype=torch.int64, device=scores[0].device if scores else "cpu")

    @torch.library.register_fake("upsafe::esi_select")
    def _select_fake(scores, threshold_bin, capacity, invert):
        dev = scores[0].device if scores else "cpu"
        return ([torch.empty_like(s, dtype=torch.bool) for s in scores],
                torch.empty((capacity,), dtype=torch.int64, device=dev), torch.empty((1,), dtype=torch.int64, device=dev))

    @torch.library.register_fake("upsafe::esi_mark_")
    def _mark_fake(masks, indices):
        return None

    @torch.library.register_fake("upsafe::esi_sparse_adamw_")
    def _adam_fake(params, grads, idx, m, v, master, lr, beta1, beta2, eps, weight_decay, step):
        return None
