"""The model a recipe trains: attention choice, creation from scratch or loading, and the checks against the data.

`choose_attention` resolves `attn_implementation: auto` for this machine; `create_model` routes PyTorch's
flash kernel on a CUDA device (`flash_attention_impl`, model/flash.py), builds the config's model (or loads a
checkpoint, or only its architecture on the meta device for a dry run), resizes the embeddings for a larger
tokenizer, turns the KV cache off for training and checks this project's attention kernels and flex_attention
against a reference on the device (`verify_attention`); `count_parameters` counts on the meta device;
`validate_model_and_data` checks sequence length and structure tokens before any work.
"""

import copy
import logging
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from starcoder2_train.configs import (
    FLASH_ATTENTION_2,
    SDPA_BLOCKED,
    SDPA_VARLEN,
    ModelArguments,
    RecipeError,
    torch_dtype,
)
from starcoder2_train.data.batches.collators import document_boundaries
from starcoder2_train.data.special_tokens import SpecialTokenIds
from starcoder2_train.model.attention import (  # registers sdpa_varlen, sdpa_blocked
    skip_mask_building,
    varlen_reference,
)
from starcoder2_train.model.dropout_check import require_dropout_replay
from starcoder2_train.model.flash import FLASH_ATTN_2_MIN_VERSION, activate_flash_impl, flash_attention_2_available
from starcoder2_train.model.presets import VOCAB_MULTIPLE, build_config, round_up

logger = logging.getLogger(__name__)

# The attention implementations create_model checks against the reference: this project's, and flex_attention.
VERIFIED_ATTENTION = (SDPA_VARLEN, SDPA_BLOCKED, "flex_attention")


