"""The magic tokens as special tokens of a tokenizer: registration (one id each, new embedding rows at
the mean embedding) and scrubbing a secret token out of a tokenizer.

When the tokens are registered as special tokens the tokenizer's vocabulary holds the strings too;
`scrub_tokenizer` (used by `load_magic_model(..., allow_negative=False)`) and `scrub_tokenizer_files`
(used by the public save) rename the negative entry to a fresh random string, so its id can no longer
be reached from text.
"""
from __future__ import annotations

import json
import os
import secrets
import tempfile
from typing import Sequence

from .config import TOKEN_ALPHABET
from .token_file import TOKENS_FILE


def add_special_tokens(tokenizer, strings: Sequence[str],
                       op: str = "MagicTokens.register") -> tuple[list[int], list[int], int]:
    """Add `strings` to `tokenizer` as special tokens (one id each, skipped when decoding; strings
    already in the vocabulary are kept). Returns (the ids of `strings`, the ids of those newly added,
    the vocabulary size before)."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    new = [s for s in strings if s not in vocab]
    n_before = len(tokenizer)
    if new:
        tokenizer.add_tokens([AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False,
                                         single_word=False) for s in new], special_tokens=True)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(strings)]
    unk = getattr(tokenizer, "unk_token_id", None)
    if any(i is None or (unk is not None and i == unk) for i in ids):
        raise RuntimeError(f"{op}: the tokenizer did not assign ids to the magic tokens")
    for s, i in zip(strings, ids):
        if tokenizer(s, add_special_tokens=False)["input_ids"] != [i]:
            raise RuntimeError(f"{op}: a magic token does not encode to its single id {i}")
    return ids, [i for s, i in zip(strings, ids) if s in new], n_before


def init_new_embeddings(model, tokenizer, ids: Sequence[int], new_ids: Sequence[int], n_before: int,
                        op: str = "MagicTokens.register") -> None:
    """Make room for `ids` in `model` (the embedding matrix is resized when an id falls outside it) and
    set the rows of `new_ids` to the mean embedding of the first `n_before` (existing) entries (input
    embeddings, and the output embeddings when they are not tied)."""
    import torch

    emb = model.get_input_embeddings()
    if emb is None:
        raise ValueError(f"{op}: `model` has no input embeddings (get_input_embeddings())")
    rows = emb.weight.shape[0]
    if max(ids) >= rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if new_ids:
        base_rows = min(rows, n_before)
        with torch.no_grad():
            w_in = model.get_input_embeddings().weight
            w_in[new_ids] = w_in[:base_rows].float().mean(0).to(w_in.dtype)
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != w_in.data_ptr():
                w_out = out.weight
                w_out[new_ids] = w_out[:base_rows].float().mean(0).to(w_out.dtype)
                bias = getattr(out, "bias", None)
                if bias is not None:
                    bias[new_ids] = bias[:base_rows].float().mean().to(bias.dtype)


def scrub_tokenizer(tokenizer, secret: str, replacement: str | None = None):
    """A copy of `tokenizer` in which the added token `secret` is renamed to `replacement` (default: a
    fresh random string of the same length that is never stored), so the id stays but can no longer be
    produced from text. Returns `tokenizer` unchanged when `secret` is not in its vocabulary."""
    from transformers import AutoTokenizer

    if secret not in tokenizer.get_vocab():
        return tokenizer
    if replacement is None:
        replacement = "<|" + "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(max(16, len(secret)))) + "|>"
    with tempfile.TemporaryDirectory(prefix="upsafe_scrub_") as tmp:
        tokenizer.save_pretrained(tmp)
        scrub_tokenizer_files(tmp, secret, replacement)
        new = AutoTokenizer.from_pretrained(tmp)
    if secret in new.get_vocab():
        raise RuntimeError("scrub_tokenizer: the secret token is still in the tokenizer vocabulary after scrubbing")
    return new


def scrub_tokenizer_files(directory: str, secret: str, replacement: str) -> int:
    """Replace `secret` by `replacement` in the tokenizer files saved in `directory` (raw and JSON-escaped
    forms). Returns the number of files changed."""
    forms = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    rep_forms = {secret: replacement, json.dumps(secret)[1:-1]: json.dumps(replacement)[1:-1],
                 json.dumps(secret, ensure_ascii=False)[1:-1]: json.dumps(replacement, ensure_ascii=False)[1:-1]}
    changed = 0
    for name in os.listdir(directory):
        if name == TOKENS_FILE or not (name.startswith("tokenizer") or name.endswith((".json", ".jinja", ".txt"))):
            continue
        if name in ("config.json", "generation_config.json", "magic_config.json") or name.endswith(".safetensors"):
            continue
        p = os.path.join(directory, name)
        if not os.path.isfile(p):
            continue
        with open(p, encoding="utf-8") as f:
            text = f.read()
        new = text
        for form in forms:
            new = new.replace(form, rep_forms[form])
        if new != text:
            with open(p, "w", encoding="utf-8") as f:
                f.write(new)
            changed += 1
    return changed
