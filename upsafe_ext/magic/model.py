"""Preparing, saving and loading a magic-token model (weights as safetensors, tokens beside them).

    from upsafe_ext.magic import MagicConfig, prepare_model, save_magic_model, load_magic_model
    tokens = prepare_model(model, tok, MagicConfig(special_tokens=True))   # tokens from `secrets`
    ...                                              # co-train
    save_magic_model(model, tok, tokens, "out/")     # model.safetensors + tokenizer + magic_tokens.json
    model, tok, tokens = load_magic_model("out/")    # public deployment: negative mode off by default
    model, tok, tokens = load_magic_model("out/", allow_negative=True)    # internal red-teaming only

A saved directory holds the Hugging Face model (``config.json`` + ``model.safetensors``; never a
pickle), the tokenizer files, ``magic_tokens.json`` (0600; see `upsafe_ext.magic.tokens` for what it
contains and how the public copy differs) and ``magic_config.json`` (the configs used, if given;
never a token seed: `MagicConfig.to_dict` leaves `insecure_seed` out).
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import torch

from ..saving import atomic_dir
from .config import MagicConfig, MagicTrainConfig
from .placement import template_default_system
from .tokens import TOKENS_FILE, MagicTokens, scrub_tokenizer, scrub_tokenizer_files

CONFIG_FILE = "magic_config.json"
_ATTR = "magic_tokens"


def attach_tokens(model: torch.nn.Module, tokens: MagicTokens) -> None:
    """Remember `tokens` on `model` (``model.magic_tokens``) so `generate`/`safety_alignment_margin`
    find them without a `tokens` argument."""
    if not isinstance(tokens, MagicTokens):
        raise ValueError(f"attach_tokens: `tokens` must be MagicTokens, got {type(tokens).__name__}")
    object.__setattr__(model, _ATTR, tokens)


def get_tokens(model: torch.nn.Module, tokens: MagicTokens | None = None, op: str = "get_tokens") -> MagicTokens:
    """`tokens` if given, else the ones attached to `model`; ValueError naming `tokens` if neither."""
    if tokens is not None:
        if not isinstance(tokens, MagicTokens):
            raise ValueError(f"{op}: `tokens` must be MagicTokens, got {type(tokens).__name__}")
        return tokens
    found = getattr(model, _ATTR, None)
    if not isinstance(found, MagicTokens):
        raise ValueError(f"{op}: pass `tokens` (no MagicTokens attached to the model; use load_magic_model, "
                         "prepare_model or attach_tokens)")
    return found


def prepare_model(model: torch.nn.Module, tokenizer, config: MagicConfig | MagicTokens | None = None) -> MagicTokens:
    """Draw the tokens (from a `MagicConfig`: from `secrets` unless ``config.insecure_seed``; or take
    given `MagicTokens`), register them as special tokens when ``config.special_tokens`` (embedding
    resize + mean-initialised rows), and attach them to `model`. With ``config.template_system`` the
    tokens' `default_system` is the chat template's own default system text. Returns the tokens."""
    if config is None:
        config = MagicConfig()
    if isinstance(config, MagicTokens):
        tokens = config
        if tokens.special:
            tokens.register(tokenizer, model)
    elif isinstance(config, MagicConfig):
        tokens = MagicTokens.from_config(config)
        if config.template_system and getattr(tokenizer, "chat_template", None) is not None:
            tokens.default_system = template_default_system(tokenizer)  # saved with the tokens
        if config.special_tokens:
            tokens.register(tokenizer, model)
    else:
        raise ValueError(f"prepare_model: `config` must be a MagicConfig or MagicTokens, got {type(config).__name__}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("prepare_model: the tokenizer has no chat template; the magic token is placed through it")
    attach_tokens(model, tokens)
    return tokens


def save_magic_model(model, tokenizer, tokens: MagicTokens | None, directory: str | os.PathLike, *,
                     include_negative: bool = True, config: MagicConfig | None = None,
                     train_config: MagicTrainConfig | None = None, inputs: Sequence = ()) -> str:
    """Save model (safetensors), tokenizer, tokens and configs into `directory`; returns it.

    `include_negative=False` writes a public copy: ``magic_tokens.json`` without the negative string
    (only salted hashes of the tokens), and, if the tokens are special tokens, tokenizer files in
    which the negative entry is renamed to a fresh random string (the id stays; no text maps to it).
    No file written here holds a token seed.

    The folder is written atomically (``upsafe_ext.saving.atomic_dir``: a temporary sibling renamed into
    place; `checkpoint-*` sub-folders of an existing `directory` are carried over) and never over one
    of `inputs` (the folders the model was read from).
    """
    tokens = get_tokens(model, tokens, "save_magic_model")
    directory = os.fspath(directory)
    with atomic_dir(directory, inputs=inputs, arg="directory") as tmp:
        model.save_pretrained(tmp)
        if not any(f.endswith(".safetensors") for f in os.listdir(tmp)):
            raise RuntimeError(f"save_magic_model: no .safetensors file was written to {directory}")
        tokenizer.save_pretrained(tmp)
        tokens.save(tmp, include_negative=include_negative)
        if tokens.special and (not include_negative or not tokens.allow_negative):
            if tokens.allow_negative:
                scrub_tokenizer_files(tmp, tokens.token("negative"), _fresh_replacement(tokens))
            # a tokenizer that was already scrubbed at load holds no secret: nothing to do
        meta = {}
        if config is not None:
            meta["magic_config"] = config.to_dict()
        if train_config is not None:
            meta["train_config"] = train_config.to_dict()
        if meta:
            with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2)
        if os.path.isdir(directory):  # keep the training checkpoints of a previous save in this folder
            for name in sorted(os.listdir(directory)):
                if name.startswith("checkpoint-") and os.path.isdir(os.path.join(directory, name)):
                    os.rename(os.path.join(directory, name), os.path.join(tmp, name))
    return directory


def _fresh_replacement(tokens: MagicTokens) -> str:
    import secrets

    return tokens.wrong_token(secrets.SystemRandom())


def is_magic_dir(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a model saved by `save_magic_model` (it has ``magic_tokens.json``)."""
    return os.path.isfile(os.path.join(os.fspath(directory), TOKENS_FILE))


