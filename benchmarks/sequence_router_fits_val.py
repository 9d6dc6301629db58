"""Does another sequence-router fit generalise better to unseen val sources? (UpSafe°C, routing per sequence;
a tuning diagnostic on val, never test.)

    python benchmarks/sequence_router_fits_val.py --cache /tmp/router_fits_val.pt

Route-only: a sequence route depends on the base model and the router alone (``upcycle.sequence``), so this
needs no stage 1 and no generation. SmolLM2 is upcycled at the default demo's layers (its scan picked 16, 17,
21, 22, 25-28; ``--layers``), ``prompt_router_inputs`` gives the routers' exact features (generation position
and prompt mean of every upcycled layer's input), and each fit below sets the routers from the same cached
features. On the demo's val model the stage-1 safety experts refuse every harmful val prompt at τ=1 and the
base model almost none at τ=0 (``sequence_routing_val.md``), so on the harmful sets the routed share is the
safety to within the base model's own refusals.

Operating point: the threshold that routes at most 2% (and 3%) of *each* style of the whole ShareGPT val
slice (417 imperatives, 388 questions; the base model alone refuses 0.017 / 0.031 of it, so about 2% routed is
what the 0.05 over-refusal target leaves). At it, the pooled routed share of the five unseen HarmBench val forms
(imperatives, questions, past tense, role-play, suffix; n = 5 x 41) and the share of the edgy probes.
The threshold is set on the prompts it is read on: compare fits with it, do not report it as a score.

Fits (all on ``eval.protocol.training_mix``'s train split):
* ``logistic``: ``upcycle.sequence.set_sequence_routers`` (the package's fit, L2 on standardised features);
  the default demo's is 256 + 256 prompts, L2 0.3, the mix's own augmentation (35% rewritten, one form each);
* ``augment=all``: the unaugmented prompts plus every one of them in each train-template form (question,
  past tense, role-play, suffix), both sides: 5x the rows;
* ``mean-difference``: the difference of the class means of the standardised features (the large-L2 limit
  of the logistic fit), with a 1-D logistic on the projection for the scale and bias.
Writes benchmarks/val/sequence_router_fits_val.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import SMOLLM2_DEMO_LAYERS as DEMO_LAYERS  # noqa: E402
from sequence_routing_val import HARMFUL  # noqa: E402  (the five unseen HarmBench val forms of its rule)
from upsafe_ext.eval.prompts import sharegpt_prompts  # noqa: E402
from upsafe_ext.eval.protocol import protocol_sets, training_mix  # noqa: E402
from upsafe_ext.eval.rephrase import FORMS, rephrase  # noqa: E402
from upsafe_ext.models import load  # noqa: E402
from upsafe_ext.upcycle import UpcycleConfig, upcycle_  # noqa: E402
from upsafe_ext.upcycle.scan import fit_probe_params  # noqa: E402
from upsafe_ext.upcycle.sequence import prompt_router_inputs, scores_from_inputs, set_sequence_routers  # noqa: E402

ROUTED = (0.02, 0.03)  # the largest share of each ShareGPT val style routed at the operating points
# (method, harmful, benign, augment, L2); augment "mix" = training_mix's own, "all" = every train form added
FITS = [("logistic", 256, 256, "mix", l2) for l2 in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 30.0)] + [
    ("logistic", 391, 391, "mix", 0.3), ("logistic", 391, 800, "mix", 0.3), ("logistic", 391, 1200, "mix", 0.3),
    ("logistic", 256, 256, "all", 0.3), ("logistic", 256, 256, "all", 1.0), ("logistic", 391, 512, "all", 0.3),
    ("mean-difference", 256, 256, "mix", None), ("mean-difference", 391, 1200, "mix", None)]


def features(model, tok, cache: str | None) -> dict:
    """Router inputs (fp16) of the val sets, the whole ShareGPT val slice and the training prompts, cached."""
    if cache and os.path.exists(cache):
        return torch.load(cache)
    f = lambda ps: prompt_router_inputs(model, tok, ps, progress=True).half()  # noqa: E731
    nb_all = max(r[2] for r in FITS if r[3] == "all")
    plain_h, plain_b = training_mix(max(r[1] for r in FITS), nb_all, augment=0.0)
    d = {"sets": {s.name: f(s.prompts) for s in protocol_sets("val", n=48, n_benign=48)},
         "sharegpt": {st: f(sharegpt_prompts("val", st)) for st in ("imperative", "question")},
         "mix": tuple(f(ps) for ps in training_mix(max(r[1] for r in FITS), max(r[2] for r in FITS))),
         "plain": (f(plain_h), f(plain_b)),
         "forms": {form: (f([rephrase(p, form, "train") for p in plain_h]),
                          f([rephrase(p, form, "train") for p in plain_b])) for form in FORMS}}
    if cache:
        torch.save(d, cache)
    return d


def training_rows(d: dict, nh: int, nb: int, augment: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [n, L, 2, H] fp32, y [n]) of one fit."""
    if augment == "mix":
        parts = [d["mix"]]
    else:  # the unaugmented prompts and each of them in every train form
        parts = [d["plain"]] + [d["forms"][form] for form in FORMS]
    xh = torch.cat([h[:nh] for h, _ in parts]).float()
    xb = torch.cat([b[:nb] for _, b in parts]).float()
    return torch.cat([xh, xb]), torch.tensor([1.0] * len(xh) + [0.0] * len(xb))


