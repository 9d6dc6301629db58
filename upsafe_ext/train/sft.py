"""Supervised fine-tuning plumbing shared by UpSafe°C, ESI SET/SPA and magic-token co-training."""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import torch
from torch import Tensor

from .chat import render_chat

IGNORE_INDEX = -100


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_sft(tokenizer, messages: Sequence[dict], response: str, max_length: int = 512) -> dict:
    """Encode one conversation turn for SFT: loss only on the assistant's `response` tokens.

    The prompt is `messages` rendered with the tokenizer's chat template and the generation prompt;
    the labels are IGNORE_INDEX over it and the token ids of the response (as the template closes it,
    end-of-turn token included) after it. Over-long examples lose prompt tokens from the left, so the
    response is kept whole where possible.
    """
    if not messages:
        raise ValueError("encode_sft: `messages` is empty")
    prefix = render_chat(tokenizer, messages, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        list(messages) + [{"role": "assistant", "content": response}], tokenize=False
    )
    prefix_ids = _ids(tokenizer, prefix)
    if full.startswith(prefix):
        full_ids = _ids(tokenizer, full)
        if full_ids[: len(prefix_ids)] != prefix_ids:  # a merge across the boundary: split explicitly
            full_ids = prefix_ids + _ids(tokenizer, full[len(prefix):])
    else:  # templates that rewrite earlier turns: fall back to prompt + response + eos
        eos = tokenizer.eos_token or ""
        full_ids = prefix_ids + _ids(tokenizer, response + eos)
    labels = [IGNORE_INDEX] * len(prefix_ids) + full_ids[len(prefix_ids):]
    if len(full_ids) > max_length:
        cut = len(full_ids) - max_length
        full_ids, labels = full_ids[cut:], labels[cut:]
    return {"input_ids": full_ids, "labels": labels, "attention_mask": [1] * len(full_ids)}


def first_token_weights(response: Tensor, first_token_weight: float = 1.0, first_tokens: int = 1) -> Tensor:
    """Loss weights over a ``[B, T]`` boolean mask of response positions: 1 on each response position,
    `first_token_weight` on each row's first `first_tokens` of them (where a reply answers or refuses),
    0 elsewhere. Shared by the weighted SET loss and the magic-token loss."""
    if first_tokens < 1:
        raise ValueError(f"first_token_weights: `first_tokens` must be >= 1, got {first_tokens}")
    w = response.float()
    if first_token_weight != 1.0:
        head = response & (response.cumsum(-1) <= first_tokens)
        w = torch.where(head, torch.full_like(w, float(first_token_weight)), w)
    return w


def weighted_lm_loss(logits: Tensor, labels: Tensor, first_token_weight: float = 1.0, first_tokens: int = 1) -> Tensor:
    """Causal-LM cross-entropy (label t predicted by ``logits[:, t - 1]``), a weighted mean over the
    response tokens with `first_token_weights`; with weight 1.0 it equals the model's own ``out.loss``."""
    y = labels[:, 1:]
    resp = y != IGNORE_INDEX
    w = first_token_weights(resp, first_token_weight, first_tokens)
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (nll * w).sum() / w.sum().clamp_min(1e-12)


class SFTCollator:
    """Right-pads a list of `encode_sft` dicts into tensors; usable as an HF `Trainer` data_collator.

    Extra integer/float fields (e.g. a per-example `harmful` label) are stacked as tensors.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("SFTCollator: `pad_token_id` is None; set tokenizer.pad_token")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, Tensor]:
        if not features:
            raise ValueError("SFTCollator: empty batch")
        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            n = int(math.ceil(n / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            L = len(f["input_ids"])
            ids[i, :L] = torch.as_tensor(f["input_ids"])
            labels[i, :L] = torch.as_tensor(f["labels"])
            mask[i, :L] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        for key in features[0]:
            if key not in batch and isinstance(features[0][key], (int, float, bool)):
                batch[key] = torch.tensor([f[key] for f in features])
        return batch


def run_sft(
    model: torch.nn.Module,
    examples: Sequence[dict],
    *,
    optimizer: torch.optim.Optimizer,
    collator: Callable[[list[dict]], dict] | None = None,
    batch_size: int = 8,
    epochs: float = 1.0,
    max_steps: int | None = None,
    grad_accum: int = 1,
    extra_loss: Callable[[torch.nn.Module, dict, object], Tensor] | None = None,
    lm_loss: bool = True,
    lr_scheduler=None,
    max_grad_norm: float | None = 1.0,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "sft",
    on_step: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """A plain SFT loop: shuffled mini-batches, LM loss (+ `extra_loss`), grad clipping, progress bar.

    `extra_loss(model, batch, outputs)` returns a scalar added to the LM loss (e.g. the MoE
    load-balancing or router-supervision loss). With ``lm_loss=False`` the model is called without
    labels and `extra_loss` is the whole loss (e.g. soft targets on some tokens). Batch keys the model
    does not take (extra labels) are kept out of the forward call. Returns one dict of logged values
    per optimizer step.
    """
    from tqdm.auto import tqdm

    if len(examples) == 0:
        raise ValueError("run_sft: no training examples")
    if not lm_loss and extra_loss is None:
        raise ValueError("run_sft: lm_loss=False needs an `extra_loss` (it is then the whole loss)")
    device = next(model.parameters()).device
    collate = collator or SFTCollator(getattr(model.config, "pad_token_id", None) or 0)
    steps_per_epoch = max(1, math.ceil(len(examples) / (batch_size * grad_accum)))
    total = max_steps if max_steps is not None else max(1, int(round(epochs * steps_per_epoch)))
    rng = random.Random(seed)
    order: list[int] = []
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("run_sft: the model has no trainable parameters")
    model.train()
    log: list[dict] = []
    bar = tqdm(range(total), desc=desc, disable=not progress, leave=False)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        rec = {"step": step, "loss": 0.0, "lm_loss": 0.0, "extra_loss": 0.0}
        for _ in range(grad_accum):
            if len(order) < batch_size:
                fresh = list(range(len(examples)))
                rng.shuffle(fresh)
                order.extend(fresh)
            idx, order = order[:batch_size], order[batch_size:]
            batch = collate([examples[i] for i in idx])
            keys = ("input_ids", "attention_mask", "labels") if lm_loss else ("input_ids", "attention_mask")
            model_inputs = {k: batch[k].to(device) for k in keys}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(**model_inputs)
                extra = extra_loss(model, {k: v.to(device) for k, v in batch.items()}, out) if extra_loss else None
                loss = out.loss if lm_loss else extra
                if lm_loss and extra is not None:
                    loss = loss + extra
            (loss / grad_accum).backward()
            rec["loss"] += float(loss.detach()) / grad_accum
            if lm_loss:
                rec["lm_loss"] += float(out.loss.detach()) / grad_accum
            if extra is not None:
                rec["extra_loss"] += float(extra.detach()) / grad_accum
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        log.append(rec)
        if on_step:
            on_step(step, rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
    model.eval()
    return log
