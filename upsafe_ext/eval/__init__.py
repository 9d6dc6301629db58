"""Evaluation harness shared by UpSafe°C, ESI and magic-token co-training.

* ``assets``     - locate and parse the offline prompt/model files (without importing their packages)
* ``prompts``    - fixed train/val/test splits of harmful, benign and over-refusal prompts, ShareGPT
                   benign requests (filtered); refusal targets
* ``rephrase``   - prompt style (imperative / question) and deterministic rephrasings (question, past
                   tense, role-play, suffix) with disjoint train and test templates
* ``protocol``   - the source-disjoint, style-balanced evaluation every method reports with
                   (``protocol_sets``, ``training_mix``, ``evaluate_sets``, ``format_sets_table``)
* ``judge``      - keyword refusal judge (+ accuracy on PyRIT's human labels vs the HarmBench prefixes)
* ``generation`` - batched greedy chat generation (left padding, KV cache, new tokens only)
* ``metrics``    - safety rate, over-refusal rate, Wilson intervals, mean KL to a reference, ``evaluate_safety``
* ``real_model`` - SmolLM2-135M-Instruct converted once from the shipped GGUF and cached

Heavy modules (transformers, the model) load lazily; importing this package is cheap.
"""
from .generation import chat, generate_chat
from .judge import PrefixJudge, RefusalJudge, is_refusal, judge_accuracy
from .metrics import evaluate_safety, mean_kl, over_refusal_rate, safety_rate
from .prompts import (REFUSAL_RESPONSES, PromptSplits, benign_prompts, harmful_prompts, labelled_prompts,
                      overrefusal_prompts, prompt_splits, refusal_response)


def load_smollm2(*args, **kwargs):
    """See ``upsafe_ext.eval.real_model.load_smollm2``."""
    from .real_model import load_smollm2 as _load

    return _load(*args, **kwargs)


__all__ = [
    "chat", "generate_chat", "RefusalJudge", "PrefixJudge", "is_refusal", "judge_accuracy", "evaluate_safety",
    "mean_kl", "over_refusal_rate", "safety_rate", "REFUSAL_RESPONSES", "PromptSplits", "benign_prompts",
    "harmful_prompts", "labelled_prompts", "overrefusal_prompts", "prompt_splits", "refusal_response",
    "load_smollm2",
]