def scorer(model, method: str, x: torch.Tensor, y: torch.Tensor, l2):
    """A function router inputs -> sequence scores (log-odds of "harmful")."""
    if method == "logistic":  # the package's fit, read through the routers it sets
        set_sequence_routers(model, x, y, l2)
        return lambda z: scores_from_inputs(model, z.float()).double()
    flat = x.reshape(len(x), -1)
    mu, sd = flat.mean(0), flat.std(0).clamp_min(1e-6)
    zs = (flat - mu) / sd
    w = (zs[y == 1].mean(0) - zs[y == 0].mean(0)) / sd
    a, c = fit_probe_params((flat @ w)[:, None], y, l2=1e-4)  # scale and bias of the projection
    return lambda z: (z.float().reshape(len(z), -1) @ (w * a[0]) + c).double()


@torch.no_grad()
def operating_points(score, d: dict) -> list[dict]:
    """At the thresholds routing <= ROUTED of each ShareGPT val style: routed share per val set."""
    sg = {st: score(x) for st, x in d["sharegpt"].items()}
    per_set = {name: score(x) for name, x in d["sets"].items()}
    out = []
    for share in ROUTED:
        thr = max(float(torch.quantile(s, 1 - share)) for s in sg.values())
        routed = {name: int((s > thr).sum()) for name, s in per_set.items()}
        n = {name: len(s) for name, s in per_set.items()}
        out.append({"sharegpt_routed_max": share, "threshold": thr,
                    "sharegpt_routed": {st: float((s > thr).float().mean()) for st, s in sg.items()},
                    "pooled_harmful": sum(routed[k] for k in HARMFUL) / sum(n[k] for k in HARMFUL),
                    "routed": {name: routed[name] / n[name] for name in per_set}, "n": n})
    return out


def write(out_dir: str, result: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sequence_router_fits_val.json"), "w") as f:
        json.dump(result, f, indent=1)
    cols = list(HARMFUL) + ["edgy benign", "prompt injection"]
    lines = ["| fit | harmful / benign (rows) | L2 | ShareGPT routed ≤ | pooled 5 HarmBench forms | "
             + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 5)]
    for r in result["rows"]:
        for p in r["points"]:
            lines.append(f"| {r['method']}, augment {r['augment']} | {r['n_harmful']} / {r['n_benign']} "
                         f"({r['rows_harmful']} / {r['rows_benign']}) | {r['l2'] if r['l2'] is not None else '-'} | "
                         f"{p['sharegpt_routed_max']:.2f} | **{p['pooled_harmful']:.3f}** | "
                         + " | ".join(f"{p['routed'][c]:.2f}" for c in cols) + " |")
    n = result["rows"][0]["points"][0]["n"]
    with open(os.path.join(out_dir, "sequence_router_fits_val.md"), "w") as f:
        f.write(f"# Sequence-router fits on val, routed share (route-only; layers {result['layers']})\n\n"
                f"Threshold per row: at most 2% / 3% of each style of the whole ShareGPT val slice routed; "
                f"HarmBench forms n={n['harmful imperative']} each, edgy n={n['edgy benign']}, prompt injection "
                f"n={n['prompt injection']}. Set on the prompts it is read on: a comparison of fits, not a score. "
                f"{result['seconds']} s.\n\n" + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=list(DEMO_LAYERS))
    ap.add_argument("--cache", default=None, help="a .pt file keeping the router inputs between runs")
    ap.add_argument("--out", default=os.path.join(HERE, "val"), help="default: benchmarks/val (the committed record)")
    args = ap.parse_args(argv)
    t0 = time.time()
    model, tok = load("smollm2")
    model.eval()
    upcycle_(model, UpcycleConfig(layers=args.layers, routing="sequence"))
    d = features(model, tok, args.cache)
    print(f"router inputs: {time.time() - t0:.0f} s", flush=True)
    rows = []
    for method, nh, nb, augment, l2 in FITS:
        x, y = training_rows(d, nh, nb, augment)
        points = operating_points(scorer(model, method, x, y, l2), d)
        rows.append({"method": method, "n_harmful": nh, "n_benign": nb, "augment": augment, "l2": l2,
                     "rows_harmful": int(y.sum()), "rows_benign": int((1 - y).sum()), "points": points})
        print(f"{method} {nh}/{nb} {augment} l2={l2}: " + ", ".join(
            f"ShareGPT<={p['sharegpt_routed_max']:.2f} pooled {p['pooled_harmful']:.3f} edgy "
            f"{p['routed']['edgy benign']:.2f}" for p in points), flush=True)
    write(args.out, {"layers": args.layers, "rows": rows, "seconds": round(time.time() - t0, 1)})
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
