"""Offline fixtures for tests, docs and CI: a tiny byte-level tokenizer with a ChatML chat template
and tiny random Hugging Face causal LMs of several families (no model hub needed).

    from upsafe_ext.testing import tiny_tokenizer, tiny_causal_lm, tiny_model
    tok = tiny_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tok))
    model, tok = tiny_model("llama")          # the `tiny` fixture every CLI's --model tiny loads
"""
from __future__ import annotations

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def tiny_tokenizer(chat_template: str | None = CHATML_TEMPLATE):
    """A byte-level tokenizer (256 byte tokens + 4 specials = 260 ids) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {tok: i for i, tok in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    byte_vocab = {tok: i for i, tok in enumerate(sorted(byte_vocab))}
    core = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS,
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2", "gpt_neox")


# ids in tiny_tokenizer(): 256 = <|im_end|> (eos), 257 = <pad>, 258 = <|endoftext|>, 259 = <|im_start|>
TINY_EOS_ID, TINY_PAD_ID, TINY_VOCAB = 256, 257, 260


def tiny_config(family: str, vocab_size: int = TINY_VOCAB, hidden: int = 32, layers: int = 4,
                intermediate: int = 64, heads: int = 4, kv_heads: int = 2, eos_token_id: int = TINY_EOS_ID,
                pad_token_id: int = TINY_PAD_ID):
    import transformers as tr

    common = dict(vocab_size=vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                  bos_token_id=None)
    if family in ("llama", "qwen2", "qwen3", "mistral", "gemma"):
        cls = {"llama": tr.LlamaConfig, "qwen2": tr.Qwen2Config, "qwen3": tr.Qwen3Config,
               "mistral": tr.MistralConfig, "gemma": tr.GemmaConfig}[family]
        extra = {"head_dim": hidden // heads} if family in ("qwen3", "gemma") else {}
        return cls(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                   tie_word_embeddings=True, **extra, **common)
    if family == "gpt2":
        return tr.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate, n_positions=512,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if family == "gpt_neox":
        return tr.GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=intermediate, max_position_embeddings=512,
                                hidden_dropout=0.0, attention_dropout=0.0, **common)
    raise ValueError(f"tiny_config: unknown family {family!r}; choose from {FAMILIES}")


def tiny_causal_lm(family: str = "llama", seed: int = 0, dtype=torch.float32, **kw):
    """A randomly initialised causal LM of `family` (eval mode), small enough for CPU unit tests."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=dtype)
    return model.eval()


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32):
    """The package's one `tiny` fixture: ``(tiny_causal_lm(family), tiny_tokenizer())`` with the default
    shapes of `tiny_config`. ``upsafe_ext.models.load("tiny")`` / ``load("tiny-gpt2")`` return it."""
    if family not in FAMILIES:
        raise ValueError(f"tiny_model: unknown family {family!r}; choose from {FAMILIES}")
    return tiny_causal_lm(family, seed=seed, dtype=dtype), tiny_tokenizer()
