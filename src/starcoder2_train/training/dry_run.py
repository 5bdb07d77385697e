"""`--dry_run true`: what a recipe would train, and whether it fits, without training or downloading weights."""

import json
import os

from starcoder2_train.configs import tokens_per_step
from starcoder2_train.model.factory import count_parameters
from starcoder2_train.model.memory import estimate_memory_per_gpu


def zero_stage(training_args) -> int:
    """The DeepSpeed ZeRO stage this run would use (0 = plain data parallel)."""
    config = training_args.deepspeed
    if isinstance(config, str) and os.path.isfile(config):
        with open(config) as handle:
            config = json.load(handle)
    if isinstance(config, dict):
        stage = config.get("zero_optimization", {}).get("stage", 0)
        return int(stage) if stage != "auto" else 0
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 0))


def print_dry_run(config, model_args, data_args, training_args, attn_implementation: str) -> dict:
    """Print the model, tokens per optimizer step and a per-GPU memory estimate; return them as a dict."""
    num_params = count_parameters(config)
    world_size = training_args.world_size
    step_tokens = tokens_per_step(training_args, data_args.seq_length)
    stage = zero_stage(training_args)
    memory = estimate_memory_per_gpu(
        config,
        num_params,
        zero_stage=stage,
        num_gpus=world_size,
        micro_batch_size=training_args.per_device_train_batch_size,
        seq_length=data_args.seq_length,
        gradient_checkpointing=training_args.gradient_checkpointing,
    )
    source = model_args.model_name_or_path or model_args.model_config
    print(f"dry run: {source}")
    print(f"parameters: {num_params:,}")
    print(f"attention: {attn_implementation}")
    print(f"config: {json.dumps(config.to_dict(), sort_keys=True, default=str)}")
    print(
        f"tokens per optimizer step: {step_tokens:,} = seq_length {data_args.seq_length} x micro batch "
        f"{training_args.per_device_train_batch_size} x accumulation {training_args.gradient_accumulation_steps} "
        f"x {world_size} process(es)"
    )
    if training_args.max_steps > 0:
        print(f"tokens in {training_args.max_steps:,} steps: {step_tokens * training_args.max_steps:,}")
    print(
        f"memory per GPU (ZeRO stage {stage}, {world_size} GPU(s)), GB: "
        + ", ".join(f"{key} {value:.2f}" for key, value in memory.items())
    )
    return {"parameters": num_params, "tokens_per_step": step_tokens, "zero_stage": stage, "memory_gb": memory}
