"""The model keys (`ModelArguments`): the checkpoint or preset trained, its dtype, the attention kernel and
FlashAttention implementation, RoPE / length / window / dropout overrides, LoRA and QLoRA; with the values
flash_attention_impl and lora_target_modules may take.
"""

from dataclasses import dataclass, field

from starcoder2_train.configs.shared import ATTENTION_CHOICES, RecipeError, torch_dtype

# Flash-attention implementations PyTorch can route its flash kernel to (torch.nn.attention, Hopper and later).
FLASH_IMPLS = ("auto", "fa2", "fa3", "fa4")
# StarCoder2's linear layers (attention q/k/v/o_proj, MLP c_fc and c_proj): the LoRA targets by default.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")


@dataclass
class ModelArguments:
    """Which model is trained: a pretrained checkpoint or a config built from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint to continue pretraining or fine-tune: a local directory or a Hub id "
            "(for example bigcode/starcoder2-3b). Leave unset to pretrain from `model_config`."
        },
    )
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "Architecture for pretraining from scratch: a preset name (starcoder2-3b, "
            "starcoder2-7b, starcoder2-15b, tiny, quickstart, test) or the path of a config.json."
        },
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    torch_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the weights as loaded or created: float32 (default: master weights for mixed "
            "precision, with `bf16: true` computing in bfloat16), bfloat16, float16 or auto."
        },
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "Attention kernel. auto: on CUDA flash_attention_2 when transformers accepts it (the flash-attn "
            "package, FlashAttention-2 >= 2.3.3; flash-attn-4 alone is not it), else "
            "sdpa_varlen (PyTorch's own variable-length FlashAttention-2 kernel); on a CPU sdpa_blocked. "
            "sdpa_varlen (CUDA) and sdpa_blocked keep packed documents apart without an s×s mask "
            f"(model/attention.py). One of {', '.join(ATTENTION_CHOICES)}."
        },
    )
    flash_attention_impl: str = field(
        default="auto",
        metadata={
            "help": "Which FlashAttention PyTorch's flash kernel runs (sdpa_varlen, sdpa): fa2 (PyTorch's own), "
            "fa3 (Hopper, the flash_attn_interface package) or fa4 (Hopper/Blackwell, flash_attn.cute.interface "
            "from the flash-attn-4 wheel), activated through torch.nn.attention.activate_flash_attention_impl. "
            "FA3 and FA4 have no dropout. auto: fa4, else fa3, where the GPU and package allow and "
            "attention_dropout is 0, else fa2; a package that fails to activate is a warning and fa2 for auto, "
            "an error for fa3/fa4. "
            f"One of {', '.join(FLASH_IMPLS)}."
        },
    )
    rope_theta: float | None = field(
        default=None, metadata={"help": "Override the RoPE base (the long-context stage uses 1e6)."}
    )
    max_position_embeddings: int | None = field(
        default=None, metadata={"help": "Override the longest position the model supports, in tokens."}
    )
    sliding_window: int | None = field(
        default=None, metadata={"help": "Override the attention window in tokens (StarCoder2: 4096)."}
    )
    attention_dropout: float | None = field(
        default=None,
        metadata={
            "help": "Override the attention-probability dropout (the released 3B and 7B configs: 0.1, 15B: 0.0). "
            "Dropout rules out the kernels without it (flex_attention, FlashAttention-3/4): 0 lets "
            "flash_attention_impl auto pick them."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub."})
    use_lora: bool = field(
        default=False,
        metadata={"help": "Train low-rank adapters (peft LoRA) on lora_target_modules; the base stays frozen."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r (adapter weights: r × (in + out) per layer)."})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA scale numerator: the update is (alpha/r)·B·A."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapters' input, in [0, 1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGET_MODULES),
        metadata={"help": f"Linear layers that get adapters (StarCoder2's: {', '.join(LORA_TARGET_MODULES)})."},
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: the frozen base in 4-bit NF4 through bitsandbytes (CUDA only; needs use_lora)."},
    )

    def __post_init__(self):
        if (self.model_name_or_path is None) == (self.model_config is None):
            raise RecipeError(
                "model_name_or_path / model_config: set exactly one of them: model_name_or_path to start "
                "from a checkpoint, model_config (a preset such as starcoder2-3b) to pretrain from scratch."
            )
        if self.attn_implementation not in ATTENTION_CHOICES:
            raise RecipeError(
                f"attn_implementation: {self.attn_implementation!r} is not one of {', '.join(ATTENTION_CHOICES)}."
            )
        if self.flash_attention_impl not in FLASH_IMPLS:
            raise RecipeError(
                f"flash_attention_impl: {self.flash_attention_impl!r} is not one of {', '.join(FLASH_IMPLS)}."
            )
        torch_dtype(self.torch_dtype)
        if self.attention_dropout is not None and not 0.0 <= self.attention_dropout < 1.0:
            raise RecipeError(f"attention_dropout: must be in [0, 1), got {self.attention_dropout}.")
        if self.load_in_4bit and not (self.use_lora and self.model_name_or_path):
            raise RecipeError(
                "load_in_4bit: QLoRA trains adapters over a quantized checkpoint: set use_lora: true and "
                "model_name_or_path, or load_in_4bit: false."
            )
        for key in ("rope_theta", "max_position_embeddings", "sliding_window"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise RecipeError(f"{key}: must be positive, got {value}.")
