"""Magic-token co-training benchmark: safety alignment margin before/after and per-mode behaviour.

    python benchmarks/bench_magic.py                 # synthetic task on a tiny Llama (CPU, ~1-3 min)

SmolLM2-135M-Instruct at real scale, measured with the source-disjoint protocol, is
benchmarks/bench_magic_protocol.py (it replaces this script's former `--real` toy run: 8 + 8 prompts,
in-source test prompts).

Synthetic: the task of python_tests/magic_fixtures.py (4 templates x 12 topics, three deterministic
response styles, 12 held-out prompts), co-trained once with the tokens as plain text and once as
added special tokens. Reports the margin on the held-out prompts before and after, exact-match
accuracy of each mode on the training prompts, and the fallback (no token / a wrong token ->
positive).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python_tests"))
from common import environment, write_results  # noqa: E402

from upsafe_ext.magic import (MODES, MagicConfig, MagicTrainConfig, build_examples, generate,  # noqa: E402
                              prepare_model, safety_alignment_margin, train_magic)


def _acc(got, want) -> float:
    return sum(g == w for g, w in zip(got, want)) / max(1, len(want))


def run_synthetic(out_dir: str, steps: int) -> list[dict]:
    from magic_fixtures import STYLE, synthetic_records  # the task the tests check (one definition)

    from upsafe_ext.eval.generation import generate_chat
    from upsafe_ext.testing import tiny_causal_lm, tiny_tokenizer

    rows = []
    for special in (False, True):
        torch.manual_seed(0)
        tok = tiny_tokenizer()
        model = tiny_causal_lm("llama", hidden=64, layers=2, intermediate=128)
        # insecure_seed: the same (reproducible, guessable) tokens every run - benchmarks only
        cfg = MagicConfig(insecure_seed=3, token_length=8, special_tokens=special, no_token_fraction=0.5,
                          wrong_token_fraction=1.0)
        tokens = prepare_model(model, tok, cfg)
        train, held = synthetic_records(), synthetic_records(held_out=True)
        data = build_examples(train, tok, tokens, cfg, progress=False)
        held_prompts = [r.prompt for r in held]
        tag = "special" if special else "text"
        before = safety_alignment_margin(model, tok, held_prompts, progress=False,
                                         plot=os.path.join(out_dir, f"magic_synthetic_{tag}_before.png"))
        t0 = time.perf_counter()
        log = train_magic(model, tok, data, config=MagicTrainConfig(learning_rate=3e-3, max_steps=steps,
                                                                    batch_size=16, warmup_ratio=0.05))
        train_s = time.perf_counter() - t0
        after = safety_alignment_margin(model, tok, held_prompts, progress=False,
                                        plot=os.path.join(out_dir, f"magic_synthetic_{tag}_after.png"))
        prompts = [r.prompt for r in train]
        row = {"tokens": tag, "examples": len(data), "steps": steps, "train s": round(train_s, 1),
               "loss": f"{log[0]['loss']:.3f} -> {log[-1]['loss']:.4f}",
               "margin before": round(before.margin, 4), "margin after": round(after.margin, 4),
               "after per mode": " / ".join(f"{after.per_mode[m]:.3f}" for m in MODES)}
        for m in MODES:
            got = generate(model, tok, prompts, mode=m, max_new_tokens=32, progress=False)
            row[f"{m} acc"] = round(_acc(got, [STYLE[m, r.meta["harmful"]] for r in train]), 3)
        want = [STYLE["positive", r.meta["harmful"]] for r in train]
        plain = generate_chat(model, tok, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens=32,
                              progress=False)
        rng = random.Random(1234)
        wrong = generate_chat(model, tok, [tokens.place(tok, [{"role": "user", "content": p}], tokens.wrong_token(rng))
                                           for p in prompts], max_new_tokens=32, progress=False)
        row["no-token -> positive"] = round(_acc(plain, want), 3)
        row["wrong-token -> positive"] = round(_acc(wrong, want), 3)
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (default 1: on a shared 2-core machine 2 threads ran 3.5x slower, "
                         "16 s vs 55 s per SmolLM2 step of 8x100 tokens)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    env = environment("cpu")
    rows = run_synthetic(args.out, args.steps)
    cols = ["tokens", "examples", "steps", "train s", "loss", "margin before", "margin after", "after per mode",
            "positive acc", "negative acc", "rejective acc", "no-token -> positive", "wrong-token -> positive"]
    md = write_results("bench_magic", rows, cols, args.out, env,
                       "Magic-token co-training, synthetic task (tiny Llama, held-out margin)")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
