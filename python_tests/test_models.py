"""`upsafe_ext.models.load`: one entry point for every kind of model folder, and the CLI contract built on
it (--device/--dtype everywhere, trained results always written, never over the model being read)."""
from __future__ import annotations

import json

import pytest
import torch
from magic_fixtures import one_torch_thread  # noqa: F401  (autouse: one intra-op thread on a shared machine)

from upsafe_ext.models import load, model_kind
from upsafe_ext.testing import tiny_model


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("spec, family", [("tiny", "llama"), ("tiny-gpt2", "gpt2")])
def test_tiny_is_the_one_fixture(spec, family):
    model, tok = load(spec)
    ref, ref_tok = tiny_model(family)
    assert _same_weights(model, ref) and tok.get_vocab() == ref_tok.get_vocab() and not model.training


def test_plain_folder_with_dtype_names(tmp_path):
    model, tok = tiny_model()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert model_kind(str(tmp_path / "m")) == "hf"
    got, _ = load(tmp_path / "m", device="cpu", dtype="bf16")
    assert got.dtype == torch.bfloat16
    assert _same_weights(load(str(tmp_path / "m"), dtype=torch.float32)[0], model)


def test_upcycled_folder_loads_its_safety_experts(tmp_path):
    from upsafe_ext.upcycle import UpcycleConfig, safety_moe_modules, upcycle_
    from upsafe_ext.upcycle.io import save_upcycled

    model, tok = tiny_model()
    upcycle_(model, UpcycleConfig(layers=[1], num_safety_experts=1))
    save_upcycled(model, str(tmp_path / "up"), tokenizer=tok)
    assert model_kind(str(tmp_path / "up")) == "upcycled"
    got, _ = load(str(tmp_path / "up"))
    assert [n for n, _ in safety_moe_modules(got)] == [n for n, _ in safety_moe_modules(model)]
    assert _same_weights(got, model)


def test_magic_folder_attaches_its_tokens(tmp_path):
    from upsafe_ext.magic import MagicConfig, prepare_model, save_magic_model
    from upsafe_ext.magic.model import get_tokens

    model, tok = tiny_model()
    tokens = prepare_model(model, tok, MagicConfig(insecure_seed=0))
    save_magic_model(model, tok, tokens, tmp_path / "magic")
    assert model_kind(str(tmp_path / "magic")) == "magic"
    got, _ = load(str(tmp_path / "magic"))
    loaded = get_tokens(got)
    assert loaded.token("positive") == tokens.token("positive") and "negative" not in loaded.modes
    assert "negative" in get_tokens(load(str(tmp_path / "magic"), allow_negative=True)[0]).modes


@pytest.mark.parametrize("kw, match", [({"dtype": "int8"}, "dtype"), ({"dtype": torch.int32}, "dtype"),
                                       ({"device": "nonsense"}, "device")])
def test_bad_device_or_dtype(kw, match):
    with pytest.raises(ValueError, match=match):
        load("tiny", **kw)


def test_unknown_name_is_an_error_naming_it():
    with pytest.raises(ValueError, match="no-such-model"):
        load("/no/such/dir/no-such-model")


def test_every_model_command_takes_device_and_dtype():
    from upsafe_ext.cli import build_parser

    def leaves(parser, path=()):
        for action in parser._actions:
            if getattr(action, "choices", None) and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    yield from leaves(sub, path + (name,))
                return
        yield path, {o for a in parser._actions for o in a.option_strings}

    checked = 0
    for path, opts in leaves(build_parser()):
        if "--model" in opts:
            assert {"--device", "--dtype"} <= opts, path
            checked += 1
    assert checked >= 12


def test_trained_results_are_always_written(tmp_path, monkeypatch, capsys):
    """`upsafe esi spa` without --out writes to its default folder; --out may not be the model's folder."""
    from upsafe_ext.cli import main
    from upsafe_ext.esi import SafetyMask

    monkeypatch.chdir(tmp_path)
    model, tok = tiny_model()
    model.save_pretrained("base")
    tok.save_pretrained("base")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith("q_proj.weight")}
    SafetyMask.random_like(shapes, fraction=0.01).save("mask.safetensors")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "response": "Sure."}) for p in ("a", "b")))
    args = ["esi", "spa", "--model", "base", "--mask", "mask.safetensors", "--data", str(data), "--steps", "1",
            "--batch-size", "2"]
    assert main(args) == 0
    assert (tmp_path / "upsafe_out" / "esi-spa" / "spa_report.json").exists()
    assert "upsafe_out/esi-spa" in capsys.readouterr().out
    report = json.loads((tmp_path / "upsafe_out" / "esi-spa" / "spa_report.json").read_text())
    assert report["config"]["type"] == "SparseTrainConfig"
    before = (tmp_path / "base" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="would overwrite the input"):
        main(args + ["--out", "base"])
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == before


def test_upsafe_train_saves_its_config_next_to_the_model(tmp_path, monkeypatch):
    from upsafe_ext.cli import main
    from upsafe_ext.train.config import UpSafeTrainConfig
    from upsafe_ext.train.upsafe import CONFIG_FILE
    from upsafe_ext.upcycle import UpcycleConfig, upcycle_
    from upsafe_ext.upcycle.io import save_upcycled

    model, tok = tiny_model()
    upcycle_(model, UpcycleConfig(layers=[1]))
    save_upcycled(model, str(tmp_path / "up"), tokenizer=tok)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "up", "--stage", "1", "--steps", "1", "--batch-size", "2", "--n-harmful", "2",
                 "--n-benign", "2"]) == 0
    saved = json.loads((tmp_path / "upsafe_out" / "trained" / CONFIG_FILE).read_text())
    assert UpSafeTrainConfig.from_dict(saved).max_steps == 1
    assert load(str(tmp_path / "upsafe_out" / "trained"))[0] is not None
