"""float8 training of the decoder's linear layers through torchao (recipe key `float8`, opt-in).

`enable_float8` swaps each chosen `nn.Linear` for torchao's `Float8Linear` (`convert_to_float8_training`,
tensorwise dynamic scaling: one scale per tensor, computed each step; e4m3 for inputs and weights, e5m2
for the gradients), so that its three matmuls run as fp8 × fp8 → bf16 on the tensor cores (`torch._scaled_mm`).
The weights stay as they are (bf16 or fp32 master weights), only the matmul inputs are cast, so checkpoints
and `save_pretrained` are unchanged. Which layers (`float8_module_filter`): every `nn.Linear` of the
decoder whose in and out features are multiples of 16 (what `_scaled_mm` needs); `lm_head`, and any
module holding the input embedding's (tied) weight, stay in bf16: the loss is the most precision-sensitive
matmul, and the fused loss kernels (training/loss.py) take lm_head's weight as a tensor anyway.

Only GPUs with fp8 tensor cores (compute capability 8.9+: H100/H200, L40/L4, B200) run it; elsewhere
`enable_float8` refuses. The casts are only cheap when `torch.compile` fuses them into the neighbouring
ops, so convert before `compile_layers` compiles the layers. Throughput figures (training/throughput.py)
still count MFU against the bf16 peak: a float8 run's MFU is "bf16-equivalent" and can exceed what bf16
could reach; compare tokens/s, not MFU, between float8 and bf16 runs.
"""

import functools

from torch import nn

from starcoder2_train.configs import RecipeError

FLOAT8_MIN_CAPABILITY = (8, 9)
# _scaled_mm needs both matmul dimensions divisible by 16.
FLOAT8_DIM_MULTIPLE = 16


def high_precision_module_names(model: nn.Module) -> frozenset[str]:
    """Names of the modules that stay bf16: the output embedding (lm_head) and any holding the input embedding's
    weight (the embedding itself, and lm_head again when tied). One pass over the modules."""
    output = model.get_output_embeddings()
    input_weight = model.get_input_embeddings().weight
    return frozenset(
        name
        for name, module in model.named_modules()
        if module is output or getattr(module, "weight", None) is input_weight
    )


def float8_module_filter(
    module: nn.Module, name: str, high_precision: frozenset[str] = frozenset({"lm_head"})
) -> bool:
    """Whether to train `module` (named `name`, torchao's fully qualified name) in float8.

    True for an `nn.Linear` not named in `high_precision` whose in and out features are multiples of 16.
    torchao's `module_filter_fn` convention (module, name); a pure function of its arguments.
    """
    return (
        isinstance(module, nn.Linear)
        and name not in high_precision
        and module.in_features % FLOAT8_DIM_MULTIPLE == 0
        and module.out_features % FLOAT8_DIM_MULTIPLE == 0
    )


def check_float8_device(device_type: str, capability: tuple[int, int] | None) -> None:
    """Raise RecipeError naming float8 unless `device_type` is CUDA with compute capability 8.9 or more."""
    if device_type != "cuda":
        raise RecipeError(
            f"float8: needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+: H100, H200, L40, L4, "
            f"B200), not {device_type!r}; set float8: false."
        )
    if capability is None or tuple(capability) < FLOAT8_MIN_CAPABILITY:
        found = "unknown" if capability is None else ".".join(map(str, capability))
        raise RecipeError(
            f"float8: this GPU has compute capability {found}; fp8 matmuls need 8.9+ (H100, H200, L40, L4, "
            "B200), not A100 (8.0) or older; set float8: false."
        )


def enable_float8(model: nn.Module, device_type: str, capability: tuple[int, int] | None) -> list[str]:
    """Convert `model`'s chosen linear layers to torchao's Float8Linear in place; return their names.

    `capability`: `torch.cuda.get_device_capability()` of the training GPU. Refuses (RecipeError naming
    float8) when not on CUDA, below capability 8.9, or without torchao. Costs one module swap per layer and
    no memory (the weights are shared, not copied). Call it before `torch.compile` (compile_layers) and before
    DeepSpeed or accelerate wrap the model; with `enable_training_loss` (training/loss.py) in either order.
    """
    check_float8_device(device_type, capability)
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear
    except ImportError as error:
        raise RecipeError(
            f"float8: needs torchao (`pip install torchao`, the project's cuda extra): {error}; or set float8: false."
        ) from error
    config = Float8LinearConfig.from_recipe_name("tensorwise")
    keep = functools.partial(float8_module_filter, high_precision=high_precision_module_names(model))
    convert_to_float8_training(model, config=config, module_filter_fn=keep)
    return [name for name, module in model.named_modules() if isinstance(module, Float8Linear)]
