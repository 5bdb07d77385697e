"""What precision a run really trains in, read from the model and optimizer the Trainer built, not the recipe.

The recipes train through DeepSpeed with `bf16` and `data_types.grad_accum_dtype: fp32`: DeepSpeed casts the
weights to bf16 (forward and backward compute in bf16, no autocast and no per-micro-batch recast of fp32
weights), keeps fp32 master weights in its optimizer (BF16_Optimizer under ZeRO-1, its ZeRO optimizer under
ZeRO-2/3) and accumulates the gradients of the micro batches in fp32. Without DeepSpeed, `bf16: true` over
float32 weights is autocast: fp32 weights, bf16 compute, the weights recast in every micro batch.
`describe_precision` says which of these a run got, at train begin, on the main process's log.
"""

import logging

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Where DeepSpeed's optimizers keep their fp32 master weights (BF16_Optimizer, ZeRO-1/2, ZeRO-3).
_MASTER_ATTRIBUTES = ("fp32_groups_flat_partition", "single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def describe_precision(model, optimizer, engine=None, autocast: bool = False) -> dict:
    """weights, master_weights, gradient_accumulation dtypes and the optimizer's class, as the run holds them."""
    weights = sorted({_dtype_name(p.dtype) for p in model.parameters() if p.is_floating_point()})
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    master = None
    for attribute in _MASTER_ATTRIBUTES:
        groups = getattr(inner, attribute, None)
        if groups:
            first = groups[0][0] if isinstance(groups[0], (list, tuple)) else groups[0]
            master = _dtype_name(first.dtype)
            break
    if master is None:  # a torch optimizer: its parameters are the master weights
        master = ",".join(weights)
    accumulation = master
    if engine is not None and hasattr(engine, "get_data_types"):
        accumulation = _dtype_name(engine.get_data_types()[1])
    return {
        "weights": ",".join(weights),
        "compute": "bfloat16 (autocast)" if autocast else ",".join(weights),
        "master_weights": master,
        "gradient_accumulation": accumulation,
        "optimizer": type(inner).__name__,
    }


class PrecisionReport(TrainerCallback):
    """Logs `describe_precision` once, when training begins; the figures also go to `self.precision`."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.precision = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        engine = trainer.model_wrapped if trainer.is_deepspeed_enabled else None
        autocast = bool(args.bf16) and not trainer.is_deepspeed_enabled and model.dtype == torch.float32
        self.precision = describe_precision(model, trainer.optimizer, engine, autocast=autocast)
        if state.is_world_process_zero:
            logger.info("precision: %s", ", ".join(f"{key} {value}" for key, value in self.precision.items()))
