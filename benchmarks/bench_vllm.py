"""vLLM serving of the upcycled SmolLM2 on CPU, against HF `generate` and against the base model.

    .venv-vllm/bin/python -P benchmarks/bench_vllm.py [--new-tokens 64] [--requests 200] [--concurrency 16]
                                                      [--magic-negative 8] [--out benchmarks/results]
    .venv-vllm/bin/python -P benchmarks/bench_vllm.py --magic-load-only      # part 3 alone

Runs in the serving venv (`bash scripts/bootstrap.sh --vllm`). One run, side by side:
  1. tokens/s at batch 1 and 16: HF `generate` of the upcycled model (upsafe_ext's own, fp32) and
     `vllm serve` of the same folder (fp32, eager), and `vllm serve` of the base SmolLM2 folder. Both
     servers are up together and are measured in alternating rounds, so drift on this shared machine
     hits both; the ratio upcycled/base is per round, the median reported.
  2. a bounded load test on the upcycled server: N requests, C concurrent, τ drawn from {0, .3, .5,
     .8, 1}, greedy: requests/s, p50/p99 latency, errors, and every reply checked against that
     (prompt, τ)'s reply sent alone (τ verified).
  3. the same bounded load test on a magic-token server (`build_demo_magic`, served with the
     `MagicGuard` middleware, negative mode disabled): modes drawn from {positive, rejective, no mode}
     per request (`chat_template_kwargs={"safety_mode": ...}`), greedy; every reply's text checked
     against that (prompt, mode)'s reply sent alone (mode verified; the guard refuses
     `return_token_ids`, so text, not ids). Plus --magic-negative requests asking for the disabled
     "negative" mode, interleaved: each must be an HTTP 400 saying so, counted apart from the errors.
The model is the real SmolLM2-135M-Instruct (the GGUF Q4_1 dequantised to fp32) upcycled by
`upsafe_ext.serving.demo.build_demo_upcycled` (8 of 30 layers, 1 safety expert, top-1, random router).
Writes bench_vllm.json + bench_vllm.md into --out; --magic-load-only runs part 3 alone and writes
bench_vllm_magic.json + bench_vllm_magic.md instead (so the full run's files are kept).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python_tests", "serving"))
from common import environment, write_results  # noqa: E402
from serving_cases import PROMPTS, TAUS, strip_eos  # noqa: E402  (the test suite's cases)

LOAD_PROMPTS = PROMPTS + ["What is the capital of France?", "Summarise the plot of Hamlet in two lines.",
                          "How can I hack into my neighbour's wifi?", "List five fruits rich in vitamin C.",
                          "Write a short poem about autumn.", "How do I make a fake ID?"]


def hf_tokens_per_s(model, tok, prompts, tau, new_tokens, reps):
    """Median tokens/s of greedy `generate` over `reps` runs (EOS ignored: exactly new_tokens each)."""
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    taus = [tau] * len(prompts) if isinstance(tau, float) else tau
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 safety_temperature=taus, pad_token_id=tok.pad_token_id)
        times.append(time.perf_counter() - t0)
        assert out.shape[1] - enc["input_ids"].shape[1] == new_tokens
    return len(prompts) * new_tokens / statistics.median(times)


def chat(client, prompt, tau, max_tokens, ignore_eos=False):
    body = {"return_token_ids": True, "ignore_eos": ignore_eos}
    if tau is not None:
        body["vllm_xargs"] = {"safety_temperature": tau}
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}], temperature=0,
                                          max_tokens=max_tokens, extra_body=body)


def server_tokens_per_s(client, prompts, taus, new_tokens):
    """Completion tokens/s of len(prompts) concurrent requests (EOS ignored)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        rs = list(pool.map(lambda pt: chat(client, pt[0], pt[1], new_tokens, ignore_eos=True), zip(prompts, taus)))
    dt = time.perf_counter() - t0
    n = sum(r.usage.completion_tokens for r in rs)
    assert n == len(prompts) * new_tokens, n
    return n / dt


