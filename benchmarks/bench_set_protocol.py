"""SET under the source-disjoint protocol: the ESI top-p% mask against a random mask of the same size.

    python benchmarks/bench_set_protocol.py                 # SmolLM2-135M-Instruct on CPU (~25 min, 2 cores)
    python benchmarks/bench_set_protocol.py --split val     # while choosing steps / lr / retain size
    python benchmarks/bench_set_protocol.py --split val --masks esi --skip-base --steps 20 40 --retain 160 480 \
        --out benchmarks/val --name set_protocol_val_grid       # a grid of (steps, retain), ESI mask only

ESI is scored on harmful prompts of the training mix (``eval.protocol.training_mix``: AdvBench + rho
expanded_100, train split, style-balanced); SET trains the masked weights on training-mix harmful
prompts -> refusal, with retain data (training-mix benign prompts with the model's own replies). Both
masks get the same data, steps and seed. Then every protocol set of `--split` is judged (share
refused, n, 95% Wilson interval). Several `--steps` / `--retain` values run every combination (the retain
replies are generated once, for the largest size, and each size keeps the replies of its first prompts).
Writes benchmarks/results/`--name`.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=["val", "test"], default="test")
    ap.add_argument("--score-prompts", type=int, default=32)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--train-prompts", type=int, default=160)
    ap.add_argument("--retain", type=int, nargs="+", default=[160],
                    help="benign training prompts with the model's own replies (several: a grid)")
    ap.add_argument("--steps", type=int, nargs="+", default=[40], help="SET steps (several: a grid)")
    ap.add_argument("--masks", nargs="+", choices=["esi", "random"], default=["esi", "random"])
    ap.add_argument("--skip-base", action="store_true", help="do not evaluate the base model")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--first-token-weight", type=float, default=1.0,
                    help="loss weight of each reply's first --first-tokens tokens (SparseTrainConfig)")
    ap.add_argument("--first-tokens", type=int, default=1)
    ap.add_argument("--n", type=int, default=32, help="prompts per harmful set")
    ap.add_argument("--n-benign", type=int, default=48, help="prompts per benign set")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default="bench_set_protocol", help="file name of the records, without extension")
    args = ap.parse_args(argv)

    from upsafe_ext.esi import compute_esi, own_replies, run_set
    from upsafe_ext.eval import judge_accuracy, load_smollm2
    from upsafe_ext.eval.protocol import evaluate_sets, format_sets_table, protocol_sets, training_mix

    t0 = time.time()
    base, tok = load_smollm2(verbose=False)
    harm, ben = training_mix(max(args.train_prompts, args.score_prompts), max(args.retain))
    sets = protocol_sets(args.split, n=args.n, n_benign=args.n_benign)
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=32, progress=True)
    columns = {} if args.skip_base else {"base": evaluate_sets(base, tok, sets, **gen)}
    replies = own_replies(base, tok, ben, max_new_tokens=args.max_new_tokens)
    scores = compute_esi(base, tok, harm[: args.score_prompts], batch_size=8)
    makers = {"esi": ("ESI top", lambda: scores.select(args.fraction)),
              "random": ("random", lambda: scores.random_mask(args.fraction, seed=0))}
    masks = {makers[k][0]: makers[k][1]() for k in args.masks}
    grid = [(st, r) for st in args.steps for r in args.retain]
    meta = {}
    for label, mask in masks.items():
        for steps, size in grid:
            kept = set(ben[:size])
            retain = [pr for pr in replies if pr[0] in kept]
            name = f"SET, {label} {args.fraction:.0%}" + (f", {steps} steps, retain {size}" if len(grid) > 1 else "")
            model = copy.deepcopy(base)
            t1 = time.time()
            res = run_set(model, tok, mask, harm[: args.train_prompts], retain=retain, max_steps=steps, lr=args.lr,
                          batch_size=8, progress=True, first_token_weight=args.first_token_weight,
                          first_tokens=args.first_tokens)
            meta[name] = {"weights": mask.count(), "steps": steps, "retain": len(retain),
                          "train_seconds": round(time.time() - t1, 1),
                          "loss": [res.log[0]["loss"], res.log[-1]["loss"]]}
            columns[name] = evaluate_sets(model, tok, sets, **gen)
            del model
    table = format_sets_table(columns)
    acc = judge_accuracy()
    os.makedirs(args.out, exist_ok=True)
    result = {"device": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "args": vars(args), "masks": meta,
              "judge_accuracy_pyrit": acc["accuracy"], "seconds": round(time.time() - t0, 1),
              "columns": {k: [{kk: vv for kk, vv in r.items() if kk != "replies"} for r in rows]
                          for k, rows in columns.items()},
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = (f"SET on SmolLM2-135M-Instruct (dequantised Q4_1 GGUF), CPU, {args.split} sets, steps {args.steps}, "
          f"lr {args.lr}, first-token weight {args.first_token_weight} on {args.first_tokens} token(s), "
          f"retain examples {[m['retain'] for m in meta.values()]}, greedy {args.max_new_tokens} "
          f"new tokens; keyword judge "
          f"(accuracy {acc['accuracy']:.3f} on PyRIT's labels). Share refused (95% Wilson interval):\n\n{table}\n")
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
