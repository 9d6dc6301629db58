"""HF `generate` throughput: base model vs upcycled (SafetyMoE in 25% of the layers), same run.

    python benchmarks/bench_generate.py [--device cuda] [--batches 1,16,64] [--out DIR]

The model is SmolLM2-135M's architecture with random weights (the real weights cannot travel to the
GPU machine; throughput does not depend on them), bf16 on CUDA, eager attention, a 64-token prompt
and 128 new tokens (EOS disabled so every run generates exactly 128). Two routings for the upcycled
model: the init router (every token to the original MLP, as for benign traffic) and a random router
that sends about half the tokens to the safety expert.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, write_results  # noqa: E402

from upsafe_ext.upcycle import UpcycleConfig, safety_moe_modules, upcycle_  # noqa: E402


def smollm2_config(tiny: bool = False):
    from transformers import LlamaConfig

    if tiny:  # CPU smoke test
        return LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, attn_implementation="eager")


def build(device, dtype, tiny):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(smollm2_config(tiny), dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def time_generate_interleaved(models: dict, batch, prompt_len, new_tokens, device, reps=5):
    """Median generate time per model, the models run in turn each round (host and clock drift hit all)."""
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(10, vocab, (batch, prompt_len), device=device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    for m in models.values():
        m.generate(ids, **kw)  # warm-up
    times = {k: [] for k in models}
    for _ in range(reps):
        for name, m in models.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = m.generate(ids, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            assert out.shape == (batch, prompt_len + new_tokens)
    res = {}
    for name, ts in times.items():
        t = sorted(ts)[len(ts) // 2]
        res[name] = {"tokens/s": round(batch * new_tokens / t, 1), "ms/step": round(1e3 * t / new_tokens, 2)}
    return res


def profile_layer(device, dtype, out_dir):
    """Host cost of one MLP call at decode size: dense LlamaMLP vs SafetyMoE (2 weight chunks)."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    from transformers.models.llama.modeling_llama import LlamaMLP

    from upsafe_ext.upcycle.layer import SafetyMoE
    from upsafe_ext.upcycle.mlp import extract_mlp

    cfg = smollm2_config()
    mlp = LlamaMLP(cfg).to(device=device, dtype=dtype).eval()
    moe = SafetyMoE(extract_mlp(mlp, cfg), UpcycleConfig(layers=[0])).eval()
    lines = []
    for T in (1, 16, 64):
        x = torch.randn(T, 1, cfg.hidden_size, device=device, dtype=dtype)
        for name, f in (("dense", mlp), ("safety_moe", moe)):
            with torch.no_grad():
                for _ in range(20):
                    f(x)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(200):
                    f(x)
                torch.cuda.synchronize()
            lines.append(f"T={T} {name}: {1e6 * (time.perf_counter() - t0) / 200:.1f} µs/call (host-bound wall time)")
    with torch.no_grad(), tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(50):
            moe(x)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    text = "\n".join(lines) + "\n\n" + table
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "profile_layer.txt"), "w") as f:
        f.write(text)
    print(text)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--tiny", action="store_true", help="a 4-layer toy config (CPU smoke test)")
    ap.add_argument("--profile-layer", action="store_true", help="host cost of one MLP call (CUDA)")
    a = ap.parse_args(argv)
    if a.profile_layer:
        return profile_layer(a.device, torch.bfloat16, a.out)
    tiny = a.tiny or a.device == "cpu"
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    batches = [int(b) for b in a.batches.split(",")] if a.batches else ([1, 16, 64] if a.device == "cuda" else [1, 4])
    new_tokens = 128 if not tiny else 16
    import copy

    model = build(a.device, dtype, tiny)
    L = model.config.num_hidden_layers
    layers = list(range(L // 2 - max(1, L // 8), L // 2 - max(1, L // 8) + max(1, L // 4)))  # 25% of the layers, middle
    init_m = upcycle_(copy.deepcopy(model), UpcycleConfig(layers=layers, num_safety_experts=1, top_k=1))
    mixed_m = upcycle_(copy.deepcopy(model), UpcycleConfig(layers=layers, num_safety_experts=1, top_k=1))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in safety_moe_modules(mixed_m):
            m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g).to(m.router.weight) * 0.05)
            m.router.bias.zero_()
    rows = []
    for b in batches:
        res = time_generate_interleaved({"base": model, "init": init_m, "mixed": mixed_m}, b, 64, new_tokens, a.device)
        base, init, mixed = res["base"], res["init"], res["mixed"]
        row = {"batch": b, "base tokens/s": base["tokens/s"], "base ms/step": base["ms/step"],
               "upcycled (benign routing) tokens/s": init["tokens/s"],
               "upcycled (~50% to safety) tokens/s": mixed["tokens/s"],
               "slowdown benign": round(base["tokens/s"] / init["tokens/s"], 3),
               "slowdown mixed": round(base["tokens/s"] / mixed["tokens/s"], 3)}
        rows.append(row)
        print(row, flush=True)
    title = (f"HF generate, {'toy' if tiny else 'SmolLM2-135M-architecture'} ({L} layers, upcycled layers {layers}), "
             f"{str(dtype).replace('torch.', '')}, 64-token prompt, {new_tokens} new tokens")
    print(write_results("bench_generate", rows, list(rows[0].keys()), a.out, environment(a.device), title))


if __name__ == "__main__":
    main()
