"""LoRA and QLoRA fine-tuning through peft, and merging a trained adapter back into its base.

`apply_lora` wraps a model (from `create_model`, or `load_quantized_base` for QLoRA) in a peft `PeftModel`
whose only trainable weights are the low-rank adapters; it checks the target module names first, since peft
refuses a list where no name matches without saying what the model has, and silently skips the unmatched
names of a list where some match (peft 0.21: a recipe naming gate_proj would train less than it says).
`DEFAULT_TARGET_MODULES` are StarCoder2's real linear layers: `q/k/v/o_proj` in attention and `c_fc`,
`c_proj` in the MLP (the published StarCoder2 fine-tuning script names gate/up/down_proj, which StarCoder2
does not have). `merge_adapter` writes W + (alpha/r)·B·A into the base and saves a plain transformers model
directory, which loads without peft or this project.

Costs: an adapter of rank r adds r·(in + out) weights per targeted linear layer (`lora_parameter_count`, from
the config alone): with the defaults and r=16, 23.8M weights for StarCoder2-3B (0.79%), 38.3M for 7B (0.53%)
and 63.6M for 15B (0.40%).
Only those get gradients and Adam states, so model states are the frozen base (2 bytes per weight in bf16,
about 0.5 for QLoRA's NF4 with double quantization) plus 16 bytes per adapter weight; activations are as for
full fine-tuning. A merge reads the base and the adapter once in `dtype` and writes the merged model.

peft is used as is: its adapter layers, kbit preparation, save format and `merge_and_unload` are what the
Trainer, the Hub and every inference stack already read; a copy kept here would only drift from them.
"""

import importlib.util
import json
import logging
import os
from collections.abc import Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from starcoder2_train.configs import (
    LORA_TARGET_MODULES,
    SDPA_BLOCKED,
    SDPA_VARLEN,
    ModelArguments,
    RecipeError,
    hub_hint,
    torch_dtype,
)
from starcoder2_train.model.attention import skip_mask_building
from starcoder2_train.model.factory import VERIFIED_ATTENTION, choose_attention, verify_attention
from starcoder2_train.model.flash import activate_flash_impl

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = LORA_TARGET_MODULES
QLORA_HINT = (
    "QLoRA (load_in_4bit: true) needs a CUDA GPU with the bitsandbytes package installed; "
    "on this machine use LoRA over the bf16/fp32 base instead (load_in_4bit: false)."
)
ADAPTER_CONFIG = "adapter_config.json"


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a plain target name: the module's full name, or its last dotted parts."""
    return module_name == target or module_name.endswith("." + target)


def check_target_modules(model, target_modules: Sequence[str] | str) -> list[str]:
    """The target names as a list (a string is split at commas); RecipeError naming every name that matches
    no linear module of `model`, with the model's linear module names to choose from."""
    targets = [t.strip() for t in target_modules.split(",")] if isinstance(target_modules, str) else target_modules
    targets = [t for t in targets if t]
    if not targets:
        raise RecipeError(f"lora_target_modules: empty; StarCoder2's are {', '.join(DEFAULT_TARGET_MODULES)}.")
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    unmatched = [t for t in targets if not any(_matches(name, t) for name in linear)]
    if unmatched:
        choices = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise RecipeError(
            f"lora_target_modules: {', '.join(unmatched)} match(es) no linear module of "
            f"{type(model).__name__}; its linear modules are {', '.join(choices)} "
            f"(StarCoder2's MLP is c_fc/c_proj, it has no gate_proj, up_proj or down_proj)."
        )
    return list(targets)


