"""Routing benchmark: upsafe sparse_route vs PyTorch eager and torch.compile, same run, ANCHORS shapes.

    python benchmarks/bench_routing.py [--device cuda|cpu] [--out benchmarks/results]

The eager baselines are the ANCHORS form (softmax(logits/T) -> topk -> renormalise) and the test
suite's reference with every output ours returns (counts, permutation, offsets): our op computes the
latter. Writes bench_routing.json/.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, time_fn, time_graph, write_results  # noqa: E402

from upsafe_ext.ops import sparse_route, sparse_route_reference  # noqa: E402

ANCHOR_SHAPES = [(16384, 4, 1), (16384, 4, 2), (65536, 8, 2), (16384, 64, 8), (16384, 128, 8)]
CPU_SHAPES = [(4096, 4, 1), (4096, 8, 2), (4096, 64, 8)]


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    T: int
    E: int
    k: int
    dtype: str = "bfloat16"
    temperature: float = 0.7


def anchor_eager(logits, k, temperature):
    p = torch.softmax(logits.float() / temperature, dim=-1)
    w, i = torch.topk(p, k, dim=-1)
    return w / w.sum(-1, keepdim=True), i


def run(device: str, shapes, out_dir: str) -> str:
    rows = []
    compiled_anchor = torch.compile(anchor_eager)
    compiled_ref = torch.compile(sparse_route_reference)
    for T, E, k in shapes:
        cfg = RoutingConfig(T, E, k)
        x = torch.randn(T, E, device=device, dtype=getattr(torch, cfg.dtype))
        ours = lambda: sparse_route(x, k, temperature=cfg.temperature)  # noqa: E731
        cases = {
            "upsafe": ours,
            "eager (topk only)": lambda: anchor_eager(x, k, cfg.temperature),
            "compile (topk only)": lambda: compiled_anchor(x, k, cfg.temperature),
            "eager (all outputs)": lambda: sparse_route_reference(x, k, temperature=cfg.temperature),
        }
        if device == "cuda":
            cases["compile (all outputs)"] = lambda: compiled_ref(x, k, temperature=cfg.temperature)
        row = {"T": T, "E": E, "k": k}
        for name, fn in cases.items():
            try:
                row[name] = round(time_fn(fn, device, warmup=5, reps=30, min_time_s=0.2)["median_us"], 1)
            except Exception as exc:  # a baseline that fails is recorded, not dropped
                row[name] = f"failed: {type(exc).__name__}"
        if device == "cuda":
            g = time_graph(ours)
            row["upsafe (graph)"] = round(g["median_us"], 2) if "median_us" in g else g.get("error")
        base = row["eager (topk only)"]
        if isinstance(base, float):
            row["speedup vs eager"] = f"{base / row['upsafe']:.1f}x"
        rows.append(row)
        print(row, flush=True)
    cols = ["T", "E", "k", "upsafe"] + (["upsafe (graph)"] if device == "cuda" else []) + [
        "eager (topk only)", "compile (topk only)", "eager (all outputs)"] + (
        ["compile (all outputs)"] if device == "cuda" else []) + ["speedup vs eager"]
    return write_results("bench_routing", rows, cols, out_dir, environment(device),
                         "sparse_route: median µs (bf16 logits)")


def profile(device: str, shapes) -> str:
    """Per-kernel CUDA time of one sparse_route call per shape (torch.profiler), to see where time goes."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    lines = ["| T | E | k | kernel | µs/call |", "|---|---|---|---|---|"]
    for T, E, k in shapes:
        x = torch.randn(T, E, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            sparse_route(x, k, temperature=0.7)
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                sparse_route(x, k, temperature=0.7)
            torch.cuda.synchronize()
        for ev in prof.key_averages():
            dev_us = getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0)) / 10
            if dev_us > 0:
                lines.append(f"| {T} | {E} | {k} | {ev.key[:70]} | {dev_us:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--quick", action="store_true", help="one small shape (smoke test)")
    ap.add_argument("--profile", action="store_true", help="per-kernel CUDA times instead of the table")
    a = ap.parse_args(argv)
    if a.profile:
        text = profile(a.device, ANCHOR_SHAPES)
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "profile_routing.md"), "w") as f:
            f.write(text + "\n")
        print(text)
        return
    shapes = ANCHOR_SHAPES if a.device == "cuda" else CPU_SHAPES
    if a.quick:
        shapes = [(1024, 8, 2)]
    print(run(a.device, shapes, a.out))


if __name__ == "__main__":
    main()
