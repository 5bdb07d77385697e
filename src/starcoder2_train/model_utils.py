"""The model: presets equal to the released StarCoder2 configs, creation or loading, attention choice,
parameter count and a memory estimate per GPU.

Vocabulary rule. The embedding matrix must hold every id the tokenizer can produce:
- from scratch, the tiny/test presets take the tokenizer's length rounded up to a multiple of 64;
  the released presets and config.json files keep their vocab_size (49152 for StarCoder2), and a
  tokenizer larger than that is refused (`tokenizer_name_or_path`) rather than silently changing the
  released architecture;
- from a checkpoint, `create_model` resizes the embeddings (again to a multiple of 64) when the
  tokenizer is larger; `validate_model_and_data` refuses a tokenizer whose structure tokens lie
  beyond the checkpoint's vocabulary, since their embeddings would be untrained new rows.
"""

import copy
import importlib.util
import logging
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Starcoder2Config

from . import attention as _registers_attention  # noqa: F401  (sdpa_varlen, sdpa_blocked)
from .configs import ModelArguments, RecipeError
from .special_tokens import SpecialTokenIds

logger = logging.getLogger(__name__)

VOCAB_MULTIPLE = 64  # embedding rows are padded to a multiple of 64 for tensor-core friendly shapes
GB = 1e9

_RELEASED = dict(
    vocab_size=49152,
    max_position_embeddings=16384,
    sliding_window=4096,
    hidden_act="gelu_pytorch_tanh",
    norm_epsilon=1e-5,
    use_bias=True,
    bos_token_id=0,
    eos_token_id=0,
)
# Dropout as written in the released config.json files (UNVERIFIED against the Hub, which is out of reach
# here: public copies show 0.1 for the Megatron-trained 3B/7B and 0.0 for the nanotron-trained 15B).
_DROPOUT_3B_7B = dict(attention_dropout=0.1, residual_dropout=0.1, embedding_dropout=0.1)
_DROPOUT_15B = dict(attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0)
_SMALL = dict(
    hidden_act="gelu_pytorch_tanh",
    norm_epsilon=1e-5,
    use_bias=True,
    bos_token_id=0,
    eos_token_id=0,
    tie_word_embeddings=True,
    initializer_range=0.02,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    attention_dropout=0.0,
    residual_dropout=0.0,
    embedding_dropout=0.0,
)

