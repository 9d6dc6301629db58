"""The one way the package loads a model: ``load(name_or_dir, device=None, dtype=None) -> (model, tokenizer)``.

Every CLI command and every method that takes a model by name goes through here, so a folder saved by
any method loads the same way everywhere:

==========================  ======================================================================
``name_or_dir``             what is loaded
==========================  ======================================================================
``"smollm2"``               SmolLM2-135M-Instruct from the bundled GGUF (``eval.real_model``)
``"tiny"``, ``"tiny-gpt2"``  the test fixture: a tiny random causal LM of that family with the byte-level
                            ChatML tokenizer (``testing.tiny_model``; offline, for smoke tests)
a magic-token folder        its weights as below, then the tokens (``magic.model.load_saved_tokens``;
                            attached to the model, negative mode off unless ``allow_negative``)
an upcycled folder          ``upcycle.io.load_upcycled`` (config.json records the upcycling)
any other folder            ``AutoModelForCausalLM.from_pretrained``
anything else               a Hugging Face hub id, where a hub is reachable
==========================  ======================================================================

``device``: None / "cpu" (default), "cuda", "cuda:1", ..., or "auto" (CUDA when available).
``dtype``: None (float32), a floating torch dtype, or a name: float32 / fp32, bfloat16 / bf16, float16 / fp16.
The model comes back in eval mode.

CLI commands add ``--model``, ``--device``, ``--dtype`` and ``--cache-dir`` with `add_model_args` and load
with `load_from_args`.
"""
from __future__ import annotations

import json
import os

import torch

__all__ = ["load", "model_kind", "resolve_device", "resolve_dtype", "add_model_args", "add_device_args",
           "load_from_args", "check_out_arg", "DTYPES"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    """None -> float32; a floating torch dtype as is; a name from `DTYPES`."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"load: `dtype` {dtype!r} is not one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"load: `dtype` must be None, a floating torch.dtype or a name, got {dtype!r}")
    return dtype


def resolve_device(device) -> torch.device:
    """None -> cpu; "auto" -> cuda when available, else cpu; anything torch.device accepts."""
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"load: `device` {device!r} is not a device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"load: `device` {device!r} asked for CUDA but no CUDA device is available")
    return dev


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"load: {directory!r} has no config.json; not a saved Hugging Face model")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def model_kind(name_or_dir: str) -> str:
    """"smollm2", "tiny", "magic", "upcycled", "hf" (a plain folder) or "hub" (anything else)."""
    from .magic.model import is_magic_dir
    from .upcycle.model import CONFIG_KEY

    spec = os.fspath(name_or_dir)
    if spec == "smollm2":
        return "smollm2"
    if spec == "tiny" or spec.startswith("tiny-"):
        return "tiny"
    if os.path.isdir(spec):
        if is_magic_dir(spec):
            return "magic"
        return "upcycled" if CONFIG_KEY in _read_config(spec) else "hf"
    return "hub"


def _load_weights(directory: str, device: torch.device, dtype: torch.dtype):
    """A saved folder's model (upcycled or plain) and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .upcycle.model import CONFIG_KEY

    tok = AutoTokenizer.from_pretrained(directory)
    if CONFIG_KEY in _read_config(directory):
        from .upcycle.io import load_upcycled

        return load_upcycled(directory, dtype=dtype, device=device), tok
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device), tok


def load(name_or_dir, device=None, dtype=None, *, cache_dir: str | None = None, allow_negative: bool = False,
         verbose: bool = True):
    """``(model in eval mode, tokenizer)`` for a model name or folder (see the module docstring).

    cache_dir: where the converted SmolLM2 lives (``eval.real_model.smollm2_cache_dir``).
    allow_negative: a magic folder keeps its negative mode (internal red-teaming only).
    """
    if not isinstance(name_or_dir, (str, os.PathLike)) or not os.fspath(name_or_dir):
        raise ValueError(f"load: `name_or_dir` must be a model name or folder, got {name_or_dir!r}")
    spec = os.fspath(name_or_dir)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    kind = model_kind(spec)
    if kind == "smollm2":
        from .eval.real_model import load_smollm2

        model, tok = load_smollm2(cache_dir=cache_dir, dtype=dt, device=dev, verbose=verbose)
    elif kind == "tiny":
        from .testing import tiny_model

        model, tok = tiny_model(spec.split("-", 1)[1] if "-" in spec else "llama", dtype=dt)
        model = model.to(dev)
    elif kind == "magic":
        from .magic.model import load_saved_tokens

        model, tok = _load_weights(spec, dev, dt)
        tok, _ = load_saved_tokens(model, tok, spec, allow_negative=allow_negative)
    elif kind in ("upcycled", "hf"):
        model, tok = _load_weights(spec, dev, dt)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(spec)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dt).to(dev)
        except (OSError, ValueError) as exc:
            raise ValueError(f"load: {spec!r} is not 'smollm2', 'tiny[-family]', a model folder or a reachable "
                             f"hub id ({type(exc).__name__}: {str(exc)[:200]})") from None
    return model.eval(), tok


# -- command line ------------------------------------------------------------------------------------

def add_device_args(p) -> None:
    """``--device`` and ``--dtype`` on an argparse (sub)parser."""
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameter dtype (default float32)")


def add_model_args(p, *, default: str | None = "smollm2", flag: str = "--model") -> None:
    """``--model`` (a name or folder `load` takes), ``--cache-dir``, ``--device`` and ``--dtype``."""
    p.add_argument(flag, required=default is None, default=default,
                   help="'smollm2' (bundled), 'tiny[-family]' (random, for smoke tests), a folder saved by any "
                        "upsafe method or Hugging Face, or a hub id" + (f" (default {default})" if default else ""))
    p.add_argument("--cache-dir", default=None, help="converted SmolLM2 folder (default: $UPSAFE_CACHE or "
                                                     "~/.cache/upsafe_ext, see upsafe_ext.eval.load_smollm2)")
    add_device_args(p)


def load_from_args(args, spec: str | None = None, *, allow_negative: bool = False):
    """`load` with a command's ``--model`` (or `spec`), ``--device``, ``--dtype`` and ``--cache-dir``;
    a bad value ends the command with its message."""
    try:
        return load(spec if spec is not None else args.model, device=getattr(args, "device", None),
                    dtype=getattr(args, "dtype", None), cache_dir=getattr(args, "cache_dir", None),
                    allow_negative=allow_negative)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"upsafe: {exc}") from None


def check_out_arg(out, inputs, arg: str = "--out") -> str:
    """``saving.check_not_input`` for a command's output folder: a folder the command reads from (its
    ``--model`` and other inputs) ends the command with the reason instead of being overwritten."""
    from .saving import check_not_input

    try:
        return check_not_input(out, inputs, arg=arg)
    except ValueError as exc:
        raise SystemExit(f"upsafe: {exc}") from None
