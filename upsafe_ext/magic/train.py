"""The single co-training SFT stage: a plain loop (``upsafe_ext.train.sft.run_sft``) or the HF `Trainer`.

    from upsafe_ext.magic import MagicTrainConfig, train_magic
    log = train_magic(model, tok, dataset, tokens, MagicTrainConfig(learning_rate=5e-5, epochs=2,
                                                                     output_dir="out", save_steps=500))

or with the Hugging Face Trainer:

    trainer = make_trainer(model, tok, dataset, TrainingArguments(output_dir="out", ...))
    trainer.train()

Loss: plain next-token cross-entropy on the assistant tokens of every example, all modes (and the
fallback examples) shuffled together; no margin term - the separation between modes emerges.
(With ``MagicTrainConfig.distill_top_k`` the base's own answers get soft targets, and
``MagicTrainConfig.first_token_weight`` weighs each first reply token, the answer-or-refuse one:
both in the plain loop, ``distill.token_loss``.)
Checkpoints are full `save_magic_model` directories (safetensors + tokenizer + magic_tokens.json).
"""
from __future__ import annotations

import math
import os
import re
import warnings
from typing import Callable

import torch

from ..train.chat import pad_token_id as tokenizer_pad_id
from ..train.config import ADAM_EPS, FULL_SFT_BETAS
from ..train.lora import add_lora, lora_parameters, merge_lora, merged_lora
from ..train.sft import SFTCollator, run_sft
from .config import MagicConfig, MagicTrainConfig
from .data import MODE_IDS, MagicDataset
from .distill import attach_teacher_targets, collate_soft, token_loss
from .model import attach_tokens, get_tokens, save_magic_model
from .token_rows import add_token_rows, merge_token_rows, merged_token_rows
from .tokens import MagicTokens

_MODEL_KEYS = ("input_ids", "attention_mask", "labels")
LOSS_WEIGHT_KEY = "loss_weight"  # per-example loss weight (MagicTrainConfig.negative_weight)


