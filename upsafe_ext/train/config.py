"""Training settings: the optimiser defaults the three methods share, and `UpSafeTrainConfig` (UpSafe°C's
two SFT stages as one serialisable config).

Shared defaults (every method's AdamW and loop start from these):

==================  ==========  ===============================================================
name                value       used by
==================  ==========  ===============================================================
ADAM_BETAS          (0.9, 0.999) UpSafe°C stages, ESI SET/SPA (`SparseTrainConfig.betas`)
ADAM_EPS            1e-8        all three
WEIGHT_DECAY        0.0         all three (short fine-tunes of a few weights: no decay needed)
MAX_GRAD_NORM       1.0         all three
BATCH_SIZE          8           all three
==================  ==========  ===============================================================

Differences, named and explained:

* Learning rate follows how much of the model a method trains: ``STAGE1_LR = 1e-4`` (UpSafe°C stage 1:
  the safety experts, copies of existing MLPs), ``STAGE2_LR = 1e-3`` (stage 2: only the small, freshly
  initialised routers), ``SPARSE_LR = 1e-4`` (ESI SET/SPA: ~1% of the weights, or all but them),
  ``FULL_SFT_LR = 2e-5`` (magic-token co-training: every weight of the model).
* ``FULL_SFT_BETAS = (0.9, 0.95)``: magic co-training updates the whole model, where the shorter β2
  memory is the usual choice for LLM fine-tuning (it reacts faster to the loss scale of new tokens).
* UpSafe°C stage 1 adds a load-balancing loss only when the router is trained with the experts
  (``route="router"``, coefficient ``STAGE1_LB_COEF = 0.01``, the Switch-Transformer value); stage 2
  supervises the router directly (``sup_coef``) and needs none.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._config import SerialisableConfig, check_bool, check_choice, check_float, check_int

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.0
MAX_GRAD_NORM = 1.0
BATCH_SIZE = 8
STAGE1_LR = 1e-4
STAGE2_LR = 1e-3
STAGE1_LB_COEF = 0.01
SPARSE_LR = 1e-4
FULL_SFT_LR = 2e-5
FULL_SFT_BETAS = (0.9, 0.95)
SEQUENCE_L2 = 0.3
"""L2 of the sequence-routing router fit (``upcycle.sequence``), chosen on val
(``benchmarks/val/sequence_routing_val.md``)."""

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Autocast names of the configs (``autocast`` fields) -> the torch dtype (None: autocast off)."""

CONFIG_VERSION = 1


def autocast_name(dtype) -> str:
    """The `AUTOCAST` name of a torch dtype (None -> "fp32")."""
    for name, dt in AUTOCAST.items():
        if dt == dtype:
            return name
    raise ValueError(f"autocast dtype must be one of None, torch.bfloat16, torch.float16; got {dtype!r}")


