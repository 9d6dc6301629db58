"""ESIConfig (scoring + selection) and SparseTrainConfig (SET / SPA training): PEFT-style dataclasses
with field help, validation naming the field, and a JSON round-trip that tolerates newer versions."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .._config import SerialisableConfig, check_float, check_int
from ..train.config import ADAM_BETAS, ADAM_EPS, BATCH_SIZE, MAX_GRAD_NORM, SPARSE_LR, WEIGHT_DECAY

CONFIG_VERSION = 1

# Parameters never scored by default (regexes searched in the parameter name). 2-D weights of
# nn.Embedding modules are excluded by module type as well, whatever their name.
DEFAULT_EXCLUDE = (
    r"embed",                       # token / position embeddings (embed_tokens, embed_positions)
    r"(^|\.)(wte|wpe)\.",           # GPT-2 embeddings
    r"norm",                        # RMSNorm / LayerNorm (input_layernorm, q_norm, ...)
    r"(^|\.)ln_",                   # GPT-2 ln_1 / ln_2 / ln_f
    r"\.bias$",                     # biases
    r"router",                      # MoE routers (upsafe SafetyMoE, Switch, ...)
    r"(^|\.)gate\.weight$",         # Mixtral / Qwen-MoE router ("block_sparse_moe.gate", "mlp.gate")
    r"shared_expert_gate",          # Qwen-MoE shared-expert gate
)

def _check_patterns(name: str, value) -> tuple:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of regex strings, got {value!r}")
    for p in value:
        if not isinstance(p, str):
            raise ValueError(f"{name} must hold strings, got {p!r}")
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"{name}: invalid regex {p!r}: {exc}") from None
    return tuple(value)

@dataclass
class ESIConfig(SerialisableConfig):
    """How `compute_esi` scores weights and how `ESIScores.select` picks them (ESI, arXiv 2604.08297).

    ESI_i = σ(W) · |Σ_prompts ∂S/∂θ_i| for every scalar θ_i of each eligible weight tensor W, σ(W) the
    standard deviation of all of W's entries (unbiased, as ``torch.std``), S the safety objective.

    Args:
        batch_size (int): prompts per micro-batch (per rank under torch.distributed). Default 4.
        max_length (int): token limit of a prompt + target / reply sequence. Default 512.
        fraction (float): default share of eligible weights that ``select()`` keeps, in (0, 1]. Default 0.01.
        expert_patterns (list[str]): regexes naming fused MoE expert tensors ``[E, out, in]`` (transformers
            5 stores Mixtral / Qwen-MoE experts this way). A matching 3-D parameter is scored as E separate
            2-D weights (σ per expert). Default ["experts"]. Other parameters must be 2-D to be scored.
        include_patterns (list[str]): regexes; when non-empty a parameter must match one of them
            (searched in its name). Default [] (no restriction).
        exclude_patterns (list[str]): regexes of parameters never scored. Default `DEFAULT_EXCLUDE`:
            embeddings, norms, biases and MoE routers. ``lm_head`` is scored unless it is tied to the
            input embedding (then the shared tensor is the embedding and is excluded).
        system (str | None): system prompt put before every harmful prompt. Default None.
        seed (int): seeds the refusal phrasing and the Gumbel noise (per prompt, so the noise does not
            depend on batch composition or rank). Default 0.
        progress (bool): show tqdm progress bars. Default True.

    Example:
        >>> cfg = ESIConfig(batch_size=8, fraction=0.01)
        >>> ESIConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    batch_size: int = field(default=4, metadata={"help": "prompts per micro-batch (per rank)"})
    max_length: int = field(default=512, metadata={"help": "token limit of prompt + target/reply"})
    fraction: float = field(default=0.01, metadata={"help": "share of eligible weights select() keeps, (0, 1]"})
    expert_patterns: tuple = field(default=(r"experts",), metadata={"help": "regexes of fused 3-D expert tensors"})
    include_patterns: tuple = field(default=(), metadata={"help": "regexes; if given a name must match one"})
    exclude_patterns: tuple = field(default=DEFAULT_EXCLUDE, metadata={"help": "regexes of names never scored"})
    system: str | None = field(default=None, metadata={"help": "system prompt before each harmful prompt"})
    seed: int = field(default=0, metadata={"help": "refusal phrasing and Gumbel-noise seed"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    version: int = field(default=CONFIG_VERSION, metadata={"help": "config format version"})

    def __post_init__(self):
        check_int("ESIConfig.batch_size", self.batch_size, 1)
        check_int("ESIConfig.max_length", self.max_length, 2)
        check_float("ESIConfig.fraction", self.fraction, 0.0, 1.0, lo_open=True)
        self.expert_patterns = _check_patterns("ESIConfig.expert_patterns", self.expert_patterns)
        self.include_patterns = _check_patterns("ESIConfig.include_patterns", self.include_patterns)
        self.exclude_patterns = _check_patterns("ESIConfig.exclude_patterns", self.exclude_patterns)
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"ESIConfig.system must be a str or None, got {self.system!r}")
        check_int("ESIConfig.seed", self.seed, 0)
        if not isinstance(self.progress, bool):
            raise ValueError(f"ESIConfig.progress must be a bool, got {self.progress!r}")

@dataclass
class SparseTrainConfig(SerialisableConfig):
    """SET / SPA training with `SparseAdamW` (see `upsafe_ext.esi.train.run_set` / `run_spa`).

    Args:
        lr (float): peak learning rate, > 0. Default 1e-4.
        weight_decay (float): decoupled weight decay of the trained weights, >= 0. Default 0.0.
        betas (list[float]): Adam (beta1, beta2), each in [0, 1). Default [0.9, 0.999].
        eps (float): Adam epsilon, > 0. Default 1e-8.
        max_steps (int): optimizer steps. Default 100 (the paper's SET budget; SPA uses ~1000).
        batch_size (int): examples per micro-batch. Default 8.
        grad_accum (int): micro-batches per optimizer step. Default 1.
        max_length (int): token limit per example. Default 512.
        max_grad_norm (float): gradient clipping norm, 0 disables. Default 1.0.
        lr_schedule (str): "constant", "linear" or "cosine" (decay to 0 over `max_steps`). Default "constant".
        warmup_steps (int): linear warm-up steps. Default 0.
        train_norm_bias (bool): also train norm weights and biases (dense AdamW). Default False.
        seed (int): data order and refusal phrasing. Default 0.
        progress (bool): show progress bars. Default True.
        first_token_weight (float): loss weight of each example's first `first_tokens` response tokens
            (where a reply answers or refuses; the rest weigh 1), > 0. Default 1.0 (the plain LM loss).
        first_tokens (int): response tokens that get `first_token_weight`, >= 1. Default 1.

    Example:
        >>> cfg = SparseTrainConfig(lr=5e-4, max_steps=50)
        >>> SparseTrainConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    lr: float = field(default=SPARSE_LR, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=WEIGHT_DECAY, metadata={"help": "decoupled weight decay"})
    betas: tuple = field(default=ADAM_BETAS, metadata={"help": "Adam (beta1, beta2)"})
    eps: float = field(default=ADAM_EPS, metadata={"help": "Adam epsilon"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=BATCH_SIZE, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_length: int = field(default=512, metadata={"help": "token limit per example"})
    max_grad_norm: float = field(default=MAX_GRAD_NORM, metadata={"help": "gradient clipping norm (0: off)"})
    lr_schedule: str = field(default="constant", metadata={"help": "'constant', 'linear' or 'cosine'"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    train_norm_bias: bool = field(default=False, metadata={"help": "also train norm weights and biases"})
    seed: int = field(default=0, metadata={"help": "data order and refusal phrasing seed"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    first_token_weight: float = field(default=1.0, metadata={"help": "loss weight of each first response token"})
    first_tokens: int = field(default=1, metadata={"help": "response tokens that get first_token_weight"})
    version: int = field(default=CONFIG_VERSION, metadata={"help": "config format version"})

    def __post_init__(self):
        check_float("SparseTrainConfig.lr", self.lr, 0.0, None, lo_open=True)
        check_float("SparseTrainConfig.weight_decay", self.weight_decay, 0.0)
        b = self.betas
        if isinstance(b, (str, bytes)) or not isinstance(b, (list, tuple)) or len(b) != 2:
            raise ValueError(f"SparseTrainConfig.betas must be a pair (beta1, beta2), got {b!r}")
        for i, x in enumerate(b):
            check_float(f"SparseTrainConfig.betas[{i}]", x, 0.0, 1.0, hi_open=True)
        self.betas = (float(b[0]), float(b[1]))
        check_float("SparseTrainConfig.eps", self.eps, 0.0, None, lo_open=True)
        check_int("SparseTrainConfig.max_steps", self.max_steps, 1)
        check_int("SparseTrainConfig.batch_size", self.batch_size, 1)
        check_int("SparseTrainConfig.grad_accum", self.grad_accum, 1)
        check_int("SparseTrainConfig.max_length", self.max_length, 2)
        check_float("SparseTrainConfig.max_grad_norm", self.max_grad_norm, 0.0)
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"SparseTrainConfig.lr_schedule must be 'constant', 'linear' or 'cosine', "
                             f"got {self.lr_schedule!r}")
        check_int("SparseTrainConfig.warmup_steps", self.warmup_steps, 0)
        if not isinstance(self.train_norm_bias, bool):
            raise ValueError(f"SparseTrainConfig.train_norm_bias must be a bool, got {self.train_norm_bias!r}")
        check_int("SparseTrainConfig.seed", self.seed, 0)
        if not isinstance(self.progress, bool):
            raise ValueError(f"SparseTrainConfig.progress must be a bool, got {self.progress!r}")
        check_float("SparseTrainConfig.first_token_weight", self.first_token_weight, 0.0, None, lo_open=True)
        check_int("SparseTrainConfig.first_tokens", self.first_tokens, 1)
