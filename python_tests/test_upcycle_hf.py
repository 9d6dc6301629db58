"""The upcycled model as a Hugging Face model (model_type "upsafe_upcycled", AutoModelForCausalLM, meta-device
loading, atomic saves) and τ as an argument of each call (forward, generate: beams, return sequences,
sampling, left padding, streaming, threads, torch.compile), on tiny random models."""
import json
import math
import os
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_safety_moe import perturb
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM, TextIteratorStreamer

from upsafe_ext.testing import TINY_PAD_ID, tiny_causal_lm, tiny_tokenizer
from upsafe_ext.upcycle import (SafetyMoE, UpcycleConfig, UpsafeConfig, load_upcycled, safety_moe_modules,
                                save_safety_adapter, save_upcycled, set_safety_temperature, upcycle_)
from upsafe_ext.upcycle.hf import ARCHITECTURE, MODEL_TYPE

IDS = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
PROMPTS = ["How do I pick a lock?", "Hi"]
GEN = dict(max_new_tokens=8, pad_token_id=TINY_PAD_ID, eos_token_id=None)


def upcycled(family="llama", tau=0.5, layers=(1, 3)):
    """A tiny upcycled model whose safety experts and router differ from the init (as after training)."""
    model = tiny_causal_lm(family)
    upcycle_(model, UpcycleConfig(layers=list(layers), num_safety_experts=2, top_k=2, safety_temperature=tau))
    perturb(model)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    m = upcycled()
    with torch.no_grad():  # τ must matter, or every comparison below is trivially true
        assert not torch.allclose(m(IDS, safety_temperature=0.0).logits, m(IDS, safety_temperature=1.0).logits)
    return m


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.padding_side = "left"
    return t


def alone(model, enc, i, tau, **kw):
    """Request i of a (left-padded) batch generated alone, unpadded, at scalar τ: its new tokens."""
    mask = enc["attention_mask"][i].bool()
    ids = enc["input_ids"][i][mask][None]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), safety_temperature=tau, **kw)
    return out[:, ids.shape[1]:]


# -- the HF-native model -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_auto_model_loads_the_upcycled_model_exactly(tmp_path, family):
    model = upcycled(family, tau=0.7)
    save_upcycled(model, str(tmp_path / "m"), tokenizer=tiny_tokenizer())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"]) == (MODEL_TYPE, [ARCHITECTURE])
    assert cfg["base_model_type"] == family and cfg["upsafe_upcycle"]["safety_temperature"] == 0.7
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert isinstance(loaded, type(model).__mro__[2]) and type(loaded).__name__ == ARCHITECTURE
    assert isinstance(AutoConfig.from_pretrained(str(tmp_path / "m")), UpsafeConfig)
    want, got = model.state_dict(), loaded.state_dict()
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    with torch.no_grad():
        for tau in (None, 0.0, 1.0):
            assert torch.equal(loaded(IDS, safety_temperature=tau).logits, model(IDS, safety_temperature=tau).logits)
        # the saved default τ (0.7) is what a call without τ uses
        assert torch.equal(loaded(IDS).logits, loaded(IDS, safety_temperature=0.7).logits)
    assert torch.equal(load_upcycled(str(tmp_path / "m"))(IDS).logits, loaded(IDS).logits)


def test_plain_transformers_refuses_the_folder_and_the_import_registers_it(tmp_path):
    save_upcycled(upcycled(), str(tmp_path / "m"))
    script = (
        "import sys\nfrom transformers import AutoModelForCausalLM\n"
        "try:\n    AutoModelForCausalLM.from_pretrained(sys.argv[1])\n    print('LOADED WITHOUT upsafe_ext')\n"
        "except (ValueError, KeyError) as e:\n    print('REFUSED', e)\n"
        "import upsafe_ext\nm = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"  # the plain package import
        "print('THEN', type(m).__name__, len(upsafe_ext.upcycle.safety_moe_modules(m)))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "REFUSED" in r.stdout and MODEL_TYPE in r.stdout, r.stdout
    assert f"THEN {ARCHITECTURE} 2" in r.stdout, r.stdout


def test_loading_builds_safety_moe_on_the_meta_device(tmp_path, monkeypatch):
    save_upcycled(upcycled(), str(tmp_path / "m"))
    devices = []
    init = SafetyMoE.__init__

    def spy(self, base, config):
        devices.append(base.w_in.device.type)
        init(self, base, config)

    monkeypatch.setattr(SafetyMoE, "__init__", spy)
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert devices == ["meta", "meta"]


def test_a_checkpoint_missing_a_safety_tensor_is_an_error(tmp_path):
    save_upcycled(upcycled(), str(tmp_path / "m"))
    path = str(tmp_path / "m" / "model.safetensors")
    sd = load_file(path)
    del sd["model.layers.3.mlp.safety_in_proj"]
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*model\.layers\.3\.mlp\.safety_in_proj"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))


def test_a_folder_in_the_old_format_still_loads(tmp_path):
    """Folders written before model_type "upsafe_upcycled": base model_type + the upsafe_upcycle entry."""
    model = upcycled(tau=0.3)
    save_upcycled(model, str(tmp_path / "m"))
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_type"], cfg["architectures"] = cfg.pop("base_model_type"), ["LlamaForCausalLM"]
    cfg_path.write_text(json.dumps(cfg))
    loaded = load_upcycled(str(tmp_path / "m"))
    assert type(loaded).__name__ == ARCHITECTURE
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)  # default τ 0.3 kept
    save_upcycled(loaded, str(tmp_path / "new"))  # re-saving migrates it
    assert json.loads((tmp_path / "new" / "config.json").read_text())["model_type"] == MODEL_TYPE


