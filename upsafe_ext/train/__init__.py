"""Training utilities shared by the methods: SFT example encoding with assistant-only labels,
a padding collator that the HF `Trainer` accepts, and a plain training loop with progress bars."""
from .sft import SFTCollator, encode_sft, render_chat, run_sft

__all__ = ["SFTCollator", "encode_sft", "render_chat", "run_sft"]
