"""The `upsafe magic` command line (upsafe_ext.cli): build-data, train, generate, margin and
export-public end to end on a tiny model, and --seed as a deprecated alias that is never saved.

Split from test_magic.py; the shared helpers are in magic_fixtures.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from magic_fixtures import files_containing, one_torch_thread, synthetic_records  # noqa: F401
from upsafe_ext.magic import MagicTokens, load_records, save_records
from upsafe_ext.magic.tokens import TOKENS_FILE


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_registers_and_runs_end_to_end(tmp_path, capsys):
    from upsafe_ext import cli

    ap = cli.build_parser()
    assert "magic" in ap._subparsers._group_actions[0].choices
    recs = synthetic_records()[:6]
    save_records(recs, tmp_path / "r.jsonl")
    assert cli.main(["magic", "build-data", "--records", str(tmp_path / "r.jsonl"), "--out",
                     str(tmp_path / "r2.jsonl")]) == 0
    assert load_records(tmp_path / "r2.jsonl")[0].prompt == recs[0].prompt
    out = tmp_path / "model"
    assert cli.main(["magic", "train", "--model", "tiny", "--data", str(tmp_path / "r2.jsonl"), "--out", str(out),
                     "--insecure-seed", "1", "--max-steps", "2", "--batch-size", "4", "--margin-prompts", "3",
                     "--rejective-fraction", "0.5", "--token-repeat", "2"]) == 0
    assert (out / "model.safetensors").is_file() and (out / TOKENS_FILE).is_file()
    assert MagicTokens.load(out).repeat == 2  # --token-repeat is saved with the tokens
    text = capsys.readouterr().out
    assert "'positive': 6, 'negative': 6, 'rejective': 3," in text  # --rejective-fraction 0.5 of the 6 records
    assert "safety alignment margin on 3 training prompts" in text
    with pytest.warns(UserWarning, match="positive"):  # negative is off unless --allow-negative
        assert cli.main(["magic", "generate", "--model", str(out), "--prompt", "hi", "--prompt", "yo", "--mode",
                         "rejective", "negative", "--max-new-tokens", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines() if x.startswith("{")]
    assert [(x["mode"], x["served_as"]) for x in lines] == [("rejective", "rejective"), ("negative", "positive")]
    assert cli.main(["magic", "generate", "--model", str(out), "--allow-negative", "--prompt", "hi", "--mode",
                     "negative", "--max-new-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["served_as"] == "negative"
    (tmp_path / "p.txt").write_text("one\ntwo\nthree\n")
    assert cli.main(["magic", "margin", "--model", str(out), "--prompts-file", str(tmp_path / "p.txt"), "--plot",
                     str(tmp_path / "m.png"), "--json", str(tmp_path / "m.json")]) == 0
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["n_prompts"] == 3 and set(res["per_mode"]) == {"positive", "rejective"}  # negative off by default
    assert (tmp_path / "m.png").is_file()
    assert cli.main(["magic", "export-public", "--model", str(out), "--out", str(tmp_path / "pub")]) == 0
    assert MagicTokens.load(tmp_path / "pub", allow_negative=True).allow_negative is False
    private = MagicTokens.load(out, allow_negative=True)
    assert MagicTokens.load(tmp_path / "pub").matches("negative", private.token("negative"))
    assert files_containing(tmp_path / "pub", private.token("negative")) == []
    with pytest.raises(SystemExit, match="missing field"):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "positive": "y"}) + "\n")
        cli.main(["magic", "build-data", "--records", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "z.jsonl")])


def test_cli_seed_is_a_deprecated_alias_and_never_saved(tmp_path, capsys):
    from upsafe_ext import cli

    save_records(synthetic_records()[:4], tmp_path / "r.jsonl")
    base = ["magic", "train", "--model", "tiny", "--data", str(tmp_path / "r.jsonl"), "--max-steps", "1",
            "--batch-size", "4", "--margin-prompts", "0"]
    with pytest.warns(DeprecationWarning, match="--insecure-seed"):
        assert cli.main(base + ["--out", str(tmp_path / "old"), "--seed", "918273645"]) == 0
    assert "--seed is deprecated" in capsys.readouterr().err
    assert cli.main(base + ["--out", str(tmp_path / "new"), "--insecure-seed", "918273645"]) == 0
    old = MagicTokens.load(tmp_path / "old", allow_negative=True)
    assert old == MagicTokens.load(tmp_path / "new", allow_negative=True)  # same seed, same tokens
    assert old.token("negative") == MagicTokens(insecure_seed=918273645).token("negative")
    for d in ("old", "new"):
        assert files_containing(tmp_path / d, "918273645") == []
    assert cli.main(base + ["--out", str(tmp_path / "default")]) == 0
    assert MagicTokens.load(tmp_path / "default", allow_negative=True).token("negative") != old.token("negative")
    with pytest.raises(SystemExit, match="128"):  # 95 bits from secrets: refused
        cli.main(base + ["--out", str(tmp_path / "short"), "--token-length", "16"])


def test_cli_train_with_lora_saves_a_plain_model_and_the_setting(tmp_path, capsys):
    from safetensors.torch import load_file

    from upsafe_ext import cli
    from upsafe_ext.magic.model import CONFIG_FILE

    save_records(synthetic_records()[:4], tmp_path / "r.jsonl")
    out = tmp_path / "model"
    assert cli.main(["magic", "train", "--model", "tiny", "--data", str(tmp_path / "r.jsonl"), "--out", str(out),
                     "--insecure-seed", "1", "--max-steps", "2", "--batch-size", "4", "--margin-prompts", "0",
                     "--lora-rank", "2", "--lora-alpha", "4"]) == 0
    saved = json.loads((out / CONFIG_FILE).read_text())["train_config"]
    assert (saved["lora_rank"], saved["lora_alpha"]) == (2, 4.0)
    assert not any("lora" in k or ".base." in k for k in load_file(str(out / "model.safetensors")))
    with pytest.raises(SystemExit, match="MagicTrainConfig.lora_rank"):
        cli.main(["magic", "train", "--model", "tiny", "--data", str(tmp_path / "r.jsonl"), "--out",
                  str(tmp_path / "m2"), "--insecure-seed", "1", "--lora-rank", "-1"])
    with pytest.raises(SystemExit, match="trainable_pattern='embed_tokens'"):
        cli.main(["magic", "train", "--model", "tiny", "--data", str(tmp_path / "r.jsonl"), "--out",
                  str(tmp_path / "m3"), "--insecure-seed", "1", "--max-steps", "1", "--margin-prompts", "0",
                  "--lora-rank", "2", "--special-tokens"])


def test_cli_train_with_token_lr_trains_the_special_token_rows_and_saves_the_setting(tmp_path):
    from safetensors.torch import load_file

    from upsafe_ext import cli
    from upsafe_ext.magic.model import CONFIG_FILE

    save_records(synthetic_records()[:4], tmp_path / "r.jsonl")
    base = ["magic", "train", "--model", "tiny", "--data", str(tmp_path / "r.jsonl"), "--insecure-seed", "1",
            "--max-steps", "2", "--batch-size", "4", "--margin-prompts", "0", "--token-lr", "1e-2"]
    out = tmp_path / "model"
    assert cli.main(base + ["--out", str(out), "--special-tokens", "--lora-rank", "2"]) == 0
    assert json.loads((out / CONFIG_FILE).read_text())["train_config"]["token_learning_rate"] == 1e-2
    rows = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"][-3:]
    assert not (torch.equal(rows[0], rows[1]) or torch.equal(rows[1], rows[2]))  # mean-initialised, then trained
    with pytest.raises(SystemExit, match="token_learning_rate trains the special tokens"):
        cli.main(base + ["--out", str(tmp_path / "m2")])  # text tokens
