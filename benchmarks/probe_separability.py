"""How well can a linear read-out of SmolLM2's own hidden states tell harmful from benign requests, on sources
it was never fitted on? (A diagnostic for the UpSafe°C router, which is such a read-out per layer.)

    python benchmarks/probe_separability.py            # val split only (a diagnostic, not a reported score)

Features: the base model's last-prompt-token hidden state (the generation position) after decoder layers
21, 24, 27 and the concatenation of 21-28. Training: `eval.protocol.training_mix` (harmful 128 or all
391, benign 128 / 391 / 1200). Read-out: `upcycle.scan.fit_probe` (L-BFGS logistic regression). On the
val sets of `eval.protocol.protocol_sets` (n=48 per set) it reports AUROC (harmful imperative + question vs
ShareGPT imperative + question) and, at the threshold that flags 5% of the ShareGPT val prompts, the share
flagged per harmful set and on the edgy probes. The threshold is set on the same val prompts it is read
on: an optimistic operating point, which is why this is a diagnostic and reads val only.
Writes benchmarks/results/probe_separability.{json,md}; features are cached in --cache.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from upsafe_ext.eval.protocol import protocol_sets, training_mix  # noqa: E402
from upsafe_ext.models import load  # noqa: E402
from upsafe_ext.upcycle.scan import auroc, fit_probe, last_token_states  # noqa: E402

LAYERS = list(range(18, 30))
READOUTS = {"layer 21": [21], "layer 24": [24], "layer 27": [27], "layers 21-28": list(range(21, 29))}
HARMFUL = ("harmful imperative", "harmful question", "harmful suffix", "harmful role-play", "harmful past tense")
BENIGN = ("benign imperative", "benign question")


def features(cache: str) -> dict:
    if os.path.exists(cache):
        return torch.load(cache)
    model, tok = load("smollm2")
    model.eval()
    h, b = training_mix(None, 1200)
    sets = protocol_sets("val", n=48, n_benign=48)
    out = {"fh": last_token_states(model, tok, h, progress=True)[:, LAYERS],
           "fb": last_token_states(model, tok, b, progress=True)[:, LAYERS],
           "sets": {s.name: last_token_states(model, tok, s.prompts, progress=True)[:, LAYERS] for s in sets}}
    torch.save(out, cache)
    return out


def readout(d: dict, nh: int, nb: int, layers: list[int], l2: float) -> dict:
    idx = [LAYERS.index(i) for i in layers]
    flat = lambda f: f[:, idx].reshape(f.shape[0], -1)  # noqa: E731
    x = torch.cat([flat(d["fh"][:nh]), flat(d["fb"][:nb])])
    y = torch.tensor([1.0] * min(nh, len(d["fh"])) + [0.0] * min(nb, len(d["fb"])))
    pred = fit_probe(x, y, l2=l2)
    zb = torch.cat([pred(flat(d["sets"][n])) for n in BENIGN])
    zh = torch.cat([pred(flat(d["sets"][n])) for n in HARMFUL[:2]])
    thr = torch.quantile(zb, 0.95)
    row = {"n_harmful": int(min(nh, len(d["fh"]))), "n_benign": int(min(nb, len(d["fb"]))), "l2": l2,
           "auroc": auroc(torch.cat([zh, zb]), torch.cat([torch.ones(len(zh)), torch.zeros(len(zb))]))}
    for n in HARMFUL + ("edgy benign",):
        row[n] = float((pred(flat(d["sets"][n])) > thr).float().mean())
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default="/tmp/upsafe_probe_features.pt")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    d = features(args.cache)
    rows = []
    for nh, nb in [(128, 128), (391, 391), (391, 1200)]:
        for name, layers in READOUTS.items():
            rows.append({"readout": name, **readout(d, nh, nb, layers, 0.1)})
            print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_separability.json"), "w") as f:
        json.dump({"rows": rows, "seconds": time.time() - t0}, f, indent=1)
    head = "| harmful / benign train | read-out | AUROC | " + " | ".join(HARMFUL) + " | edgy benign |"
    lines = [head, "|" + "---|" * (len(HARMFUL) + 4)]
    for r in rows:
        lines.append(f"| {r['n_harmful']} / {r['n_benign']} | {r['readout']} | {r['auroc']:.3f} | "
                     + " | ".join(f"{r[n]:.2f}" for n in HARMFUL + ("edgy benign",)) + " |")
    with open(os.path.join(args.out, "probe_separability.md"), "w") as f:
        f.write("# Linear read-out of SmolLM2-135M-Instruct (Q4_1 dequantised) at the generation position, "
                "val split, n=48 per set; flagged share at 5% ShareGPT false positives\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
