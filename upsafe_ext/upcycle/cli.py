"""`upsafe scan | upcycle | train | eval | sweep-temperature | demo` (UpSafe°C)."""
from __future__ import annotations

import json
import os


def load_model(spec: str):
    """'smollm2' (the bundled SmolLM2-135M-Instruct), an upcycled folder, or a plain HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "smollm2":
        from ..eval.real_model import load_smollm2

        return load_smollm2()
    if not os.path.isdir(spec):
        raise SystemExit(f"upsafe: --model {spec!r} is neither 'smollm2' nor a directory")
    tok = AutoTokenizer.from_pretrained(spec)
    with open(os.path.join(spec, "config.json")) as f:
        upcycled = "upsafe_upcycle" in json.load(f)
    if upcycled:
        from .io import load_upcycled

        return load_upcycled(spec), tok
    return AutoModelForCausalLM.from_pretrained(spec).eval(), tok


def _splits(n_harm, n_ben):
    """Training prompts (the style-balanced mix of eval.protocol) for scan / train."""
    from ..eval.protocol import training_mix

    return training_mix(n_harm, n_ben)


def _cmd_scan(a) -> int:
    from .scan import scan_safety_layers

    model, tok = load_model(a.model)
    harm, ben = _splits(a.n, a.n)
    rep = scan_safety_layers(model, tok, harm, ben, seed=a.seed)
    os.makedirs(a.out, exist_ok=True)
    rep.save_json(os.path.join(a.out, "scan.json"))
    rep.plot(os.path.join(a.out, "scan.png"), k=a.top)
    print("layer  val-BCE  acc    AUROC")
    for i, (b, acc, r) in enumerate(zip(rep.bce, rep.accuracy, rep.auroc)):
        print(f"{i:5d}  {b:7.4f}  {acc:.3f}  {r:.3f}")
    print(f"selected (lowest BCE): {rep.top(a.top)}  -> {a.out}/scan.json, scan.png")
    return 0


def _cmd_upcycle(a) -> int:
    from .config import UpcycleConfig
    from .io import save_upcycled
    from .model import upcycle_
    from .scan import LayerScanReport

    if bool(a.layers) == bool(a.from_scan):
        raise SystemExit("upsafe upcycle: give exactly one of --layers or --from-scan")
    layers = ([int(x) for x in a.layers.split(",")] if a.layers
              else LayerScanReport.load_json(a.from_scan).top(a.top))
    model, tok = load_model(a.model)
    upcycle_(model, UpcycleConfig(layers=layers, num_safety_experts=a.experts, top_k=a.top_k))
    save_upcycled(model, a.out, tokenizer=tok)
    print(f"upcycled layers {layers} ({a.experts} safety expert(s), top-{a.top_k}) -> {a.out}")
    return 0


def _cmd_train(a) -> int:
    from ..eval.generation import chat, generate_chat
    from ..train.upsafe import stage1, stage2
    from .io import save_upcycled
    from .model import safety_temperature

    model, tok = load_model(a.model)
    harm, ben = _splits(a.n_harmful, a.n_benign)
    if a.stage in ("1", "both"):
        log = stage1(model, tok, harm, lr=a.lr1, epochs=a.epochs, batch_size=a.batch_size, max_steps=a.steps)
        print(f"stage 1: loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f} ({len(log)} steps)")
    if a.stage in ("2", "both"):
        with safety_temperature(model, 0.0):
            answers = generate_chat(model, tok, [chat(p) for p in ben], max_new_tokens=48)
        log = stage2(model, tok, harm, ben, benign_responses=answers, lr=a.lr2, epochs=a.epochs,
                     batch_size=a.batch_size, max_steps=a.steps)
        print(f"stage 2: router loss {log[0]['extra_loss']:.3f} -> {log[-1]['extra_loss']:.3f} ({len(log)} steps)")
    save_upcycled(model, a.out, tokenizer=tok)
    print(f"saved -> {a.out}")
    return 0


def _eval(a, taus, out_dir=None):
    """The protocol sets of `--split` at each τ, the base model's answers as the KL reference."""
    from ..eval.generation import chat, generate_chat
    from ..eval.judge import judge_accuracy
    from ..eval.protocol import format_sets_table, protocol_sets
    from .model import safety_moe_modules, safety_temperature
    from .pipeline import sweep_temperature

    model, tok = load_model(a.model)
    sets = protocol_sets(a.split, n=a.n_harmful, n_benign=a.n_benign)
    kl_prompts = [p for s in sets if s.kind == "benign" for p in s.prompts][: a.kl_prompts]
    base_answers = None
    if safety_moe_modules(model):
        with safety_temperature(model, 0.0):
            base_answers = generate_chat(model, tok, [chat(p) for p in kl_prompts], max_new_tokens=a.max_new_tokens)
    rows = sweep_temperature(model, tok, taus, sets, kl_prompts, base_answers=base_answers, out_dir=out_dir,
                             max_new_tokens=a.max_new_tokens)
    acc = judge_accuracy()["accuracy"]
    print(f"{a.split} sets, greedy, {a.max_new_tokens} new tokens, keyword judge (accuracy {acc:.3f} on PyRIT's "
          "labels); share refused (95% Wilson interval):")
    print(format_sets_table({f"τ={r['tau']:g}": list(r["sets"].values()) for r in rows}))
    if base_answers is not None:
        print("KL to base (nats/token): " + ", ".join(f"τ={r['tau']:g}: {r['kl_benign']:.4f}" for r in rows))
    return rows


