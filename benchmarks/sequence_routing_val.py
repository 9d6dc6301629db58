"""Choose sequence routing's settings on val (UpcycleConfig(routing="sequence"); a tuning run, never test).

    python benchmarks/sequence_routing_val.py --model DIR     # DIR: a routing="sequence" SmolLM2 folder, stage 1 done

With sequence routing a prompt's reply depends only on its route (τ=0: the base model; τ=1: the safety
experts), so every val prompt is generated twice and judged twice, and the whole τ curve follows from the
sequence scores: at τ the prompt is refused iff its reply on the route ``score + log(τ/(1-τ)) > 0`` is. For
each router fit (training-mix sizes, L2) it writes the share refused per val set at every τ of the grid,
with n and 95% Wilson intervals, to benchmarks/val/sequence_routing_val.{json,md} (committed: the record of
the choice). The router fit reads only the base model, so stage 1 changes the τ=1 replies, not the routes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from upsafe_ext.eval.generation import chat, generate_chat  # noqa: E402
from upsafe_ext.eval.judge import RefusalJudge  # noqa: E402
from upsafe_ext.eval.metrics import wilson_interval  # noqa: E402
from upsafe_ext.eval.protocol import protocol_sets, training_mix  # noqa: E402
from upsafe_ext.models import load  # noqa: E402
from upsafe_ext.upcycle import get_upcycle_config, safety_temperature  # noqa: E402
from upsafe_ext.upcycle.sequence import decide, prompt_router_inputs, scores_from_inputs, set_sequence_routers  # noqa: E402

TAUS = (0.3, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
# (harmful, benign training prompts, L2). Earlier runs, with the read-out at the generation position only
# (val/sequence_routing_val_last_only*.json), also tried 391 / 1200 (L2 0.1 and 1.0) and 391 / 3000: more
# benign prompts lowered safety at every τ without lowering over-refusal below the 391 / 391 fits
FITS = ((391, 391, 0.1), (391, 391, 0.3), (391, 391, 1.0), (256, 256, 0.3))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=48, help="prompts per val set")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(HERE, "val"), help="default: benchmarks/val (the committed record)")
    ap.add_argument("--cache", default=None, help="a .pt file keeping the judged replies between runs")
    args = ap.parse_args(argv)
    t0 = time.time()
    model, tok = load(args.model)
    model.eval()
    if get_upcycle_config(model).routing != "sequence":
        raise SystemExit(f"{args.model}: upcycled with routing='token'; give a routing='sequence' folder "
                         "(e.g. `upsafe demo --quick --split val`'s model)")
    sets = protocol_sets("val", n=args.n, n_benign=args.n)
    flat = [p for s in sets for p in s.prompts]
    judge = RefusalJudge()
    cached = torch.load(args.cache) if args.cache and os.path.exists(args.cache) else None
    if cached is not None and cached["prompts"] == flat:
        refused = cached["refused"]
    else:
        refused = {}
        for tau in (0.0, 1.0):
            with safety_temperature(model, tau):
                replies = generate_chat(model, tok, [chat(p) for p in flat], max_new_tokens=args.max_new_tokens,
                                        batch_size=32, desc=f"val replies at τ={tau:g}")
            refused[tau] = [bool(judge(r)) for r in replies]
            print(f"generated at τ={tau:g}: {time.time() - t0:.0f} s", flush=True)
        if args.cache:
            torch.save({"prompts": flat, "refused": refused}, args.cache)
    x_val = prompt_router_inputs(model, tok, flat)
    h_all, b_all = training_mix(None, max(f[1] for f in FITS))
    x_h = prompt_router_inputs(model, tok, h_all)
    x_b = prompt_router_inputs(model, tok, b_all)
    rows = []
    for nh, nb, l2 in FITS:
        # the fit of fit_sequence_routers, on features computed once
        fit = set_sequence_routers(model, torch.cat([x_h[:nh], x_b[:nb]]),
                                   torch.tensor([1.0] * len(x_h[:nh]) + [0.0] * len(x_b[:nb])), l2)
        score = scores_from_inputs(model, x_val).double()
        row = {"n_harmful": nh, "n_benign": nb, "l2": l2, **fit, "taus": {}}
        for tau in TAUS:
            route = decide(score, torch.full_like(score, tau)).bool().tolist()
            at, per = 0, {}
            for s in sets:
                k = len(s.prompts)
                r = sum(refused[1.0 if route[at + i] else 0.0][at + i] for i in range(k))
                lo, hi = wilson_interval(r, k)
                per[s.name] = {"n": k, "refused": r, "rate": r / k, "ci95": [lo, hi], "kind": s.kind,
                               "routed": sum(route[at: at + k]) / k}
                at += k
            row["taus"][tau] = per
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "taus"}), flush=True)
        for tau in TAUS:
            print(f"  τ={tau}: " + ", ".join(f"{n[:18]} {v['rate']:.2f}" for n, v in row["taus"][tau].items()), flush=True)
    os.makedirs(args.out, exist_ok=True)
    starts = [sum(len(t.prompts) for t in sets[:j]) for j in range(len(sets) + 1)]

    def share(tau):  # share refused per set when every prompt takes route τ
        return {s.name: sum(refused[tau][starts[j]:starts[j + 1]]) / len(s.prompts) for j, s in enumerate(sets)}

    base, always = share(0.0), share(1.0)
    out = {"model": args.model, "n": args.n, "base": base, "safety_experts_always": always, "rows": rows, "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(args.out, "sequence_routing_val.json"), "w") as f:
        json.dump(out, f, indent=1)
    names = [s.name for s in sets]
    lines = ["| fit (harmful / benign, L2) | τ | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for r in rows:
        for tau in TAUS:
            lines.append(f"| {r['n_harmful']} / {r['n_benign']}, {r['l2']:g} | {tau} | "
                         + " | ".join(f"{r['taus'][tau][n]['rate']:.2f}" for n in names) + " |")
    with open(os.path.join(args.out, "sequence_routing_val.md"), "w") as f:
        f.write(f"# Sequence routing on val (n={args.n} per set; share refused; model {args.model})\n\n"
                + "\n".join(lines) + "\n")
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
