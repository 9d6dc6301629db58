"""Training utilities shared by the methods: SFT example encoding with assistant-only labels,
a padding collator that the HF `Trainer` accepts, a plain training loop with progress bars, and the
UpSafe°C stages."""
from .sft import SFTCollator, encode_sft, render_chat, run_sft
from .upsafe import make_examples, router_losses, stage1, stage2, stage_parameters, train_only, upsafe_trainer_class

__all__ = ["SFTCollator", "encode_sft", "render_chat", "run_sft", "stage1", "stage2", "make_examples",
           "router_losses", "stage_parameters", "train_only", "upsafe_trainer_class"]