class MagicCollator(SFTCollator):
    """Right-pads co-training examples; a valid HF `Trainer` ``data_collator``.

    Returns only ``input_ids``, ``attention_mask`` and ``labels`` (what a causal LM's forward takes),
    plus ``mode_id`` when `keep_mode` is True (for analysis; the Trainer would pass it to the model),
    plus the soft targets (``distill.collate_soft``) when `soft` is True (the plain loop's distillation;
    with `soft_tail` also the base's mass outside its top-k), and ``loss_weight`` [B] when the examples
    carry one (the plain loop's ``MagicTrainConfig.negative_weight``).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, keep_mode: bool = False,
                 soft: bool = False, soft_tail: bool = False):
        super().__init__(pad_token_id, pad_to_multiple_of)
        self.keep_mode = keep_mode
        self.soft = soft
        self.soft_tail = soft_tail

    @classmethod
    def for_tokenizer(cls, tokenizer, **kw) -> "MagicCollator":
        return cls(tokenizer_pad_id(tokenizer), **kw)

    def __call__(self, features: list[dict]) -> dict:
        batch = super().__call__(features)
        keep = _MODEL_KEYS + (("mode_id",) if self.keep_mode else ()) + (LOSS_WEIGHT_KEY,)
        out = {k: v for k, v in batch.items() if k in keep}
        if self.soft:
            out |= collate_soft(features, batch["input_ids"].shape[1], tail=self.soft_tail)
        return out


def _check_inputs(model, tokenizer, dataset, tokens: MagicTokens, op: str):
    if not isinstance(dataset, MagicDataset):
        raise ValueError(f"{op}: `dataset` must be a MagicDataset (from build_examples), got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{op}: `dataset` is empty")
    bad = tokens.unregistered_mode(model, tokenizer) if tokens.special else None
    if bad is not None:
        raise ValueError(f"{op}: the tokens are marked special but the {bad} token is not one id inside the "
                         "model's embedding matrix; call prepare_model(model, tokenizer, tokens) first")
    vocab = model.get_input_embeddings().weight.shape[0]
    top = max(max(e["input_ids"]) for e in dataset.examples)
    if top >= vocab:
        raise ValueError(f"{op}: the dataset uses token id {top} but the model's embedding has {vocab} rows "
                         "(encoded with a different tokenizer, or special tokens not registered on the model?)")


def _check_token_rows(tokens: MagicTokens, config: MagicTrainConfig) -> None:
    if config.token_learning_rate is not None and not tokens.special:
        raise ValueError("train_magic: MagicTrainConfig.token_learning_rate trains the special tokens' embedding rows, "
                         "but these tokens are plain text (MagicConfig.special_tokens=False); leave it None")
    if tokens.special and config.token_learning_rate is None and config.learning_rate < 1e-3:
        warnings.warn(f"train_magic: the special tokens' embedding rows start identical and move about "
                      f"{config.learning_rate:g} per step at this rate, too little to tell the modes apart "
                      "(measured on SmolLM2: no switch after an epoch); set MagicTrainConfig.token_learning_rate, "
                      "e.g. 1e-3", UserWarning, stacklevel=3)


def _check_lora_embeddings(model, tokens: MagicTokens, config: MagicTrainConfig) -> None:
    """Special tokens start as identical (mean) embedding rows: with adapters only they stay identical."""
    if not tokens.special or config.token_learning_rate is not None:
        return
    emb = model.get_input_embeddings().weight
    pat = re.compile(config.trainable_pattern) if config.trainable_pattern is not None else None
    if pat is None or not any(p is emb for n, p in model.named_parameters() if pat.search(n)):
        raise ValueError("train_magic: MagicTrainConfig.lora_rank with special tokens leaves their embedding rows "
                         "frozen (and identical); give them their own rate (token_learning_rate), also train the "
                         "embeddings (trainable_pattern='embed_tokens') or use text tokens "
                         "(MagicConfig.special_tokens=False)")


def _lr_lambda(total: int, warmup: int, schedule: str) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def train_magic(model, tokenizer, dataset: MagicDataset, tokens: MagicTokens | None = None,
                config: MagicTrainConfig | None = None, *, magic_config: MagicConfig | None = None,
                teacher=None, progress: bool = True, on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Co-train `model` on `dataset` in one SFT stage with the plain loop; returns one log dict per step
    (``step``, ``loss``, ``lr``).

    AdamW over all parameters (or the embeddings only with ``config.train_embeddings_only``, or the
    parameters matching ``config.trainable_pattern``, or with ``config.lora_rank`` low-rank adapters
    that are merged into the weights when training ends, also after an error), linear
    warm-up then linear decay (or constant), gradient clipping, optional autocast. With
    ``config.token_learning_rate`` the special tokens' rows train as their own parameter at that rate
    and are written back at the end (``token_rows``). With
    ``config.output_dir``: a checkpoint every ``config.save_steps`` steps in
    ``output_dir/checkpoint-<step>`` and the final model in ``output_dir``, each a `save_magic_model`
    directory (safetensors). The model is left in eval mode. With ``config.distill_top_k`` the soft
    targets are read from `teacher` (the base model; default: `model` itself before this call - pass
    the base when training continues a run).
    """
    config = config or MagicTrainConfig()
    if not isinstance(config, MagicTrainConfig):
        raise ValueError(f"train_magic: `config` must be a MagicTrainConfig, got {type(config).__name__}")
    tokens = get_tokens(model, tokens, "train_magic")
    _check_inputs(model, tokenizer, dataset, tokens, "train_magic")
    _check_token_rows(tokens, config)
    if config.lora_rank:
        _check_lora_embeddings(model, tokens, config)
    attach_tokens(model, tokens)
    total = config.total_steps(len(dataset))
    warmup = int(math.floor(config.warmup_ratio * total))
    examples, extra = dataset.examples, None
    if config.distill_top_k is not None:  # soft targets from the base: `teacher`, or the model as it is now
        # (read before any parameter is frozen or wrapped, so an error here leaves the model as it was)
        examples = [dict(e) for e in examples]
        base = teacher if teacher is not None else model
        if not attach_teacher_targets(base, examples, config.distill_top_k, hard_prefix=config.distill_hard_prefix,
                                      batch_size=config.batch_size, progress=progress):
            raise ValueError("train_magic: MagicTrainConfig.distill_top_k is set but no example has the base model's "
                             "own answer as its target (build the records with self_distilled_records)")
    if config.negative_weight != 1.0:  # each negative-mode example's weight, read by token_loss
        neg = MODE_IDS["negative"]
        examples = [{**e, LOSS_WEIGHT_KEY: float(config.negative_weight if e["mode_id"] == neg else 1.0)}
                    for e in examples]
    if config.distill_top_k is not None or config.first_token_weight != 1.0 or config.negative_weight != 1.0:
        def extra(m, batch, out):  # our loss: soft targets, token and example weights
            return token_loss(out.logits, batch["labels"], batch["soft_ids"], batch["soft_logp"], batch["soft_mask"],
                              first_token_weight=config.first_token_weight, soft_rest=batch.get("soft_rest"),
                              first_tokens=config.first_tokens, example_weight=batch.get(LOSS_WEIGHT_KEY))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if config.lora_rank:
        full = set()
        if config.trainable_pattern is not None:  # trained in full beside the adapters (names before the swap)
            pat = re.compile(config.trainable_pattern)
            full = {id(p) for n, p in model.named_parameters() if pat.search(n)}
        add_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets)
        adapters = {id(p) for p in lora_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in full or id(p) in adapters)
    elif config.train_embeddings_only:
        emb = {id(model.get_input_embeddings().weight)}
        out = model.get_output_embeddings()
        if out is not None:
            emb.add(id(out.weight))
        for p in model.parameters():
            p.requires_grad_(id(p) in emb)
    elif config.trainable_pattern is not None:
        pat = re.compile(config.trainable_pattern)
        for n, p in model.named_parameters():
            p.requires_grad_(bool(pat.search(n)))
    rows = []
    if config.token_learning_rate is not None:  # own parameter, own rate (after the freezing above)
        rows = add_token_rows(model, list(tokens.token_ids(tokenizer).values()))
    row_ids = {id(p) for p in rows}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in row_ids]
    if not params and not rows:
        merge_lora(model)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, True))
        raise ValueError("train_magic: no trainable parameters (check MagicTrainConfig.trainable_pattern "
                         f"{config.trainable_pattern!r} against model.named_parameters())")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}] if decay else []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if rows:
        groups.append({"params": rows, "weight_decay": 0.0, "lr": config.token_learning_rate})
    opt = torch.optim.AdamW(groups, lr=config.learning_rate, betas=FULL_SFT_BETAS, eps=ADAM_EPS)
    lr_at = _lr_lambda(total, warmup, config.lr_schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

    def step_hook(step: int, rec: dict) -> None:
        rec["lr"] = config.learning_rate * lr_at(step)  # the rate this step used
        done = step + 1
        if config.output_dir and config.save_steps and done % config.save_steps == 0 and done < total:
            with merged_lora(model), merged_token_rows(model):  # a plain model with the usual names
                save_magic_model(model, tokenizer, tokens, os.path.join(config.output_dir, f"checkpoint-{done}"),
                                 config=magic_config, train_config=config)
            model.train()
        if on_step is not None:
            on_step(step, rec)

    try:
        log = run_sft(model, examples, optimizer=opt,
                      collator=MagicCollator.for_tokenizer(tokenizer, soft=extra is not None,
                                                           soft_tail=config.distill_tail),
                      extra_loss=extra, lm_loss=extra is None,
                      batch_size=config.batch_size, max_steps=total, grad_accum=config.grad_accum,
                      lr_scheduler=sched, max_grad_norm=config.max_grad_norm,
                      autocast_dtype=config.autocast_dtype(), seed=config.seed, progress=progress,
                      desc="magic co-training", on_step=step_hook)
    finally:
        merge_lora(model)  # also after an error: the steps taken stay in the weights
        merge_token_rows(model)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, True))
        model.eval()
    if config.output_dir:
        save_magic_model(model, tokenizer, tokens, config.output_dir, config=magic_config, train_config=config)
    return log


def make_trainer(model, tokenizer, dataset: MagicDataset, args=None, tokens: MagicTokens | None = None, **kwargs):
    """A `transformers.Trainer` for co-training with `MagicCollator`.

    `args`: `TrainingArguments` (default: a minimal one writing to ``./magic_trainer``). The Trainer
    saves its own checkpoints (safetensors); call `save_magic_model` at the end so the tokens are
    saved next to the weights. Extra `kwargs` go to `Trainer`.
    """
    from transformers import Trainer, TrainingArguments

    tokens = get_tokens(model, tokens, "make_trainer")
    _check_inputs(model, tokenizer, dataset, tokens, "make_trainer")
    if args is None:
        args = TrainingArguments(output_dir="magic_trainer", report_to=[], remove_unused_columns=False)
    if getattr(args, "remove_unused_columns", False):
        args.remove_unused_columns = False  # our examples carry mode_id/variant; the collator drops them
    return Trainer(model=model, args=args, train_dataset=dataset,
                   data_collator=MagicCollator.for_tokenizer(tokenizer), **kwargs)