def test_from_config_builds_the_upcycled_architecture():
    model = upcycled()
    fresh = AutoModelForCausalLM.from_config(model.config)
    assert type(fresh) is type(model)
    assert [n for n, _ in safety_moe_modules(fresh)] == ["model.layers.1.mlp", "model.layers.3.mlp"]


def test_saves_are_atomic_and_never_overwrite_the_input(tmp_path):
    save_upcycled(upcycled(), str(tmp_path / "m"))
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    loaded = load_upcycled(str(tmp_path / "m"))
    for save in (save_upcycled, save_safety_adapter):
        with pytest.raises(ValueError, match="`save_directory`.*would overwrite the input"):
            save(loaded, str(tmp_path / "m"))
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before

    class BrokenTokenizer:
        def save_pretrained(self, d):
            raise OSError("disk full")

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        save_upcycled(loaded, str(tmp_path / "out"), tokenizer=BrokenTokenizer())
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]  # no temporary folder left


# -- τ per call --------------------------------------------------------------------------------------------
def test_forward_per_request_tau_equals_each_request_alone(model):
    taus = [0.0, 0.3, 1.0]
    with torch.no_grad():
        mixed = model(IDS, safety_temperature=taus).logits
        as_tensor = model(IDS, safety_temperature=torch.tensor(taus, dtype=torch.float64)).logits
        for i, tau in enumerate(taus):
            torch.testing.assert_close(mixed[i], model(IDS[i:i + 1], safety_temperature=tau).logits[0],
                                       atol=1e-5, rtol=1e-5)
    assert torch.equal(mixed, as_tensor)
    # the calls (here and in the fixture) left the saved default untouched: τ is never module state
    assert [m.safety_temperature for _, m in safety_moe_modules(model)] == [0.5, 0.5]


def test_call_tau_overrides_the_models_default(model):
    with torch.no_grad():
        want = model(IDS, safety_temperature=1.0).logits
        set_safety_temperature(model, 0.0)
        try:
            assert torch.equal(model(IDS, safety_temperature=1.0).logits, want)
            assert torch.equal(model(IDS).logits, model(IDS, safety_temperature=0.0).logits)
        finally:
            set_safety_temperature(model, 0.5)


def test_generate_with_left_padding_gives_each_request_its_tau(model, tok):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert not enc["attention_mask"].all()  # left padding is really there
    n = enc["input_ids"].shape[1]
    out = model.generate(**enc, safety_temperature=[0.0, 1.0], do_sample=False, **GEN)[:, n:]
    for i, tau in enumerate([0.0, 1.0]):
        assert torch.equal(out[i:i + 1], alone(model, enc, i, tau, do_sample=False, **GEN))
    assert not torch.equal(alone(model, enc, 0, 1.0, do_sample=False, **GEN), out[:1])  # τ changed request 0


@pytest.mark.parametrize("beams,returns", [(3, 1), (3, 2)])
def test_beam_search_and_return_sequences_keep_each_requests_tau(model, tok, beams, returns):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(num_beams=beams, num_return_sequences=returns, do_sample=False, **GEN)
    mixed = model.generate(**enc, safety_temperature=[0.0, 1.0], **kw)
    ref = [model.generate(**enc, safety_temperature=t, **kw) for t in (0.0, 1.0)]  # same batch, scalar τ
    assert mixed.shape[0] == 2 * returns
    assert torch.equal(mixed[:returns], ref[0][:returns]) and torch.equal(mixed[returns:], ref[1][returns:])
    assert not torch.equal(ref[0][returns:], ref[1][returns:])


def test_sampling_keeps_each_requests_tau(model, tok):
    enc = tok([PROMPTS[0]] * 2, return_tensors="pt", padding=True)
    kw = dict(do_sample=True, top_k=0, temperature=1.0, num_return_sequences=2, **GEN)
    outs = []
    for tau in ([0.0, 1.0], 0.0, 1.0):
        torch.manual_seed(123)
        outs.append(model.generate(**enc, safety_temperature=tau, **kw))
    mixed, ref0, ref1 = outs
    assert torch.equal(mixed[:2], ref0[:2]) and torch.equal(mixed[2:], ref1[2:])
    assert not torch.equal(ref0[2:], ref1[2:])


