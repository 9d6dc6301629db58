"""Which read-outs of the base model should a sequence router use? (UpSafe°C, routing per sequence; a tuning
diagnostic on val, never test.)

    python benchmarks/router_readouts_val.py --cache /tmp/router_readouts_val.pt

Route-only, like ``sequence_router_fits_val.py`` (whose operating point and val sets it reuses): the route of
a request depends on the base model and the router alone. The package's router reads each upcycled layer's MLP
input at the generation position (``last``) and averaged over every attended position of the rendered chat
(``mean``: that includes the chat template's own tokens, e.g. SmolLM2's default system text, the same for
every request). Here the same MLP inputs are read at every one of the 30 layers, four ways:

* ``last``: the generation position (the package's ``router``);
* ``mean``: the mean over all attended positions (the package's ``router_pool``);
* ``user_mean``: the mean over the user message's own tokens only (template tokens left out);
* ``user_max``: the per-feature max over the user message's tokens.

Each combination of read-outs and layers is one logistic fit (``scan.fit_probe_params``, L2 on standardised
features) on the demo's training mix, read at the threshold that routes at most 2% (3%) of each style of the
whole ShareGPT val slice. Three rows try other fits of the package's read-outs instead (``NONLINEAR``): an
ensemble of 5 one-hidden-layer MLPs (64 GELU units, input dropout 0.5, AdamW weight decay 0.01, 200 full-batch
steps), the mean of one logistic fit per layer, and a logistic fit on the top 32 principal components.
Writes benchmarks/val/router_readouts_val.{json,md}.

``--frame TEXT`` (a ``{prompt}`` placeholder in it) reads the base model over the request wrapped in that text
instead (e.g. a question whether the request is harmful), for every prompt alike; the records get ``_frame``.
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
from sequence_router_fits_val import operating_points  # noqa: E402
from upsafe_ext.eval.prompts import sharegpt_prompts  # noqa: E402
from upsafe_ext.eval.protocol import protocol_sets, training_mix  # noqa: E402
from upsafe_ext.models import load  # noqa: E402
from upsafe_ext.train.chat import chat, encode_prompts  # noqa: E402
from upsafe_ext.upcycle.scan import fit_probe_params  # noqa: E402

READOUTS = ("last", "mean", "user_mean", "user_max")
MIX = (256, 256)  # the demo's fit: 256 harmful + 256 benign prompts of the training mix
# (name, read-outs, layers, L2); layers None = the demo's upcycled layers
FITS = [("package (last + mean)", ("last", "mean"), None, 0.3),
        ("last + user mean", ("last", "user_mean"), None, 0.3),
        ("last + user max", ("last", "user_max"), None, 0.3),
        ("last + user mean + user max", ("last", "user_mean", "user_max"), None, 0.3),
        ("last + mean + user max", ("last", "mean", "user_max"), None, 0.3),
        ("user mean", ("user_mean",), None, 0.3),
        ("user max", ("user_max",), None, 0.3),
        ("last + mean, layers 8-15", ("last", "mean"), tuple(range(8, 16)), 0.3),
        ("last + mean, layers 0-29 even", ("last", "mean"), tuple(range(0, 30, 2)), 0.3),
        ("last + user max, L2 1", ("last", "user_max"), None, 1.0),
        ("last + user max, L2 3", ("last", "user_max"), None, 3.0),
        ("last + mean + user max, L2 1", ("last", "mean", "user_max"), None, 1.0)]
NONLINEAR = [("package read-outs, MLP x5", "mlp"), ("package read-outs, mean of per-layer fits", "per-layer"),
             ("package read-outs, 32 principal components", "pca")]


def scorer(kind: str, x: torch.Tensor, y: torch.Tensor, l2: float, n_layers: int):
    """A function features -> log-odds of "harmful", fitted on (x, y)."""
    if kind == "logistic":
        w, b = fit_probe_params(x, y, l2=l2)
        return lambda z: (z @ w + b).double()
    if kind == "per-layer":
        h = x.shape[1] // n_layers
        fits = [fit_probe_params(x[:, i * h:(i + 1) * h], y, l2=l2) for i in range(n_layers)]
        return lambda z: torch.stack([z[:, i * h:(i + 1) * h] @ w + b
                                      for i, (w, b) in enumerate(fits)]).mean(0).double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    zs = (x - mu) / sd
    if kind == "pca":
        comps = torch.pca_lowrank(zs, q=64, niter=4)[2][:, :32]
        w, b = fit_probe_params(zs @ comps, y, l2=0.01)
        return lambda z: ((((z - mu) / sd) @ comps) @ w + b).double()
    nets = []
    for seed in range(5):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(zs.shape[1], 64), torch.nn.GELU(),
                                  torch.nn.Linear(64, 1))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
        for _ in range(200):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(net(zs).squeeze(-1), y).backward()
            opt.step()
        nets.append(net.eval())
    return lambda z: torch.stack([n(((z - mu) / sd)).squeeze(-1) for n in nets]).mean(0).detach().double()


def template_span(tok) -> tuple[int, int]:
    """(tokens before, tokens after) the user message in a rendered one-turn chat."""
    a, b = encode_prompts(tok, [chat("Alpha"), chat("Zulu")])
    pre = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    post = next(i for i, (x, y) in enumerate(zip(a[::-1], b[::-1])) if x != y)
    return pre, post


@torch.no_grad()
def readouts(model, tok, prompts, span, frame=None) -> torch.Tensor:
    """``[n, 30 layers, 4 read-outs, H]`` fp16: every decoder layer's MLP input, read the four ways."""
    layers = model.model.layers
    got = {}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda m, args, i=i: got.__setitem__(i, args[0][0].float())) for i, layer in enumerate(layers)]
    pre, post = span
    out = []
    try:
        framed = [frame.format(prompt=p) if frame else p for p in prompts]
        for ids in encode_prompts(tok, [chat(p) for p in framed]):
            ids = ids[-256:]
            model(input_ids=torch.tensor([ids]), use_cache=False)
            lo = min(pre, len(ids) - 1)
            hi = max(lo + 1, len(ids) - post)
            rows = []
            for i in range(len(layers)):
                x = got[i]
                rows.append(torch.stack([x[-1], x.mean(0), x[lo:hi].mean(0), x[lo:hi].amax(0)]))
            out.append(torch.stack(rows).half())
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(out)