def choose_attention(requested: str, cuda: bool | None = None) -> str:
    """auto: the fastest attention that keeps packed documents apart, as measured (docs/benchmarks.md).

    `cuda`: whether training runs on a CUDA GPU (default `torch.cuda.is_available()`). CUDA: flash_attention_2
    where transformers accepts it (`flash_attention_2_available`: the flash-attn distribution, FlashAttention-2;
    flash-attn-4 alone is not it), else sdpa_varlen (PyTorch's own FlashAttention-2 kernel, variable length:
    1.7x transformers' masked sdpa at 4k and 4.4x at 16k on an H100, with dropout, which flex_attention lacks).
    CPU: sdpa_blocked (1.9x the masked sdpa for the tiny model). An explicit flash_attention_2 that transformers
    would refuse is a RecipeError.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested == "auto":
        if cuda:
            return FLASH_ATTENTION_2 if flash_attention_2_available(cuda) else SDPA_VARLEN
        return SDPA_BLOCKED
    if requested == FLASH_ATTENTION_2 and not flash_attention_2_available(cuda):
        raise RecipeError(
            "attn_implementation: flash_attention_2 needs the flash-attn package (FlashAttention-2 >= "
            f"{FLASH_ATTN_2_MIN_VERSION}; flash-attn-4 alone is not it) and a CUDA GPU; use auto (sdpa_varlen "
            "on a CUDA GPU, sdpa_blocked on a CPU) or sdpa."
        )
    return requested


def create_model(
    model_args: ModelArguments,
    config=None,
    tokenizer=None,
    attn_implementation: str | None = None,
    *,
    device: str | torch.device = "cpu",
    verify: bool = True,
):
    """Create the model from scratch (`model_config`) or load `model_name_or_path`, ready to train.

    `config` defaults to `build_config(model_args, len(tokenizer))`; `attn_implementation` to
    `choose_attention(model_args.attn_implementation)`. On `device="meta"` only the architecture is
    built, without weights, even for a checkpoint (dry runs). On a CUDA device, `flash_attention_impl` is
    activated first (`activate_flash_impl`: a RecipeError comes before any weights are read). The embeddings
    are resized when the tokenizer is larger than them, and `use_cache` is turned off (training needs no cache,
    and packed sequences are isolated per document only without one). With `verify` (not on meta), an
    attention of VERIFIED_ATTENTION is checked once on `device` by `verify_attention` (milliseconds; a
    RecipeError if it is wrong), in the model's dtype, or bf16 for an fp32 model on CUDA, which trains under
    autocast there (FlashAttention has no fp32).
    """
    device = torch.device(device)
    vocab_needed = len(tokenizer) if tokenizer is not None else 0
    config = config if config is not None else build_config(model_args, vocab_needed)
    attention = attn_implementation or choose_attention(model_args.attn_implementation)
    if device.type == "cuda":
        activate_flash_impl(model_args.flash_attention_impl, config.attention_dropout, device=device)
    pretrained = model_args.model_name_or_path is not None and device.type != "meta"
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
            vocab_needed, pad_to_multiple_of=VOCAB_MULTIPLE, mean_resizing=device.type != "meta"
        )
    model.config.use_cache = False
    if attention in (SDPA_VARLEN, SDPA_BLOCKED):
        skip_mask_building(model)  # no host-device sync per training forward (model/attention.py)
    if verify and attention in VERIFIED_ATTENTION and device.type != "meta":
        dtype = torch.bfloat16 if device.type == "cuda" and model.dtype == torch.float32 else model.dtype
        errors = verify_attention(attention, model.config, device, dtype)
        logger.info("%s on %s in %s matches the reference: relative errors %s", attention, device, dtype, errors)
    return model


# verify_attention's batch: two rows of 64 tokens, documents longer and shorter than its window of (at most) 16.
_CHECK_DOCUMENTS = ((20, 30, 14), (50, 14))
_CHECK_WINDOW = 16
# Largest relative error (max |error| / max |reference|) accepted for fp32 (and wider), and for fp16/bf16.
_TOLERANCE_FP32, _TOLERANCE_16_BIT = 1e-4, 2e-2


def verify_attention(attn_implementation: str, config, device, dtype: torch.dtype) -> dict[str, float]:
    """Check an attention implementation against an fp32 per-document sdpa reference before it is trained with.

    Runs it as a Starcoder2 layer calls it (through transformers' AttentionInterface, with the mask transformers
    builds for it from packed `position_ids`, and `cu_seq_lens` for sdpa_varlen) on two packed rows of 64 tokens
    with the model's head counts and head dim, its window narrowed to 16 (none if it has none), dropout 0, in
    `dtype` on `device`; the reference runs on the CPU in fp32. Returns the relative errors of the output and
    of the three input gradients; raises RecipeError naming attn_implementation if one exceeds 1e-4 (fp32) or
    2e-2 (16-bit). Cost: one forward and backward of attention alone on 128 tokens (milliseconds). For sdpa_varlen
    on CUDA with attention_dropout > 0, also `dropout_check.require_dropout_replay` (its ratio as
    "dropout_mask_replay", at most 1): dropout 0 cannot show whether the backward replays the forward's mask.
    """
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = None if config.sliding_window is None else min(config.sliding_window, _CHECK_WINDOW)
    position_ids = torch.stack([torch.cat([torch.arange(length) for length in row]) for row in _CHECK_DOCUMENTS])
    boundaries = document_boundaries(position_ids)
    rows, seq = position_ids.shape
    generator = torch.Generator().manual_seed(0)
    exact = [torch.randn(rows, n, seq, dim, generator=generator) for n in (heads, kv_heads, kv_heads)]
    grad_out = torch.randn(rows, seq, heads, dim, generator=generator)

    checked = copy.deepcopy(config)
    checked.sliding_window, checked._attn_implementation = window, attn_implementation
    make_mask = create_causal_mask if window is None else create_sliding_window_causal_mask
    kwargs = {"position_ids": position_ids.to(device)}
    if attn_implementation == SDPA_VARLEN:  # make_collator adds the document boundaries for it
        kwargs.update((key, v.to(device) if torch.is_tensor(v) else v) for key, v in boundaries.items())
    embeds = torch.empty(rows, seq, 1, device=device, dtype=dtype)  # the mask functions read only its shape
    module = SimpleNamespace(config=checked, num_key_value_groups=heads // kv_heads, is_causal=True, training=True)
    inputs = [t.to(device, dtype).requires_grad_() for t in exact]
    try:
        mask = make_mask(
            config=checked, inputs_embeds=embeds, attention_mask=None, cache=None, position_ids=kwargs["position_ids"]
        )
        out, _ = ALL_ATTENTION_FUNCTIONS[attn_implementation](
            module, *inputs, mask, dropout=0.0, scaling=dim**-0.5, sliding_window=window, **kwargs
        )
        out.backward(grad_out.to(device, dtype))
    except (RuntimeError, ValueError) as error:  # NotImplementedError is a RuntimeError
        raise RecipeError(
            f"attn_implementation: {attn_implementation} fails forward and backward on {device} in {dtype} "
            f"({error}). Use another attn_implementation (sdpa_blocked runs anywhere)."
        ) from error

    def flat(t):  # (rows, heads, seq, dim) → (tokens, heads, dim), as the reference takes them
        return t.detach().transpose(1, 2).reshape(rows * seq, -1, dim).float().cpu()

    reference_inputs = [flat(t).requires_grad_() for t in exact]
    window_left = window - 1 if window is not None and window < seq else -1
    reference = varlen_reference(*reference_inputs, boundaries["cu_seq_lens_q"], 0.0, dim**-0.5, window_left)
    reference.backward(grad_out.reshape(rows * seq, heads, dim))
    pairs = {"output": (out.detach().float().cpu().reshape(reference.shape), reference.detach())}
    for name, ours, theirs in zip(("query", "key", "value"), inputs, reference_inputs):
        pairs[f"grad_{name}"] = (flat(ours.grad), theirs.grad)
    errors = {name: float((ours - theirs).abs().max() / theirs.abs().max()) for name, (ours, theirs) in pairs.items()}
    tolerance = _TOLERANCE_FP32 if torch.finfo(dtype).bits >= 32 else _TOLERANCE_16_BIT
    if not all(error <= tolerance for error in errors.values()):  # also catches NaN
        measured = ", ".join(f"{name} {error:.1e}" for name, error in errors.items())
        raise RecipeError(
            f"attn_implementation: {attn_implementation} differs from the per-document reference on {device} in "
            f"{dtype} (relative errors {measured}; tolerance {tolerance:.0e}). Use another attn_implementation "
            "(sdpa_blocked runs anywhere), or for sdpa_varlen set flash_attention_impl: fa2."
        )
    if torch.device(device).type == "cuda" and attn_implementation == SDPA_VARLEN and config.attention_dropout > 0:
        # The flash backward must replay the forward's dropout mask (model/dropout_check.py; 33 passes, milliseconds).
        errors["dropout_mask_replay"] = require_dropout_replay(config, device, dtype, window)["mask_replay_ratio"]
    return errors


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
