"""The real server: `vllm serve` of an upcycled SmolLM2 on 127.0.0.1, driven with the `openai` client.

Greedy outputs equal upsafe_ext's HF model token for token at the same τ; requests with different τ
that share the engine's batches each get what they get alone; bad τ values are HTTP 400 with a clear
message and the server keeps serving. One server for the whole session (startup ~1-2 min on CPU).
"""
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_cases import MAX_TOKENS, PROMPTS, TAUS, VLLM_VENV_REASON, strip_eos

pytest.importorskip("vllm", reason=VLLM_VENV_REASON)
openai = pytest.importorskip("openai", reason=VLLM_VENV_REASON)
from serving_fixtures import client, demo_model_dir, hf_greedy, vllm_server  # noqa: E402,F401  (session fixtures)

pytestmark = pytest.mark.slow


def chat(client, prompt, tau=None, max_tokens=MAX_TOKENS, **kw):
    body = {"return_token_ids": True}
    if tau is not None:
        body["vllm_xargs"] = {"safety_temperature": tau}
    return client.chat.completions.create(model="upsafe", messages=[{"role": "user", "content": prompt}],
                                          temperature=0, max_tokens=max_tokens, extra_body=body, **kw)


def token_ids(resp, eos):
    return strip_eos(list(resp.choices[0].token_ids), eos)


@pytest.fixture(scope="module")
def solo(client, hf_greedy):
    """(prompt, τ) -> the server's greedy token ids with the request alone in the engine."""
    return {(p, t): token_ids(chat(client, p, t), hf_greedy.eos) for p in PROMPTS for t in TAUS}


def test_runs_the_installed_plugin():
    import importlib.metadata as md

    import upsafe_ext
    from upsafe_ext import _ext

    assert "site-packages" in upsafe_ext.__file__, "the vLLM venv must import its own build, not the checkout"
    assert _ext.loaded(), _ext.LOAD_ERROR
    eps = {e.value for e in md.entry_points(group="vllm.general_plugins")}
    assert "upsafe_ext.serving.vllm_plugin:register" in eps


@pytest.mark.parametrize("tau", TAUS)
def test_greedy_equals_hf_generate(solo, hf_greedy, tau):
    for prompt in PROMPTS:
        want = hf_greedy(prompt, tau)
        got = solo[(prompt, tau)]
        assert got == want, f"τ={tau} {prompt!r}: vLLM {got} != HF {want}"


def test_tau_changes_the_output(solo):
    # the demo model's experts differ from the base MLP: τ=0 (base) and τ=1 (safety experts only) disagree
    assert any(solo[(p, 0.0)] != solo[(p, 1.0)] for p in PROMPTS)


def test_default_tau_comes_from_the_saved_config(client, solo, hf_greedy, demo_model_dir):
    import json
    import os

    with open(os.path.join(demo_model_dir, "config.json")) as f:
        default = json.load(f)["upsafe_upcycle"]["safety_temperature"]
    assert default in TAUS
    for prompt in PROMPTS[:2]:
        assert token_ids(chat(client, prompt), hf_greedy.eos) == solo[(prompt, default)]


def test_mixed_tau_batch_gives_each_request_its_solo_result(client, vllm_server, solo, hf_greedy):
    jobs = [(p, t) for p in PROMPTS for t in TAUS] * 2
    random.Random(0).shuffle(jobs)
    running, done = [0.0], threading.Event()

    def watch():  # evidence that the requests really shared the engine's batches
        while not done.is_set():
            for line in vllm_server.metrics().splitlines():
                if line.startswith("vllm:num_requests_running"):
                    running[0] = max(running[0], float(line.rsplit(" ", 1)[1]))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = threading.Barrier(len(jobs))

    def one(job):
        start.wait()
        return token_ids(chat(client, *job), hf_greedy.eos)

    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(one, jobs))
    finally:
        done.set()
        watcher.join()
    bad = [(p, t) for (p, t), got in zip(jobs, results) if got != solo[(p, t)]]
    assert not bad, f"{len(bad)}/{len(jobs)} requests differ from their solo result: {bad[:4]}"
    assert running[0] >= 2, f"the requests never ran together (max running {running[0]})"


@pytest.mark.parametrize("bad", [1.5, -0.1, "0.3", [0.3], 1e9])
def test_bad_tau_is_a_400_and_the_server_keeps_serving(client, solo, hf_greedy, bad):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, PROMPTS[0], bad)
    assert err.value.status_code == 400
    assert "safety_temperature" in str(err.value)
    assert token_ids(chat(client, PROMPTS[0], 0.3), hf_greedy.eos) == solo[(PROMPTS[0], 0.3)]


def test_bad_tau_on_the_completions_endpoint(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="upsafe", prompt="Hello", max_tokens=4,
                                  extra_body={"vllm_xargs": {"safety_temperature": 2}})
    assert err.value.status_code == 400 and "safety_temperature" in str(err.value)
    ok = client.completions.create(model="upsafe", prompt="Hello", max_tokens=4, temperature=0,
                                   extra_body={"vllm_xargs": {"safety_temperature": 0.7}})
    assert ok.choices[0].text


def test_other_bad_inputs_are_400s_too(client, solo, hf_greedy):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="upsafe", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=10**7)  # longer than max_model_len
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert token_ids(chat(client, PROMPTS[1], 0.8), hf_greedy.eos) == solo[(PROMPTS[1], 0.8)]


def test_streaming_carries_tau(client, solo, hf_greedy):
    prompt, tau = PROMPTS[1], 0.8
    stream = client.chat.completions.create(
        model="upsafe", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=MAX_TOKENS,
        stream=True, extra_body={"vllm_xargs": {"safety_temperature": tau}})
    text = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
    whole = chat(client, prompt, tau).choices[0].message.content
    assert text == whole