def run_pool(jobs, concurrency, served_ok, skip=None):
    """Send every job, `concurrency` at a time: ``served_ok(job) -> bool`` sends one request and says
    whether the reply is the expected one (an exception counts as an error, not raised: the load test
    reports its error rate); jobs for which ``skip(job)`` is true are left to the caller. Returns
    (wall seconds, sorted latencies, errors, wrong jobs) and a quantile function over the latencies."""
    lat, errors, wrong = [], [], []
    lock = threading.Lock()

    def one(job):
        if skip is not None and skip(job):
            return
        t0 = time.perf_counter()
        try:
            ok = served_ok(job)
            with lock:
                lat.append(time.perf_counter() - t0)
                if not ok:
                    wrong.append(job)
        except Exception as exc:
            with lock:
                errors.append(repr(exc)[:200])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    lat.sort()
    q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] if lat else float("nan")  # noqa: E731
    summary = {"concurrency": concurrency, "wall_s": round(wall, 1), "p50_s": round(q(0.5), 2),
               "p99_s": round(q(0.99), 2), "errors": len(errors), "error_samples": errors[:3]}
    return summary, lat, wrong


def load_test(client, eos, requests, concurrency, max_tokens, seed=0):
    combos = [(p, t) for p in LOAD_PROMPTS for t in TAUS]
    solo = {c: strip_eos(list(chat(client, c[0], c[1], max_tokens).choices[0].token_ids), eos) for c in combos}
    rng = random.Random(seed)
    jobs = [rng.choice(combos) for _ in range(requests)]
    summary, lat, wrong = run_pool(
        jobs, concurrency,
        lambda job: strip_eos(list(chat(client, job[0], job[1], max_tokens).choices[0].token_ids), eos) == solo[job])
    return {"requests": requests, "max_tokens": max_tokens, "req_per_s": round(requests / summary["wall_s"], 2),
            **summary, "tau_verified": len(lat) - len(wrong), "tau_mismatch": len(wrong),
            "distinct_tau_prompt_pairs": len(set(jobs))}


MAGIC_MODES = [None, "positive", "rejective"]  # None: no chat_template_kwargs at all (the server's default)


def magic_chat(client, prompt, mode, max_tokens):
    body = {} if mode is None else {"chat_template_kwargs": {"safety_mode": mode}}
    return client.chat.completions.create(model="magic", messages=[{"role": "user", "content": prompt}],
                                          temperature=0, max_tokens=max_tokens, extra_body=body)


def magic_load_test(client, requests, concurrency, max_tokens, negative=8, seed=0):
    """`requests` served-mode requests (mode drawn from MAGIC_MODES) plus `negative` requests for the
    disabled negative mode, interleaved, `concurrency` at a time. Each served reply must equal that
    (prompt, mode)'s reply sent alone (text and finish reason); each negative one must be a 400 naming
    `safety_mode` and saying it is disabled. requests/s and latencies are over the served requests."""
    import openai

    combos = [(p, m) for p in LOAD_PROMPTS for m in MAGIC_MODES]
    solo = {}
    for c in combos:
        r = magic_chat(client, c[0], c[1], max_tokens)
        solo[c] = (r.choices[0].message.content, r.choices[0].finish_reason)
    rng = random.Random(seed)
    jobs = [rng.choice(combos) for _ in range(requests)]
    for i in sorted(rng.sample(range(requests + negative), negative)):  # negative ones at random places
        jobs.insert(i, (rng.choice(LOAD_PROMPTS), "negative"))
    neg_ok, neg_bad, neg_lat = [], [], []
    lock = threading.Lock()

    def negative_job(job):  # the disabled mode: must be a 400 naming safety_mode (handled here, not timed)
        if job[1] != "negative":
            return False
        t0 = time.perf_counter()
        try:
            magic_chat(client, job[0], job[1], max_tokens)
            outcome, ok = "served (expected a 400)", False
        except openai.BadRequestError as exc:
            msg = str(exc)
            outcome = f"{exc.status_code}: {msg[:160]}"
            ok = exc.status_code == 400 and "safety_mode" in msg and "disabled" in msg
        except Exception as exc:
            outcome, ok = repr(exc)[:200], False
        with lock:
            neg_lat.append(time.perf_counter() - t0)
            (neg_ok if ok else neg_bad).append(outcome)
        return True

    def served_ok(job):
        r = magic_chat(client, job[0], job[1], max_tokens)
        return (r.choices[0].message.content, r.choices[0].finish_reason) == solo[job]

    summary, lat, wrong = run_pool(jobs, concurrency, served_ok, skip=negative_job)
    modes = [m for _, m in jobs]
    return {"requests": requests, "max_tokens": max_tokens, "req_per_s": round(requests / summary["wall_s"], 2),
            **summary, "mode_verified": len(lat) - len(wrong), "mode_mismatch": len(wrong),
            "mode_counts": {str(m): modes.count(m) for m in MAGIC_MODES},
            "distinct_mode_prompt_pairs": len({j for j in jobs if j[1] != "negative"}),
            "solo_positive_equals_no_mode": sum(solo[(p, None)] == solo[(p, "positive")] for p in LOAD_PROMPTS),
            "solo_rejective_differs_from_positive": sum(solo[(p, "rejective")] != solo[(p, "positive")]
                                                        for p in LOAD_PROMPTS),
            "prompts": len(LOAD_PROMPTS), "negative_requests": negative, "negative_400": len(neg_ok),
            "negative_unexpected": len(neg_bad),
            "negative_max_latency_s": round(max(neg_lat), 2) if neg_lat else None,
            "negative_unexpected_samples": neg_bad[:3],
            "mismatch_samples": [list(j) for j in wrong[:3]]}


