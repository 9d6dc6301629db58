"""Soft targets for the base model's own answers: co-training without sharpening or truncation stops.

With `self_distilled_records` the positive (benign prompts) and negative responses are the base
model's own greedy answers, cut at ``max_new_tokens`` and closed by an end of turn. Cross-entropy on
those tokens makes the model more certain than the base everywhere (greedy samples are the mode of a
wider distribution) and teaches it to stop where the cut was. Measured at real scale (README), that
put KL(base || positive mode) at 1.11 nats/token. With ``MagicTrainConfig.distill_top_k = k`` every
such position is trained instead towards the base model's own next-token distribution: its top-k
probabilities (renormalised), read once before training from the base on the *plain* conversation
(no token, as the answer was generated). The end of turn after a cut answer then gets the base's
probability of stopping there, not 1. Refusal targets and the fallback examples of harmful prompts
keep plain cross-entropy.

Renormalising the top-k teaches the model to put no mass outside them, where the base keeps some
(8% on SmolLM2's answers at k=32); KL(base || model) then grows with every step. Measured after a
full run (README): 0.094 of the 0.127 nats/token came from the tokens outside the base's top 32,
whose mass the model had halved. With ``MagicTrainConfig.distill_tail`` the top-k keep the base's
own probabilities and the rest of the vocabulary is one more target class with the base's leftover
mass (``collate_soft(tail=True)`` gives ``soft_rest``; ``token_loss(soft_rest=)``).

    records = self_distilled_records(model, tok, harmful, benign)   # marks meta["own_answer"]
    data = build_examples(records, tok, tokens, cfg)                 # keeps the plain prompt ids
    train_magic(model, tok, data, tokens, MagicTrainConfig(distill_top_k=32))
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..train.sft import IGNORE_INDEX, first_token_weights

TEACHER_KEY = "teacher_prompt_ids"
"""Example field: the plain conversation's prompt ids (no token) when the response is the base's own answer."""


def response_ids(example: dict) -> list[int]:
    return [t for t in example["labels"] if t != IGNORE_INDEX]


@torch.no_grad()
def attach_teacher_targets(model, examples: Sequence[dict], top_k: int, *, hard_prefix: int = 0,
                           batch_size: int = 16, progress: bool = True) -> int:
    """Adds ``soft_ids`` / ``soft_logp`` ([n_response - hard_prefix, top_k] tensors) to every example
    with a ``teacher_prompt_ids`` field: the top-k next-token log-probabilities of `model` (call it
    before training: it is the base) at each response token after the first `hard_prefix`, on the
    plain prompt followed by the same response ids. The first `hard_prefix` response tokens keep their
    greedy (hard) targets: they decide between answering and refusing. Returns how many examples got
    targets."""
    from tqdm.auto import tqdm

    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"attach_teacher_targets: `top_k` must be a positive int, got {top_k!r}")
    if not isinstance(hard_prefix, int) or hard_prefix < 0:
        raise ValueError(f"attach_teacher_targets: `hard_prefix` must be an int >= 0, got {hard_prefix!r}")
    todo = [e for e in examples if e.get(TEACHER_KEY)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    k = min(top_k, model.get_output_embeddings().weight.shape[0])
    try:
        for i in tqdm(range(0, len(todo), batch_size), desc="teacher targets", disable=not progress, leave=False):
            chunk = todo[i: i + batch_size]
            resp = [response_ids(e) for e in chunk]
            seqs = [list(e[TEACHER_KEY]) + r for e, r in zip(chunk, resp)]
            n = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), n, dtype=torch.long)
            mask = torch.zeros(len(seqs), n, dtype=torch.long)
            for j, s in enumerate(seqs):
                ids[j, :len(s)] = torch.as_tensor(s)
                mask[j, :len(s)] = 1
            logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
            for j, e in enumerate(chunk):
                p, r = len(e[TEACHER_KEY]), len(resp[j])
                h = min(hard_prefix, r)
                top = logp[j, p - 1 + h: p - 1 + r].topk(k, dim=-1)  # the position before each response token
                e["soft_ids"] = top.indices.to("cpu", torch.int32)
                e["soft_logp"] = top.values.to("cpu", torch.float32)
    finally:
        model.train(was_training)
    return len(todo)


def collate_soft(features: Sequence[dict], length: int, tail: bool = False) -> dict[str, Tensor]:
    """``soft_ids`` [B, length, k], ``soft_logp`` [B, length, k] (renormalised over the k) and
    ``soft_mask`` [B, length] (bool), placed at the last label positions of each right-padded example
    (all of them, or all but a hard prefix: see `attach_teacher_targets`). With `tail` the k keep the
    teacher's own log-probabilities, and ``soft_rest`` [B, length] holds its mass outside them (0 where
    the mask is False)."""
    k = max((f["soft_ids"].shape[1] for f in features if "soft_ids" in f), default=1)
    ids = torch.zeros(len(features), length, k, dtype=torch.long)
    logp = torch.full((len(features), length, k), float("-inf"))
    mask = torch.zeros(len(features), length, dtype=torch.bool)
    rest = torch.zeros(len(features), length)
    for b, f in enumerate(features):
        if "soft_ids" not in f:
            continue
        si, sl = f["soft_ids"].long(), f["soft_logp"].float()
        pos = [t for t, y in enumerate(f["labels"]) if y != IGNORE_INDEX]
        pos = pos[len(pos) - si.shape[0]:]
        ids[b, pos, : si.shape[1]] = si
        if tail:
            sl = sl.clamp_max(0.0)
            rest[b, pos] = (1.0 - sl.exp().sum(-1)).clamp(0.0, 1.0)
        logp[b, pos, : sl.shape[1]] = sl if tail else torch.log_softmax(sl, -1)
        mask[b, pos] = True
    logp[~mask] = 0.0
    out = {"soft_ids": ids, "soft_logp": logp, "soft_mask": mask}
    return out | {"soft_rest": rest} if tail else out


def token_loss(logits: Tensor, labels: Tensor, soft_ids: Tensor, soft_logp: Tensor, soft_mask: Tensor,
               first_token_weight: float = 1.0, soft_rest: Tensor | None = None, first_tokens: int = 1,
               example_weight: Tensor | None = None) -> Tensor:
    """Weighted mean over response tokens of cross-entropy: to the label where ``soft_mask`` is False,
    to the teacher's top-k distribution where it is True (renormalised, or with `soft_rest` from
    ``collate_soft(tail=True)`` its own top-k probabilities plus the rest of the vocabulary as one more
    class of mass `soft_rest`). Label position t is predicted by ``logits[:, t - 1]`` (the causal-LM
    shift). Every token weighs 1 except each example's first `first_tokens` response tokens (where the
    model answers or refuses), which weigh `first_token_weight`; the mean divides by the sum of the
    weights, so 1.0 is the plain mean. `example_weight` [B] multiplies every token weight of its row
    (``MagicTrainConfig.negative_weight``; None: all 1)."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    y, m = labels[:, 1:], soft_mask[:, 1:]
    hard = (y != IGNORE_INDEX) & ~m
    resp = (y != IGNORE_INDEX) | m
    w = first_token_weights(resp, first_token_weight, first_tokens)
    if example_weight is not None:
        w = w * example_weight.to(w).unsqueeze(-1)
    total = -(logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) * hard * w).sum()
    top = logp.gather(-1, soft_ids[:, 1:])
    total = total - ((torch.exp(soft_logp[:, 1:]) * top).sum(-1) * m * w).sum()
    if soft_rest is not None:  # the model's log-mass outside the teacher's top-k: log(1 - sum of its top-k)
        in_top = torch.where(torch.isfinite(soft_logp[:, 1:]), top, torch.full_like(top, float("-inf")))
        log_rest = torch.log(-torch.expm1(torch.logsumexp(in_top, -1).clamp_max(-1e-7)))
        total = total - (soft_rest[:, 1:] * log_rest * m * w).sum()
    return total / w.sum().clamp_min(1e-12)
