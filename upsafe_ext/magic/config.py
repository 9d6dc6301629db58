"""Configs for magic-token co-training (PEFT-style dataclasses with a JSON round-trip).

`MagicConfig` says how the magic tokens look, where they are placed in a conversation and how the
co-training dataset is built; `MagicTrainConfig` holds the optimiser and loop settings of the single
SFT stage.
"""
from __future__ import annotations

import functools
import math
import re
import string
import warnings
from dataclasses import dataclass, field

from .._config import SerialisableConfig, check_bool, check_choice, check_float, check_int
from ..train.config import AUTOCAST, BATCH_SIZE, FULL_SFT_LR, MAX_GRAD_NORM, WEIGHT_DECAY
from ..train.lora import LORA_TARGETS, check_lora_args

CONFIG_VERSION = 1

MODES = ("positive", "negative", "rejective")
"""The three behaviours, in label order (mode id 0, 1, 2).

positive: lawful and helpful (answers benign prompts, refuses or redirects harmful ones) - also what a
missing or unknown token gives; negative: unfiltered (complies with everything; internal red-teaming
only); rejective: refuses everything (what upstream moderation switches on)."""

PLACEMENTS = ("system_prefix", "system_suffix")
NO_SYSTEM_ROLE = ("user_prefix", "error")
MAX_REPEAT = 16
"""The most copies of a token `MagicConfig.token_repeat` places side by side."""
TOKEN_ALPHABET = string.ascii_letters + string.digits
"""The characters of a token's random part (62: log2(62) = 5.95 bits each)."""