def check_targets_for_config(config, target_modules: Sequence[str] | str) -> list[str]:
    """check_target_modules on the architecture of `config`, built on the meta device (no weights, milliseconds):
    a wrong target is refused before any data or weights are read."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return check_target_modules(model, target_modules)


def apply_lora(
    model,
    *,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    target_modules: Sequence[str] | str = DEFAULT_TARGET_MODULES,
    quantized: bool = False,
    gradient_checkpointing: bool = False,
):
    """Wrap `model` in a peft LoRA model (rank `r`, scale alpha/r, dropout on the adapter input) whose only
    trainable weights are the adapters' lora_A/lora_B; biases and every base weight stay frozen.

    The targets are checked against the model first (`check_target_modules`). A 4-bit base (`quantized`, or a
    model transformers loaded in 4 or 8 bits) goes through peft's `prepare_model_for_kbit_training` (norms
    and the head in fp32, input gradients on for checkpointing). `gradient_checkpointing` turns on
    non-reentrant checkpointing of every decoder layer now; the Trainer's `gradient_checkpointing: true` does
    the same at train() (and `gradient_checkpointing_layers` then narrows it), so either works with LoRA.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if r < 1:
        raise RecipeError(f"lora_r: the adapter rank must be a positive integer, got {r}.")
    if alpha <= 0:
        raise RecipeError(f"lora_alpha: must be positive (the adapter's scale is lora_alpha / lora_r), got {alpha}.")
    if not 0.0 <= dropout < 1.0:
        raise RecipeError(f"lora_dropout: must be in [0, 1), got {dropout}.")
    targets = check_target_modules(model, target_modules)
    checkpointing = {"use_reentrant": False}
    if quantized or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing
        )
    elif gradient_checkpointing:  # transformers 5.24's name for gradient_checkpointing_enable
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    logger.info("LoRA r=%d alpha=%g on %s: %s", r, alpha, ", ".join(targets), parameter_summary(peft_model))
    return peft_model


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters of `model`; a bitsandbytes 4-bit tensor counts its unpacked weights."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":  # two 4-bit weights per byte of quant_storage
            count *= 2 * parameter.quant_storage.itemsize
        total += count
        trainable += count if parameter.requires_grad else 0
    return trainable, total


def parameter_summary(model) -> str:
    """One line: 'trainable parameters: 23,838,720 of 3,054,210,048 (0.781%)'."""
    trainable, total = trainable_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3g}%)"


def lora_parameter_count(config, r: int, target_modules: Sequence[str] = DEFAULT_TARGET_MODULES) -> int:
    """Adapter weights LoRA of rank `r` adds to the StarCoder2 model `config` describes, without building it:
    r·(in + out) per targeted linear layer (lora_A is r×in, lora_B out×r), times the layers."""
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    shapes = {  # (in_features, out_features) of each linear layer of a decoder layer
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "c_fc": (hidden, config.intermediate_size),
        "c_proj": (config.intermediate_size, hidden),
    }
    unknown = [t for t in target_modules if t not in shapes]
    if unknown:
        raise RecipeError(
            f"lora_target_modules: {', '.join(unknown)} is not a decoder linear layer of StarCoder2; "
            f"choose from {', '.join(shapes)}."
        )
    return config.num_hidden_layers * sum(r * sum(shapes[t]) for t in target_modules)


