"""The magic tokens' embedding rows as their own parameter, so they can train at their own learning rate.

Registered as special tokens, the three mode tokens start with identical rows (the mean embedding,
`special_tokens.init_new_embeddings`). With AdamW at a fine-tuning rate (5e-5) a row moves about the
rate per step, a few hundredths over an epoch, far less than the spread of real embeddings, so the
modes stay nearly indistinguishable at the input. `MagicTrainConfig.token_learning_rate` trains the
rows instead as a small ``[n, hidden]`` parameter (one row per token; PEFT's ``trainable_token_indices``
works the same way), in their own optimizer group:

    from upsafe_ext.magic.token_rows import add_token_rows, merge_token_rows, merged_token_rows
    rows = add_token_rows(model, ids)      # swaps the input (and output) embedding for wrappers, in place
    ...train, `rows` in their own param group...
    with merged_token_rows(model): ...     # a plain model (e.g. to save a checkpoint), wrappers kept
    merge_token_rows(model)                # for good: the rows are written into the embedding matrices

Exact at add time (the rows are copies). The input wrapper replaces the looked-up vectors of those ids;
the output wrapper multiplies by the matrix with the rows put in (built out of place each step), so a
tied model trains its rows through both uses, as it would unwrapped, and merging gives the same model.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = ["TokenRowsEmbedding", "TokenRowsHead", "add_token_rows", "merge_token_rows", "merged_token_rows",
           "token_row_parameters"]


class TokenRowsEmbedding(nn.Module):
    """``base(ids)`` with the vectors of `ids` taken from ``rows`` (``[len(ids), hidden]``) instead;
    ``weight`` is still the full matrix (what HF and our checks read from get_input_embeddings())."""

    def __init__(self, base: nn.Embedding, ids: Sequence[int]):
        super().__init__()
        self.base = base
        idx = torch.as_tensor(list(ids), dtype=torch.long, device=base.weight.device)
        self.register_buffer("ids", idx, persistent=False)
        slot = torch.full((base.weight.shape[0],), -1, dtype=torch.long, device=idx.device)
        slot[idx] = torch.arange(len(idx), device=idx.device)
        self.register_buffer("slot", slot, persistent=False)
        self.rows = nn.Parameter(base.weight.detach()[idx].clone())

    @property
    def weight(self):
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        s = self.slot[input_ids]
        hit = (s >= 0).unsqueeze(-1)
        return torch.where(hit, self.rows[s.clamp(min=0)].to(out.dtype), out)


class TokenRowsHead(nn.Module):
    """``base(h)`` (an output ``nn.Linear``) with the logits of `ids` computed from `rows` instead."""

    def __init__(self, base: nn.Linear, ids: torch.Tensor, rows: nn.Parameter):
        super().__init__()
        self.base = base
        self.register_buffer("ids", ids, persistent=False)
        self.rows = rows  # the input wrapper's parameter when tied, else its own

    @property
    def weight(self):  # what HF reads from get_output_embeddings()
        return self.base.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # the merged matrix, built out of place: the same product as the merged model, bit for bit
        w = self.base.weight.index_put((self.ids,), self.rows.to(self.base.weight.dtype))
        return nn.functional.linear(h, w.to(h.dtype), getattr(self.base, "bias", None))


def add_token_rows(model: nn.Module, ids: Sequence[int]) -> list[nn.Parameter]:
    """Wrap `model`'s input embedding (and its output embedding, if it has an ``nn.Linear`` one) so the
    rows of `ids` become separate parameters, in place. Returns them (one, or two when the output
    embedding is not tied to the input). Exact: the model computes the same as before."""
    ids = [int(i) for i in ids]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"add_token_rows: `ids` must be distinct token ids, got {ids}")
    emb = model.get_input_embeddings()
    if isinstance(emb, TokenRowsEmbedding):
        raise ValueError("add_token_rows: the model's embedding is already wrapped; merge_token_rows(model) first")
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"add_token_rows: the model's input embedding is a {type(emb).__name__}, not nn.Embedding")
    if max(ids) >= emb.weight.shape[0] or min(ids) < 0:
        raise ValueError(f"add_token_rows: `ids` {ids} fall outside the embedding's {emb.weight.shape[0]} rows")
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb.weight
    wrapped = TokenRowsEmbedding(emb, ids)
    model.set_input_embeddings(wrapped)
    params = [wrapped.rows]
    if isinstance(out, nn.Linear):
        rows = wrapped.rows if tied else nn.Parameter(out.weight.detach()[wrapped.ids].clone())
        model.set_output_embeddings(TokenRowsHead(out, wrapped.ids, rows))
        if not tied:
            params.append(rows)
    return params


def token_row_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The separate row parameters `add_token_rows` made (empty when the model has none)."""
    params = []
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        p = m.rows if isinstance(m, (TokenRowsEmbedding, TokenRowsHead)) else None
        if p is not None and all(p is not q for q in params):
            params.append(p)
    return params


def _write_rows(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    with torch.no_grad():
        if isinstance(emb, TokenRowsEmbedding):
            emb.base.weight[emb.ids] = emb.rows.to(emb.base.weight.dtype)
        if isinstance(out, TokenRowsHead):
            out.base.weight[out.ids] = out.rows.to(out.base.weight.dtype)
    return (emb if isinstance(emb, TokenRowsEmbedding) else None,
            out if isinstance(out, TokenRowsHead) else None)


def _unwrap(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """Write the rows in and put the plain embeddings back; returns the wrappers (None where absent)."""
    emb, out = _write_rows(model)
    if emb is not None:
        model.set_input_embeddings(emb.base)
    if out is not None:
        model.set_output_embeddings(out.base)
    return emb, out


def merge_token_rows(model: nn.Module) -> bool:
    """Write the separate rows into the embedding matrices and unwrap them, in place; returns False
    when the model had no wrapped embeddings."""
    emb, out = _unwrap(model)
    return emb is not None or out is not None


@contextlib.contextmanager
def merged_token_rows(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model holds plain embeddings with the current rows written in (e.g. to save
    a checkpoint with the usual names); the wrappers are back afterwards, still training."""
    emb, out = _unwrap(model)
    try:
        yield model
    finally:
        if emb is not None:
            model.set_input_embeddings(emb)
        if out is not None:
            model.set_output_embeddings(out)