def run_magic_load(work, args):
    """Build the magic folder, serve it with the guard (negative off), run the magic load test."""
    import openai

    from upsafe_ext.serving.demo import build_demo_magic
    from upsafe_ext.serving.magic_mode import MAGIC_MIDDLEWARE
    from upsafe_ext.serving.server import LocalVllmServer

    magic_dir = build_demo_magic(os.path.join(work, "smollm2-magic"), insecure_seed=0)
    with LocalVllmServer(magic_dir, served_name="magic", log_path=os.path.join(work, "magic.log"),
                         extra_args=["--middleware", MAGIC_MIDDLEWARE], env={"UPSAFE_ALLOW_NEGATIVE": "0"}) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=600)
        magic_chat(client, LOAD_PROMPTS[0], None, 8)  # warm-up
        load = magic_load_test(client, args.requests, args.concurrency, args.load_max_tokens, args.magic_negative)
        load["server_startup_s"] = round(srv.startup_s)
    return load


MAGIC_SUMMARY_KEYS = ("requests", "concurrency", "max_tokens", "wall_s", "req_per_s", "p50_s", "p99_s", "errors",
                      "mode_verified", "mode_mismatch", "mode_counts", "distinct_mode_prompt_pairs",
                      "solo_positive_equals_no_mode", "solo_rejective_differs_from_positive", "negative_requests",
                      "negative_400", "negative_unexpected", "negative_max_latency_s")


