"""UpSafe°C end to end: scan -> upcycle -> stage 1 -> stage 2 -> evaluate -> τ sweep (+ plots).

`run_demo` is what `upsafe demo` runs on SmolLM2-135M-Instruct (offline, CPU). Training uses the
style-balanced training mix of `upsafe_ext.eval.protocol`; every number is measured with that module's
source-disjoint protocol (sources never trained on, both styles, rephrasings with held-out templates,
n and 95% Wilson intervals). Utility is the mean KL(base || upcycled) over benign prompts and the base
model's own answers; the base model is the same upcycled model at τ=0, so no second copy is kept.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .._config import SerialisableConfig
from ..saving import atomic_file
from ..train.config import SEQUENCE_L2
from .config import UpcycleConfig
from .hf import routes_per_sequence
from .model import safety_moe_modules, safety_temperature, upcycle_
from .sequence import prompt_routes


# the default τ of each routing, chosen on val (README): the largest safety on the unseen harmful val sets
# whose ShareGPT val over-refusal stays <= 0.05 (`benchmarks/sequence_routing_val.py` for 'sequence', with
# the whole ShareGPT val slice; benchmarks/val/sequence_routing_val.md)
DEFAULT_TAU = {"sequence": 0.6, "token": 0.5}


@dataclass
class DemoConfig(SerialisableConfig):
    """Sizes and hyper-parameters of `upsafe demo` (see the README for the measured wall time).

    Training uses ``eval.protocol.training_mix`` (train splits of the training sources, style-balanced,
    train-template augmentations); evaluation uses ``eval.protocol.protocol_sets(split)``: sources the
    model never saw, both styles, rephrasings with held-out templates, with 95% Wilson intervals.
    """

    out_dir: str = field(default="upsafe_out/demo", metadata={"help": "where results go"})
    split: str = field(default="test", metadata={"help": "'test' for reported numbers, 'val' while tuning"})
    scan_prompts: int = field(default=128, metadata={"help": "harmful and benign training prompts for the scan"})
    layer_fraction: float = field(default=0.25, metadata={"help": "fraction of layers to upcycle"})
    num_safety_experts: int = 1
    top_k: int = 1
    router_grad: str = field(default="straight_through", metadata={"help": "UpcycleConfig.router_grad"})
    routing: str = field(default="sequence", metadata={"help": "UpcycleConfig.routing: 'sequence' (one decision "
                                                                "per request; chosen on val) or 'token'"})
    sequence_l2: float = field(default=SEQUENCE_L2,
                               metadata={"help": "routing='sequence': L2 of the router fit (chosen on val)"})
    augment: float = field(default=0.35, metadata={"help": "share of training prompts rewritten (train templates)"})
    stage1_prompts: int = field(default=256, metadata={"help": "harmful training prompts for stage 1"})
    stage1_epochs: float = 1.0
    stage1_lr: float = 2e-4
    stage2_harmful: int | None = field(default=256, metadata={"help": "harmful training prompts for stage 2 (None: "
                                                                     "256, as before)"})
    stage2_benign: int | None = field(default=None, metadata={"help": "benign training prompts for stage 2 (None: "
                                                                     "256 with 'sequence', 320 with 'token')"})
    stage2_epochs: float = 1.5
    stage2_lr: float = 1e-3
    sup_tokens: int | None = field(default=4, metadata={"help": "router supervised on the header + this many "
                                                                 "response tokens (None = all); chosen on val"})
    batch_size: int = 8
    eval_harmful: int | None = field(default=None, metadata={"help": "prompts per harmful set at the default τ "
                                                                     "(None: every prompt of the set)"})
    eval_benign: int | None = field(default=None, metadata={"help": "prompts per benign set at the default τ "
                                                                    "(None: every prompt of the set)"})
    eval_base: int = field(default=16, metadata={"help": "prompts per set for the base model's column"})
    sweep_prompts: int = field(default=16, metadata={"help": "prompts per set in the τ sweep"})
    max_new_tokens: int = 32
    gen_batch_size: int = 32
    default_tau: float | None = field(default=None, metadata={"help": "the τ the table reports, chosen on val (None: "
                                                                     "0.6 with routing='sequence', 0.5 with 'token')"})
    taus: tuple = (0.0, 0.25, 0.5, 0.6, 0.75, 1.0)
    seed: int = 0
    save_model: bool = True
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:N or auto (upsafe_ext.models.load)"})
    dtype: str = field(default="float32", metadata={"help": "parameter dtype name (upsafe_ext.models.DTYPES)"})

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """Fewer prompts and steps (the numbers are noisier); see the README for its wall time."""
        routing = overrides.get("routing", cls.__dataclass_fields__["routing"].default)
        tau = overrides["default_tau"] if overrides.get("default_tau") is not None else DEFAULT_TAU[routing]
        base = dict(stage1_prompts=128, stage2_epochs=2.0, eval_harmful=24, eval_benign=24, eval_base=12,
                    sweep_prompts=12, taus=(0.0, tau, 1.0))
        if routing == "token":  # stage 2 trains by SGD on generated answers: fewer prompts
            base |= dict(stage2_harmful=128, stage2_benign=160)
        return cls(**(base | overrides))

    def __post_init__(self):
        self.taus = tuple(self.taus)  # JSON gives a list back
        if self.routing not in DEFAULT_TAU:
            raise ValueError(f"DemoConfig.routing must be 'token' or 'sequence', got {self.routing!r}")
        if self.default_tau is None:
            self.default_tau = DEFAULT_TAU[self.routing]
        if self.stage2_harmful is None:  # accepted as before: the default
            self.stage2_harmful = 256
        if self.stage2_benign is None:
            self.stage2_benign = {"sequence": 256, "token": 320}[self.routing]
        if not 0 < self.layer_fraction <= 1:
            raise ValueError(f"DemoConfig.layer_fraction must be in (0, 1], got {self.layer_fraction}")
        for name in ("scan_prompts", "stage1_prompts", "stage2_harmful", "stage2_benign", "max_new_tokens",
                     "batch_size", "eval_base", "sweep_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.split not in ("val", "test"):
            raise ValueError(f"DemoConfig.split must be 'val' or 'test', got {self.split!r}")
        if self.default_tau not in self.taus:
            raise ValueError(f"DemoConfig.default_tau ({self.default_tau}) must be one of `taus` {self.taus}")


def routes_at(model, tokenizer, prompts: Sequence[str], tau: float, scores: dict | None = None,
              progress: bool = True) -> list[float] | None:
    """The 0/1 route of each prompt (a one-turn chat) at τ (``sequence.prompt_routes``, with `scores` its
    cache: one pass over the prompts serves every τ of a sweep) for a model routed per sequence; None for
    any other model."""
    from .config import check_safety_temperature

    tau = check_safety_temperature(tau, "routes_at: `tau`")
    if not safety_moe_modules(model) or not routes_per_sequence(model):
        return None
    return prompt_routes(model, tokenizer, prompts, tau, scores=scores, progress=progress).tolist()


def evaluate_routed(model, tokenizer, sets, *, tau: float, scores: dict | None = None, max_new_tokens: int = 32,
                    batch_size: int = 32, progress: bool = True) -> list[dict]:
    """``eval.protocol.evaluate_sets`` at safety temperature τ (rows with the replies). A model routed per
    sequence gets each prompt's route from `routes_at` (one decision, which ``generate`` then does not repeat),
    and every row also holds ``routed`` (share of its prompts sent to the safety experts) and
    ``refused_not_routed`` (refusals of prompts the base model answered itself: not caused by the routing)."""
    from ..eval.judge import RefusalJudge
    from ..eval.protocol import evaluate_sets

    routes = routes_at(model, tokenizer, [p for s in sets for p in s.prompts], tau, scores, progress=progress)
    with (safety_temperature(model, tau) if safety_moe_modules(model) else contextlib.nullcontext()):
        rows = evaluate_sets(model, tokenizer, sets, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             safety_temperature=routes, progress=progress)
    if routes is not None:
        judge, at = RefusalJudge(), 0
        for r in rows:
            mine, at = routes[at: at + r["n"]], at + r["n"]
            r["routed"] = sum(mine) / len(mine) if mine else 0.0
            r["refused_not_routed"] = sum(1 for (_, reply), z in zip(r["replies"], mine) if not z and judge(reply))
    return rows


def evaluate_at(model, tokenizer, sets, *, tau: float, kl_prompts: Sequence[str] | None = None,
                base_answers: Sequence[str] | None = None, scores: dict | None = None, max_new_tokens: int = 32,
                batch_size: int = 32, progress: bool = True, return_replies: bool = False) -> dict:
    """Every protocol set (``eval.protocol.EvalSet``) at safety temperature τ: share refused with n and
    the 95% Wilson interval per set (``evaluate_routed``), and (with `kl_prompts` and the base model's
    `base_answers` to them) the mean KL(base || model) in nats/token, the base being the same model at τ=0.
    scores: ``routes_at``'s cache of sequence scores (a sweep passes one dict to every τ).
    return_replies: also ``out["replies"]`` = {set name: [(prompt, reply), ...]}."""
    from ..eval.generation import chat
    from ..eval.metrics import KL_MAX_LENGTH, mean_kl
    from ..train.sft import IGNORE_INDEX, encode_sft

    t0 = time.time()
    upcycled = bool(safety_moe_modules(model))
    rows = evaluate_routed(model, tokenizer, sets, tau=tau, scores=scores, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=progress)
    with (safety_temperature(model, tau) if upcycled else contextlib.nullcontext()):
        out = {"tau": tau, "sets": _rates(rows)}
        if return_replies:
            out["replies"] = {r["name"]: r["replies"] for r in rows}
        if base_answers is not None:
            if not upcycled:
                raise ValueError("evaluate_at: KL to the base needs an upcycled model (the base is its τ=0)")
            if kl_prompts is None or len(kl_prompts) != len(base_answers):
                raise ValueError("evaluate_at: `kl_prompts` must hold one prompt per base answer")

            def reference(input_ids, attention_mask):
                with safety_temperature(model, 0.0):
                    return model(input_ids=input_ids, attention_mask=attention_mask).logits

            convs = [chat(p) for p in kl_prompts]
            if not routes_per_sequence(model):
                out["kl_benign"] = mean_kl(model, reference, tokenizer, convs, base_answers, progress=progress)
            else:  # a prompt not routed to the safety experts is the base model: KL exactly 0 on its tokens
                routes = routes_at(model, tokenizer, kl_prompts, tau, scores, progress=progress)
                routed = [i for i, r in enumerate(routes) if r]
                kl_sum = 0.0
                if routed:  # only the routed prompts are run (at τ=1: their route)
                    with safety_temperature(model, 1.0):
                        _, per = mean_kl(model, reference, tokenizer, [convs[i] for i in routed],
                                         [base_answers[i] for i in routed], progress=progress, return_per_token=True)
                    kl_sum = sum(float(k.sum()) for k in per)
                tokens = sum(sum(y != IGNORE_INDEX for y in encode_sft(tokenizer, c, a, KL_MAX_LENGTH)["labels"])
                             for c, a in zip(convs, base_answers))  # mean_kl's response tokens, all prompts
                out["kl_benign"] = kl_sum / max(tokens, 1)
                out["routed_benign"] = sum(routes) / len(routes)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def plot_pareto(rows: list[dict], path: str) -> str:
    """PNG: safety (harmful sets refused) against utility cost (KL to base), and every set's refusal
    share across τ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    taus = [r["tau"] for r in rows]
    names = list(rows[0]["sets"]) if rows else []
    harmful = [n for n in names if rows[0]["sets"][n]["kind"] == "harmful"]
    kl = [r.get("kl_benign", float("nan")) for r in rows]
    saf = [100 * sum(r["sets"][n]["refused"] for n in harmful) / max(1, sum(r["sets"][n]["n"] for n in harmful))
           for r in rows]
    ax = axes[0]
    ax.plot(kl, saf, "o-", color="#c0392b")
    for t, x, y in zip(taus, kl, saf):
        ax.annotate(f"τ={t:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("utility cost: mean KL(base ‖ model) on benign prompts [nats/token]")
    ax.set_ylabel("harmful prompts refused (unseen sources) [%]")
    ax.set_title("Safety temperature: Pareto frontier")
    ax.grid(alpha=0.3)
    ax = axes[1]
    for n in names:
        harm = rows[0]["sets"][n]["kind"] == "harmful"
        ax.plot(taus, [100 * r["sets"][n]["rate"] for r in rows], "o-" if harm else "s--",
                label=f"{n} ({'safety' if harm else 'over-refusal'})")
    ax.set_xlabel("safety temperature τ")
    ax.set_ylabel("share refused [%]")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_temperature(model, tokenizer, taus: Sequence[float], sets, kl_prompts: Sequence[str] | None = None, *,
                      base_answers=None, out_dir: str | None = None, scores: dict | None = None,
                      max_new_tokens: int = 32, batch_size: int = 32, progress: bool = True,
                      replies_file: str | None = None) -> list[dict]:
    """`evaluate_at` for every τ (sharing one cache of sequence scores, `scores` when given); writes sweep.json
    and (for more than one τ) pareto.png into `out_dir` when given, and every judged reply into
    `out_dir`/`replies_file` (JSON lines, ``write_replies``) when that is given too."""
    from ..upcycle.config import check_safety_temperature

    taus = [check_safety_temperature(t, "sweep_temperature: τ") for t in taus]
    if replies_file is not None and not out_dir:
        raise ValueError("sweep_temperature: `replies_file` needs `out_dir`")
    scores = {} if scores is None else scores
    rows = [evaluate_at(model, tokenizer, sets, tau=t, kl_prompts=kl_prompts, base_answers=base_answers,
                        scores=scores, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                        return_replies=replies_file is not None)
            for t in taus]
    if out_dir:
        if replies_file is not None:
            write_replies(os.path.join(out_dir, replies_file), [(r["tau"], r.pop("replies")) for r in rows])
        with atomic_file(os.path.join(out_dir, "sweep.json")) as tmp, open(tmp, "w") as f:
            json.dump(rows, f, indent=2)
        if len(rows) > 1:
            plot_pareto(rows, os.path.join(out_dir, "pareto.png"))
    return rows


def write_replies(path: str, replies_at: Sequence[tuple[float, dict]]) -> str:
    """JSON lines ``{"set", "tau", "prompt", "reply"}``, one per judged reply, written atomically to `path`;
    `replies_at`: (τ, {set name: [(prompt, reply), ...]}) pairs."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        for tau, by_set in replies_at:
            for name, pairs in by_set.items():
                for prompt, reply in pairs:
                    f.write(json.dumps({"set": name, "tau": tau, "prompt": prompt, "reply": reply}) + "\n")
    return path


SWEEP_SETS = ("harmful imperative", "harmful question", "benign imperative", "benign question", "edgy benign")


def _rates(rows: Sequence[dict]) -> dict:
    return {r["name"]: {k: v for k, v in r.items() if k != "replies"} for r in rows}


def run_demo(cfg: DemoConfig | None = None, progress: bool = True, model=None, tokenizer=None) -> dict:
    """SmolLM2-135M-Instruct: scan, upcycle, two-stage SFT on the style-balanced training mix, then the
    source-disjoint protocol at the default τ and a τ sweep. Returns the report (also report.json)."""
    from ..eval.generation import chat, generate_chat
    from ..eval.judge import judge_accuracy
    from ..eval.protocol import evaluate_sets, protocol_sets, training_mix
    from ..models import load
    from ..train.upsafe import stage1, stage2
    from .io import save_upcycled
    from .scan import scan_safety_layers

    cfg = cfg or DemoConfig()
    os.makedirs(cfg.out_dir, exist_ok=True)
    with atomic_file(os.path.join(cfg.out_dir, "demo_config.json")) as tmp, open(tmp, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    say = (lambda *a: print(*a, flush=True)) if progress else (lambda *a: None)
    if model is None:
        model, tokenizer = load("smollm2", device=cfg.device, dtype=cfg.dtype)
    model.eval()
    gen = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size, progress=progress)
    main_sets = protocol_sets(cfg.split, n=cfg.eval_harmful, n_benign=cfg.eval_benign)
    sweep_sets = protocol_sets(cfg.split, n=cfg.sweep_prompts, names=SWEEP_SETS)
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    report = {"model": os.path.basename(str(name).rstrip("/")) or type(model).__name__, "config": cfg.to_dict(),
              "judge": judge_accuracy()}
    say(f"[demo] judge accuracy on PyRIT's human labels: {report['judge']['accuracy']:.3f}")

    say(f"[demo] base model on the {cfg.split} sets ({cfg.eval_base} prompts per set)")
    report["base"] = _rates(evaluate_sets(model, tokenizer, protocol_sets(cfg.split, n=cfg.eval_base), **gen))
    kl_prompts = [p for s in sweep_sets if s.kind == "benign" for p in s.prompts]
    base_answers = generate_chat(model, tokenizer, [chat(p) for p in kl_prompts], **gen)

    # the scan contrasts harmful and benign prompts of the style-balanced training mix: both sides hold
    # imperatives and questions, so a layer cannot score well on style alone
    h_scan, b_scan = training_mix(cfg.scan_prompts, cfg.scan_prompts, augment=cfg.augment)
    scan = scan_safety_layers(model, tokenizer, h_scan, b_scan, seed=cfg.seed, progress=progress)
    layers = scan.top(fraction=cfg.layer_fraction)
    scan.save_json(os.path.join(cfg.out_dir, "scan.json"))
    scan.plot(os.path.join(cfg.out_dir, "scan.png"))
    report["scan"] = {"layers": layers, "bce": scan.bce, "accuracy": scan.accuracy, "auroc": scan.auroc}
    say(f"[demo] scan: upcycling layers {layers}")

    upcycle_(model, UpcycleConfig(layers=layers, num_safety_experts=cfg.num_safety_experts, top_k=cfg.top_k,
                                  router_grad=cfg.router_grad, routing=cfg.routing,
                                  safety_temperature=cfg.default_tau))  # the saved model's default τ
    n_h = max(cfg.stage1_prompts, cfg.stage2_harmful)
    h_train, b_train = training_mix(n_h, cfg.stage2_benign, augment=cfg.augment)
    s1 = stage1(model, tokenizer, h_train[: cfg.stage1_prompts], lr=cfg.stage1_lr, epochs=cfg.stage1_epochs,
                batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    say(f"[demo] stage 1: loss {s1[0]['loss']:.3f} -> {s1[-1]['loss']:.3f} over {len(s1)} steps")
    b_answers = None
    if cfg.routing == "token":  # sequence routing fits the routers on the prompts alone
        with safety_temperature(model, 0.0):
            b_answers = generate_chat(model, tokenizer, [chat(p) for p in b_train], **gen)
    s2 = stage2(model, tokenizer, h_train[: cfg.stage2_harmful], b_train, benign_responses=b_answers,
                lr=cfg.stage2_lr, epochs=cfg.stage2_epochs, batch_size=cfg.batch_size, sup_tokens=cfg.sup_tokens,
                sequence_l2=cfg.sequence_l2, seed=cfg.seed, progress=progress)
    say(f"[demo] stage 2: router loss {s2[0]['extra_loss']:.3f} -> {s2[-1]['extra_loss']:.3f} over {len(s2)} steps"
        + (" (routing per sequence: one closed-form fit)" if cfg.routing == "sequence" else ""))
    report["training"] = {"stage1": s1, "stage2": s2}
    report["training_steps"] = [len(s1), len(s2)]

    say(f"[demo] upcycled model at τ={cfg.default_tau:g} on the {cfg.split} sets")
    scores: dict = {}  # sequence scores, one pass per prompt for the main sets and every τ of the sweep
    main_rows = evaluate_routed(model, tokenizer, main_sets, tau=cfg.default_tau, scores=scores, **gen)
    report["after"] = _rates(main_rows)  # routed per sequence: which refusals the routing caused, which not
    report["examples"] = {r["name"]: r["replies"][:3] for r in main_rows}
    write_replies(os.path.join(cfg.out_dir, "replies.jsonl"),  # for a second look
                  [(cfg.default_tau, {r["name"]: r["replies"] for r in main_rows})])
    rows = sweep_temperature(model, tokenizer, cfg.taus, sweep_sets, kl_prompts, base_answers=base_answers,
                             out_dir=cfg.out_dir, scores=scores, **gen)
    report["sweep"] = rows
    if cfg.save_model:
        report["model_dir"] = save_upcycled(model, os.path.join(cfg.out_dir, "model"), tokenizer=tokenizer)
    report["seconds"] = round(time.time() - t_start, 1)
    with atomic_file(os.path.join(cfg.out_dir, "report.json")) as tmp, open(tmp, "w") as f:
        json.dump({k: v for k, v in report.items() if k != "training"}, f, indent=2, default=str)
    say("")
    say(format_report(report))
    return report


def format_report(report: dict) -> str:
    """The demo's table: every protocol set, base vs upcycled at the default τ, with 95% intervals."""
    from ..eval.protocol import format_sets_table

    cfg = report["config"]
    tau = cfg["default_tau"]
    lines = [f"UpSafe°C on {report.get('model', 'the model')} (upcycled layers {report['scan']['layers']}, routing per "
             f"{cfg.get('routing', 'token')}), "
             f"{cfg['split']} sets, greedy, {cfg['max_new_tokens']} new tokens, keyword judge (accuracy "
             f"{report['judge']['accuracy']:.3f} on PyRIT's labels). Share refused, 95% Wilson interval:",
             format_sets_table({f"base (n={cfg['eval_base']}/set)": list(report["base"].values()),
                                f"τ={tau:g}": list(report["after"].values())})]
    if all("routed" in v for v in report["after"].values()):
        lines.append(f"Routed to the safety experts at τ={tau:g} (refusals by the base model itself, not routed): "
                     + ", ".join(f"{n} {v['routed']:.2f} ({v['refused_not_routed']})"
                                 for n, v in report["after"].items()))
    lines.append("τ sweep (" + ", ".join(SWEEP_SETS) + "; KL to base in nats/token):")
    for row in report["sweep"]:
        lines.append(f"  τ={row['tau']:g}: " + ", ".join(f"{row['sets'][n]['rate']:.2f}" for n in SWEEP_SETS
                                                       if n in row["sets"])
                     + f"; KL {row.get('kl_benign', float('nan')):.3f}")
    lines.append("Sets marked in-source come from sources the model was trained on (held-out prompts); all "
                 "others come from sources it never saw.")
    where = report.get("model_dir") or report["config"]["out_dir"]
    lines.append(f"({report['seconds']:.0f} s; report and plots in {cfg['out_dir']}; model saved in {where})")
    return "\n".join(lines)