# Starcoder2Config keyword arguments. tiny and test have no vocab_size: build_config sets it from the tokenizer.
MODEL_PRESETS = {
    "starcoder2-3b": dict(
        **_RELEASED,
        **_DROPOUT_3B_7B,
        num_hidden_layers=30,
        hidden_size=3072,
        num_attention_heads=24,
        num_key_value_heads=2,
        intermediate_size=12288,
        tie_word_embeddings=True,
        initializer_range=0.018042,
        rope_parameters={"rope_type": "default", "rope_theta": 999999.4420358813},
    ),
    "starcoder2-7b": dict(
        **_RELEASED,
        **_DROPOUT_3B_7B,
        num_hidden_layers=32,
        hidden_size=4608,
        num_attention_heads=36,
        num_key_value_heads=4,
        intermediate_size=18432,
        tie_word_embeddings=True,
        initializer_range=0.018042,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    "starcoder2-15b": dict(
        **_RELEASED,
        **_DROPOUT_15B,
        num_hidden_layers=40,
        hidden_size=6144,
        num_attention_heads=48,
        num_key_value_heads=4,
        intermediate_size=24576,
        tie_word_embeddings=False,
        initializer_range=0.01275,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
    # CPU quickstart: about 4.9M parameters with an 8k-token tokenizer; a few minutes on 2 cores.
    "tiny": dict(
        **_SMALL,
        num_hidden_layers=4,
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1024,
        max_position_embeddings=4096,
        sliding_window=512,
    ),
    # Unit tests: about 0.1M parameters plus 64 per token of vocabulary; a window shorter than test sequences.
    "test": dict(
        **_SMALL,
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=1024,
        sliding_window=32,
    ),
}


def round_up(value: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-value // multiple) * multiple


def _apply_overrides(config, model_args: ModelArguments):
    if model_args.rope_theta is not None:
        config.rope_parameters = {
            **(config.rope_parameters or {"rope_type": "default"}),
            "rope_theta": model_args.rope_theta,
        }
    if model_args.max_position_embeddings is not None:
        config.max_position_embeddings = model_args.max_position_embeddings
    if model_args.sliding_window is not None:
        config.sliding_window = model_args.sliding_window
    return config


def build_config(model_args: ModelArguments, tokenizer_vocab_size: int):
    """The config of the model to train: a preset, a config.json, or a checkpoint's config; overrides applied.

    For a checkpoint (`model_name_or_path`) only the config is fetched; its vocab_size is left as is
    (create_model resizes the embeddings after loading the weights).
    """
    if model_args.model_name_or_path is not None:
        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            trust_remote_code=model_args.trust_remote_code,
        )
        return _apply_overrides(config, model_args)
    name = model_args.model_config
    needed = round_up(tokenizer_vocab_size)
    if name in MODEL_PRESETS:
        kwargs = copy.deepcopy(MODEL_PRESETS[name])
        kwargs.setdefault("vocab_size", needed)  # tiny and test take the tokenizer's size
        config = Starcoder2Config(**kwargs)
    elif os.path.isfile(name):
        try:
            config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise RecipeError(f"model_config: {name} is not a readable config.json: {error}") from error
        if config.model_type != "starcoder2":
            raise RecipeError(f"model_config: {name} has model_type {config.model_type!r}, not 'starcoder2'.")
    else:
        raise RecipeError(
            f"model_config: {name!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor an existing config.json."
        )
    if tokenizer_vocab_size > config.vocab_size:
        # A released architecture is reproduced exactly: a larger tokenizer is a mistake, not a resize.
        raise RecipeError(
            f"tokenizer_name_or_path: the tokenizer has {tokenizer_vocab_size} tokens but model_config {name} has an "
            f"embedding of {config.vocab_size}; use the StarCoder2 tokenizer (49152 tokens) or a config.json with "
            "a larger vocab_size."
        )
    return _apply_overrides(config, model_args)


def choose_attention(requested: str) -> str:
    """auto: the fastest attention that keeps packed documents apart, as measured (docs/benchmarks.md).

    CUDA: flash_attention_2 when flash-attn is installed, else sdpa_varlen (PyTorch's own FlashAttention-2
    kernel, variable length: 1.7x transformers' masked sdpa at 4k and 4.4x at 16k on an H100, with dropout,
    which flex_attention lacks). CPU: sdpa_blocked (1.9x the masked sdpa for the tiny model).
    """
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        if torch.cuda.is_available():
            return "flash_attention_2" if has_flash else "sdpa_varlen"
        return "sdpa_blocked"
    if requested == "flash_attention_2" and not (has_flash and torch.cuda.is_available()):
        raise RecipeError(
            "attn_implementation: flash_attention_2 needs the flash-attn package and a CUDA GPU; use sdpa (or auto)."
        )
    return requested


def create_model(
    model_args: ModelArguments,
    config=None,
    tokenizer=None,
    attn_implementation: str | None = None,
    *,
    device: str | torch.device = "cpu",
):
    """Create the model from scratch (`model_config`) or load `model_name_or_path`, ready to train.

    `config` defaults to `build_config(model_args, len(tokenizer))`; `attn_implementation` to
    `choose_attention(model_args.attn_implementation)`. On `device="meta"` only the architecture is
    built, without weights, even for a checkpoint (dry runs). The embeddings are resized when the tokenizer
    is larger than them, and `use_cache` is turned off (training needs no cache, and packed sequences are
    isolated per document only without one).
    """
    vocab_needed = len(tokenizer) if tokenizer is not None else 0
    config = config if config is not None else build_config(model_args, vocab_needed)
    attention = attn_implementation or choose_attention(model_args.attn_implementation)
    pretrained = model_args.model_name_or_path is not None and torch.device(device).type != "meta"
    # "auto": a checkpoint's own dtype; from scratch, the config's dtype if it names one, else float32.
    dtype = model_args.torch_dtype if model_args.torch_dtype == "auto" else getattr(torch, model_args.torch_dtype)
    if pretrained:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            revision=model_args.model_revision,
            dtype=dtype,
            attn_implementation=attention,
            trust_remote_code=model_args.trust_remote_code,
        )
        model.to(device)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                config,
                attn_implementation=attention,
                trust_remote_code=model_args.trust_remote_code,
                **({} if dtype == "auto" else {"dtype": dtype}),
            )
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab_needed > rows:
        logger.info(
            "resizing the embeddings from %d to %d rows for the tokenizer's %d tokens",
            rows,
            round_up(vocab_needed),
            vocab_needed,
        )
        # New rows start at the old rows' mean (transformers' default); a meta model has no values to average.
        model.resize_token_embeddings(
            vocab_needed, pad_to_multiple_of=VOCAB_MULTIPLE, mean_resizing=torch.device(device).type != "meta"
        )
    model.config.use_cache = False
    return model