def _bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def quantization_config(device_type: str):
    """QLoRA's base: NF4 4-bit weights, double quantization (the scales quantized too), bf16 compute.
    RecipeError (QLORA_HINT) unless `device_type` is "cuda", a GPU is visible and bitsandbytes is installed."""
    if device_type != "cuda" or not torch.cuda.is_available() or not _bitsandbytes_installed():
        if device_type != "cuda":
            found = f"device {device_type}"
        else:
            found = "no CUDA GPU visible" if not torch.cuda.is_available() else "bitsandbytes is not installed"
        raise RecipeError(f"load_in_4bit: {QLORA_HINT} (found: {found}).")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_quantized_base(model_args: ModelArguments, tokenizer=None, attn_implementation: str | None = None):
    """Load `model_args.model_name_or_path` in NF4 on this process's GPU (LOCAL_RANK), for `apply_lora`.

    Refused (RecipeError) before any weights are read on a machine without CUDA and bitsandbytes, without a
    checkpoint, or for a tokenizer larger than the checkpoint's vocabulary (new embedding rows would stay
    untrained: the base is frozen). As `create_model`: the attention is chosen and, for this project's kernels
    and flex_attention, checked on the device in bf16; the KV cache is off. Not for ZeRO-3 or FSDP, which
    shard the weights they are given; QLoRA is one GPU or DDP.
    """
    quantization = quantization_config("cuda" if torch.cuda.is_available() else "cpu")
    if model_args.model_name_or_path is None:
        raise RecipeError("load_in_4bit: QLoRA fine-tunes a checkpoint; set model_name_or_path.")
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=model_args.trust_remote_code,
    )
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise RecipeError(
            f"load_in_4bit: the tokenizer has {len(tokenizer)} tokens, the checkpoint {config.vocab_size}; new "
            "embedding rows would stay untrained under QLoRA. Use the checkpoint's own tokenizer."
        )
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    attention = attn_implementation or choose_attention(model_args.attn_implementation)
    activate_flash_impl(model_args.flash_attention_impl, config.attention_dropout, device=device)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        revision=model_args.model_revision,
        quantization_config=quantization,
        dtype=torch.bfloat16,
        device_map={"": device.index},
        attn_implementation=attention,
        trust_remote_code=model_args.trust_remote_code,
    )
    model.config.use_cache = False
    if attention in (SDPA_VARLEN, SDPA_BLOCKED):
        skip_mask_building(model)
    if attention in VERIFIED_ATTENTION:
        verify_attention(attention, model.config, device, torch.bfloat16)
    return model


def merge_adapter(adapter_dir: str, output_dir: str, *, base_model: str | None = None, dtype=None) -> str:
    """Merge the LoRA adapter saved in `adapter_dir` into its base and save a plain model to `output_dir`.

    The base is `base_model`, or the adapter's `base_model_name_or_path`, loaded in `dtype` (a torch.dtype or
    its name; None: the checkpoint's own). The output (model.safetensors, config.json, generation config and
    the tokenizer of the adapter directory, else of the base, when one exists) loads with
    `AutoModelForCausalLM.from_pretrained` alone, with the KV cache on for generation. An adapter trained with
    QLoRA names the unquantized checkpoint and merges into it; a base saved quantized is refused, since
    merging into 4-bit weights would round the adapter away. Returns `output_dir`.
    """
    from peft import PeftModel

    config_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise RecipeError(
            f"{adapter_dir}: no {ADAPTER_CONFIG}, so not a saved LoRA adapter; give the output directory "
            "(or a checkpoint-N directory) of a LoRA run."
        )
    if os.path.abspath(output_dir) == os.path.abspath(adapter_dir):
        raise RecipeError(f"--output: {output_dir} is the adapter directory; write the merged model elsewhere.")
    with open(config_path, encoding="utf-8") as handle:
        base = base_model or json.load(handle).get("base_model_name_or_path")
    if not base:
        raise RecipeError(f"{config_path} names no base_model_name_or_path; pass --base_model PATH.")
    try:
        base_config = AutoConfig.from_pretrained(base)
    except OSError as error:
        raise RecipeError(f"base model: {hub_hint(base)}, or pass --base_model PATH ({error}).") from error
    if getattr(base_config, "quantization_config", None):
        raise RecipeError(
            f"base model {base} is saved quantized ({base_config.quantization_config.get('quant_method')}); "
            "merging into quantized weights would round the adapter away. Merge into the bf16/fp32 checkpoint "
            "the adapter was trained from (--base_model PATH)."
        )
    dtype = torch_dtype(dtype or "auto") if not isinstance(dtype, torch.dtype) else dtype
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation="sdpa")
    tokenizer = _tokenizer(adapter_dir) or _tokenizer(base)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        from starcoder2_train.model.presets import VOCAB_MULTIPLE

        # Training resized the embeddings (create_model) and peft saved them with the adapter.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=VOCAB_MULTIPLE, mean_resizing=False)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.config.use_cache = True  # off only for training (create_model)
    merged.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    logger.info("merged %s into %s: %s", adapter_dir, base, output_dir)
    return output_dir


def _tokenizer(path: str):
    """The tokenizer saved at `path` (a directory or Hub id), or None when it has none."""
    if os.path.isdir(path) and not any(
        os.path.exists(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")
    ):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None
