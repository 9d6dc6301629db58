"""UpSafe°C two-stage SFT.

Stage 1 trains the safety experts (and optionally the router) on harmful prompts -> refusals.
  route="safety" (default, ours): τ=1 sends every token through the safety experts, so they learn the
  refusal behaviour directly; the router is left to stage 2. route="router": the router chooses
  (paper-faithful) and a Switch-Transformer load-balancing loss keeps the experts in use.
Stage 2 trains only the router on harmful (-> refusal) and benign (-> the base model's own answer)
prompts at τ=0.5, with the LM loss plus a router-supervision loss: binary cross-entropy of the
router's total safety-expert probability against the prompt's harmful/benign label, over the
assistant-turn positions (the generation prompt and the response). With top-1 routing the LM loss
gives the router no gradient toward experts it did not pick, which is why the supervision term exists.
Everything not trained in a stage is frozen, and frozen weights stay bitwise unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F

from ..upcycle.hf import routes_per_sequence
from ..upcycle.model import safety_moe_modules, safety_temperature
from .chat import chat, pad_token_id, render_chat
from .config import UpSafeTrainConfig, autocast_name
from .sft import IGNORE_INDEX, SFTCollator, encode_sft, run_sft

CONFIG_FILE = "upsafe_train_config.json"
"""The file the CLI writes the `UpSafeTrainConfig` of a trained model into, next to its weights."""


def generation_prompt_length(tokenizer, system: str | None = None) -> int:
    """Tokens the chat template adds for the assistant turn's header (supervised for the router)."""
    msgs = chat("x", system)
    with_gen = tokenizer(render_chat(tokenizer, msgs, True), add_special_tokens=False)["input_ids"]
    without = tokenizer(render_chat(tokenizer, msgs, False), add_special_tokens=False)["input_ids"]
    return max(1, len(with_gen) - len(without))


def make_examples(tokenizer, prompts: Sequence[str], responses: Sequence[str], harmful: bool, *,
                  system: str | None = None, max_length: int = 256, sup_tokens: int | None = None) -> list[dict]:
    """SFT examples (assistant-only labels) with `harmful` and the router-supervised span
    [`sup_from`, `sup_to`): the assistant header plus the first `sup_tokens` response tokens (None = all)."""
    if sup_tokens is not None and (not isinstance(sup_tokens, int) or sup_tokens < 0):
        raise ValueError(f"make_examples: `sup_tokens` must be None or an int >= 0, got {sup_tokens!r}")
    if len(prompts) != len(responses):
        raise ValueError(f"make_examples: {len(prompts)} prompts but {len(responses)} responses")
    g = generation_prompt_length(tokenizer, system)
    out = []
    for p, r in zip(prompts, responses):
        ex = encode_sft(tokenizer, chat(p, system), r, max_length=max_length)
        first = next((i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX), len(ex["labels"]))
        ex["harmful"] = int(bool(harmful))
        ex["sup_from"] = max(0, first - g)
        ex["sup_to"] = len(ex["labels"]) if sup_tokens is None else min(len(ex["labels"]), first + sup_tokens)
        out.append(ex)
    return out


def default_refusals(prompts: Sequence[str], seed: int = 0) -> list[str]:
    from ..eval.prompts import refusal_response

    return [refusal_response(p, seed=seed) for p in prompts]