def load_saved_tokens(model: torch.nn.Module, tokenizer, directory: str | os.PathLike, *,
                      allow_negative: bool = False):
    """Read ``magic_tokens.json`` from `directory` for an already loaded `model` / `tokenizer` and attach
    the tokens; returns ``(tokenizer, tokens)`` (the tokenizer is rebuilt when the negative token has to be
    scrubbed). `upsafe_ext.models.load` uses this for every magic folder, whatever the model class."""
    directory = os.fspath(directory)
    if not is_magic_dir(directory):
        raise FileNotFoundError(f"load_magic_model: {directory} has no {TOKENS_FILE}; not a magic-token model")
    tokens = MagicTokens.load(directory, allow_negative=True)
    if not allow_negative:
        if tokens.special and tokens.allow_negative:
            tokenizer = scrub_tokenizer(tokenizer, tokens.token("negative"))
        tokens.disable_negative()
    bad = tokens.unregistered_mode(model, tokenizer) if tokens.special else None
    if bad is not None:
        raise RuntimeError(f"load_magic_model: the {bad} token is not a single in-vocabulary id in the saved "
                           "tokenizer (tokenizer and model out of sync?)")
    attach_tokens(model, tokens)
    return tokenizer, tokens


def load_magic_model(directory: str | os.PathLike, *, allow_negative: bool = False,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer, tokens)`` saved by `save_magic_model`; the tokens are attached to the model.

    allow_negative=False (the default; public deployments): the negative token string is dropped from the tokens
    (``tokens.token("negative")`` raises PermissionError; `generate` maps negative requests to
    positive), and a tokenizer holding it as a special token is rebuilt with that entry renamed to a
    random string that is never stored. allow_negative=True (the operator's explicit choice, for
    internal red-teaming or to continue co-training) keeps the negative mode.

    The weights load as a plain Hugging Face causal LM; ``upsafe_ext.models.load(directory)`` loads any
    kind of magic folder (an upcycled model's included) and attaches the same tokens (`load_saved_tokens`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"load_magic_model: `directory` {directory!r} does not exist")
    if not is_magic_dir(directory):
        raise FileNotFoundError(f"load_magic_model: {directory} has no {TOKENS_FILE}; not a magic-token model")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"load_magic_model: `dtype` must be a floating torch.dtype, got {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    tokenizer, tokens = load_saved_tokens(model, AutoTokenizer.from_pretrained(directory), directory,
                                          allow_negative=allow_negative)
    return model, tokenizer, tokens


def read_saved_configs(directory: str | os.PathLike) -> tuple[MagicConfig | None, MagicTrainConfig | None]:
    """The configs `save_magic_model` recorded in ``magic_config.json`` (None where absent)."""
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.isfile(path):
        return None, None
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    mc = MagicConfig.from_dict(meta["magic_config"]) if "magic_config" in meta else None
    tc = MagicTrainConfig.from_dict(meta["train_config"]) if "train_config" in meta else None
    return mc, tc
