"""The model a recipe trains: attention choice, creation from scratch or loading, and the checks against the data.

`choose_attention` resolves `attn_implementation: auto` for this machine; `create_model` builds the config's
model (or loads a checkpoint, or only its architecture on the meta device for a dry run), resizes the
embeddings for a larger tokenizer and turns the KV cache off for training; `count_parameters` counts on
the meta device; `validate_model_and_data` checks sequence length and structure tokens before any work.
"""

import importlib.util
import logging

import torch
from transformers import AutoModelForCausalLM

from starcoder2_train.configs import (
    FLASH_ATTENTION_2,
    SDPA_BLOCKED,
    SDPA_VARLEN,
    ModelArguments,
    RecipeError,
    torch_dtype,
)
from starcoder2_train.data.special_tokens import SpecialTokenIds
from starcoder2_train.model import attention as _registers_attention  # noqa: F401  (sdpa_varlen, sdpa_blocked)
from starcoder2_train.model.presets import VOCAB_MULTIPLE, build_config, round_up

logger = logging.getLogger(__name__)


def choose_attention(requested: str) -> str:
    """auto: the fastest attention that keeps packed documents apart, as measured (docs/benchmarks.md).

    CUDA: flash_attention_2 when flash-attn is installed, else sdpa_varlen (PyTorch's own FlashAttention-2
    kernel, variable length: 1.7x transformers' masked sdpa at 4k and 4.4x at 16k on an H100, with dropout,
    which flex_attention lacks). CPU: sdpa_blocked (1.9x the masked sdpa for the tiny model).
    """
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        if torch.cuda.is_available():
            return FLASH_ATTENTION_2 if has_flash else SDPA_VARLEN
        return SDPA_BLOCKED
    if requested == FLASH_ATTENTION_2 and not (has_flash and torch.cuda.is_available()):
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
    dtype = torch_dtype(model_args.torch_dtype)
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
