"""LoRA adapters (upsafe_ext.train.lora) and their use in magic co-training (MagicTrainConfig.lora_rank):
exact at init, only the adapters train, merging reproduces the adapted model with the original names,
checkpoints are plain models, and bad arguments are named."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from magic_fixtures import one_torch_thread, synthetic_records, synthetic_setup  # noqa: F401
from upsafe_ext.magic import MagicConfig, MagicTrainConfig, build_examples, prepare_model, train_magic
from upsafe_ext.testing import tiny_causal_lm, tiny_tokenizer
from upsafe_ext.train.lora import LoraLinear, add_lora, lora_parameters, merge_lora, merged_lora

IDS = torch.tensor([[5, 17, 42, 9, 101, 7], [3, 3, 88, 21, 60, 2]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_add_lora_is_exact_at_init_and_wraps_every_projection():
    model = tiny_causal_lm("llama")
    before, keys = _logits(model), set(model.state_dict())
    names = add_lora(model, rank=4, alpha=8)
    n_layers = len(model.model.layers)
    assert len(names) == 7 * n_layers  # q, k, v, o, gate, up, down per layer; not the LM head
    assert not any("lm_head" in n for n in names)
    assert torch.equal(_logits(model), before)  # B = 0: the same model bit for bit
    assert all(not m.base.weight.requires_grad for m in model.modules() if isinstance(m, LoraLinear))
    assert len(lora_parameters(model)) == 2 * len(names)
    assert merge_lora(model) == len(names)
    assert set(model.state_dict()) == keys and torch.equal(_logits(model), before)


def test_merge_reproduces_the_adapted_model_with_the_original_names():
    model = tiny_causal_lm("llama")
    keys = set(model.state_dict())
    emb = model.get_input_embeddings().weight.detach().clone()
    add_lora(model, rank=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.normal_(0, 0.05)
    adapted = _logits(model)
    q = model.model.layers[0].self_attn.q_proj
    assert (adapted - _logits(tiny_causal_lm("llama"))).abs().max() > 1e-3  # the adapters do change the output
    with merged_lora(model):  # a plain model inside, the adapters back afterwards
        assert set(model.state_dict()) == keys
        torch.testing.assert_close(_logits(model), adapted, atol=1e-5, rtol=1e-5)
    assert model.model.layers[0].self_attn.q_proj is q
    assert merge_lora(model) > 0 and not any(isinstance(m, LoraLinear) for m in model.modules())
    torch.testing.assert_close(_logits(model), adapted, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert all(p.requires_grad for p in model.parameters())  # each base layer's own flag restored
    assert merge_lora(model) == 0


@pytest.mark.parametrize("kw, match", [
    (dict(rank=0), "`rank` must be a positive int"),
    (dict(rank=2.0), "`rank` must be a positive int"),
    (dict(alpha=0.0), "`alpha` must be a finite number > 0"),
    (dict(alpha=float("nan")), "`alpha` must be a finite number > 0"),
    (dict(targets="("), "`targets` is not a valid regex"),
    (dict(targets="no_such_module"), "`targets` 'no_such_module' matches no nn.Linear"),
])
def test_add_lora_names_the_bad_argument(kw, match):
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match=match):
        add_lora(model, **kw)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_add_lora_twice_is_refused():
    model = tiny_causal_lm("llama")
    add_lora(model, rank=2)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, rank=2)


@pytest.mark.parametrize("kw, match", [
    (dict(lora_rank=-1), "MagicTrainConfig.lora_rank"),
    (dict(lora_rank=4, lora_alpha=0.0), "MagicTrainConfig.lora_alpha"),
    (dict(lora_rank=0, lora_alpha=-1.0), "MagicTrainConfig.lora_alpha"),
    (dict(lora_rank=4, lora_targets="["), "MagicTrainConfig.lora_targets"),
    (dict(lora_rank=4, train_embeddings_only=True), "exclusive"),
])
def test_magic_train_config_checks_the_lora_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        MagicTrainConfig(**kw)


def test_magic_train_config_round_trips_the_lora_fields():
    cfg = MagicTrainConfig(lora_rank=8, lora_alpha=16.0, lora_targets=r"(q|v)_proj$")
    assert MagicTrainConfig.from_dict(cfg.to_dict()) == cfg
    assert MagicTrainConfig().lora_rank == 0  # full fine-tuning stays the default


def test_train_magic_with_lora_trains_only_the_adapters_and_saves_plain_checkpoints(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama")
    tokens = prepare_model(model, tok, MagicConfig(insecure_seed=0))
    data = build_examples(synthetic_records()[:8], tok, tokens, progress=False)
    keys = set(model.state_dict())
    emb = model.get_input_embeddings().weight.detach().clone()
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    cfg = MagicTrainConfig(learning_rate=5e-3, max_steps=4, batch_size=4, lora_rank=4, lora_alpha=8.0,
                           save_steps=2, output_dir=str(tmp_path), warmup_ratio=0.0)
    log = train_magic(model, tok, data, config=cfg, progress=False)
    assert len(log) == 4 and all(math.isfinite(r["loss"]) for r in log)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # merged at the end
    assert set(model.state_dict()) == keys
    assert torch.equal(model.get_input_embeddings().weight, emb)  # frozen: only the adapters trained
    assert torch.equal(model.model.layers[0].input_layernorm.weight, norm)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q)  # the merged update
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    for d in (tmp_path / "checkpoint-2", tmp_path):  # checkpoints are plain models, no adapter names
        saved = load_file(str(d / "model.safetensors"))
        assert not any("lora" in k or ".base." in k for k in saved)
    final = load_file(str(tmp_path / "model.safetensors"))
    torch.testing.assert_close(final["model.layers.0.self_attn.q_proj.weight"],
                               model.model.layers[0].self_attn.q_proj.weight)
    mid = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(mid, q) and not torch.equal(mid, final["model.layers.0.self_attn.q_proj.weight"])


def test_train_magic_with_lora_leaves_the_model_as_it_was_on_a_setup_error():
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama")
    tokens = prepare_model(model, tok, MagicConfig(insecure_seed=0))
    data = build_examples(synthetic_records()[:4], tok, tokens, progress=False)  # no own answers: no soft targets
    with pytest.raises(ValueError, match="distill_top_k is set but no example"):
        train_magic(model, tok, data, config=MagicTrainConfig(max_steps=1, lora_rank=2, distill_top_k=4),
                    progress=False)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_train_magic_with_lora_and_special_tokens_needs_the_embeddings_trained():
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama")
    tokens = prepare_model(model, tok, MagicConfig(insecure_seed=0, special_tokens=True))
    data = build_examples(synthetic_records()[:4], tok, tokens, progress=False)
    ids = [tok.convert_tokens_to_ids(tokens.token(m)) for m in ("positive", "rejective")]
    with pytest.raises(ValueError, match="trainable_pattern='embed_tokens'"):
        train_magic(model, tok, data, config=MagicTrainConfig(max_steps=1, lora_rank=2), progress=False)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    rows = model.get_input_embeddings().weight[ids].detach().clone()
    assert torch.equal(rows[0], rows[1])  # mean-initialised: identical until trained
    cfg = MagicTrainConfig(learning_rate=1e-2, max_steps=2, batch_size=4, lora_rank=2, trainable_pattern="embed_tokens",
                           warmup_ratio=0.0)
    train_magic(model, tok, data, config=cfg, progress=False)
    rows = model.get_input_embeddings().weight[ids]
    assert not torch.equal(rows[0], rows[1])  # the token rows trained beside the adapters


def _synthetic(**train_kw):
    model, tok, _, records, data = synthetic_setup()
    log = train_magic(model, tok, data, config=MagicTrainConfig(learning_rate=1e-2, batch_size=16, warmup_ratio=0.05,
                                                                trainable_pattern="embed_tokens", **train_kw),
                      progress=False)
    return model, tok, records, log


def test_lora_learns_the_synthetic_switch():
    """Adapters (rank 8, every projection) learn the three behaviours of the synthetic task on a random
    2-layer model, as full fine-tuning does in test_magic_training. The random model's embeddings train
    beside them (frozen random embeddings stall even full fine-tuning of every projection at a loss of
    ~4.3, measured); the embeddings alone stall at ~2.2, so the adapters do the rest."""
    from magic_fixtures import STYLE
    from upsafe_ext.magic import MODES, generate

    _, _, _, alone = _synthetic(max_steps=60)
    model, tok, records, log = _synthetic(max_steps=200, lora_rank=8, lora_alpha=16.0)
    assert log[-1]["loss"] < 0.1 < 1.0 < alone[-1]["loss"]
    prompts = [r.prompt for r in records]
    for mode in MODES:
        got = generate(model, tok, prompts, mode=mode, max_new_tokens=32, progress=False)
        acc = sum(g == STYLE[mode, r.meta["harmful"]] for g, r in zip(got, records)) / len(records)
        assert acc >= 0.95, (mode, acc, got[:4])
