"""Would a sequence router decide better after reading the base model's first reply tokens? (UpSafe°C, routing
per sequence; a tuning diagnostic on val, never test.)

    python benchmarks/router_reply_readouts_val.py --cache /tmp/router_reply_val.pt

A request that is not routed *is* the base model, so a router could let the base model write its first k reply
tokens (greedy), read them, and only then decide: not routed, generation goes on from those k tokens exactly as
the base model would; routed, the reply starts again from the prompt through the safety experts (k wasted
decode steps). This measures, route-only and on val, whether the read-outs after k base tokens separate the
unseen harmful sources from ShareGPT better than the package's read-outs at the prompt's end (k = 0).

For k in ``KS`` and each of the demo's upcycled layers: the MLP input at the position that predicts reply token
k+1 (``last``, k = 0 is the package's ``router``), its mean over the prompt and the first k reply tokens (``mean``,
k = 0 is ``router_pool``) and its mean over the k reply tokens alone (``reply``). Fits, operating point and sets
as in ``router_readouts_val.py``. Writes benchmarks/val/router_reply_readouts_val.{json,md}.
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
from router_readouts_val import MIX, logistic_row, val_features, write_records  # noqa: E402
from upsafe_ext.models import load  # noqa: E402
from upsafe_ext.train.chat import chat, encode_prompts, eos_token_ids, left_pad, pad_token_id  # noqa: E402

KS = (0, 2, 4, 8, 16)
READ = ("last", "mean", "reply")
# (name, [(k, read-out), ...])
FITS = [("package: last + mean at k=0", [(0, "last"), (0, "mean")])] + [
    (f"last + mean at k={k}", [(k, "last"), (k, "mean")]) for k in KS[1:]] + [
    (f"k=0 last + mean, k={k} reply mean", [(0, "last"), (0, "mean"), (k, "reply")]) for k in KS[1:]] + [
    (f"k=0 last + mean, k={k} last + mean", [(0, "last"), (0, "mean"), (k, "last"), (k, "mean")]) for k in KS[1:]]


@torch.no_grad()
def readouts(model, tok, prompts, batch_size: int = 16) -> torch.Tensor:
    """``[n, len(KS), layers, 3, H]`` fp16 (see the module docstring)."""
    layers = [model.model.layers[i] for i in DEMO_LAYERS]
    eos = set(eos_token_ids(model, tok))
    pad = pad_token_id(tok, model)
    kmax = max(KS)
    got = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, args, i=i: got.__setitem__(i, args[0].float()))
             for i, layer in enumerate(layers)]
    ids_all = [p[-256:] for p in encode_prompts(tok, [chat(p) for p in prompts])]
    out = []
    try:
        for s in range(0, len(ids_all), batch_size):
            ids, mask = left_pad(ids_all[s: s + batch_size], pad)
            width = ids.shape[1]
            seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=kmax, do_sample=False,
                                 pad_token_id=pad, eos_token_id=sorted(eos))
            if seq.shape[1] < width + kmax:  # every row ended early: pad (positions after an eos are never read)
                seq = torch.cat([seq, torch.full((len(seq), width + kmax - seq.shape[1]), pad)], 1)
            # reply tokens up to and including the first eos count; after it the reading stays at the eos
            n_reply = []
            for row in seq[:, width:].tolist():
                end = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
                n_reply.append(end)
            full = torch.cat([mask, torch.ones(len(seq), kmax, dtype=mask.dtype)], 1)
            pos = (full.cumsum(-1) - 1).clamp(min=0)
            model(input_ids=seq, attention_mask=full, position_ids=pos, use_cache=False)
            for b in range(len(seq)):
                start = int((mask[b] == 0).sum())
                per_k = []
                for k in KS:
                    kk = min(k, n_reply[b])
                    end = width + kk  # positions [start, end) are read; end - 1 predicts reply token kk + 1
                    rows = []
                    for i in range(len(layers)):
                        x = got[i][b]
                        reply = x[width: end].mean(0) if kk else torch.zeros_like(x[0])
                        rows.append(torch.stack([x[end - 1], x[start: end].mean(0), reply]))
                    per_k.append(torch.stack(rows))
                out.append(torch.stack(per_k).half())
            print(f"  {s + len(seq)}/{len(ids_all)}", flush=True)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(out)


def select(x: torch.Tensor, picks) -> torch.Tensor:
    return torch.cat([x[:, KS.index(k), :, READ.index(r)].float().reshape(len(x), -1) for k, r in picks], 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "val"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--l2", type=float, default=0.3)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load("smollm2")
    model.eval()
    d = val_features(lambda ps: readouts(model, tok, ps), args.cache)
    print(f"read-outs: {time.time() - t0:.0f} s", flush=True)
    rows = []
    for name, picks in FITS:
        xh, xb = (select(x, picks) for x in d["mix"])
        view = {g: {k: select(x, picks) for k, x in d[g].items()} for g in ("sets", "sharegpt")}
        rows.append(logistic_row(name, xh, xb, view, args.l2, picks=picks))
    result = {"mix": list(MIX), "ks": list(KS), "l2": args.l2, "layers": list(DEMO_LAYERS), "rows": rows,
              "seconds": round(time.time() - t0, 1)}
    write_records(args.out, "router_reply_readouts_val", result, [("read-outs", "fit")],
                  f"Sequence-router read-outs after k greedy base-model reply tokens, on val (route-only; fit on "
                  f"{MIX[0]} + {MIX[1]} training-mix prompts, L2 {args.l2}, layers {list(DEMO_LAYERS)})")
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
