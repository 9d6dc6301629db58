"""Training utilities shared by the methods: the one chat rendering and padding rule (`chat`), SFT
example encoding with assistant-only labels, a padding collator that the HF `Trainer` accepts, a plain
training loop with progress bars, the shared optimiser defaults (`config`), LoRA adapters that merge back
into plain layers (`lora`), and the UpSafe°C stages."""
from .chat import chat, encode_prompts, pad_token_id, render_chat
from .config import UpSafeTrainConfig
from .lora import add_lora, merge_lora, merged_lora
from .sft import SFTCollator, encode_sft, run_sft
from .upsafe import make_examples, router_losses, stage1, stage2, stage_parameters, train_only, upsafe_trainer_class

__all__ = ["SFTCollator", "encode_sft", "render_chat", "run_sft", "stage1", "stage2", "make_examples",
           "router_losses", "stage_parameters", "train_only", "upsafe_trainer_class", "UpSafeTrainConfig", "chat",
           "encode_prompts", "pad_token_id", "add_lora", "merge_lora", "merged_lora"]
