"""UpSafe°C end to end: scan -> upcycle -> stage 1 -> stage 2 -> evaluate -> τ sweep (+ plots).

`run_demo` is what `upsafe demo` runs on SmolLM2-135M-Instruct (offline, CPU in minutes). All numbers
are measured on the test splits of `upsafe_ext.eval.prompts`; training uses only the train splits.
Utility is the mean KL(base || upcycled) over benign test prompts and the base model's own answers;
the base model is the same upcycled model at τ=0, so no second copy is kept.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from .config import UpcycleConfig
from .model import safety_moe_modules, safety_temperature, upcycle_


@dataclass
class DemoConfig:
    """Sizes and hyper-parameters of `upsafe demo` (defaults: 23 min on an idle 2-core CPU, measured)."""

    out_dir: str = field(default="upsafe_out/demo", metadata={"help": "where results go"})
    scan_prompts: int = field(default=96, metadata={"help": "harmful and benign train prompts for the scan"})
    layer_fraction: float = field(default=0.25, metadata={"help": "fraction of layers to upcycle"})
    num_safety_experts: int = 1
    top_k: int = 1
    stage1_prompts: int = field(default=256, metadata={"help": "harmful train prompts for stage 1"})
    stage1_epochs: float = 2.0
    stage1_lr: float = 2e-4
    stage2_harmful: int = field(default=256, metadata={"help": "harmful train prompts for stage 2"})
    stage2_benign: int | None = field(default=None, metadata={"help": "benign train prompts (None = all)"})
    stage2_epochs: float = 2.0
    stage2_lr: float = 1e-3
    batch_size: int = 8
    eval_harmful: int = field(default=96, metadata={"help": "harmful test prompts evaluated"})
    eval_benign: int | None = field(default=None, metadata={"help": "benign test prompts (None = all)"})
    eval_edgy: int | None = field(default=None, metadata={"help": "edgy benign (over-refusal) test prompts (None = all)"})
    max_new_tokens: int = 48
    gen_batch_size: int = 16
    taus: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    seed: int = 0
    save_model: bool = True

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A few minutes on a CPU: fewer prompts and steps (the numbers are noisier)."""
        base = dict(scan_prompts=48, stage1_prompts=96, stage2_harmful=96, stage2_benign=96, eval_harmful=48,
                    taus=(0.0, 0.5, 1.0))
        return cls(**(base | overrides))

    def __post_init__(self):
        if not 0 < self.layer_fraction <= 1:
            raise ValueError(f"DemoConfig.layer_fraction must be in (0, 1], got {self.layer_fraction}")
        for name in ("scan_prompts", "stage1_prompts", "stage2_harmful", "eval_harmful", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)}")


def _take(xs, n):
    return list(xs) if n is None else list(xs)[:n]


def evaluate_at(model, tokenizer, harmful: Sequence[str], benign: Sequence[str], overrefusal: Sequence[str], *,
                tau: float, base_answers: Sequence[str] | None = None, max_new_tokens: int = 48,
                batch_size: int = 16, progress: bool = True) -> dict:
    """Safety rate (harmful refused), over-refusal (benign, edgy benign refused) and KL to the base at τ."""
    from ..eval.generation import chat
    from ..eval.judge import is_refusal
    from ..eval.metrics import evaluate_safety, mean_kl, over_refusal_rate

    t0 = time.time()
    upcycled = bool(safety_moe_modules(model))
    with (safety_temperature(model, tau) if upcycled else contextlib.nullcontext()):
        ev = evaluate_safety(model, tokenizer, harmful, list(benign) + list(overrefusal), max_new_tokens=max_new_tokens,
                             batch_size=batch_size, progress=progress)
        ben_resp = ev["benign_responses"][: len(benign)]
        edgy_resp = ev["benign_responses"][len(benign):]
        row = {"tau": tau, "safety_rate": ev["safety_rate"], "over_refusal_benign": over_refusal_rate(ben_resp),
               "over_refusal_edgy": over_refusal_rate(edgy_resp) if edgy_resp else None,
               "n_harmful": len(harmful), "n_benign": len(benign), "n_edgy": len(overrefusal)}
        if base_answers is not None:

            if not upcycled:
                raise ValueError("evaluate_at: KL to the base needs an upcycled model (the base is its τ=0)")

            def reference(input_ids, attention_mask):
                with safety_temperature(model, 0.0):
                    return model(input_ids=input_ids, attention_mask=attention_mask).logits

            row["kl_benign"] = mean_kl(model, reference, tokenizer, [chat(p) for p in benign], base_answers,
                                       progress=progress)
    row["examples"] = {"harmful": list(zip(harmful[:3], ev["harmful_responses"][:3])),
                       "benign": list(zip(benign[:3], ben_resp[:3]))}
    row["harmful_refused"] = [is_refusal(r) for r in ev["harmful_responses"]]
    row["seconds"] = round(time.time() - t0, 1)
    return row


