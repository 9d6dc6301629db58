"""Would harmful training prompts from more categories help the sequence router? (UpSafe°C, routing per
sequence; a tuning diagnostic on val, never test.)

    python benchmarks/router_extra_harmful_val.py --cache /tmp/router_readouts_val.pt

AdvBench, the main harmful training source, barely covers some harm categories (misinformation articles,
hate speech, sexual content, scams). PyRIT ships small hand-written AIRT seed files per harm category
(``pyrit/datasets/seed_datasets/local/airt/*.prompt``; only that folder: a sibling one holds a reserved
set). This script adds their harmful requests (``eval.assets.pyrit_airt_harmful``) to the demo's router fit
and reads the routed shares on val at the package's operating points, route-only, with the package's
read-outs (MLP input at the generation position and the mean over the chat, demo layers), as
``router_readouts_val.py`` does (whose cached read-outs it reuses). Rows: the package fit; + the AIRT
requests as written; + each also through the four train-template rephrasings; the same with the AIRT
"leakage" file (copyright and system-prompt extraction requests) as well. Writes
benchmarks/val/router_extra_harmful_val.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import SMOLLM2_DEMO_LAYERS as DEMO_LAYERS  # noqa: E402
from router_readouts_val import features, logistic_row, readouts, select, write_records  # noqa: E402
from upsafe_ext.eval.assets import pyrit_airt_harmful  # noqa: E402
from upsafe_ext.eval.rephrase import FORMS, rephrase  # noqa: E402
from upsafe_ext.models import load  # noqa: E402

PACKAGE = ("last", "mean")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=None, help="the .pt file of router_readouts_val.py (read-outs kept)")
    ap.add_argument("--out", default=os.path.join(HERE, "val"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load("smollm2")
    model.eval()
    d = features(model, tok, args.cache)
    span = tuple(d["span"])
    groups = {"airt": pyrit_airt_harmful(), "airt + leakage": pyrit_airt_harmful(include_leakage=True)}
    every = groups["airt + leakage"]  # the AIRT requests come first: each group is a head of it, read once
    forms = [rephrase(p, f, "train") for p in every for f in FORMS]  # prompt-major: a head of prompts, of forms
    plain_all, forms_all = readouts(model, tok, every, span), readouts(model, tok, forms, span)
    print(f"{len(every)} prompts (+{len(forms)} rephrased), {time.time() - t0:.0f} s", flush=True)
    extra = {name: (plain_all[:len(ps)], forms_all[:len(ps) * len(FORMS)], len(ps)) for name, ps in groups.items()}
    xh0, xb = (select(x, PACKAGE, DEMO_LAYERS) for x in d["mix"])
    view = {"sets": {k: select(x, PACKAGE, DEMO_LAYERS) for k, x in d["sets"].items()},
            "sharegpt": {k: select(x, PACKAGE, DEMO_LAYERS) for k, x in d["sharegpt"].items()}}
    fits = [("package mix", xh0)]
    for name, (plain, forms, n) in extra.items():
        p, f = select(plain, PACKAGE, DEMO_LAYERS), select(forms, PACKAGE, DEMO_LAYERS)
        fits += [(f"mix + {name} ({n})", torch.cat([xh0, p])),
                 (f"mix + {name} + rephrased ({n} + {len(f)})", torch.cat([xh0, p, f]))]
    rows = []
    for name, xh in fits:
        rows.append(logistic_row(name, xh, xb, view, 0.3, harmful_rows=len(xh), benign_rows=len(xb)))
    result = {"layers": list(DEMO_LAYERS), "readouts": list(PACKAGE), "l2": 0.3, "rows": rows,
              "extra_prompts": {k: list(v) for k, v in groups.items()}, "seconds": round(time.time() - t0, 1)}
    write_records(args.out, "router_extra_harmful_val", result, [("fit", "fit")],
                  f"Sequence router with PyRIT AIRT harmful requests added to its fit, val, routed share "
                  f"(route-only; package read-outs, demo layers {list(DEMO_LAYERS)}, L2 0.3)")
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
