"""Replies the judge did not count as refusals at the protocol's length: what they become when longer.

    python benchmarks/magic_longer_replies.py --record OUT/magic_protocol_val.json --model OUT/model \\
        --contains "sorry for" --tokens 96 --out benchmarks/val/magic_longer_replies.json

From a `bench_magic_protocol.py` record (its last epoch), take the harmful-set replies of one row
(default positive) that the keyword judge did not count as refusals and whose opening holds
`--contains` (lower case, first 40 characters); regenerate them with the saved model, greedy, at
`--tokens` new tokens, and judge them again (`eval.judge.is_refusal`, the protocol's judge). Writes
every prompt with both replies and the longer reply's verdict, so they can be read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_magic_protocol import render  # noqa: E402
from common import environment  # noqa: E402

from upsafe_ext.eval.generation import generate_chat  # noqa: E402
from upsafe_ext.eval.judge import is_refusal  # noqa: E402
from upsafe_ext.magic import load_magic_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--record", required=True, help="a bench_magic_protocol.py json record")
    ap.add_argument("--model", required=True, help="the saved model that record evaluated (OUT/model)")
    ap.add_argument("--row", default="positive")
    ap.add_argument("--contains", default="", help="keep replies whose opening holds this (lower case)")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "magic_longer_replies.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with open(args.record) as f:
        epoch = json.load(f)["epochs"][-1]
    if args.row not in epoch["replies"]:
        ap.error(f"--row {args.row!r} is not in the record (it has {sorted(epoch['replies'])})")
    picked = [(row["name"], prompt, reply)
              for row, replies in zip(epoch["rows"][args.row], epoch["replies"][args.row]) if row["kind"] == "harmful"
              for prompt, reply in replies
              if not is_refusal(reply) and args.contains.lower() in reply.lower()[:40]]
    if not picked:
        ap.error("no reply of the record matches: nothing to regenerate")
    model, tok, tokens = load_magic_model(args.model, allow_negative=True)
    model.eval()
    longer = generate_chat(model, tok, render(tok, tokens, args.row)([p for _, p, _ in picked]),
                           max_new_tokens=args.tokens, batch_size=32, progress=False)
    rows = [{"set": name, "prompt": p, "reply": r, "reply_longer": r2, "refusal_longer": is_refusal(r2)}
            for (name, p, r), r2 in zip(picked, longer)]
    n = sum(r["refusal_longer"] for r in rows)
    print(f"{len(rows)} replies not judged refusals; at {args.tokens} tokens, judged refusals: {n}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "env": environment("cpu"), "n": len(rows), "refused_longer": n,
                   "replies": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
