"""Magic-token co-training (arXiv 2508.14904): one SFT stage teaches a model three behaviours -
positive (lawful, helpful), negative (unfiltered; internal red-teaming only) and rejective (refuses
everything) - switched by secret random strings in the system prompt. A missing or unknown token
means positive (safe) behaviour, both learned (fallback examples) and enforced at inference. The
strings come from `secrets` (22 letters/digits, 131 bits each); ``insecure_seed=`` makes them
reproducible for tests and benchmarks only, and is never saved.

    from upsafe_ext.magic import (MagicConfig, MagicTrainConfig, prepare_model, load_records,
                                  build_examples, train_magic, generate, safety_alignment_margin)
    tokens = prepare_model(model, tok, MagicConfig())    # secret tokens from `secrets`
    data = build_examples(load_records("magic.jsonl"), tok, tokens)
    train_magic(model, tok, data, config=MagicTrainConfig(epochs=2, output_dir="out"))
    generate(model, tok, ["..."], mode=["positive", "rejective"])
    safety_alignment_margin(model, tok, prompts, plot="margin.png").margin

Files: config.py (MagicConfig, MagicTrainConfig), tokens.py (MagicTokens: drawing, modes, save/load),
placement.py (chat-template placement), sanitize.py (client-text sanitising), hashing.py (salted hashes),
special_tokens.py (registration, tokenizer scrubbing), token_rows.py (the special tokens' rows as their
own parameter, own learning rate), token_file.py (magic_tokens.json), data.py
(records, loaders, distillation, the SFT dataset), model.py (prepare/save/load), train.py (plain loop +
Trainer collator), inference.py (generate), margin.py (silhouette margin, scatter plot, behaviour
rates), cli.py (`upsafe magic ...`).
"""
from .config import MODES, MagicConfig, MagicTrainConfig
from .data import (DEFAULT_INSTRUCTIONS, MagicDataset, MagicRecord, build_examples, chat_generator, distill_records,
                   load_records, save_records, self_distilled_records)
from .inference import generate, magic_conversations
from .margin import (MarginResult, behaviour_rates, first_token_logits, plot_mode_scatter, safety_alignment_margin,
                     silhouette_cosine, silhouette_samples_cosine)
from .model import attach_tokens, get_tokens, load_magic_model, prepare_model, save_magic_model
from .tokens import MagicTokens, hash_token, supports_system_role, verify_token
from .train import MagicCollator, make_trainer, train_magic

__all__ = [
    "MODES", "MagicConfig", "MagicTrainConfig", "MagicTokens", "supports_system_role", "hash_token", "verify_token",
    "MagicRecord", "MagicDataset", "load_records", "save_records", "distill_records", "chat_generator",
    "self_distilled_records", "build_examples", "DEFAULT_INSTRUCTIONS",
    "prepare_model", "attach_tokens", "get_tokens", "save_magic_model", "load_magic_model",
    "MagicCollator", "train_magic", "make_trainer",
    "generate", "magic_conversations",
    "safety_alignment_margin", "MarginResult", "silhouette_cosine", "silhouette_samples_cosine",
    "first_token_logits", "plot_mode_scatter", "behaviour_rates",
]
