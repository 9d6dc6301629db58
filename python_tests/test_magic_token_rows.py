"""The special tokens' embedding rows as their own parameter (upsafe_ext.magic.token_rows) and their own
learning rate in co-training (MagicTrainConfig.token_learning_rate): exact when added, gradients through
both uses of a tied matrix, merging reproduces the wrapped model under the original names, the rows move
at their rate while the rest trains at its own, and bad arguments are named."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from magic_fixtures import one_torch_thread, synthetic_records  # noqa: F401
from upsafe_ext.magic import MagicConfig, MagicTrainConfig, build_examples, prepare_model, train_magic
from upsafe_ext.magic.token_rows import (TokenRowsEmbedding, TokenRowsHead, add_token_rows, merge_token_rows,
                                         merged_token_rows, token_row_parameters)
from upsafe_ext.testing import tiny_causal_lm, tiny_tokenizer
from upsafe_ext.train.lora import LoraLinear

IDS = torch.tensor([[5, 17, 42, 9, 101, 7], [3, 250, 88, 21, 60, 2]])
ROWS = [17, 250, 60]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("family,tied", [("llama", True), ("gpt_neox", False)])
def test_add_token_rows_is_exact_and_merging_reproduces_the_trained_rows(family, tied):
    model = tiny_causal_lm(family)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    before, keys = _logits(model), set(model.state_dict())
    params = add_token_rows(model, ROWS)
    assert len(params) == (1 if tied else 2) and token_row_parameters(model) == params
    assert isinstance(model.get_input_embeddings(), TokenRowsEmbedding)
    assert isinstance(model.get_output_embeddings(), TokenRowsHead)
    assert torch.equal(_logits(model), before)  # copies of the rows: the same model bit for bit
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    wrapped = _logits(model)
    assert not torch.allclose(wrapped, before)
    assert not torch.allclose(wrapped[..., ROWS], before[..., ROWS])  # the output side uses the rows too
    assert merge_token_rows(model) and not merge_token_rows(model)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(_logits(model), wrapped)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied


def test_rows_get_the_gradient_of_both_uses_and_the_matrix_rows_none():
    model = tiny_causal_lm("llama")
    plain = tiny_causal_lm("llama")
    (rows,) = add_token_rows(model, ROWS)
    model(input_ids=IDS).logits.square().mean().backward()
    plain(input_ids=IDS).logits.square().mean().backward()
    emb = model.get_input_embeddings().weight
    assert torch.count_nonzero(emb.grad[ROWS]) == 0  # replaced in the lookup and in the logits
    # the tied matrix's gradient on those rows, unwrapped, is what the separate rows receive
    torch.testing.assert_close(rows.grad, plain.get_input_embeddings().weight.grad[ROWS])
    other = [i for i in range(emb.shape[0]) if i not in ROWS]
    torch.testing.assert_close(emb.grad[other], plain.get_input_embeddings().weight.grad[other])


def test_merged_token_rows_gives_a_plain_model_inside_and_the_wrappers_after():
    model = tiny_causal_lm("llama")
    keys = set(model.state_dict())
    (rows,) = add_token_rows(model, ROWS)
    with torch.no_grad():
        rows.fill_(0.5)
    with merged_token_rows(model):
        assert set(model.state_dict()) == keys
        assert torch.equal(model.get_input_embeddings().weight[ROWS], rows.detach())
    assert isinstance(model.get_input_embeddings(), TokenRowsEmbedding) and token_row_parameters(model) == [rows]


def test_add_token_rows_names_bad_ids():
    model = tiny_causal_lm("llama")
    for ids in ([], [3, 3], [10_000]):
        with pytest.raises(ValueError, match="add_token_rows: `ids`"):
            add_token_rows(model, ids)
    add_token_rows(model, [3])
    with pytest.raises(ValueError, match="already wrapped"):
        add_token_rows(model, [4])


def _special_setup():
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama")
    tokens = prepare_model(model, tok, MagicConfig(insecure_seed=0, special_tokens=True))
    data = build_examples(synthetic_records()[:8], tok, tokens, progress=False)
    ids = list(tokens.token_ids(tok).values())
    return model, tok, tokens, data, ids


@pytest.mark.parametrize("lora", [False, True])
def test_token_learning_rate_moves_the_token_rows_at_their_own_rate(lora, tmp_path):
    runs = {}
    for token_lr in (None, 1e-2):
        model, tok, tokens, data, ids = _special_setup()
        emb0 = model.get_input_embeddings().weight.detach().clone()
        assert torch.equal(emb0[ids[0]], emb0[ids[1]])  # mean-initialised: identical
        cfg = MagicTrainConfig(learning_rate=1e-4, max_steps=4, batch_size=4, warmup_ratio=0.0,
                               lr_schedule="constant", token_learning_rate=token_lr,
                               lora_rank=2 if lora else 0, trainable_pattern="embed_tokens" if lora and token_lr is None
                               else None, save_steps=2, output_dir=str(tmp_path / f"{lora}{token_lr}"))
        train_magic(model, tok, data, config=cfg, progress=False)
        emb = model.get_input_embeddings()
        assert type(emb) is torch.nn.Embedding and not any(isinstance(m, LoraLinear) for m in model.modules())
        moved = (emb.weight.detach()[ids] - emb0[ids]).abs().max(dim=1).values
        other = (emb.weight.detach()[:ids[0]] - emb0[:ids[0]]).abs().max()
        runs[token_lr] = (moved, other, emb.weight.detach()[ids])
        for d in (tmp_path / f"{lora}{token_lr}" / "checkpoint-2", tmp_path / f"{lora}{token_lr}"):
            saved = load_file(str(d / "model.safetensors"))
            assert not any(".base." in k or "rows" in k for k in saved)  # plain models, usual names
        final = load_file(str(tmp_path / f"{lora}{token_lr}" / "model.safetensors"))
        torch.testing.assert_close(final["model.embed_tokens.weight"][ids], emb.weight.detach()[ids])
    moved_own, other_own, rows = runs[1e-2]
    moved_shared, other_shared, _ = runs[None]
    # AdamW moves a coordinate about lr per step: 4 steps at 1e-2 against 4 at 1e-4
    assert moved_own.min() > 10 * moved_shared.max()
    assert moved_own.max() <= 4 * 1e-2 * 1.01
    assert not torch.equal(rows[0], rows[1])  # the tokens are told apart
    if lora:  # with adapters only the rows train in the embedding
        assert other_own == 0
    else:  # the rest of the embedding trains at the shared rate
        assert 0 < other_own <= 4 * 1e-4 * 1.01


def test_token_learning_rate_is_named_on_bad_input():
    with pytest.raises(ValueError, match="MagicTrainConfig.token_learning_rate"):
        MagicTrainConfig(token_learning_rate=0.0)
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama")
    tokens = prepare_model(model, tok, MagicConfig(insecure_seed=0))  # text tokens
    data = build_examples(synthetic_records()[:4], tok, tokens, progress=False)
    with pytest.raises(ValueError, match="token_learning_rate trains the special tokens"):
        train_magic(model, tok, data, config=MagicTrainConfig(max_steps=1, token_learning_rate=1e-3), progress=False)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    with pytest.raises(ValueError, match="plain text"):
        tokens.token_ids(tok)


def test_token_rows_alone_can_train():
    """A pattern that matches nothing leaves only the rows: they train, every other weight stays."""
    model, tok, tokens, data, ids = _special_setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_magic(model, tok, data, config=MagicTrainConfig(max_steps=1, trainable_pattern="no_such_weight"),
                    progress=False)
    cfg = MagicTrainConfig(max_steps=2, batch_size=4, trainable_pattern="no_such_weight", token_learning_rate=1e-2)
    train_magic(model, tok, data, config=cfg, progress=False)
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    emb = "model.embed_tokens.weight"
    assert all(torch.equal(after[n], before[n]) for n in before if n != emb)
    assert torch.equal(after[emb][: ids[0]], before[emb][: ids[0]])
    assert not torch.equal(after[emb][ids], before[emb][ids])


def test_special_tokens_at_a_fine_tuning_rate_warn_and_name_token_learning_rate():
    model, tok, tokens, data, ids = _special_setup()
    with pytest.warns(UserWarning, match="MagicTrainConfig.token_learning_rate"):
        train_magic(model, tok, data, config=MagicTrainConfig(max_steps=1, batch_size=4, learning_rate=5e-5),
                    progress=False)
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train_magic(model, tok, data, config=MagicTrainConfig(max_steps=1, batch_size=4, learning_rate=5e-5,
                                                              token_learning_rate=1e-3), progress=False)
    assert not [w for w in seen if "token_learning_rate" in str(w.message)]  # quiet once the rows have their rate