@dataclass
class UpSafeTrainConfig(SerialisableConfig):
    """Both UpSafe°C SFT stages (`upsafe_ext.train.upsafe.stage1` / `stage2`).

    Args:
        route (str): stage 1's routing: "safety" (τ=1, every token through the safety experts; ours) or
            "router" (the router chooses, with load balancing; paper-faithful). Default "safety".
        stage1_lr / stage2_lr (float): AdamW learning rates, > 0. Defaults `STAGE1_LR` (1e-4), `STAGE2_LR`
            (1e-3); see the module docstring for why they differ.
        weight_decay (float): AdamW weight decay, >= 0. Default 0.0.
        batch_size (int): examples per micro-batch. Default 8.
        epochs (float): passes over the examples of a stage (unless `max_steps`), > 0. Default 1.0.
        max_steps (int | None): optimizer steps per stage (overrides `epochs`). Default None.
        grad_accum (int): micro-batches per optimizer step. Default 1.
        stage1_lb_coef / stage2_lb_coef (float): load-balancing loss coefficients (stage 1 uses it only
            with route="router"). Defaults 0.01 and 0.0.
        sup_coef (float): stage 2's router-supervision loss coefficient. Default 1.0.
        warm_start (bool): stage 2 starts every router from a logistic probe (ours). Default True.
        sequence_l2 (float): L2 of stage 2's router fit for ``routing="sequence"`` models (a logistic probe
            on standardised features, ``upcycle.sequence.fit_sequence_routers``), > 0. Default 1.0 (chosen
            on val, ``benchmarks/val/sequence_routing_val.md``).
        sup_tokens (int | None): supervise only the assistant header and this many response tokens
            (None: all). Default None.
        system (str | None): system prompt of every training conversation (None: the template's own;
            "" is an empty system message, see `upsafe_ext.train.chat.chat`). Default None.
        max_length (int): token limit per example. Default 256.
        max_new_tokens (int): reply length when stage 2 generates the benign answers itself. Default 64.
        max_grad_norm (float): gradient clipping (0: off). Default 1.0.
        autocast (str): "fp32" (off), "bf16" or "fp16". Default "fp32".
        seed (int): data order and refusal phrasing. Default 0.
        progress (bool): progress bars. Default True.

    Example:
        >>> cfg = UpSafeTrainConfig(stage1_lr=2e-4, max_steps=50)
        >>> UpSafeTrainConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    route: str = field(default="safety", metadata={"help": "stage 1 routing: 'safety' or 'router'"})
    stage1_lr: float = field(default=STAGE1_LR, metadata={"help": "stage 1 (safety experts) learning rate"})
    stage2_lr: float = field(default=STAGE2_LR, metadata={"help": "stage 2 (routers) learning rate"})
    weight_decay: float = field(default=WEIGHT_DECAY, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=BATCH_SIZE, metadata={"help": "examples per micro-batch"})
    epochs: float = field(default=1.0, metadata={"help": "passes over a stage's examples"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps per stage (overrides epochs)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    stage1_lb_coef: float = field(default=STAGE1_LB_COEF, metadata={"help": "stage 1 load balancing (route='router')"})
    stage2_lb_coef: float = field(default=0.0, metadata={"help": "stage 2 load balancing"})
    sup_coef: float = field(default=1.0, metadata={"help": "stage 2 router supervision"})
    warm_start: bool = field(default=True, metadata={"help": "stage 2: logistic-probe router initialisation"})
    sequence_l2: float = field(default=SEQUENCE_L2, metadata={"help": "stage 2 L2 for routing='sequence' models"})
    sup_tokens: int | None = field(default=None, metadata={"help": "supervised response tokens (None: all)"})
    system: str | None = field(default=None, metadata={"help": "system prompt (None: the template's own)"})
    max_length: int = field(default=256, metadata={"help": "token limit per example"})
    max_new_tokens: int = field(default=64, metadata={"help": "stage 2 benign answer length when generated"})
    max_grad_norm: float = field(default=MAX_GRAD_NORM, metadata={"help": "gradient clipping (0: off)"})
    autocast: str = field(default="fp32", metadata={"help": "'fp32', 'bf16' or 'fp16'"})
    seed: int = field(default=0, metadata={"help": "data order and refusal phrasing"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    version: int = field(default=CONFIG_VERSION, metadata={"help": "config format version"})

    def __post_init__(self):
        n = "UpSafeTrainConfig."
        check_choice(n + "route", self.route, ("safety", "router"))
        for name in ("stage1_lr", "stage2_lr", "epochs", "sequence_l2"):
            check_float(n + name, getattr(self, name), 0.0, None, lo_open=True)
        for name in ("weight_decay", "stage1_lb_coef", "stage2_lb_coef", "sup_coef", "max_grad_norm"):
            check_float(n + name, getattr(self, name), 0.0)
        for name in ("batch_size", "grad_accum", "max_new_tokens"):
            check_int(n + name, getattr(self, name), 1)
        check_int(n + "max_length", self.max_length, 2)
        check_int(n + "max_steps", self.max_steps, 1, optional=True)
        check_int(n + "sup_tokens", self.sup_tokens, 0, optional=True)
        check_int(n + "seed", self.seed, 0)
        check_bool(n + "warm_start", self.warm_start)
        check_bool(n + "progress", self.progress)
        check_choice(n + "autocast", self.autocast, tuple(AUTOCAST))
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"{n}system must be a str or None, got {self.system!r}")

    def autocast_dtype(self):
        return AUTOCAST[self.autocast]

    def optimizer(self, params, stage: int) -> torch.optim.AdamW:
        """AdamW over `params` with this stage's learning rate and the shared betas / eps."""
        lr = self.stage1_lr if stage == 1 else self.stage2_lr
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay, betas=ADAM_BETAS, eps=ADAM_EPS)
