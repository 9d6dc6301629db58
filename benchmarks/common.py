"""Shared benchmark plumbing: median timing (CUDA events on GPU), frozen config/result records,
and JSON + markdown output that records where each number came from."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

# the layers `upsafe demo`'s scan picks on SmolLM2 with the default training mix (README, UpSafe°C)
SMOLLM2_DEMO_LAYERS = (16, 17, 21, 22, 25, 26, 27, 28)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def time_fn(fn: Callable[[], object], device: str, warmup: int = 5, reps: int = 20,
            min_time_s: float = 0.0) -> dict:
    """Median/p20/p80 in microseconds of `reps` timed calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
    else:
        t_end = time.perf_counter() + min_time_s
        while len(samples) < reps or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    q = lambda f: samples[min(len(samples) - 1, int(f * len(samples)))]  # noqa: E731
    return {"median_us": statistics.median(samples), "p20_us": q(0.2), "p80_us": q(0.8), "reps": len(samples)}


def time_graph(fn: Callable[[], object], reps: int = 20) -> dict | None:
    """Median per-call time of `fn` replayed from a CUDA graph (launch gaps removed)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        inner = 20
        with torch.cuda.graph(g):
            for _ in range(inner):
                fn()
        res = time_fn(g.replay, "cuda", warmup=3, reps=reps)
        return {k: (v / inner if k.endswith("_us") else v) for k, v in res.items()}
    except Exception as exc:  # graph capture is best effort (some baselines sync)
        return {"error": str(exc)[:200]}


def environment(device: str) -> dict:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
    }


def write_results(name: str, rows: list[dict], columns: list[str], out_dir: str, env: dict,
                  title: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=2, default=str)
    lines = [f"# {title}", "", f"device: {env['device']} · torch {env['torch']} · {env['timestamp']}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(md)
    return md


def asdict(x) -> dict:
    return dataclasses.asdict(x)
