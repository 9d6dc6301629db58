"""Where the safety-critical weights sit: layer × module-type tables and a PNG heatmap.

Parameter names are parsed into (layer index, module type): q / k / v / o for attention projections,
gate / up / down for MLPs (MoE experts are pooled into their type; fused expert tensors give
"gate_up"), "qkv" for fused attention
(GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``), "lm_head", or "other".
"""
from __future__ import annotations

import re

import numpy as np

from .mask import SafetyMask

__all__ = ["MODULE_TYPES", "classify", "module_table", "type_summary", "top_modules", "depth_summary",
           "plot_heatmap", "format_summary"]

MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")
_TYPES = [
    (re.compile(r"(q_proj|query)\.weight$"), "q"),
    (re.compile(r"(k_proj|key)\.weight$"), "k"),
    (re.compile(r"(v_proj|value)\.weight$"), "v"),
    (re.compile(r"(o_proj|out_proj|attn\.c_proj|attention\.dense|self_attn\.dense)\.weight$"), "o"),
    (re.compile(r"(c_attn|query_key_value|qkv_proj|Wqkv)\.weight$"), "qkv"),
    (re.compile(r"gate_up_proj(\.weight)?$"), "gate_up"),
    (re.compile(r"(gate_proj|w1)\.weight$"), "gate"),
    (re.compile(r"(up_proj|w3|c_fc|dense_h_to_4h|fc1)\.weight$"), "up"),
    (re.compile(r"(down_proj|w2|mlp\.c_proj|dense_4h_to_h|fc2)\.weight$|down_proj$"), "down"),
    (re.compile(r"lm_head\.weight$"), "lm_head"),
]


def classify(name: str) -> tuple[int | None, str]:
    """(layer index or None, module type) of a parameter name."""
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    for pat, kind in _TYPES:
        if pat.search(name):
            return layer, kind
    return layer, "other"


def module_table(mask: SafetyMask) -> dict:
    """Counts per (layer, type): ``{"layers", "types", "selected" [L, T], "numel" [L, T], "density", "share"}``.

    density = selected / weights of that cell; share = selected / all selected. Parameters outside the
    decoder layers (e.g. lm_head) are reported under ``"extra"``.
    """
    cells: dict = {}
    extra: dict = {}
    for n in mask.names:
        layer, kind = classify(n)
        key = (layer, kind)
        target = cells if layer is not None else extra
        sel, tot = target.get(key, (0, 0))
        target[key] = (sel + mask.count(n), tot + mask.numel(n))
    layers = sorted({k[0] for k in cells})
    present = {k[1] for k in cells}
    types = [t for t in MODULE_TYPES if t in present] + sorted(present - set(MODULE_TYPES))
    sel = np.zeros((len(layers), len(types)), dtype=np.int64)
    tot = np.zeros_like(sel)
    for (layer, kind), (s, t) in cells.items():
        sel[layers.index(layer), types.index(kind)] += s
        tot[layers.index(layer), types.index(kind)] += t
    k = max(mask.count(), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        density = np.where(tot > 0, sel / np.maximum(tot, 1), np.nan)
    return {"layers": layers, "types": types, "selected": sel, "numel": tot, "density": density, "share": sel / k,
            "extra": {kind: {"selected": s, "numel": t, "density": s / t if t else float("nan")}
                      for (_, kind), (s, t) in extra.items()}}


def type_summary(mask: SafetyMask) -> dict:
    """Per module type (all layers pooled): selected, numel, density, share of the mask."""
    tab = module_table(mask)
    k = max(mask.count(), 1)
    out = {}
    for j, t in enumerate(tab["types"]):
        s, n = int(tab["selected"][:, j].sum()), int(tab["numel"][:, j].sum())
        out[t] = {"selected": s, "numel": n, "density": s / n if n else float("nan"), "share": s / k}
    for t, d in tab["extra"].items():
        out[t] = {**d, "share": d["selected"] / k}
    return out


def depth_summary(mask: SafetyMask, bands: int = 3) -> dict:
    """Density per module type in early / middle / late thirds of the layers (``bands`` groups)."""
    tab = module_table(mask)
    L = len(tab["layers"])
    if L == 0:
        return {}
    edges = np.linspace(0, L, bands + 1).round().astype(int)
    names = {3: ["early", "middle", "late"]}.get(bands, [f"band{i}" for i in range(bands)])
    out = {}
    for b in range(bands):
        rows = slice(edges[b], edges[b + 1])
        sel, tot = tab["selected"][rows].sum(0), tab["numel"][rows].sum(0)
        out[names[b]] = {t: (float(sel[j] / tot[j]) if tot[j] else float("nan")) for j, t in enumerate(tab["types"])}
    return out


def top_modules(mask: SafetyMask, n: int = 10) -> list[tuple[str, int, float]]:
    """The `n` parameters with the most selected weights: ``(name, selected, density)``."""
    rows = [(name, mask.count(name), mask.count(name) / max(mask.numel(name), 1)) for name in mask.names]
    rows.sort(key=lambda r: (-r[1], r[0]))
    return rows[:n]


def format_summary(mask: SafetyMask, n: int = 10) -> str:
    """A text report: per-type density/share, depth bands, and the top parameters."""
    lines = [f"{mask.count()} of {mask.numel()} eligible weights selected ({mask.fraction:.3%})",
             f"{'type':<8}{'selected':>10}{'density':>10}{'share':>8}"]
    for t, d in type_summary(mask).items():
        lines.append(f"{t:<8}{d['selected']:>10}{d['density']:>10.3%}{d['share']:>8.1%}")
    depth = depth_summary(mask)
    if depth:
        types = list(next(iter(depth.values())))
        lines.append("density by depth: " + " ".join(f"{t:>7}" for t in types))
        for band, vals in depth.items():
            lines.append(f"  {band:<15}" + " ".join(f"{vals[t]:>7.2%}" for t in types))
    lines.append("top parameters:")
    for name, c, dens in top_modules(mask, n):
        lines.append(f"  {name:<48}{c:>9}  ({dens:.2%} of the tensor)")
    return "\n".join(lines)


def plot_heatmap(mask: SafetyMask, path: str, *, value: str = "density", title: str | None = None) -> str:
    """Write a PNG heatmap (layer rows × module-type columns) of the mask's `value` ("density": share of
    each cell's weights selected; "share": share of the whole mask). Returns `path`."""
    if value not in ("density", "share"):
        raise ValueError(f"plot_heatmap: `value` must be 'density' or 'share', got {value!r}")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    tab = module_table(mask)
    data = tab[value] * 100.0
    L, T = data.shape
    fig, ax = plt.subplots(figsize=(1.1 * max(T, 3) + 2.0, 0.28 * max(L, 4) + 1.6), dpi=120)
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xticks(range(T), tab["types"])
    ax.set_yticks(range(L), [str(x) for x in tab["layers"]])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    label = "% of the module's weights selected" if value == "density" else "% of the selected weights"
    fig.colorbar(im, ax=ax, label=label)
    sel = mask.meta.get("selection", "")
    ax.set_title(title or f"ESI safety-critical weights ({sel}, {mask.count()} = {mask.fraction:.2%})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