def supervised_positions(batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: the positions in [`sup_from`, `sup_to`) of each example (`sup_to` optional) within `mask`."""
    pos = torch.arange(mask.shape[1], device=mask.device)[None, :]
    sup = mask.bool() & (pos >= batch["sup_from"][:, None])
    if "sup_to" in batch:
        sup &= pos < batch["sup_to"][:, None]
    return sup


def router_losses(model, batch: dict, *, lb_coef: float = 0.0, sup_coef: float = 0.0) -> torch.Tensor | None:
    """Switch-Transformer load balancing (E · Σ_e f_e P_e) and router supervision, averaged over the
    SafetyMoE layers of the last forward pass (their `router_logits`)."""
    mods = [m for _, m in safety_moe_modules(model) if m.router_logits is not None]
    if not mods or (lb_coef == 0 and sup_coef == 0):
        return None
    mask = batch["attention_mask"].bool()
    total = 0.0
    for m in mods:
        probs = torch.softmax(m.router_logits.float() / m.router_temperature, dim=-1)  # [B, S, E]
        if lb_coef:
            E = probs.shape[-1]
            top1 = F.one_hot(probs.argmax(-1), E).float()[mask]
            total = total + lb_coef * E * (top1.mean(0) * probs[mask].mean(0)).sum()
        if sup_coef:
            if "harmful" not in batch or "sup_from" not in batch:
                raise ValueError("router_losses: router supervision needs `harmful` and `sup_from` in the batch")
            sup = supervised_positions(batch, mask)
            p_safety = probs[..., 1:].sum(-1).clamp(1e-6, 1 - 1e-6)
            target = batch["harmful"].float()[:, None].expand_as(p_safety)
            total = total + sup_coef * F.binary_cross_entropy(p_safety[sup], target[sup])
    return total / len(mods)


@contextlib.contextmanager
def train_only(model, params):
    """Freeze everything except `params` for the duration; restores the requires_grad flags after."""
    keep = {id(p) for p in params}
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])


def stage_parameters(model, stage: int, route: str = "safety") -> list[torch.nn.Parameter]:
    mods = [m for _, m in safety_moe_modules(model)]
    if not mods:
        raise ValueError("UpSafe training: the model has no SafetyMoE layers (call upcycle_ first)")
    if stage == 1:
        ps = [p for m in mods for p in m.safety_parameters()]
        if route == "router":
            ps += [p for m in mods for p in m.router_parameters()]
        return ps
    if stage == 2:
        return [p for m in mods for p in m.router_parameters()]
    raise ValueError(f"stage must be 1 or 2, got {stage}")


@torch.no_grad()
def warm_start_routers(model, examples: Sequence[dict], *, batch_size: int = 8, max_positions: int = 20000,
                       l2: float = 0.1, seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Initialise every router from a logistic probe on its own input (ours).

    Runs the examples through the model, collects each SafetyMoE's input at the router-supervised
    positions (assistant header + response) with the example's harmful label, fits a probe per layer
    (`fit_probe_params`), and sets the router so the safety experts win exactly where the probe says
    harmful: original-MLP logit 0, every safety expert's logit = the probe logit. Stage 2 then
    fine-tunes from there. Returns each layer's probe training accuracy.
    """
    from tqdm.auto import tqdm

    from ..upcycle.scan import fit_probe_params

    mods = [(n, m) for n, m in safety_moe_modules(model)]
    feats = {n: [] for n, _ in mods}
    labels: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: feats[n].append(args[0].detach()))
             for n, m in mods]
    collate = SFTCollator(0)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        for i in tqdm(range(0, len(examples), batch_size), desc="router warm start", disable=not progress, leave=False):
            batch = collate(list(examples[i: i + batch_size]))
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            model(input_ids=ids, attention_mask=mask)
            sup = supervised_positions({k: v.to(device) for k, v in batch.items()}, mask.bool())
            for n, _ in mods:
                feats[n][-1] = feats[n][-1][sup].float().cpu()
            labels.append(batch["harmful"].to(device)[:, None].expand_as(sup)[sup].float().cpu())
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    y = torch.cat(labels)
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(y), generator=g)[:max_positions]
    acc = {}
    for n, m in mods:
        x = torch.cat(feats[n])[keep]
        w, b = fit_probe_params(x, y[keep], l2=l2)
        acc[n] = float((((x @ w + b) > 0).float() == y[keep]).float().mean())
        m.router.weight.zero_()
        m.router.bias.zero_()
        m.router.weight[1:] = w.to(m.router.weight)
        m.router.bias[1:] = b.to(m.router.bias)
    return acc


def stage_config(config: UpSafeTrainConfig | None, overrides: dict, stage: int, op: str) -> UpSafeTrainConfig:
    """`config` (or the defaults) with keyword `overrides`; `lr` / `lb_coef` name this stage's
    ``stage<N>_lr`` / ``stage<N>_lb_coef`` and `autocast_dtype` (a torch dtype) sets ``autocast``."""
    kw = dict(overrides)
    for short, full in (("lr", f"stage{stage}_lr"), ("lb_coef", f"stage{stage}_lb_coef")):
        if short in kw:
            kw[full] = kw.pop(short)
    if "autocast_dtype" in kw:
        kw["autocast"] = autocast_name(kw.pop("autocast_dtype"))
    return UpSafeTrainConfig.resolve(config, kw, op)


def _run_stage(model, tokenizer, examples, stage: int, cfg: UpSafeTrainConfig, params, extra) -> list[dict]:
    return run_sft(model, examples, optimizer=cfg.optimizer(params, stage),
                   collator=SFTCollator(pad_token_id(tokenizer, model)), batch_size=cfg.batch_size,
                   epochs=cfg.epochs, max_steps=cfg.max_steps, grad_accum=cfg.grad_accum, extra_loss=extra,
                   max_grad_norm=cfg.max_grad_norm or None, autocast_dtype=cfg.autocast_dtype(), seed=cfg.seed,
                   progress=cfg.progress, desc=f"upsafe stage {stage}")