def plot_pareto(rows: list[dict], path: str) -> str:
    """PNG: safety rate vs utility (KL to base) and over-refusal across τ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    taus = [r["tau"] for r in rows]
    kl = [r.get("kl_benign", float("nan")) for r in rows]
    saf = [100 * r["safety_rate"] for r in rows]
    over = [100 * r["over_refusal_benign"] for r in rows]
    ax = axes[0]
    ax.plot(kl, saf, "o-", color="#c0392b")
    for t, x, y in zip(taus, kl, saf):
        ax.annotate(f"τ={t:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("utility cost: mean KL(base ‖ model) on benign test prompts [nats/token]")
    ax.set_ylabel("safety rate on held-out harmful prompts [%]")
    ax.set_title("Safety temperature: Pareto frontier")
    ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot(taus, saf, "o-", label="safety rate (harmful refused)", color="#c0392b")
    ax.plot(taus, over, "s-", label="over-refusal (benign refused)", color="#2980b9")
    if rows and rows[0].get("over_refusal_edgy") is not None:
        ax.plot(taus, [100 * r["over_refusal_edgy"] for r in rows], "^--", label="over-refusal (edgy benign)",
                color="#8e44ad")
    ax.set_xlabel("safety temperature τ")
    ax.set_ylabel("%")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_temperature(model, tokenizer, taus: Sequence[float], harmful, benign, overrefusal, *, base_answers=None,
                      out_dir: str | None = None, max_new_tokens: int = 48, batch_size: int = 16,
                      progress: bool = True) -> list[dict]:
    """Evaluate every τ; writes sweep.json and pareto.png into `out_dir` when given."""
    from ..upcycle.config import check_safety_temperature

    taus = [check_safety_temperature(t, "sweep_temperature: τ") for t in taus]
    rows = [evaluate_at(model, tokenizer, harmful, benign, overrefusal, tau=t, base_answers=base_answers,
                        max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress) for t in taus]
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "sweep.json"), "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "harmful_refused"} for r in rows], f, indent=2)
        plot_pareto(rows, os.path.join(out_dir, "pareto.png"))
    return rows


def run_demo(cfg: DemoConfig | None = None, progress: bool = True, model=None, tokenizer=None) -> dict:
    """SmolLM2-135M-Instruct: scan, upcycle, two-stage SFT, evaluation and the τ sweep. Returns the report."""
    from ..eval.generation import chat, generate_chat
    from ..eval.judge import judge_accuracy
    from ..eval.prompts import benign_prompts, harmful_prompts, overrefusal_prompts
    from ..eval.real_model import load_smollm2
    from ..train.upsafe import stage1, stage2
    from .io import save_upcycled
    from .scan import scan_safety_layers

    cfg = cfg or DemoConfig()
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    say = (lambda *a: print(*a, flush=True)) if progress else (lambda *a: None)
    if model is None:
        model, tokenizer = load_smollm2()
    model.eval()
    h_train, b_train = harmful_prompts("train"), benign_prompts("train") + overrefusal_prompts("train")
    h_test = _take(harmful_prompts("test"), cfg.eval_harmful)
    b_test = _take(benign_prompts("test"), cfg.eval_benign)
    e_test = _take(overrefusal_prompts("test"), cfg.eval_edgy)
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    report = {"model": os.path.basename(str(name).rstrip("/")) or type(model).__name__, "config": asdict(cfg),
              "judge": judge_accuracy()}
    say(f"[demo] judge accuracy on PyRIT's human labels: {report['judge']['accuracy']:.3f}")

    say("[demo] base model: answers to benign test prompts (the KL reference) and evaluation")
    base_answers = generate_chat(model, tokenizer, [chat(p) for p in b_test], max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.gen_batch_size, progress=progress)
    base = evaluate_at(model, tokenizer, h_test, b_test, e_test, tau=0.0, max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.gen_batch_size, progress=progress)
    base["kl_benign"] = 0.0
    report["base"] = base
    say(f"[demo] base: safety {base['safety_rate']:.3f}, over-refusal {base['over_refusal_benign']:.3f} "
        f"(edgy {base['over_refusal_edgy']:.3f})")

    # topic-matched harmful/benign pairs make the scan discriminative (all layers separate the
    # mixed sets perfectly); fall back to the mixed sets if a source is missing
    matched = ("rho_harmful_benign_50", "rho_expanded_100", "weighted_safety")
    h_scan = harmful_prompts("train", sources=matched)[: cfg.scan_prompts]
    b_scan = benign_prompts("train", sources=matched)[: cfg.scan_prompts]
    scan = scan_safety_layers(model, tokenizer, h_scan, b_scan, seed=cfg.seed, progress=progress)
    layers = scan.top(fraction=cfg.layer_fraction)
    scan.save_json(os.path.join(cfg.out_dir, "scan.json"))
    scan.plot(os.path.join(cfg.out_dir, "scan.png"))
    report["scan"] = {"layers": layers, "bce": scan.bce, "accuracy": scan.accuracy, "auroc": scan.auroc}
    say(f"[demo] scan: upcycling layers {layers}")

    upcycle_(model, UpcycleConfig(layers=layers, num_safety_experts=cfg.num_safety_experts, top_k=cfg.top_k))
    s1 = stage1(model, tokenizer, h_train[: cfg.stage1_prompts], lr=cfg.stage1_lr, epochs=cfg.stage1_epochs,
                batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    say(f"[demo] stage 1: loss {s1[0]['loss']:.3f} -> {s1[-1]['loss']:.3f} over {len(s1)} steps")
    b2 = _take(b_train, cfg.stage2_benign)
    with safety_temperature(model, 0.0):
        b2_answers = generate_chat(model, tokenizer, [chat(p) for p in b2], max_new_tokens=cfg.max_new_tokens,
                                   batch_size=cfg.gen_batch_size, progress=progress)
    s2 = stage2(model, tokenizer, h_train[: cfg.stage2_harmful], b2, benign_responses=b2_answers, lr=cfg.stage2_lr,
                epochs=cfg.stage2_epochs, batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    say(f"[demo] stage 2: router loss {s2[0]['extra_loss']:.3f} -> {s2[-1]['extra_loss']:.3f} over {len(s2)} steps")
    report["training"] = {"stage1": s1, "stage2": s2}

    rows = sweep_temperature(model, tokenizer, cfg.taus, h_test, b_test, e_test, base_answers=base_answers,
                             out_dir=cfg.out_dir, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size,
                             progress=progress)
    report["sweep"] = [{k: v for k, v in r.items() if k not in ("harmful_refused",)} for r in rows]
    default = next((r for r in rows if r["tau"] == 0.5), rows[len(rows) // 2])
    report["after"] = {k: v for k, v in default.items() if k != "harmful_refused"}
    if cfg.save_model:
        save_upcycled(model, os.path.join(cfg.out_dir, "model"), tokenizer=tokenizer)
    report["seconds"] = round(time.time() - t_start, 1)
    with open(os.path.join(cfg.out_dir, "report.json"), "w") as f:
        json.dump({k: v for k, v in report.items() if k != "training"} | {"training_steps": [len(s1), len(s2)]},
                  f, indent=2, default=str)
    say("")
    say(format_report(report))
    return report


def format_report(report: dict) -> str:
    b, a = report["base"], report["after"]
    lines = [
        f"UpSafe°C on {report.get('model', 'the model')} (upcycled layers {report['scan']['layers']}), test splits:",
        f"  refusal judge accuracy on PyRIT human labels: {report['judge']['accuracy']:.3f}",
        "  |                        | base   | upcycled (τ=0.5) |",
        "  |------------------------|--------|------------------|",
        f"  | safety rate (harmful)  | {b['safety_rate']:.3f}  | {a['safety_rate']:.3f}            |",
        f"  | over-refusal (benign)  | {b['over_refusal_benign']:.3f}  | {a['over_refusal_benign']:.3f}            |",
        f"  | over-refusal (edgy)    | {b['over_refusal_edgy']:.3f}  | {a['over_refusal_edgy']:.3f}            |",
        f"  | KL to base (benign)    | 0      | {a.get('kl_benign', float('nan')):.4f}           |",
        "  τ sweep: " + ", ".join(f"τ={r['tau']:g}: safety {r['safety_rate']:.2f} / over-refusal "
                                  f"{r['over_refusal_benign']:.2f} / KL {r.get('kl_benign', float('nan')):.3f}"
                                  for r in report["sweep"]),
        f"  ({report['seconds']:.0f} s; files in {report['config']['out_dir']})",
    ]
    return "\n".join(lines)
