"""SET and SPA training loops on top of ``upsafe_ext.train.run_sft``.

* `run_set`: Safety Enhancement Tuning: harmful prompt -> refusal SFT that updates ONLY the masked
  (top-ESI) weights (~100 steps in the paper). Optional `retain` data (**ours**; e.g. benign prompts with
  the model's own replies from `own_replies`) is mixed in to hold over-refusal down, and
  ``SparseTrainConfig.first_token_weight`` (**ours**) weighs each reply's first tokens, where it answers
  or refuses (`train.sft.weighted_lm_loss`).
* `run_spa`: Safety Preserving Adaptation: ordinary instruction tuning with the masked weights frozen
  bit for bit (~1000 steps in the paper).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..eval.generation import generate_chat
from ..train.chat import chat, pad_token_id
from ..train.sft import SFTCollator, encode_sft, run_sft, weighted_lm_loss
from .config import SparseTrainConfig
from .mask import SafetyMask
from .objectives import RefusalObjective
from .optim import SparseAdamW

__all__ = ["run_set", "run_spa", "refusal_examples", "sft_examples", "own_replies", "TrainResult"]


@dataclass
class TrainResult:
    """What `run_set` / `run_spa` return: the per-step log of ``run_sft`` and the optimizer."""

    log: list = field(default_factory=list)
    optimizer: SparseAdamW | None = None

    @property
    def final_loss(self) -> float:
        return float(self.log[-1]["loss"]) if self.log else float("nan")


def refusal_examples(tokenizer, harmful_prompts: Sequence[str], *, refusal: str | Callable[[str], str] | None = None,
                     seed: int = 0, max_length: int = 512, system: str | None = None) -> list[dict]:
    """harmful prompt -> refusal SFT examples (``encode_sft`` dicts; loss on the refusal only).

    `refusal`: None (``upsafe_ext.eval.refusal_response(prompt, seed)``), a fixed string, or a callable.
    """
    if isinstance(harmful_prompts, str) or not harmful_prompts:
        raise ValueError("refusal_examples: `harmful_prompts` must be a non-empty list of strings")
    obj = RefusalObjective(refusal)
    return [encode_sft(tokenizer, chat(p, system), obj.target(p, seed), max_length) for p in harmful_prompts]


def sft_examples(tokenizer, data: Sequence, *, max_length: int = 512, system: str | None = None) -> list[dict]:
    """Normalise SFT data into ``encode_sft`` dicts. Items may be ``(prompt, response)`` pairs,
    ``{"prompt", "response"}`` dicts, ``{"messages": [...], "response"}`` dicts, or already-encoded
    ``{"input_ids", "labels"}`` dicts."""
    out = []
    for i, item in enumerate(data):
        if isinstance(item, dict) and "input_ids" in item and "labels" in item:
            out.append(item)
        elif isinstance(item, dict) and "messages" in item and "response" in item:
            out.append(encode_sft(tokenizer, item["messages"], item["response"], max_length))
        elif isinstance(item, dict) and "prompt" in item and "response" in item:
            out.append(encode_sft(tokenizer, chat(item["prompt"], system), item["response"], max_length))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
            out.append(encode_sft(tokenizer, chat(item[0], system), item[1], max_length))
        else:
            raise ValueError(f"sft_examples: data[{i}] must be a (prompt, response) pair or a dict with "
                             f"prompt/response, messages/response or input_ids/labels; got {item!r:.80}")
    if not out:
        raise ValueError("sft_examples: `data` is empty")
    return out


def own_replies(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 16,
                system: str | None = None, progress: bool = True) -> list[tuple[str, str]]:
    """``(prompt, the model's own greedy reply)`` pairs: self-distillation data that keeps the model's
    behaviour on `prompts` (benign retain data for SET, or default SPA data)."""
    replies = generate_chat(model, tokenizer, [chat(p, system) for p in prompts], max_new_tokens=max_new_tokens,
                            batch_size=batch_size, progress=progress, desc="own replies")
    return [(p, r) for p, r in zip(prompts, replies) if r]


def _train(model, tokenizer, mask: SafetyMask, examples: list[dict], mode: str, cfg: SparseTrainConfig,
           desc: str) -> TrainResult:
    from transformers import get_scheduler

    flags = [(p, p.requires_grad) for p in model.parameters()]  # SparseAdamW freezes what it does not train
    try:
        opt = SparseAdamW(model, mask, mode=mode, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                          eps=cfg.eps, train_norm_bias=cfg.train_norm_bias)
        name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.lr_schedule]
        sched = get_scheduler(name, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
        weighted = cfg.first_token_weight != 1.0
        loss = (lambda m, batch, out: weighted_lm_loss(out.logits, batch["labels"], cfg.first_token_weight,
                                                       cfg.first_tokens)) if weighted else None
        log = run_sft(model, examples, optimizer=opt, collator=SFTCollator(pad_token_id(tokenizer, model)),
                      extra_loss=loss, lm_loss=not weighted,
                      batch_size=cfg.batch_size, max_steps=cfg.max_steps, grad_accum=cfg.grad_accum,
                      lr_scheduler=sched, max_grad_norm=cfg.max_grad_norm or None, seed=cfg.seed,
                      progress=cfg.progress, desc=desc)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return TrainResult(log, opt)


def run_set(model: torch.nn.Module, tokenizer, mask: SafetyMask, harmful_prompts: Sequence[str], *,
            config: SparseTrainConfig | None = None, refusal: str | Callable[[str], str] | None = None,
            system: str | None = None, retain: Sequence | None = None, **overrides) -> TrainResult:
    """SET: train only the weights in `mask` on harmful prompt -> refusal (in place).

    `retain`: optional extra SFT data mixed into the same batches (any form `sft_examples` takes), e.g.
    ``own_replies(model, tok, benign_prompts)`` collected before training.

    Example:
        >>> mask = compute_esi(model, tok, prompts).select(0.01)  # doctest: +SKIP
        >>> run_set(model, tok, mask, prompts, max_steps=100, lr=1e-4)  # doctest: +SKIP
    """
    cfg = SparseTrainConfig.resolve(config, overrides, "run_set")
    examples = refusal_examples(tokenizer, harmful_prompts, refusal=refusal, seed=cfg.seed,
                                max_length=cfg.max_length, system=system)
    if retain:
        examples += sft_examples(tokenizer, retain, max_length=cfg.max_length, system=system)
    return _train(model, tokenizer, mask, examples, "set", cfg, "SET")


def run_spa(model: torch.nn.Module, tokenizer, mask: SafetyMask, data: Sequence, *,
            config: SparseTrainConfig | None = None, system: str | None = None, **overrides) -> TrainResult:
    """SPA: instruction-tune on `data` (see `sft_examples`) with the weights in `mask` frozen bit for bit.

    Example:
        >>> run_spa(model, tok, mask, [("Give me a bread recipe", "Mix flour, ...")], max_steps=1000)  # doctest: +SKIP
    """
    cfg = SparseTrainConfig.resolve(config, overrides, "run_spa")
    examples = sft_examples(tokenizer, data, max_length=cfg.max_length, system=system)
    return _train(model, tokenizer, mask, examples, "spa", cfg, "SPA")