def stage1(model, tokenizer, harmful: Sequence[str], *, responses: Sequence[str] | None = None,
           config: UpSafeTrainConfig | None = None, **overrides) -> list[dict]:
    """Stage 1: safety experts learn harmful prompt -> refusal. Returns the per-step log.

    Settings come from `config` (`UpSafeTrainConfig`) and keyword overrides of its fields; ``lr=`` and
    ``lb_coef=`` set this stage's ``stage1_lr`` / ``stage1_lb_coef`` (see `stage_config`)."""
    cfg = stage_config(config, overrides, 1, "stage1")
    if not harmful:
        raise ValueError("stage1: `harmful` is empty")
    responses = list(responses) if responses is not None else default_refusals(harmful, cfg.seed)
    examples = make_examples(tokenizer, harmful, responses, True, system=cfg.system, max_length=cfg.max_length)
    params = stage_parameters(model, 1, cfg.route)
    extra = ((lambda mdl, b, out: router_losses(mdl, b, lb_coef=cfg.stage1_lb_coef))
             if cfg.route == "router" else None)
    tau = 1.0 if cfg.route == "safety" else 0.5
    with train_only(model, params), safety_temperature(model, tau):
        return _run_stage(model, tokenizer, examples, 1, cfg, params, extra)


def stage2(model, tokenizer, harmful: Sequence[str], benign: Sequence[str], *,
           harmful_responses: Sequence[str] | None = None, benign_responses: Sequence[str] | None = None,
           config: UpSafeTrainConfig | None = None, **overrides) -> list[dict]:
    """Stage 2: only the router, on harmful -> refusal and benign -> the base model's own answers
    (generated at τ=0 when `benign_responses` is None). With ``warm_start`` (ours, default) every router
    first gets a logistic-probe initialisation on its own inputs (`warm_start_routers`). ``sup_tokens``
    (ours): supervise the router (and fit the warm-start probe) only on the assistant header and the
    first `sup_tokens` response tokens, where the choice to refuse is made (None = every response token).
    Settings as in `stage1` (``lr=`` / ``lb_coef=`` set ``stage2_lr`` / ``stage2_lb_coef``).

    A model upcycled with ``routing="sequence"`` takes one decision per prompt; its stage 2 is
    ``upcycle.sequence.fit_sequence_routers`` on the prompts (L2 ``sequence_l2``; no replies are generated or
    trained on) and the log is one entry with the fit's accuracy and BCE on its training prompts."""
    cfg = stage_config(config, overrides, 2, "stage2")
    if not harmful or not benign:
        raise ValueError("stage2: needs both harmful and benign prompts")
    if routes_per_sequence(model):  # one decision per prompt: the routers are one probe, fitted in closed form
        from ..upcycle.sequence import fit_sequence_routers

        fit = fit_sequence_routers(model, tokenizer, harmful, benign, l2=cfg.sequence_l2, system=cfg.system,
                                   batch_size=cfg.batch_size, max_length=cfg.max_length, progress=cfg.progress)
        return [{"step": 1, "loss": fit["train_bce"], "extra_loss": fit["train_bce"], **fit}]
    harmful_responses = (list(harmful_responses) if harmful_responses is not None
                         else default_refusals(harmful, cfg.seed))
    if benign_responses is None:
        from ..eval.generation import generate_chat

        with safety_temperature(model, 0.0):
            benign_responses = generate_chat(model, tokenizer, [chat(p, cfg.system) for p in benign],
                                             max_new_tokens=cfg.max_new_tokens, progress=cfg.progress)
    kw = dict(system=cfg.system, max_length=cfg.max_length, sup_tokens=cfg.sup_tokens)
    examples = (make_examples(tokenizer, harmful, harmful_responses, True, **kw)
                + make_examples(tokenizer, benign, benign_responses, False, **kw))
    if cfg.warm_start:
        warm_start_routers(model, examples, batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress)
    params = stage_parameters(model, 2)

    def extra(mdl, b, out):
        return router_losses(mdl, b, lb_coef=cfg.stage2_lb_coef, sup_coef=cfg.sup_coef)

    with train_only(model, params), safety_temperature(model, 0.5):
        return _run_stage(model, tokenizer, examples, 2, cfg, params, extra)


def upsafe_trainer_class():
    """An HF `Trainer` subclass that adds the router losses (`lb_coef`, `sup_coef` kwargs).

    Use with `SFTCollator`, examples from `make_examples`, and `train_only(model, stage_parameters(...))`;
    `remove_unused_columns=False` keeps the `harmful`/`sup_from` columns.
    """
    from transformers import Trainer

    class UpSafeTrainer(Trainer):
        def __init__(self, *args, lb_coef: float = 0.0, sup_coef: float = 0.0, **kw):
            super().__init__(*args, **kw)
            self.lb_coef, self.sup_coef = lb_coef, sup_coef

        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
            out = model(**model_inputs)
            loss = out.loss
            extra = router_losses(model, inputs, lb_coef=self.lb_coef, sup_coef=self.sup_coef)
            if extra is not None:
                loss = loss + extra
            return (loss, out) if return_outputs else loss

    return UpSafeTrainer
