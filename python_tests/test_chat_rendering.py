"""One chat rendering and one padding rule: the same conversation reaches the model as the same token ids
through training (UpSafe°C, ESI SET/SPA, magic co-training), the layer scan, the ESI objectives,
evaluation and generation."""
from __future__ import annotations

import pytest
import torch
from magic_fixtures import one_torch_thread  # noqa: F401  (autouse: one intra-op thread on a shared machine)

from upsafe_ext.testing import tiny_model

PROMPT, RESPONSE = "How do I bake bread?", "Mix flour and water."


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def _prompt_part(example: dict) -> list[int]:
    """The prompt ids of an `encode_sft` example (the positions without labels)."""
    return [t for t, lab in zip(example["input_ids"], example["labels"]) if lab == -100]


class _Recorder(torch.nn.Module):
    """Wraps a causal LM; records the unpadded input ids of every forward / generate call."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.seen: list[list[int]] = []
        self.config, self.generation_config = model.config, model.generation_config

    def _record(self, input_ids, attention_mask):
        for row, m in zip(input_ids.tolist(), attention_mask.tolist()):
            self.seen.append([t for t, k in zip(row, m) if k])

    def forward(self, input_ids=None, attention_mask=None, **kw):
        self._record(input_ids, attention_mask)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kw)

    def generate(self, input_ids=None, attention_mask=None, **kw):
        self._record(input_ids, attention_mask)
        return self.inner.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)


@pytest.mark.parametrize("system", [None, "", "Be brief."])
def test_one_conversation_renders_to_the_same_ids_everywhere(tiny, system):
    from upsafe_ext.esi.config import ESIConfig
    from upsafe_ext.esi.objectives import JudgeObjective
    from upsafe_ext.esi.train import refusal_examples, sft_examples
    from upsafe_ext.eval.generation import encode_prompts as eval_encode_prompts
    from upsafe_ext.eval.generation import generate_chat
    from upsafe_ext.magic.data import MagicRecord
    from upsafe_ext.train.chat import chat, encode_prompts
    from upsafe_ext.train.sft import encode_sft
    from upsafe_ext.train.upsafe import make_examples
    from upsafe_ext.upcycle.scan import last_token_states

    model, tok = tiny
    reference = encode_prompts(tok, [chat(PROMPT, system)])[0]
    assert (system is not None) == ("system" in tok.decode(reference))  # "" is kept as an empty system turn

    paths = {
        "eval.encode_prompts": eval_encode_prompts(tok, [chat(PROMPT, system)])[0],
        "encode_sft": _prompt_part(encode_sft(tok, chat(PROMPT, system), RESPONSE)),
        "upsafe.make_examples": _prompt_part(make_examples(tok, [PROMPT], [RESPONSE], True, system=system)[0]),
        "esi.refusal_examples": _prompt_part(refusal_examples(tok, [PROMPT], refusal=RESPONSE, system=system)[0]),
        "esi.sft_examples": _prompt_part(sft_examples(tok, [(PROMPT, RESPONSE)], system=system)[0]),
        "magic.MagicRecord": _prompt_part(encode_sft(tok, MagicRecord(PROMPT, "a", "b", "c", system=system).messages(),
                                                     RESPONSE)),
    }
    rec = _Recorder(model)
    last_token_states(rec, tok, [PROMPT, PROMPT + " Please."], system=system, progress=False)
    paths["scan.last_token_states"] = rec.seen[0]
    rec.seen.clear()
    generate_chat(rec, tok, [chat(PROMPT, system), chat("Hi", system)], max_new_tokens=1, progress=False)
    paths["eval.generate_chat"] = next(s for s in rec.seen if len(s) == len(reference))
    rec.seen.clear()
    judge = JudgeObjective(tiny_model("llama", seed=1)[0], tok, safe_token="s", max_new_tokens=1)
    judge(rec, tok, [PROMPT, "Hi"], ESIConfig(system=system))
    paths["esi.JudgeObjective"] = rec.seen[0]
    for name, ids in paths.items():
        assert ids == reference, name


def test_one_padding_rule(tiny):
    from upsafe_ext.magic.train import MagicCollator
    from upsafe_ext.testing import TINY_EOS_ID, TINY_PAD_ID, tiny_tokenizer
    from upsafe_ext.train.chat import left_pad, pad_token_id

    model, tok = tiny
    assert pad_token_id(tok, model) == TINY_PAD_ID
    no_pad = tiny_tokenizer()
    no_pad.pad_token = None
    assert pad_token_id(no_pad, model) == TINY_EOS_ID  # the first eos id
    assert MagicCollator.for_tokenizer(no_pad).pad_token_id == TINY_EOS_ID
    ids, mask = left_pad([[5, 6, 7], [8]], 9)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_scan_features_do_not_depend_on_the_padding(tiny):
    from upsafe_ext.upcycle.scan import last_token_states

    model, tok = tiny
    together = last_token_states(model, tok, [PROMPT, "Hi"], progress=False)
    alone = last_token_states(model, tok, ["Hi"], progress=False)
    torch.testing.assert_close(together[1], alone[0], rtol=1e-4, atol=1e-5)