def val_features(f, cache: str | None, **extra) -> dict:
    """``f(prompts)`` of the val sets, the whole ShareGPT val slice and the training mix (plus `extra`), kept in
    the .pt file `cache` between runs."""
    if cache and os.path.exists(cache):
        return torch.load(cache)
    d = {"sets": {s.name: f(s.prompts) for s in protocol_sets("val", n=48, n_benign=48)},
         "sharegpt": {st: f(sharegpt_prompts("val", st)) for st in ("imperative", "question")},
         "mix": tuple(f(ps) for ps in training_mix(*MIX)), **extra}
    if cache:
        torch.save(d, cache)
    return d


def features(model, tok, cache: str | None, frame: str | None = None) -> dict:
    span = template_span(tok)  # with a frame, the "user" read-outs cover the framed message
    t0 = time.time()

    def f(ps):
        x = readouts(model, tok, ps, span, frame)
        print(f"  {len(ps)} prompts, {time.time() - t0:.0f} s", flush=True)
        return x

    return val_features(f, cache, span=span, frame=frame)


def select(x: torch.Tensor, names, layers) -> torch.Tensor:
    idx = [READOUTS.index(r) for r in names]
    return x[:, list(layers)][:, :, idx].float().reshape(len(x), -1)


COLS = ("harmful imperative", "harmful question", "harmful past tense", "harmful role-play", "harmful suffix",
        "edgy benign", "prompt injection")


def progress_line(name: str, points: list[dict]) -> str:
    return f"{name}: " + ", ".join(f"ShareGPT<={p['sharegpt_routed_max']:.2f} pooled {p['pooled_harmful']:.3f} "
                                   f"edgy {p['routed']['edgy benign']:.2f}" for p in points)


