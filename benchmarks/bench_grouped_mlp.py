"""Grouped expert MLP benchmark: upsafe grouped_expert_mlp vs (a) a per-expert loop, (b) the HF-style
torch._grouped_mm pipeline, (c) a dense MLP of the same size on the same tokens; same run.

    python benchmarks/bench_grouped_mlp.py [--device cuda] [--out DIR] [--quick]

Routing for every case comes from sparse_route (timed separately in bench_routing). Reports
forward and forward+backward median times, TFLOP/s, and for small T the GB/s of expert-weight traffic
(the bytes of every expert any token touched).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines as B  # noqa: E402
from common import environment, time_fn, write_results  # noqa: E402

from upsafe_ext.ops import grouped_expert_mlp, sparse_route  # noqa: E402


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    name: str
    E: int
    k: int
    T: int
    H: int
    I: int
    chunks: tuple = ()        # () = one stacked tensor; (1, N) = frozen original + N safety experts
    all_to_first: bool = False  # every token to expert 0 (a benign batch through a safety MoE)
    backward: bool = True


GPU_CASES = [
    MoEConfig("llama8b E4 k1 T8192", 4, 1, 8192, 4096, 14336),
    MoEConfig("llama8b E4 k2 T8192", 4, 2, 8192, 4096, 14336),
    MoEConfig("llama8b E2 k2 T4096", 2, 2, 4096, 4096, 14336),
    MoEConfig("safety-MoE E2 k1 T8192 (1+1 chunks)", 2, 1, 8192, 4096, 14336, chunks=(1, 1)),
    MoEConfig("safety-MoE benign E2 k1 T8192 (all->orig)", 2, 1, 8192, 4096, 14336, chunks=(1, 1), all_to_first=True),
    MoEConfig("qwen2.5-7b E3 k1 T4096", 3, 1, 4096, 3584, 18944),
    MoEConfig("decode E4 k1 T16", 4, 1, 16, 4096, 14336),
    MoEConfig("decode E4 k2 T64", 4, 2, 64, 4096, 14336),
    MoEConfig("decode E2 k1 T1", 2, 1, 1, 4096, 14336, chunks=(1, 1)),
    MoEConfig("qwen3-30b E128 k8 T16384", 128, 8, 16384, 2048, 768),
    MoEConfig("fine E64 k8 T16384", 64, 8, 16384, 2048, 1408),
]
CPU_CASES = [
    MoEConfig("smollm2 E2 k1 T512 (1+1 chunks)", 2, 1, 512, 576, 1536, chunks=(1, 1)),
    MoEConfig("small E4 k2 T256", 4, 2, 256, 256, 512),
]


def run_case(cfg: MoEConfig, device: str, dtype) -> dict:
    torch.manual_seed(0)
    T, H, I, E, k = cfg.T, cfg.H, cfg.I, cfg.E, cfg.k
    x = (torch.randn(T, H, device=device) * 0.5).to(dtype)
    logits = torch.randn(T, E, device=device)
    if cfg.all_to_first:
        logits[:, 0] += 100.0
    r = sparse_route(logits, k)
    w_gate_up = (torch.randn(E, 2 * I, H, device=device) * H ** -0.5).to(dtype)
    w_down = (torch.randn(E, H, I, device=device) * I ** -0.5).to(dtype)
    if cfg.chunks:
        cuts = torch.tensor(cfg.chunks).cumsum(0).tolist()
        starts = [0] + cuts[:-1]
        w_in = [w_gate_up[s:e].clone() for s, e in zip(starts, cuts)]
        w_out = [w_down[s:e].clone() for s, e in zip(starts, cuts)]
    else:
        w_in, w_out = w_gate_up, w_down
    ours = lambda: grouped_expert_mlp(x, r, w_in, w_out)  # noqa: E731
    cases = {"upsafe": ours, "(a) loop": lambda: B.per_expert_loop(x, r.experts, r.weights, w_gate_up, w_down)}
    if device == "cuda":
        cases["(b) grouped_mm pipeline"] = lambda: B.hf_grouped_mm_pipeline(x, r.experts, r.weights, w_gate_up, w_down)
    cases["(c) dense MLP"] = lambda: B.dense_mlp(x, w_gate_up, w_down)
    ref = ours()
    for name in ("(a) loop", "(b) grouped_mm pipeline"):
        if name in cases:
            B.check_close(name, cases[name](), ref)
    flops = 2 * T * k * 3 * H * I
    touched = int((r.counts > 0).sum())
    weight_bytes = touched * 3 * H * I * x.element_size()
    row = {"case": cfg.name}
    reps = 20 if device == "cuda" else 5
    for name, fn in cases.items():
        res = time_fn(fn, device, warmup=3, reps=reps)
        row[f"{name} fwd µs"] = round(res["median_us"], 1)
    row["upsafe TF/s"] = round(flops / row["upsafe fwd µs"] / 1e6, 1)
    if T <= 64:
        row["upsafe weight GB/s"] = round(weight_bytes / row["upsafe fwd µs"] / 1e3, 0)
        row["floor µs (touched weights @3TB/s)"] = round(weight_bytes / 3e6, 1)
    base = row.get("(b) grouped_mm pipeline fwd µs")
    if base:
        row["fwd speedup vs (b)"] = round(base / row["upsafe fwd µs"], 2)
    row["fwd vs dense"] = round(row["upsafe fwd µs"] / row["(c) dense MLP fwd µs"], 2)
    if cfg.backward:
        xg = x.clone().requires_grad_()
        wg_in = [w.clone().requires_grad_(i > 0 or not cfg.chunks) for i, w in enumerate(w_in if cfg.chunks else [w_in])]
        wg_out = [w.clone().requires_grad_(i > 0 or not cfg.chunks) for i, w in enumerate(w_out if cfg.chunks else [w_out])]
        g = torch.randn(T, H, device=device, dtype=dtype)
        wgu = w_gate_up.clone().requires_grad_()
        wdn = w_down.clone().requires_grad_()

        def ours_fb():
            grouped_expert_mlp(xg, r, wg_in, wg_out).backward(g)

        fb = {"upsafe": ours_fb}
        if device == "cuda":
            fb["(b) grouped_mm pipeline"] = lambda: B.hf_grouped_mm_pipeline(xg, r.experts, r.weights, wgu, wdn).backward(g)
        fb["(c) dense MLP"] = lambda: B.dense_mlp(xg, wgu, wdn).backward(g)
        for name, fn in fb.items():
            res = time_fn(fn, device, warmup=2, reps=max(5, reps // 2))
            row[f"{name} fwd+bwd µs"] = round(res["median_us"], 1)
        row["upsafe fwd+bwd TF/s"] = round(3 * flops / row["upsafe fwd+bwd µs"] / 1e6, 1)
        base = row.get("(b) grouped_mm pipeline fwd+bwd µs")
        if base:
            row["fwd+bwd speedup vs (b)"] = round(base / row["upsafe fwd+bwd µs"], 2)
    print(row, flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="substring of case names to run")
    a = ap.parse_args(argv)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    cases = GPU_CASES if a.device == "cuda" else CPU_CASES
    if a.only:
        cases = [c for c in cases if a.only in c.name]
    if a.quick:
        cases = cases[:1]
    rows = []
    for cfg in cases:
        try:
            rows.append(run_case(cfg, a.device, dtype))
        except Exception as exc:  # recorded, not dropped
            rows.append({"case": cfg.name, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            print(rows[-1], flush=True)
        if a.device == "cuda":
            torch.cuda.empty_cache()
    cols = sorted({c for r in rows for c in r}, key=lambda c: (c != "case", "error" in c, c))
    print(write_results("bench_grouped_mlp", rows, cols, a.out, environment(a.device),
                        f"grouped_expert_mlp ({str(dtype).replace('torch.', '')}): median µs"))


if __name__ == "__main__":
    main()
