"""What deciding each route once saves in `upsafe demo` (UpSafe°C, routing per sequence): the scoring passes.

    python benchmarks/routes_once_timing.py          # val prompts at the demo's set sizes; no generation

Before commit 2e92947 the demo decided routes again and again: ``generate`` took the decision itself (one forward
over the prompt, stopped after the last upcycled layer), then the routed column repeated it over the main sets,
and every τ of the sweep strictly between 0 and 1 decided again over the sweep sets, and once more over the KL
prompts. Now ``upcycle.sequence.prompt_scores`` scores each distinct prompt once and the score serves every τ.
The replies are the same either way, so the saving is those passes. This script times one scoring pass over each
group (``prompt_scores``, the pass both versions run; the fastest of `--reps`) and counts the passes:
old = 2 x main + (interior τ) x (sweep + KL), new = main + the sweep prompts not among the main ones.
An estimate from measured passes, not a run of the old code. Writes benchmarks/val/routes_once_timing.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import SMOLLM2_DEMO_LAYERS as DEMO_LAYERS  # noqa: E402
from upsafe_ext.eval.protocol import protocol_sets  # noqa: E402
from upsafe_ext.models import load  # noqa: E402
from upsafe_ext.upcycle import UpcycleConfig, upcycle_  # noqa: E402
from upsafe_ext.upcycle.pipeline import SWEEP_SETS, DemoConfig  # noqa: E402
from upsafe_ext.upcycle.sequence import prompt_scores  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "val", "routes_once_timing.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = DemoConfig()
    model, tok = load("smollm2")
    model.eval()
    upcycle_(model, UpcycleConfig(layers=list(DEMO_LAYERS), routing="sequence"))  # a pass's cost: not its weights
    main_ps = [p for s in protocol_sets("val", n=cfg.eval_harmful, n_benign=cfg.eval_benign) for p in s.prompts]
    sweep_sets = protocol_sets("val", n=cfg.sweep_prompts, names=SWEEP_SETS)
    groups = {"main": main_ps, "sweep": [p for s in sweep_sets for p in s.prompts],
              "kl": [p for s in sweep_sets if s.kind == "benign" for p in s.prompts]}
    seen = set(main_ps)
    groups["sweep_not_in_main"] = [p for p in dict.fromkeys(groups["sweep"]) if p not in seen]
    interior = [t for t in cfg.taus if 0 < t < 1]
    prompt_scores(model, tok, groups["sweep"][:16], progress=False)  # warm-up

    def seconds(prompts):
        if not prompts:
            return 0.0
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            prompt_scores(model, tok, prompts, progress=False)
            best = min(best, time.perf_counter() - t0)
        return best

    t = {name: seconds(ps) for name, ps in groups.items()}
    old = 2 * t["main"] + len(interior) * (t["sweep"] + t["kl"])
    new = t["main"] + t["sweep_not_in_main"]
    result = {"n_prompts": {k: len(v) for k, v in groups.items()}, "interior_taus": interior,
              "pass_seconds": t, "old_seconds": old, "new_seconds": new, "saved_seconds": old - new,
              "threads": args.threads, "reps": args.reps, "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__}
    print(json.dumps(result, indent=1))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
