"""ESI benchmark: fused multi-tensor accumulate/finalize, top-p selection and the SET optimizer step,
against eager PyTorch, torch.topk and dense AdamW, in one run.

    python benchmarks/bench_esi.py [--device cuda] [--params 5e8,2e9] [--out DIR]

The parameter set is a list of tensors shaped like a Llama-style model's linear weights (4096x4096 and
4096x14336 blocks) adding up to N. Bandwidth counts the bytes each pass must move at least once.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, time_fn, write_results  # noqa: E402

from upsafe_ext.ops import esi_accumulate_, select_topk, sparse_adamw_  # noqa: E402


def make_shapes(n_params: float, device: str):
    shapes, total = [], 0
    blocks = [(4096, 4096), (1024, 4096), (4096, 14336), (14336, 4096)] if device == "cuda" else [(512, 512), (512, 1536)]
    i = 0
    while total < n_params:
        s = blocks[i % len(blocks)]
        shapes.append(s)
        total += s[0] * s[1]
        i += 1
    return shapes, total


def run(device: str, sizes, out_dir: str, frac: float = 0.01):
    rows = []
    for n in sizes:
        shapes, total = make_shapes(n, device)
        torch.manual_seed(0)
        acc = [torch.zeros(s, device=device) for s in shapes]
        grads = [torch.randn(s, device=device, dtype=torch.bfloat16) for s in shapes]
        params = [torch.randn(s, device=device, dtype=torch.bfloat16) for s in shapes]
        sigma = [1.0] * len(shapes)
        row = {"N params": f"{total / 1e9:.2f}e9", "tensors": len(shapes)}
        reps = 10 if device == "cuda" else 3
        t = time_fn(lambda: esi_accumulate_(acc, grads), device, warmup=2, reps=reps)["median_us"]
        row["accumulate µs"] = round(t)
        row["accumulate GB/s"] = round(total * 10 / t / 1e3)
        t = time_fn(lambda: [a.add_(g) for a, g in zip(acc, grads)], device, warmup=2, reps=reps)["median_us"]
        row["eager acc.add_(g) µs"] = round(t)
        t = time_fn(lambda: [a.add_((p * g).abs()) for a, p, g in zip(acc, params, grads)], device, warmup=1,
                    reps=reps)["median_us"]
        row["ANCHORS eager add_(|p*g|) µs"] = round(t)
        hist_box = {}

        def fin():
            hist_box["h"] = esi_accumulate_(acc, grads, sigma, finalize=True)

        t = time_fn(fin, device, warmup=1, reps=reps)["median_us"]
        row["accumulate+finalize+hist µs"] = round(t)
        row["finalize GB/s"] = round(total * 10 / t / 1e3)
        k = int(round(frac * total))
        t = time_fn(lambda: select_topk(acc, k, hist=hist_box["h"]), device, warmup=1, reps=reps)["median_us"]
        row["select top1% µs"] = round(t)
        one_read = total * 4 / 3.0e6  # µs to read the fp32 scores once at 3 TB/s
        row["select / one read @3TB/s"] = round(t / one_read, 2) if device == "cuda" else ""
        if device == "cuda" or total <= 5e7:
            flat = torch.cat([a.reshape(-1) for a in acc]) if total <= 3e9 else None
            if flat is not None:
                row["torch.topk(1%) µs"] = round(time_fn(lambda: torch.topk(flat, k, sorted=False), device, warmup=1,
                                                         reps=max(3, reps // 2))["median_us"])
                del flat
        masks = select_topk(acc, k, hist=hist_box["h"])
        idx = [m.reshape(-1).nonzero().squeeze(1).int() for m in masks]
        m_ = [torch.zeros(i.numel(), device=device) for i in idx]
        v_ = [torch.zeros(i.numel(), device=device) for i in idx]
        master = [p.reshape(-1)[i.long()].float() for p, i in zip(params, idx)]
        step = {"n": 0}

        def set_step():
            step["n"] += 1
            sparse_adamw_(params, grads, idx, m_, v_, master, lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.0, step=step["n"])

        row["SET step µs"] = round(time_fn(set_step, device, warmup=2, reps=reps)["median_us"])
        set_state = sum(t.numel() * 4 for t in m_ + v_ + master) + sum(i.numel() * 4 for i in idx)
        if device == "cuda" and total <= 1e9:
            ps = [p.float().requires_grad_() for p in params]  # fp32 master copy, as fp32 AdamW would hold
            for p, g in zip(ps, grads):
                p.grad = g.float()
            opt = torch.optim.AdamW(ps, lr=1e-5, foreach=True)
            row["dense AdamW(foreach) step µs"] = round(time_fn(opt.step, device, warmup=2, reps=reps)["median_us"])
            dense_state = sum(p.numel() * 8 for p in ps)
            row["SET state / AdamW state"] = f"{set_state / dense_state:.3f}"
            del ps, opt
        else:
            row["SET state / AdamW state"] = f"{set_state / (total * 8):.3f}"
        rows.append(row)
        print(row, flush=True)
        del acc, grads, params, masks, idx, m_, v_, master
        if device == "cuda":
            torch.cuda.empty_cache()
    cols = list(rows[0].keys()) if rows else []
    for r in rows:
        cols += [c for c in r if c not in cols]
    return write_results("bench_esi", rows, cols, out_dir, environment(device), "ESI kernels: median µs")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--params", default=None, help="comma-separated parameter counts, e.g. 5e8,2e9")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args(argv)
    sizes = [float(x) for x in a.params.split(",")] if a.params else ([5e8, 2e9] if a.device == "cuda" else [2e7])
    print(run(a.device, sizes, a.out))


if __name__ == "__main__":
    main()