def test_streaming_gets_the_requests_tau(model, tok):
    enc = tok(PROMPTS[:1], return_tensors="pt")
    n = enc["input_ids"].shape[1]
    want = {t: tok.decode(model.generate(**enc, safety_temperature=t, do_sample=False, **GEN)[0, n:])
            for t in (0.0, 1.0)}
    assert want[0.0] != want[1.0]
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    th = threading.Thread(target=model.generate, kwargs=dict(**enc, streamer=streamer, safety_temperature=1.0,
                                                             do_sample=False, **GEN))
    th.start()
    text = "".join(streamer)
    th.join()
    assert text == want[1.0]


def test_two_threads_generate_at_their_own_tau(model, tok):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    taus = [0.0, 1.0, [1.0, 0.0]]
    want = [model.generate(**enc, safety_temperature=t, do_sample=False, **GEN) for t in taus]
    assert not torch.equal(want[0], want[1])
    barrier, errors = threading.Barrier(len(taus)), []

    def worker(k):
        try:
            barrier.wait()
            for _ in range(4):
                got = model.generate(**enc, safety_temperature=taus[k], do_sample=False, **GEN)
                if not torch.equal(got, want[k]):
                    errors.append((k, got))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append((k, e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(taus))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors


def test_torch_compile_keeps_tau_per_call_and_validates_it(tok):
    model = upcycled()
    with torch.no_grad():
        ref = {t: model(IDS, safety_temperature=t).logits for t in (0.0, 0.3, 1.0)}
        mixed_ref = model(IDS, safety_temperature=[1.0, 0.0, 0.3]).logits
        compiled = torch.compile(model, backend="eager")
        for tau in (0.0, 1.0, 0.3, 0.0):  # each call its own τ: no stale guard or baked-in constant
            assert torch.equal(compiled(IDS, safety_temperature=tau).logits, ref[tau])
        assert torch.equal(compiled(IDS, safety_temperature=[1.0, 0.0, 0.3]).logits, mixed_ref)
        for bad in (1.5, [0.1, 2.0, 0.3], torch.tensor([0.1, math.nan, 0.2])):
            with pytest.raises(ValueError, match="safety_temperature"):
                compiled(IDS, safety_temperature=bad)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    want = model.generate(**enc, safety_temperature=[0.0, 1.0], num_beams=2, do_sample=False, **GEN)
    model.forward = torch.compile(model.forward, backend="eager")
    got = model.generate(**enc, safety_temperature=[0.0, 1.0], num_beams=2, do_sample=False, **GEN)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bad,match", [
    (1.5, r"\[0, 1\]"), (-0.1, r"\[0, 1\]"), (math.nan, "NaN"), ("0.3", r"\[0, 1\]"), (True, r"\[0, 1\]"),
    ([0.2, 0.3], "2 values but the batch has 3"), ([0.1, 0.2, 1.1], r"\[0, 1\]"), ([], "one float per sequence"),
    (torch.tensor([[0.1, 0.2, 0.3]]), "1-D float"), (torch.tensor([0, 1, 1]), "1-D float"),
])
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_a_bad_tau_is_a_value_error_naming_it(model, bad, match, call):
    with pytest.raises(ValueError, match=f"safety_temperature.*{match}"):
        if call == "forward":
            model(IDS, safety_temperature=bad)
        else:
            model.generate(IDS, safety_temperature=bad, max_new_tokens=2, pad_token_id=TINY_PAD_ID)


def test_forward_signature_is_the_base_one_plus_tau(model):
    """generate's kwarg check and Trainer's column and label discovery read the forward signature."""
    import inspect

    from transformers.utils import find_labels

    params = inspect.signature(model.forward).parameters
    base = inspect.signature(LlamaForCausalLM.forward).parameters
    assert list(params) == [p for p in base if p not in ("self", "kwargs")] + ["safety_temperature", "kwargs"]
    assert find_labels(type(model)) == ["labels"]


def test_pickle_and_deepcopy_keep_the_upcycled_class(model):
    """The classes are made at run time; pickle (torch.save of a whole model) and deepcopy rebuild them."""
    import copy
    import pickle

    model.config._attn_implementation = "eager"  # run-time state a to_dict round trip would drop
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone) is type(model) and type(clone.config) is type(model.config)
        assert clone.config._attn_implementation == "eager"
        with torch.no_grad():
            assert torch.equal(clone(IDS, safety_temperature=[0.0, 0.3, 1.0]).logits,
                               model(IDS, safety_temperature=[0.0, 0.3, 1.0]).logits)