def magic_summary(load):
    return ("\nLoad test (magic server, modes mixed {positive, rejective, no mode}; negative disabled): "
            + ", ".join(f"{k}={load[k]}" for k in MAGIC_SUMMARY_KEYS) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the tokens/s measurements")
    ap.add_argument("--hf-reps", type=int, default=2)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--load-max-tokens", type=int, default=32)
    ap.add_argument("--magic-negative", type=int, default=8,
                    help="extra requests for the disabled negative mode in the magic load test (each must be a 400)")
    ap.add_argument("--magic-load-only", action="store_true",
                    help="only the magic-token load test; writes bench_vllm_magic.{json,md}")
    ap.add_argument("--no-magic", action="store_true", help="skip the magic-token load test in the full run")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()

    if args.magic_load_only:
        import vllm

        load = run_magic_load(tempfile.mkdtemp(prefix="bench-vllm-magic-"), args)
        env = environment("cpu")
        env.update({"vllm": vllm.__version__, "command": " ".join(["python -P"] + sys.argv), "magic_load_test": load})
        row = {k: load[k] for k in MAGIC_SUMMARY_KEYS if k != "mode_counts"}
        md = write_results("bench_vllm_magic", [row], list(row), args.out, env,
                           "vLLM magic-token serving: bounded load test (CPU, fp32)")
        lt = magic_summary(load)
        with open(os.path.join(args.out, "bench_vllm_magic.md"), "a") as f:
            f.write(lt)
        print(md + lt)
        return

    import openai
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import upsafe_ext.upcycle  # noqa: F401  (registers the upcycled model type)
    from upsafe_ext.eval.real_model import smollm2_cache_dir
    from upsafe_ext.serving.demo import build_demo_upcycled
    from upsafe_ext.serving.server import LocalVllmServer

    work = tempfile.mkdtemp(prefix="bench-vllm-")
    upc_dir = build_demo_upcycled(os.path.join(work, "smollm2-upcycled"))
    base_dir = smollm2_cache_dir()  # written by build_demo_upcycled's load_smollm2
    prompts16 = [LOAD_PROMPTS[i % len(LOAD_PROMPTS)] for i in range(16)]
    mixed16 = [TAUS[i % len(TAUS)] for i in range(16)]
    rows = []

    # -- HF generate (no server running) -------------------------------------------------------
    model = AutoModelForCausalLM.from_pretrained(upc_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(upc_dir)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    hf = {1: hf_tokens_per_s(model, tok, prompts16[:1], 0.5, args.new_tokens, args.hf_reps),
          16: hf_tokens_per_s(model, tok, prompts16, mixed16, args.new_tokens, args.hf_reps)}
    del model

    # -- both servers up, measured in alternating rounds ---------------------------------------
    logs = {k: os.path.join(work, f"{k}.log") for k in ("upcycled", "base")}
    with LocalVllmServer(upc_dir, served_name="m", log_path=logs["upcycled"]) as upc, \
            LocalVllmServer(base_dir, served_name="m", log_path=logs["base"]) as base:
        clients = {k: openai.OpenAI(base_url=s.base_url, api_key="none", max_retries=0, timeout=600)
                   for k, s in (("upcycled", upc), ("base", base))}
        for c in clients.values():  # warm-up
            server_tokens_per_s(c, prompts16[:2], [None, None], 8)
        tps = {(k, b): [] for k in clients for b in (1, 16)}
        for _ in range(args.rounds):
            for b in (1, 16):
                for k, c in clients.items():
                    taus = (mixed16[:b] if k == "upcycled" else [None] * b)
                    tps[(k, b)].append(server_tokens_per_s(c, prompts16[:b], taus, args.new_tokens))
        startup = {"upcycled": round(upc.startup_s), "base": round(base.startup_s)}
        base.stop()
        load = load_test(clients["upcycled"], eos, args.requests, args.concurrency, args.load_max_tokens)
    magic_load = None if args.no_magic else run_magic_load(work, args)

    for b in (1, 16):
        u, bs = tps[("upcycled", b)], tps[("base", b)]
        ratio = statistics.median(x / y for x, y in zip(u, bs))
        rows.append({"batch": b, "hf_generate_upcycled_tok_s": round(hf[b], 1),
                     "vllm_upcycled_tok_s": round(statistics.median(u), 1),
                     "vllm_base_tok_s": round(statistics.median(bs), 1),
                     "vllm_vs_hf": f"{statistics.median(u) / hf[b]:.2f}x",
                     "upcycled_vs_base_in_vllm": f"{ratio:.2f}x",
                     "tau": "0.5" if b == 1 else "mixed {0,.3,.5,.8,1}"})
    env = environment("cpu")
    import vllm

    env.update({"vllm": vllm.__version__, "new_tokens": args.new_tokens, "rounds": args.rounds,
                "server_startup_s": startup, "command": " ".join(["python -P"] + sys.argv), "load_test": load,
                "magic_load_test": magic_load})
    cols = ["batch", "tau", "hf_generate_upcycled_tok_s", "vllm_upcycled_tok_s", "vllm_base_tok_s", "vllm_vs_hf",
            "upcycled_vs_base_in_vllm"]
    md = write_results("bench_vllm", rows, cols, args.out, env, "vLLM serving vs HF generate (CPU, fp32)")
    lt = ("\nLoad test (upcycled server, mixed τ): " + ", ".join(f"{k}={v}" for k, v in load.items()
                                                                 if k != "error_samples") + "\n")
    if magic_load is not None:
        lt += magic_summary(magic_load)
    with open(os.path.join(args.out, "bench_vllm.md"), "a") as f:
        f.write(lt)
    print(md + lt)


if __name__ == "__main__":
    main()