def count_parameters(config) -> int:
    """Parameters of the model `config` describes (tied weights once), counted on the meta device: no memory."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def estimate_memory_per_gpu(
    config,
    num_params: int,
    zero_stage: int,
    num_gpus: int,
    micro_batch_size: int,
    seq_length: int,
    gradient_checkpointing: bool,
    offload: bool = False,
    attn_implementation: str = "sdpa",
    cross_document_attention: bool = False,
) -> dict:
    """GPU memory per device in GB (1e9 bytes) for bf16 mixed-precision AdamW training; a planning estimate.

    Model states, bytes per parameter: bf16 weights 2, bf16 gradients 2, fp32 master weights + Adam's two
    moments 12 (16 in all without ZeRO). ZeRO partitions over `num_gpus`: stage 1 the optimizer states,
    stage 2 also the gradients, stage 3 also the weights. `offload` moves the optimizer states to CPU memory
    (`optimizer_states_cpu`, left out of `total`).

    Activations kept for the backward, bf16, per token and layer (h hidden, i intermediate, g = kv/query heads):
      LayerNorm-1 input and output 4h, queries 2h, keys and values 4h·g, attention output 2h (also the
      o_proj input), LayerNorm-2 input and output 4h, c_fc output 2i, GELU output 2i: (12 + 4g)·h + 4i.
    That holds for flash_attention_2 and flex_attention, and for sdpa while no mask is built. sdpa builds
    an s×s mask when documents are packed with restarting position_ids (cross_document_attention false)
    or when seq_length >= sliding_window; each layer then keeps its own bf16 copy (2·s² bytes per
    sequence) and keys/values repeated to every query head (16h + 4i per token). eager keeps the repeated
    keys/values plus the fp32 softmax and its bf16 copy: 6·heads·s² bytes per sequence and layer.
    Gradient checkpointing keeps each layer's input (2h) and rebuilds one layer at a time in the backward.
    The final LayerNorm adds 4h per token.
    `logits`: the bf16 logits (2 bytes × vocab per token) and the fp32 log-probabilities cross-entropy keeps (4),
    plus at the start of the backward their fp32 and bf16 gradients (4 + 2): 12 bytes × vocab per token, held
    while every activation is still alive. Checked on an H100 and an H200 (torch 2.11, transformers 5.17, sdpa,
    8 layers, h 1024, s 2048 and 4096, packed or not, with and without checkpointing): gradients +
    activations + logits came within -1%..+7% of the measured peak (torch.cuda.max_memory_allocated).
    Not counted: the CUDA context and allocator fragmentation (1-3 GB), ZeRO-3's gathered layers and
    communication buckets, dropout masks (1 byte per element when dropout > 0).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise RecipeError(f"zero_stage: must be 0, 1, 2 or 3, got {zero_stage}.")
    if num_gpus < 1 or micro_batch_size < 1 or seq_length < 1:
        raise RecipeError("num_gpus, micro_batch_size and seq_length: must be positive.")
    if attn_implementation not in ("flash_attention_2", "flex_attention", "sdpa", "eager"):
        raise RecipeError(
            f"attn_implementation: {attn_implementation!r} has no memory model; resolve 'auto' "
            "with choose_attention on the training machine."
        )
    optimizer = 12 * num_params / (num_gpus if zero_stage >= 1 else 1)
    gradients = 2 * num_params / (num_gpus if zero_stage >= 2 else 1)
    weights = 2 * num_params / (num_gpus if zero_stage == 3 else 1)

    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, window = config.num_attention_heads, getattr(config, "sliding_window", None)
    tokens = micro_batch_size * seq_length
    per_layer = tokens * ((12 + 4 * config.num_key_value_heads / heads) * h + 4 * i)
    masked = not cross_document_attention or (window is not None and seq_length >= window)
    if attn_implementation == "eager":
        per_layer = tokens * (16 * h + 4 * i) + micro_batch_size * 6 * heads * seq_length**2
    elif attn_implementation == "sdpa" and masked:
        per_layer = tokens * (16 * h + 4 * i) + micro_batch_size * 2 * seq_length**2
    if gradient_checkpointing:
        activations = layers * tokens * 2 * h + per_layer
    else:
        activations = layers * per_layer
    activations += tokens * 4 * h
    logits = tokens * config.vocab_size * 12

    result = {
        "weights": weights / GB,
        "gradients": gradients / GB,
        "optimizer_states": 0.0 if offload else optimizer / GB,
        "optimizer_states_cpu": optimizer / GB if offload else 0.0,
        "activations": activations / GB,
        "logits": logits / GB,
    }
    result["total"] = sum(v for k, v in result.items() if k != "optimizer_states_cpu")
    return result