def logistic_row(name: str, xh: torch.Tensor, xb: torch.Tensor, view: dict, l2: float, **fields) -> dict:
    """One logistic fit (harmful rows `xh` against benign `xb`), read at the operating points on `view` (the
    val sets and ShareGPT slices, features alike); prints its progress line; the row for ``write_records``."""
    score = scorer("logistic", torch.cat([xh, xb]), torch.tensor([1.0] * len(xh) + [0.0] * len(xb)), l2, 1)
    points = operating_points(score, view)
    print(progress_line(name, points), flush=True)
    return {"fit": name, **fields, "points": points}


def write_records(out_dir: str, stem: str, result: dict, lead: list[tuple[str, str]], heading: str,
                  note: str = "") -> None:
    """``stem``.json (`result`) and ``stem``.md: a row per fit and operating point; `lead` = the first columns,
    (header, key of the row)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    lines = ["| " + " | ".join(h for h, _ in lead) + " | ShareGPT routed ≤ | pooled 5 HarmBench forms | "
             + " | ".join(COLS) + " |", "|" + "---|" * (len(COLS) + len(lead) + 2)]
    for r in result["rows"]:
        for p in r["points"]:
            lines.append("| " + " | ".join(str(r[k]) for _, k in lead) + f" | {p['sharegpt_routed_max']:.2f} | "
                         f"**{p['pooled_harmful']:.3f}** | " + " | ".join(f"{p['routed'][c]:.2f}" for c in COLS) + " |")
    n = result["rows"][0]["points"][0]["n"]
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as fh:
        fh.write(f"# {heading}\n\n" + (f"{note}\n\n" if note else "")
                 + f"Threshold per row: at most 2% / 3% of each style of the whole ShareGPT val slice routed; "
                 f"HarmBench forms n={n['harmful imperative']} each, edgy n={n['edgy benign']}. Set on the prompts "
                 f"it is read on: a comparison of fits, not a score. {result['seconds']} s.\n\n"
                 + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=None, help="a .pt file keeping the read-outs between runs")
    ap.add_argument("--out", default=os.path.join(HERE, "val"), help="default: benchmarks/val (the committed record)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--frame", default=None, help="wrap each request in this text ({prompt} = the request)")
    args = ap.parse_args(argv)
    if args.frame is not None and "{prompt}" not in args.frame:
        ap.error("--frame must contain {prompt}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load("smollm2")
    model.eval()
    d = features(model, tok, args.cache, args.frame)
    if d.get("frame") != args.frame:
        ap.error(f"--cache {args.cache} holds read-outs with frame {d.get('frame')!r}, not {args.frame!r}")
    tag = "_frame" if args.frame else ""
    print(f"read-outs: {time.time() - t0:.0f} s (template span {d['span']})", flush=True)
    rows = []
    torch.manual_seed(0)  # pca_lowrank's random start
    for name, names, layers, l2, kind in [(*f, "logistic") for f in FITS] + [
            (n, ("last", "mean"), None, 0.3, k) for n, k in NONLINEAR]:
        layers = layers or DEMO_LAYERS
        xh, xb = (select(x, names, layers) for x in d["mix"])
        score = scorer(kind, torch.cat([xh, xb]), torch.tensor([1.0] * len(xh) + [0.0] * len(xb)), l2, len(layers))
        view = {"sets": {k: select(x, names, layers) for k, x in d["sets"].items()},
                "sharegpt": {k: select(x, names, layers) for k, x in d["sharegpt"].items()}}
        points = operating_points(score, view)
        rows.append({"fit": name, "kind": kind, "readouts": list(names), "layers": list(layers), "l2": l2,
                     "points": points})
        print(progress_line(name, points), flush=True)
    result = {"mix": list(MIX), "span": list(d["span"]), "frame": args.frame, "rows": rows,
              "seconds": round(time.time() - t0, 1)}
    for r in rows:
        r["l2_shown"] = r["l2"] if r["kind"] in ("logistic", "per-layer") else "-"
    write_records(args.out, f"router_readouts_val{tag}", result, [("read-outs (layers)", "fit"), ("L2", "l2_shown")],
                  f"Sequence-router read-outs on val, routed share (route-only; fit on {MIX[0]} + {MIX[1]} "
                  f"training-mix prompts; demo layers {list(DEMO_LAYERS)} unless named)",
                  f"Every request read inside the frame {args.frame!r}." if args.frame else "")
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