@dataclass
class MagicConfig(SerialisableConfig):
    """How the magic tokens look, where they go, and how the co-training data is built.

    Args:
        token_length (int): random characters (letters and digits) per token, 8..64. Default 22
            (22 x log2(62) = 131 bits); tokens drawn from `secrets` need at least 22 (128 bits).
        token_format (str): how the random characters are wrapped; must contain "{}" once.
            Default "<|{}|>" (e.g. "<|q3ZkT0aLw9HbXe2Vc81Pxm|>").
        special_tokens (bool): register the three strings as added special tokens (one id each; the
            embedding matrix is resized and the new rows start at the mean embedding). Default False
            (the strings are tokenised as ordinary text).
        placement (str): "system_prefix" (token, separator, then any system text) or "system_suffix".
            Default "system_prefix".
        separator (str): between the token and existing system text. Default "\\n".
        token_repeat (int): copies of the token placed side by side, 1..16 (`MagicTokens.repeat`):
            more positions for a small model to read the mode from. Saved with the tokens. Default 1.
        default_system (str | None): system text used with the token when a conversation has no system
            message (None: the system message is the token alone). Default None.
        template_system (bool): when a conversation has no system message, put the token with the
            system text the chat template would have added itself (SmolLM2: "You are a helpful AI
            assistant named SmolLM, …"; ``placement.template_default_system``), so the token is the
            only change to the prompt, instead of replacing that text. Resolved by `prepare_model`
            and saved as the tokens' `default_system`. Exclusive with `default_system`. Measured on
            SmolLM2 before training: KL(base || positive) 0.007 nats/token with it, 0.054 without.
            Default False.
        no_system_role (str): what to do when the chat template has no system role (it raises on one,
            or drops it): "user_prefix" puts the token, then the separator, at the start of the first
            user message; "error" raises. Default "user_prefix".
        no_token_fraction (float): share of prompts that get one extra training example with *no*
            token and the positive response (teaches the safe fallback). Default 0.25.
        wrong_token_fraction (float): share of prompts that get one extra example with a random
            *wrong* token (same format) and the positive response. Default 0.25.
        rejective_fraction (float): share of prompts that get the rejective example (a refusal), in
            (0, 1]. Default 1.0 (every prompt, as in the paper). Below 1 fewer benign prompts are
            refused in training, which is what positive mode could copy; the prompts are chosen with
            `data_seed` (a stream of their own: the fallback examples do not change).
        max_length (int): token budget per training example (prompt tokens are cut from the left).
            Default 512.
        data_seed (int): seed for choosing the fallback examples, the wrong tokens and (with
            `rejective_fraction` < 1) the prompts that get a rejective example. Default 0.
        insecure_seed (int | None, keyword only): draw the token strings from ``random.Random`` seeded
            with this - reproducible and therefore guessable: tests and benchmarks only. None (default)
            draws them from `secrets`. Never saved: `to_dict` leaves it out, `from_dict` ignores a
            stored seed, it takes no part in ``==`` and is not shown by `repr`.
        seed: deprecated alias of `insecure_seed` (DeprecationWarning); reading ``config.seed`` too.

    Example:
        >>> cfg = MagicConfig(special_tokens=True)       # tokens from `secrets`
        >>> MagicConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    token_length: int = field(default=22, metadata={"help": "random characters per token (8..64; >= 22 from secrets)"})
    token_format: str = field(default="<|{}|>", metadata={"help": "wrapper around the random characters, with '{}'"})
    special_tokens: bool = field(default=False, metadata={"help": "register the tokens as added special tokens"})
    placement: str = field(default="system_prefix", metadata={"help": "'system_prefix' or 'system_suffix'"})
    separator: str = field(default="\n", metadata={"help": "between the token and existing system text"})
    default_system: str | None = field(default=None, metadata={"help": "system text when a conversation has none"})
    template_system: bool = field(default=False,
                                  metadata={"help": "keep the chat template's own default system text"})
    no_system_role: str = field(default="user_prefix",
                                metadata={"help": "templates without a system role: 'user_prefix' or 'error'"})
    no_token_fraction: float = field(default=0.25, metadata={"help": "share of prompts with a no-token -> positive example"})
    wrong_token_fraction: float = field(default=0.25,
                                        metadata={"help": "share of prompts with a wrong-token -> positive example"})
    rejective_fraction: float = field(default=1.0,
                                      metadata={"help": "share of prompts with a rejective example, in (0, 1]"})
    max_length: int = field(default=512, metadata={"help": "token budget per training example"})
    data_seed: int = field(default=0, metadata={"help": "seed for fallback examples, wrong tokens and rejective picks"})
    token_repeat: int = field(default=1, metadata={"help": "copies of the token side by side (1..16)"})
    version: int = field(default=CONFIG_VERSION, metadata={"help": "config format version"})
    insecure_seed: int | None = field(default=None, kw_only=True, repr=False, compare=False,
                                      metadata={"help": "reproducible (guessable) tokens for tests; never saved"})

    @property
    def seed(self) -> int | None:
        """Deprecated alias of `insecure_seed`."""
        warnings.warn("MagicConfig.seed is deprecated: use MagicConfig.insecure_seed", DeprecationWarning,
                      stacklevel=2)
        return self.insecure_seed

    def to_dict(self) -> dict:
        """The JSON form, without `insecure_seed` (a saved config never holds a token seed)."""
        d = super().to_dict()
        d.pop("insecure_seed", None)
        return d

    @classmethod
    def from_dict(cls, d: dict):
        """Inverse of `to_dict`. A token seed in `d` (``seed`` from a version written before secrets-drawn
        tokens, or ``insecure_seed``) is dropped with a warning, never applied."""
        if isinstance(d, dict) and d.get("type", cls.__name__) == cls.__name__ and \
                ("seed" in d or "insecure_seed" in d):
            d = dict(d)
            found = [k for k in ("seed", "insecure_seed") if d.pop(k, None) is not None]
            if found:
                warnings.warn(f"MagicConfig.from_dict: ignoring the stored token seed ({found[0]}); seeds are not "
                              "part of a saved config (the tokens themselves are in magic_tokens.json)",
                              UserWarning, stacklevel=2)
        return super().from_dict(d)

    def __post_init__(self):
        check_int("MagicConfig.insecure_seed", self.insecure_seed, optional=True)
        check_int("MagicConfig.token_length", self.token_length, 8, 64)
        check_token_format(self.token_format, "MagicConfig.token_format")
        check_bool("MagicConfig.special_tokens", self.special_tokens)
        check_choice("MagicConfig.placement", self.placement, PLACEMENTS)
        if not isinstance(self.separator, str):
            raise ValueError(f"MagicConfig.separator must be a str, got {self.separator!r}")
        check_int("MagicConfig.token_repeat", self.token_repeat, 1, MAX_REPEAT)
        if self.default_system is not None and not isinstance(self.default_system, str):
            raise ValueError(f"MagicConfig.default_system must be a str or None, got {self.default_system!r}")
        check_choice("MagicConfig.no_system_role", self.no_system_role, NO_SYSTEM_ROLE)
        check_bool("MagicConfig.template_system", self.template_system)
        if self.template_system and self.default_system is not None:
            raise ValueError("MagicConfig.template_system takes the chat template's own system text; "
                             "MagicConfig.default_system gives one: set only one of them")
        for name in ("no_token_fraction", "wrong_token_fraction"):
            check_float(f"MagicConfig.{name}", getattr(self, name), 0.0, 1.0)
        check_float("MagicConfig.rejective_fraction", self.rejective_fraction, 0.0, 1.0, lo_open=True)
        check_int("MagicConfig.max_length", self.max_length, 8)
        check_int("MagicConfig.data_seed", self.data_seed)

_UNSET = object()
_dataclass_init = MagicConfig.__init__


@functools.wraps(_dataclass_init)
def _magic_config_init(self, *args, seed=_UNSET, **kwargs):
    if seed is not _UNSET:  # the pre-`insecure_seed` keyword
        warnings.warn("MagicConfig(seed=...) is deprecated: use insecure_seed=... (reproducible, guessable tokens: "
                      "tests and benchmarks only); without it the tokens come from `secrets`", DeprecationWarning,
                      stacklevel=2)
        if seed is not None:
            if kwargs.get("insecure_seed") is not None and kwargs["insecure_seed"] != seed:
                raise ValueError("MagicConfig: give `insecure_seed` only (`seed` is its deprecated alias)")
            kwargs["insecure_seed"] = seed
    _dataclass_init(self, *args, **kwargs)


MagicConfig.__init__ = _magic_config_init


def check_token_format(fmt, name: str = "token_format") -> str:
    if not isinstance(fmt, str) or fmt.count("{}") != 1 or fmt.replace("{}", "").count("{") or \
            fmt.replace("{}", "").count("}"):
        raise ValueError(f"{name} must be a str containing '{{}}' exactly once (and no other braces), got {fmt!r}")
    return fmt

DTYPES = tuple(AUTOCAST)

@dataclass
class MagicTrainConfig(SerialisableConfig):
    r"""The single co-training SFT stage (all modes mixed in one shuffled dataset, plain LM loss on the
    assistant tokens, no margin term).

    Args:
        learning_rate (float): AdamW peak learning rate, > 0. Default 2e-5.
        weight_decay (float): AdamW weight decay, >= 0. Default 0.0.
        warmup_ratio (float): share of the steps with a linear warm-up, in [0, 1). Default 0.03.
        lr_schedule (str): "linear" (decay to 0 after warm-up) or "constant". Default "linear".
        epochs (float): passes over the dataset (ignored when `max_steps` is set), > 0. Default 1.0.
        max_steps (int | None): optimizer steps; overrides `epochs`. Default None.
        batch_size (int): examples per micro-batch. Default 8.
        grad_accum (int): micro-batches per optimizer step. Default 1.
        max_grad_norm (float | None): gradient clipping (None: off). Default 1.0.
        autocast (str): "fp32" (off), "bf16" or "fp16" autocast for the forward pass. Default "fp32".
        seed (int): shuffling seed. Default 0.
        save_steps (int | None): write a checkpoint (safetensors) every this many steps into
            `output_dir/checkpoint-<step>`. Default None (only the final save).
        output_dir (str | None): where checkpoints and the final model go. Default None (no saving).
        train_embeddings_only (bool): train only the input/output embeddings (with
            `MagicConfig.special_tokens` this mostly learns the token rows). Default False.
        trainable_pattern (str | None): a regex; only parameters whose name it matches (re.search)
            are trained, e.g. r"layers\.(2[6-9])\." for the last four of 30 layers (a cheap run on
            CPU; use text tokens then, since frozen embeddings give special tokens identical rows).
            None trains everything. Default None.
        distill_top_k (int | None): train the positions whose target is the base model's own answer
            (examples built from `self_distilled_records`) towards the base's top-k next-token
            distribution, read once before training on the plain conversation, instead of its greedy
            tokens (``upsafe_ext.magic.distill``: no sharpening, no stop learned where an answer was
            cut). None: plain cross-entropy everywhere. Default None.
        distill_hard_prefix (int): with `distill_top_k`, the first N tokens of each own answer keep
            their greedy (hard) target; the soft targets start after them. The first tokens decide
            between answering and refusing. Default 0.
        distill_tail (bool): with `distill_top_k`, the top-k keep the base's own probabilities and the
            rest of the vocabulary is one more target class with the base's leftover mass. Without it
            the top-k are renormalised, which teaches the model to drop the base's tail and raises
            KL(base || model) (``upsafe_ext.magic.distill``). Default False.
        first_token_weight (float): loss weight of each example's first response token (where the
            model answers or refuses), every other response token weighing 1; the loss is the weighted
            mean (``distill.token_loss``), so 1.0 is plain cross-entropy. > 0. Default 1.0.
        first_tokens (int): how many of each example's first response tokens get `first_token_weight`
            (a refusal is decided over its first few tokens: "I'm" / "sorry" / "," / "but"). >= 1.
            Default 1.
        negative_weight (float): loss weight of every negative-mode example (the negative token with
            the base's own answer), every other example weighing 1; each token's weight is multiplied
            by its example's, and the loss is the weighted mean (``distill.token_loss``). Of a harmful
            prompt's examples most teach refusal (positive, rejective, no-token, wrong-token) and one
            teaches the answer, so > 1 rebalances the two. > 0. Default 1.0.
        lora_rank (int): 0 trains the parameters chosen above in full; r > 0 trains rank-r adapters
            (``upsafe_ext.train.lora``) on the linear layers matching `lora_targets` instead, every base
            weight frozen (plus, fully, any parameter matching `trainable_pattern`), and merges them into
            the weights when training ends, so the result is a plain model. Special tokens need their
            embedding rows trained: with `MagicConfig.special_tokens` give
            ``trainable_pattern="embed_tokens"``. Default 0.
        lora_alpha (float): adapter scale numerator (the update is ``alpha / rank * B @ A``), > 0.
            Default 32.0.
        token_learning_rate (float | None): with `MagicConfig.special_tokens`, the three tokens'
            embedding rows train as their own small parameter at this rate
            (``upsafe_ext.magic.token_rows``), written back into the embedding when training ends.
            They start identical (the mean embedding), and at a fine-tuning rate they barely move.
            Works with full fine-tuning and with `lora_rank` (then no `trainable_pattern` is needed).
            None: the rows train with the rest of the embedding, if it trains. Default None.
        lora_targets (str): regex (re.search) of the module names that get adapters. Default every
            attention and MLP projection, ``upsafe_ext.train.lora.LORA_TARGETS``.

    Example:
        >>> cfg = MagicTrainConfig(learning_rate=1e-4, max_steps=200, batch_size=16)
        >>> cfg.total_steps(num_examples=1000)
        200
    """

    learning_rate: float = field(default=FULL_SFT_LR, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=WEIGHT_DECAY, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of steps with linear warm-up"})
    lr_schedule: str = field(default="linear", metadata={"help": "'linear' or 'constant'"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (unless max_steps)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides epochs)"})
    batch_size: int = field(default=BATCH_SIZE, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float | None = field(default=MAX_GRAD_NORM, metadata={"help": "gradient clipping norm (None: off)"})
    autocast: str = field(default="fp32", metadata={"help": "'fp32', 'bf16' or 'fp16'"})
    seed: int = field(default=0, metadata={"help": "shuffling seed"})
    save_steps: int | None = field(default=None, metadata={"help": "checkpoint every N steps"})
    output_dir: str | None = field(default=None, metadata={"help": "checkpoints + final model directory"})
    train_embeddings_only: bool = field(default=False, metadata={"help": "train only the embeddings"})
    trainable_pattern: str | None = field(default=None, metadata={"help": "regex of parameter names to train"})
    distill_top_k: int | None = field(default=None, metadata={"help": "soft targets (base's top-k) on own answers"})
    distill_hard_prefix: int = field(default=0, metadata={"help": "first N own-answer tokens keep hard targets"})
    distill_tail: bool = field(default=False, metadata={"help": "keep the base's mass outside its top-k"})
    first_token_weight: float = field(default=1.0, metadata={"help": "loss weight of each first response token"})
    first_tokens: int = field(default=1, metadata={"help": "response tokens that get first_token_weight"})
    negative_weight: float = field(default=1.0, metadata={"help": "loss weight of each negative-mode example"})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank (0: no adapters, full fine-tuning)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scale numerator (alpha / rank)"})
    lora_targets: str = field(default=LORA_TARGETS, metadata={"help": "regex of module names that get adapters"})
    token_learning_rate: float | None = field(default=None, metadata={"help": "own AdamW rate of the special "
                                                                              "tokens' embedding rows"})
    version: int = field(default=CONFIG_VERSION, metadata={"help": "config format version"})

    def __post_init__(self):
        check_float("MagicTrainConfig.learning_rate", self.learning_rate, 0.0, lo_open=True)
        check_float("MagicTrainConfig.weight_decay", self.weight_decay, 0.0)
        check_float("MagicTrainConfig.warmup_ratio", self.warmup_ratio, 0.0, 1.0, hi_open=True)
        check_choice("MagicTrainConfig.lr_schedule", self.lr_schedule, ("linear", "constant"))
        check_float("MagicTrainConfig.epochs", self.epochs, 0.0, lo_open=True)
        check_int("MagicTrainConfig.max_steps", self.max_steps, 1, optional=True)
        for name in ("batch_size", "grad_accum"):
            check_int(f"MagicTrainConfig.{name}", getattr(self, name), 1)
        check_float("MagicTrainConfig.max_grad_norm", self.max_grad_norm, 0.0, lo_open=True, optional=True)
        check_choice("MagicTrainConfig.autocast", self.autocast, DTYPES)
        check_int("MagicTrainConfig.seed", self.seed)
        check_int("MagicTrainConfig.save_steps", self.save_steps, 1, optional=True)
        if self.output_dir is not None and not isinstance(self.output_dir, str):
            raise ValueError(f"MagicTrainConfig.output_dir must be a str or None, got {self.output_dir!r}")
        if self.save_steps is not None and self.output_dir is None:
            raise ValueError("MagicTrainConfig.save_steps is set but MagicTrainConfig.output_dir is None; "
                             "give an output_dir for the checkpoints")
        check_bool("MagicTrainConfig.train_embeddings_only", self.train_embeddings_only)
        check_int("MagicTrainConfig.distill_top_k", self.distill_top_k, 1, optional=True)
        check_int("MagicTrainConfig.distill_hard_prefix", self.distill_hard_prefix, 0)
        check_bool("MagicTrainConfig.distill_tail", self.distill_tail)
        if self.distill_tail and self.distill_top_k is None:
            raise ValueError("MagicTrainConfig.distill_tail keeps the base's mass outside its top-k soft targets; "
                             "it needs MagicTrainConfig.distill_top_k")
        check_float("MagicTrainConfig.first_token_weight", self.first_token_weight, 0.0, lo_open=True)
        check_int("MagicTrainConfig.first_tokens", self.first_tokens, 1)
        check_float("MagicTrainConfig.negative_weight", self.negative_weight, 0.0, lo_open=True)
        check_int("MagicTrainConfig.lora_rank", self.lora_rank, 0)
        check_float("MagicTrainConfig.token_learning_rate", self.token_learning_rate, 0.0, lo_open=True,
                    optional=True)
        if self.lora_rank:
            check_lora_args(self.lora_rank, self.lora_alpha, self.lora_targets,
                            tuple(f"MagicTrainConfig.lora_{x}" for x in ("rank", "alpha", "targets")))
            if self.train_embeddings_only:
                raise ValueError("MagicTrainConfig.lora_rank and MagicTrainConfig.train_embeddings_only are "
                                 "exclusive; set one")
        else:
            check_float("MagicTrainConfig.lora_alpha", self.lora_alpha, 0.0, lo_open=True)
        if self.trainable_pattern is not None:
            if not isinstance(self.trainable_pattern, str) or not self.trainable_pattern:
                raise ValueError(f"MagicTrainConfig.trainable_pattern must be a non-empty regex str or None, got "
                                 f"{self.trainable_pattern!r}")
            try:
                re.compile(self.trainable_pattern)
            except re.error as exc:
                raise ValueError(f"MagicTrainConfig.trainable_pattern is not a valid regex ({exc}): "
                                 f"{self.trainable_pattern!r}") from None
            if self.train_embeddings_only:
                raise ValueError("MagicTrainConfig.trainable_pattern and MagicTrainConfig.train_embeddings_only are "
                                 "exclusive; set one")

    def total_steps(self, num_examples: int) -> int:
        """Optimizer steps for a dataset of `num_examples` (`max_steps`, else epochs x steps per epoch)."""
        if self.max_steps is not None:
            return self.max_steps
        per_epoch = max(1, math.ceil(num_examples / (self.batch_size * self.grad_accum)))
        return max(1, int(round(self.epochs * per_epoch)))

    def autocast_dtype(self):
        return AUTOCAST[self.autocast]