def validate_model_and_data(config, tokenizer, seq_length: int, from_scratch: bool = True) -> SpecialTokenIds:
    """Check that the model can take the data; return the structure-token ids. Errors name the recipe key.

    - `seq_length` must not exceed `max_position_embeddings`.
    - The tokenizer must have StarCoder2's structure tokens (SpecialTokenIds).
    - For a checkpoint (`from_scratch=False`), a tokenizer larger than the vocabulary is accepted (create_model
      adds the rows) only when every structure token already lies inside the checkpoint's vocabulary:
      otherwise this is not the checkpoint's tokenizer, and its control tokens would have untrained
      embeddings. From scratch any size is fine: build_config sizes the vocabulary.
    """
    if seq_length > config.max_position_embeddings:
        raise RecipeError(
            f"seq_length: {seq_length} exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings}); lower seq_length or set max_position_embeddings (and rope_theta)."
        )
    try:
        ids = SpecialTokenIds.from_tokenizer(tokenizer)
    except ValueError as error:
        raise RecipeError(str(error)) from error
    if not from_scratch and len(tokenizer) > config.vocab_size:
        outside = sorted(i for i in ids.as_set() if i >= config.vocab_size)
        if outside:
            raise RecipeError(
                f"tokenizer_name_or_path: the structure token id(s) {outside} lie beyond the checkpoint's "
                f"vocab_size {config.vocab_size} ({len(tokenizer)} tokens in the tokenizer): this is not the "
                "checkpoint's tokenizer. Leave tokenizer_name_or_path unset to use the model's own."
            )
        logger.warning(
            "tokenizer has %d tokens, the checkpoint %d: the embeddings will be resized",
            len(tokenizer),
            config.vocab_size,
        )
    return ids