def _cmd_eval(a) -> int:
    _eval(a, [a.tau])
    return 0


def _cmd_sweep(a) -> int:
    _eval(a, [float(t) for t in a.taus.split(",")], out_dir=a.out)
    print(f"-> {a.out}/sweep.json, pareto.png")
    return 0


def _cmd_demo(a) -> int:
    from .pipeline import DemoConfig, run_demo

    cfg = DemoConfig.quick(out_dir=a.out, split=a.split) if a.quick else DemoConfig(out_dir=a.out, split=a.split)
    run_demo(cfg)
    return 0


def register(sub) -> set[str]:
    def common(p, model=True):
        if model:
            p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a model folder")
        return p

    p = common(sub.add_parser("scan", help="UpSafe°C: probe every layer for safety sensitivity"))
    p.add_argument("--n", type=int, default=96, help="harmful and benign train prompts")
    p.add_argument("--top", type=int, default=None, help="layers to select (default 25%%)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="upsafe_out/scan")
    p.set_defaults(fn=_cmd_scan)

    p = common(sub.add_parser("upcycle", help="UpSafe°C: turn chosen MLPs into safety MoEs and save"))
    p.add_argument("--layers", default=None, help="comma-separated layer indices")
    p.add_argument("--from-scan", default=None, help="a scan.json from `upsafe scan`")
    p.add_argument("--top", type=int, default=None)
    p.add_argument("--experts", type=int, default=1)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_cmd_upcycle)

    p = common(sub.add_parser("train", help="UpSafe°C: two-stage SFT of an upcycled model"))
    p.add_argument("--stage", choices=["1", "2", "both"], default="both")
    p.add_argument("--n-harmful", type=int, default=256)
    p.add_argument("--n-benign", type=int, default=199)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr1", type=float, default=2e-4)
    p.add_argument("--lr2", type=float, default=3e-3)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_cmd_train)

    for name, fn, helptext in (("eval", _cmd_eval, "safety rate, over-refusal and KL to base at one τ"),
                               ("sweep-temperature", _cmd_sweep, "evaluate several τ; JSON + Pareto PNG")):
        p = common(sub.add_parser(name, help=f"UpSafe°C: {helptext}"))
        p.add_argument("--split", choices=["val", "test"], default="test",
                       help="choose settings on val; read test once per reported number")
        p.add_argument("--n-harmful", type=int, default=48, help="prompts per harmful set")
        p.add_argument("--n-benign", type=int, default=64, help="prompts per benign set")
        p.add_argument("--kl-prompts", type=int, default=64, help="benign prompts for the KL to base")
        p.add_argument("--max-new-tokens", type=int, default=32)
        if name == "eval":
            p.add_argument("--tau", type=float, default=0.5)
        else:
            p.add_argument("--taus", default="0,0.25,0.5,0.75,1")
            p.add_argument("--out", default="upsafe_out/sweep")
        p.set_defaults(fn=fn)

    p = sub.add_parser("demo", help="the main job: UpSafe°C on SmolLM2-135M-Instruct end to end (CPU, minutes)")
    p.add_argument("--out", default="upsafe_out/demo")
    p.add_argument("--quick", action="store_true", help="fewer prompts and steps")
    p.add_argument("--split", choices=["val", "test"], default="test", help="evaluate on val while tuning")
    p.set_defaults(fn=_cmd_demo)
    return {"scan", "upcycle", "train", "eval", "sweep-temperature", "demo"}
