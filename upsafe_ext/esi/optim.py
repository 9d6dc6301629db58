"""SparseAdamW: AdamW restricted by a `SafetyMask`, for SET (train only the masked weights) and SPA
(train everything except them).

* ``mode="set"``: Adam moments exist ONLY for the selected elements: compact fp32 ``m``/``v`` gathered
  by int32 flat index (8 bytes per selected weight, i.e. 1% of dense AdamW's moments for a 1% mask),
  plus an fp32 master copy when the parameter is bf16/fp16. One fused kernel launch per dtype
  (``upsafe_ext.ops.sparse_adamw_``) gathers the gradients, runs Adam and scatters the new values;
  nothing outside the mask is written.
* ``mode="spa"``: dense AdamW over every trained weight (fp32 master weights for bf16/fp16 params), with
  the gradients of the protected elements zeroed and their original values written back after every
  step, so they stay bitwise unchanged (weight decay included).

Norm weights and biases (tensors of rank < 2) are trained only with ``train_norm_bias=True`` (dense
AdamW, no weight decay). Works with the HF ``Trainer`` (``optimizers=(opt, None)``), plain loops
(``run_sft``), DDP (replicated) and FSDP2 (each rank updates its shard with the mask's indices that fall
in it). Build it before wrapping the model in DDP when ``freeze_untrained`` changes requires_grad.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..ops.esi import sparse_adamw_
from .dist import local_tensor, shard_row_range, unwrap_model
from .mask import SafetyMask

__all__ = ["SparseAdamW"]


def _check_float(name: str, v, lo: float, lo_open: bool, hi: float | None = None, hi_open: bool = True):
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (v > lo if lo_open else v >= lo)
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        raise ValueError(f"SparseAdamW: `{name}` must be a finite float {'>' if lo_open else '>='} {lo}"
                         f"{'' if hi is None else f' and < {hi}'}, got {v!r}")


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over the weights a `SafetyMask` selects (SET) or leaves free (SPA).

    Args:
        model: the model the mask was computed on (plain, DDP or FSDP2).
        mask: the `SafetyMask` (parameter names as in ``model.named_parameters()``).
        mode: "set" (update only masked weights) or "spa" (update all trainable weights except them).
        lr (float): learning rate. Default 1e-4.
        weight_decay (float): decoupled weight decay of the updated weight matrices. Default 0.0.
        betas (tuple[float, float]): Adam betas. Default (0.9, 0.999).
        eps (float): Adam epsilon. Default 1e-8.
        train_norm_bias (bool): also train norm weights and biases (dense, no decay). Default False.
        freeze_untrained (bool): set ``requires_grad=False`` on parameters this optimizer never updates
            (and True on those it does), so backward skips them. Default True. SPA trains only weight
            matrices that have ``requires_grad=True`` when the optimizer is built: weights the caller froze
            are never unfrozen (`run_set` / `run_spa` restore every flag when they return).

    Example:
        >>> opt = SparseAdamW(model, scores.select(0.01), mode="set", lr=1e-4)  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, optimizers=(opt, None), ...)  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, mask: SafetyMask, mode: str = "set", lr: float = 1e-4,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, *,
                 train_norm_bias: bool = False, freeze_untrained: bool = True):
        if not isinstance(mask, SafetyMask):
            raise ValueError(f"SparseAdamW: `mask` must be a SafetyMask, got {type(mask).__name__}")
        if mode not in ("set", "spa"):
            raise ValueError(f"SparseAdamW: `mode` must be 'set' or 'spa', got {mode!r}")
        _check_float("lr", lr, 0.0, False)
        _check_float("weight_decay", weight_decay, 0.0, False)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"SparseAdamW: `betas` must be a pair (beta1, beta2), got {betas!r}")
        _check_float("betas[0]", betas[0], 0.0, False, 1.0)
        _check_float("betas[1]", betas[1], 0.0, False, 1.0)
        _check_float("eps", eps, 0.0, True)
        mask.validate(model)
        inner, self.layout = unwrap_model(model)
        self.mode = mode
        self.mask = mask
        named = dict(inner.named_parameters())
        sparse, dense, normbias, names = [], [], [], {}
        for n, p in named.items():
            is_nb = p.dim() < 2
            if mode == "set":
                if n in mask and mask.count(n) > 0:
                    sparse.append(p)
                elif is_nb and train_norm_bias:
                    normbias.append(p)
            else:
                if is_nb:
                    if train_norm_bias:
                        normbias.append(p)
                elif p.requires_grad:  # a weight the caller froze stays frozen
                    dense.append(p)
            names[id(p)] = n
        if mode == "set" and not sparse:
            raise ValueError("SparseAdamW: the mask selects no weights of this model (count() == 0)")
        if mode == "spa" and not dense and not normbias:
            raise ValueError("SparseAdamW: no trainable weights for SPA")
        groups = []
        if sparse:
            groups.append({"params": sparse, "kind": "sparse", "weight_decay": weight_decay,
                           "names": [names[id(p)] for p in sparse]})
        if dense:
            groups.append({"params": dense, "kind": "dense", "weight_decay": weight_decay,
                           "names": [names[id(p)] for p in dense]})
        if normbias:
            groups.append({"params": normbias, "kind": "dense", "weight_decay": 0.0,
                           "names": [names[id(p)] for p in normbias]})
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        if freeze_untrained:
            trained = {id(p) for g in self.param_groups for p in g["params"]}
            for p in inner.parameters():
                p.requires_grad_(id(p) in trained)
        for g in self.param_groups:
            for p, n in zip(g["params"], g["names"]):
                self._init_state(p, n, g["kind"])

    # -- state ---------------------------------------------------------------------------------------
    def _local_indices(self, p: Tensor, name: str) -> Tensor:
        """The mask's flat indices of `name` inside this rank's piece of `p` (int64)."""
        idx = self.mask.indices(name) if name in self.mask else torch.zeros(0, dtype=torch.int64)
        r0, r1 = shard_row_range(p, name)
        row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
        lo, hi = r0 * row, r1 * row
        if lo == 0 and hi == p.numel():
            return idx
        return idx[(idx >= lo) & (idx < hi)] - lo

    def _init_state(self, p: Tensor, name: str, kind: str) -> None:
        loc = local_tensor(p.detach())
        if not loc.is_contiguous():
            raise ValueError(f"SparseAdamW: parameter {name!r} is not contiguous")
        st = self.state[p]
        st["step"] = torch.zeros((), dtype=torch.float32)
        if kind == "sparse":
            idx = self._local_indices(p, name).to(loc.device)
            if loc.numel() >= 2 ** 31:
                raise ValueError(f"SparseAdamW: parameter {name!r} has {loc.numel()} elements; the SET kernel "
                                 "indexes with int32 (< 2^31)")
            st["idx"] = idx.to(torch.int32)
            st["exp_avg"] = torch.zeros(idx.numel(), dtype=torch.float32, device=loc.device)
            st["exp_avg_sq"] = torch.zeros(idx.numel(), dtype=torch.float32, device=loc.device)
            if loc.dtype != torch.float32:
                st["master"] = loc.reshape(-1)[idx].float()
        else:
            st["exp_avg"] = torch.zeros(loc.shape, dtype=torch.float32, device=loc.device)
            st["exp_avg_sq"] = torch.zeros(loc.shape, dtype=torch.float32, device=loc.device)
            if loc.dtype != torch.float32:
                st["master"] = loc.float()
            if self.mode == "spa" and name in self.mask and self.mask.count(name) > 0:
                prot = self._local_indices(p, name).to(loc.device)
                st["protected_idx"] = prot
                st["protected_val"] = loc.reshape(-1)[prot].clone()

    def state_nbytes(self) -> int:
        """Bytes held in optimizer state tensors (moments, master copies, indices, protected values)."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values()
                   if isinstance(t, Tensor))

    def dense_adamw_nbytes(self) -> int:
        """Bytes dense fp32 AdamW moments (exp_avg + exp_avg_sq) would take for the same tensors."""
        return sum(8 * local_tensor(p.detach()).numel() for g in self.param_groups for p in g["params"])

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to the parameter dtype on load; SET/SPA state is fp32 by design
        # (bf16 params keep fp32 moments and master weights), so it is put back as saved.
        saved = {pid: dict(st) for pid, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        for g_saved, g in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(g_saved["params"], g["params"]):
                if pid in saved:
                    dev = local_tensor(p.detach()).device
                    self.state[p] = {k: (v.to(dev) if isinstance(v, Tensor) and k != "step" else v)
                                     for k, v in saved[pid].items()}

    # -- step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (the closure, if given, is re-evaluated with gradients enabled)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            if g["kind"] == "sparse":
                self._sparse_step(g)
            else:
                self._dense_step(g)
        return loss

    def _sparse_step(self, g: dict) -> None:
        buckets: dict = {}
        for p in g["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            st["step"] += 1
            if st["idx"].numel() == 0:
                continue
            loc = local_tensor(p.detach())
            grad = local_tensor(p.grad)
            if grad.dtype != loc.dtype:
                grad = grad.to(loc.dtype)
            buckets.setdefault((loc.dtype, loc.device, int(st["step"])), []).append((p, loc, grad.contiguous()))
        b1, b2 = g["betas"]
        for (dtype, _, step), items in buckets.items():
            params, grads, idx, m, v, master = [], [], [], [], [], []
            for p, loc, grad in items:
                st = self.state[p]
                params.append(loc)
                grads.append(grad)
                idx.append(st["idx"])
                m.append(st["exp_avg"])
                v.append(st["exp_avg_sq"])
                # fp32 params are their own master: gather the selected values (a temporary)
                master.append(st["master"] if "master" in st else loc.reshape(-1)[st["idx"].long()])
            sparse_adamw_(params, grads, idx, m, v, master, lr=g["lr"], beta1=b1, beta2=b2, eps=g["eps"],
                          weight_decay=g["weight_decay"], step=step)

    def _dense_step(self, g: dict) -> None:
        b1, b2 = g["betas"]
        lr, wd, eps = g["lr"], g["weight_decay"], g["eps"]
        for p in g["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            st["step"] += 1
            step = int(st["step"])
            loc = local_tensor(p.detach())
            grad = local_tensor(p.grad).float()
            prot = st.get("protected_idx")
            if prot is not None and prot.numel():
                if grad.data_ptr() == local_tensor(p.grad).data_ptr():
                    grad = grad.clone()
                grad.view(-1)[prot] = 0.0
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            w = st["master"] if "master" in st else loc
            if wd:
                w.mul_(1 - lr * wd)
            denom = (v / (1 - b2 ** step)).sqrt_().add_(eps)
            w.addcdiv_(m, denom, value=-lr / (1 - b1 ** step))
            if prot is not None and prot.numel():
                w.view(-1)[prot] = st["protected_val"].to(w.dtype)
            if "master" in st:
                loc.copy_(w)
            if prot is not None and prot.numel():
                loc.view(-1)[prot] = st["protected_val"]  # bitwise the original values
