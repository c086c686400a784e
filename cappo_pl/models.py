"""Policy, reference and tokenizer builders.

A policy is either an HF causal LM in a local folder (never the hub: loading is local-only) or the
built-in tiny Llama-style model with a character-level tokenizer built offline. The built-in model
can be warm-started by SFT on the data's reference completions (see ``cappo_pl.sft``); the result
is saved with ``save_pretrained`` and loaded back through the same local-folder path as any HF model.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
from annotated_types import Interval
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cappo_pl.constraints import NonNegativeInt, PositiveFloat, PositiveInt, check_fields
from cappo_pl.errors import ConfigError
from cappo_pl.seeds import derive_seed

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


@dataclass
class TinyModelConfig:
    """Shape of the built-in Llama-style model (about 0.8M parameters with the defaults)."""

    hidden_size: PositiveInt = 128
    """Model width."""
    num_layers: PositiveInt = 4
    """Transformer blocks."""
    num_heads: PositiveInt = 4
    """Attention heads."""
    intermediate_size: PositiveInt = 512
    """MLP width."""
    max_position_embeddings: PositiveInt = 256
    """Longest prompt + completion in tokens."""
    init_seed: int = 0
    """Seed of the random initialisation."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class SFTConfig:
    """SFT warm start of the built-in model on the data's reference completions (cached by config hash)."""

    steps: NonNegativeInt = 1500
    """Optimizer steps."""
    batch_size: PositiveInt = 64
    """Sequences per step."""
    lr: PositiveFloat = 3e-3
    """Peak learning rate (linear warm-up, cosine decay)."""
    warmup_steps: NonNegativeInt = 50
    """Warm-up steps."""
    seed: int = 0
    """Seed of the data order."""
    eval_samples: NonNegativeInt = 8
    """Completions sampled per prompt to report the SFT policy's accuracy."""
    cache_dir: str = ".cache/cappo_pl/sft"
    """Where trained checkpoints are kept, one folder per config hash."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class LoRAConfig:
    """LoRA adapters through peft (Hu et al. 2021): only the adapters train; the base stays frozen."""

    r: PositiveInt = 16
    """Rank of the update ``B A``."""
    alpha: PositiveFloat = 32.0
    """Scale: the update is ``alpha / r * B A``."""
    dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.0
    """Dropout on the adapters' input (0: the policy stays deterministic, as pi/pi_old need)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear layers that get adapters (Llama-style attention projections by default)."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class PolicyConfig:
    """Where the policy comes from.

    Set ``path`` to a local HF folder (``AutoModelForCausalLM.from_pretrained``), or leave it None
    for the built-in tiny model, warm-started by SFT unless ``sft`` is null.
    """

    path: str | None = None
    """Local folder with config.json, weights and tokenizer files (never downloaded)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the built-in model (used when ``path`` is None)."""
    sft: SFTConfig | None = field(default_factory=SFTConfig)
    """SFT warm start of the built-in model; null starts RL from random weights."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype: float32 or bfloat16."""
    lora: LoRAConfig | None = None
    """Train LoRA adapters instead of every weight; the reference is the base with adapters off."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass (less memory, more time)."""

    def __post_init__(self) -> None:
        check_fields(self)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus specials, built with no download.

    Every encoded text starts with ``<bos>``. Unknown characters map to ``<unk>``.
    """
    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tiny_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Randomly initialised Llama-style causal LM sized by ``cfg`` for ``tokenizer``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(derive_seed(cfg.init_seed, "model_init"))
        return LlamaForCausalLM(config)


def load_pretrained(path: str | Path, dtype: str = "float32") -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Load a causal LM and its tokenizer from a local folder, never from the hub.

    Raises:
        ConfigError: the folder does not exist or does not hold a loadable model.

    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.policy.path: {folder} is not a local HF model folder (no config.json)")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ConfigError(f"model.policy.dtype: expected float32 or bfloat16, got {dtype!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.policy.path: cannot load {folder}: {str(err).splitlines()[0]}") from err
    if tokenizer.pad_token_id is None:
        # Left padding needs a pad id; the pad positions are masked everywhere, so EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put a reference model in eval mode with no trainable parameters."""
    model.eval()
    model.requires_grad_(False)
    return model


def add_lora(model: torch.nn.Module, cfg: LoRAConfig):
    """Inject LoRA adapters into ``model`` in place and freeze everything else.

    Returns:
        The peft wrapper (for ``disable_adapter()`` and ``merge_and_unload()``); ``model`` itself stays
        the HF causal LM the rest of the code scores, now with adapter layers inside.

    Raises:
        ConfigError: naming ``model.policy.lora.target_modules`` when none of them is in the model.

    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"model.policy.lora.target_modules: {str(err).splitlines()[0]}") from None


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Checkpoint every decoder layer, also in eval mode (RL keeps dropout off through eval mode).

    HF checkpoints a layer only when ``layer.training`` is True, so the decoder layers themselves are
    flagged as training while every submodule stays in eval mode (dropout stays off: attention
    dropout reads its own module's flag). Call again after ``model.eval()``/``train()``.

    Returns:
        The number of layers checkpointed (0: the model has no checkpointable layers).

    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.training = True
    return len(layers)
