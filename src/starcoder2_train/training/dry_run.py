"""`--dry_run true`: what a recipe would train, and whether it fits, without training or downloading weights;
and `gradient_checkpointing_layers: auto`, which checkpoints as few layers as that estimate allows.

The plan is read from where the run takes it: the ZeRO stage and offload from the DeepSpeed JSON (the recipe's
`deepspeed` key, or the `deepspeed_config_file` of an accelerate config, which accelerate passes on without
setting ACCELERATE_DEEPSPEED_ZERO_STAGE), FSDP from accelerate's environment, the precision from `bf16` and
`torch_dtype`, the attention, loss kernel, micro batch, accumulation and checkpointed layers from the recipe.
The memory model itself is model/memory.py; the evaluation's share of the training time,
training/evaluation_cost.py. The dry run models the GPU the recipe is for even when it runs on a
login node without one: `attn_implementation: auto` is planned as CUDA's flash kernel, `loss_kernel: auto` as
the fused kernel installed here (else the chunked or plain loss).
"""

import contextlib
import json
import os

from starcoder2_train.configs import RecipeError, tokens_per_step
from starcoder2_train.model.factory import count_parameters
from starcoder2_train.model.memory import checkpointed_layers_to_fit, estimate_memory_per_gpu, layer_matrix_parameters
from starcoder2_train.training.evaluation_cost import evaluation_cost
from starcoder2_train.training.loss import resolve_loss_kernel

AUTO_MEMORY_SHARE = 0.92  # `auto` plans to this share of gpu_memory_gb: the estimate's error and fragmentation


def deepspeed_settings(training_args) -> dict | None:
    """The DeepSpeed JSON this run uses, as a dict, or None without DeepSpeed.

    From `training_args.deepspeed` (a path or a dict), else the `deepspeed_config_file` accelerate passes on, else
    the plugin accelerate built from the zero_stage/offload keys of its YAML.
    """
    config = training_args.deepspeed
    if isinstance(config, str):
        if not os.path.isfile(config):
            raise RecipeError(f"deepspeed: {config}: no such file.")
        with open(config) as handle:
            return json.load(handle)
    if isinstance(config, dict):
        return config
    # The file as written first: the plugin's copy has its "auto" values already filled from this process's
    # arguments (bf16 among them, which a dry run without a GPU had to drop).
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and os.path.isfile(path):
        with open(path) as handle:
            return json.load(handle)
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "hf_ds_config", None) is not None:
        return plugin.hf_ds_config.config
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        return {"zero_optimization": {"stage": int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])}}
    return None


def parallel_plan(training_args, torch_dtype: str, bf16: bool) -> dict:
    """precision, zero_stage, offload_optimizer and offload_params for estimate_memory_per_gpu, and what told."""
    settings = deepspeed_settings(training_args)
    if settings is not None:
        zero = settings.get("zero_optimization", {})
        stage = zero.get("stage", 0)
        stage = 0 if stage == "auto" else int(stage)
        device = lambda key: (zero.get(key) or {}).get("device", "none")  # noqa: E731
        grad_accum = (settings.get("data_types") or {}).get("grad_accum_dtype", "bf16")
        enabled = (settings.get("bf16") or {}).get("enabled", False)
        return {
            "precision": "deepspeed_bf16" if enabled is True or (enabled == "auto" and bf16) else "deepspeed_fp32",
            "zero_stage": stage,
            "offload_optimizer": device("offload_optimizer") in ("cpu", "nvme"),
            "offload_params": device("offload_param") in ("cpu", "nvme"),
            "source": f"DeepSpeed ZeRO-{stage}, gradient accumulation in {grad_accum}",
        }
    if training_args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return {"precision": "fsdp_bf16", "zero_stage": 3, "source": "FSDP, bf16 compute over fp32 shards"}
    if torch_dtype == "bfloat16":
        return {"precision": "deepspeed_bf16", "zero_stage": 0, "source": "bf16 weights, no DeepSpeed"}
    precision = "autocast_fp32" if bf16 or torch_dtype in ("float32", "auto") else "deepspeed_bf16"
    source = "no DeepSpeed config (launch with an accelerate_configs/ file, or give --deepspeed JSON): data parallel"
    return {"precision": precision, "zero_stage": 0, "source": source}


def planned_attention(requested: str) -> str:
    """The attention the memory model assumes: auto → the flash kernel a CUDA GPU gets (sdpa_varlen; the memory of
    flash_attention_2, which auto picks where flash-attn is installed, is the same)."""
    return "sdpa_varlen" if requested == "auto" else requested


def memory_plan(config, model_args, data_args, training_args, bf16: bool | None = None) -> dict:
    """The keyword arguments of estimate_memory_per_gpu for this recipe on its GPUs (checkpointed_layers: what
    the recipe says; `auto` is left to resolve_checkpointed_layers)."""
    plan = parallel_plan(training_args, model_args.torch_dtype, training_args.bf16 if bf16 is None else bf16)
    plan.pop("source")
    chunk = training_args.loss_chunk_size
    try:
        loss = resolve_loss_kernel(training_args.loss_kernel, chunk, "cuda")
    except RecipeError:  # a fused kernel named in the recipe but not installed here: plan for it anyway
        loss = training_args.loss_kernel
    return dict(
        plan,
        num_gpus=planned_world_size(training_args),
        micro_batch_size=training_args.per_device_train_batch_size,
        seq_length=data_args.seq_length,
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
        attn_implementation=planned_attention(model_args.attn_implementation),
        cross_document_attention=data_args.cross_document_attention,
        loss_kernel=loss,
        loss_chunk_size=chunk,
        # muon: true (no ZeRO, no FSDP): the layers' matrices keep Muon's one moment, not Adam's two
        muon_params=config.num_hidden_layers * layer_matrix_parameters(config) if training_args.muon else 0,
    )


def planned_world_size(training_args) -> int:
    """The GPUs a dry run plans for: dry_run_world_size when given (with dry_run), else the processes launched."""
    if training_args.dry_run and training_args.dry_run_world_size:
        return training_args.dry_run_world_size
    return training_args.world_size


def recipe_checkpointed_layers(config, training_args) -> int | str:
    """Checkpointed decoder layers as the recipe says: 0, a number, every layer, or "auto"."""
    layers = training_args.gradient_checkpointing_layers
    if layers == "auto":
        return "auto"
    if not training_args.gradient_checkpointing:
        return 0
    if layers is None:
        return config.num_hidden_layers
    return min(int(layers), config.num_hidden_layers)


@contextlib.contextmanager
def without_zero3_init():
    """Build models without DeepSpeed's ZeRO-3 hooks: under accelerate with a ZeRO-3 config, transformers would
    partition even a meta-device model at creation and fail ("Cannot copy out of meta tensor")."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def resolve_checkpointed_layers(
    config, model_args, data_args, training_args, num_params: int | None = None, plan: dict | None = None
):
    """For `gradient_checkpointing_layers: auto`: the fewest layers to checkpoint for the estimate to stay under
    AUTO_MEMORY_SHARE of gpu_memory_gb, set on training_args (gradient_checkpointing on when it is above 0).
    Raises a RecipeError when even every layer checkpointed does not fit. Returns the number of layers.
    `plan`: memory_plan's result when the caller has it (a dry run, which plans with the recipe's bf16)."""
    if training_args.gradient_checkpointing_layers != "auto":
        return recipe_checkpointed_layers(config, training_args)
    if num_params is None:
        with without_zero3_init():
            num_params = count_parameters(config)
    budget = AUTO_MEMORY_SHARE * training_args.gpu_memory_gb
    plan = plan or memory_plan(config, model_args, data_args, training_args)
    layers = checkpointed_layers_to_fit(config, num_params, budget, **plan)
    if layers is None:
        raise RecipeError(
            f"gradient_checkpointing_layers: auto: even with every layer checkpointed the estimate exceeds "
            f"{budget:.1f} GB ({AUTO_MEMORY_SHARE:.0%} of gpu_memory_gb {training_args.gpu_memory_gb}); lower "
            "per_device_train_batch_size, use more GPUs or a higher ZeRO stage (run --dry_run true)."
        )
    training_args.gradient_checkpointing_layers = layers
    training_args.gradient_checkpointing = layers > 0
    return layers


LORA_BASE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}  # per frozen weight; NF4: 0.5


def lora_memory(config, num_params: int, model_args, memory: dict) -> dict:
    """The full-training estimate with LoRA's model states instead: the frozen base (NF4 about 0.5 bytes a weight
    with double quantization, else its dtype's bytes), no gradients or Adam states for it, and 16 bytes per
    adapter weight (fp32 weight, gradient, two Adam moments). Activations and the rest as for full training,
    which is what LoRA keeps too (unmeasured on a GPU so far; the full-training estimate is the tested one)."""
    from starcoder2_train.model.lora import lora_parameter_count

    trainable = lora_parameter_count(config, model_args.lora_r, model_args.lora_target_modules)
    rest = memory["total"] - memory["weights"] - memory["gradients"] - memory["optimizer_states"]
    base = 0.5 if model_args.load_in_4bit else LORA_BASE_BYTES[model_args.torch_dtype]
    weights, adapter_states = base * num_params / 1e9, 16 * trainable / 1e9
    return {
        "base_weights": weights,
        "adapter_states": adapter_states,
        "activations_and_rest": rest,
        "total": weights + adapter_states + rest,
        "lora": {"trainable": trainable},
    }


def print_dry_run(
    config, model_args, data_args, training_args, attn_implementation: str, bf16=None, fim_budget: int | None = None
) -> dict:
    """Print the model, tokens per optimizer step, the per-GPU memory estimate and, given the FIM generation budget
    (evaluation/fim.py's fim_generation_budget, which run.py passes), the evaluation's share of the training time
    (training/evaluation_cost.py); return them as a dict.
    `bf16`: the recipe's value where the parser had to drop it (a dry run on a machine without a GPU)."""
    with without_zero3_init():
        num_params = count_parameters(config)
    world_size = planned_world_size(training_args)
    step_tokens = tokens_per_step(training_args, data_args.seq_length) // training_args.world_size * world_size
    bf16 = training_args.bf16 if bf16 is None else bf16
    parallel = parallel_plan(training_args, model_args.torch_dtype, bf16)
    requested_layers = training_args.gradient_checkpointing_layers
    plan = memory_plan(config, model_args, data_args, training_args, bf16)
    try:
        layers = resolve_checkpointed_layers(config, model_args, data_args, training_args, num_params, plan)
    except RecipeError:  # auto and nothing fits: plan every layer checkpointed and say it does not fit
        layers = config.num_hidden_layers
    memory = estimate_memory_per_gpu(config, num_params, checkpointed_layers=layers, **plan)
    source = model_args.model_name_or_path or model_args.model_config
    print(f"dry run: {source}")
    print(f"parameters: {num_params:,}")
    print(f"attention: {attn_implementation} here; memory planned for {plan['attn_implementation']}")
    print(f"config: {json.dumps(config.to_dict(), sort_keys=True, default=str)}")
    print(
        f"tokens per optimizer step: {step_tokens:,} = seq_length {data_args.seq_length} x micro batch "
        f"{training_args.per_device_train_batch_size} x accumulation {training_args.gradient_accumulation_steps} "
        f"x {world_size} process(es)"
    )
    if training_args.max_steps > 0:
        print(f"tokens in {training_args.max_steps:,} steps: {step_tokens * training_args.max_steps:,}")
    auto = " (auto)" if requested_layers == "auto" else ""
    print(
        f"plan: {parallel['source']}; precision {plan['precision']}; loss {plan['loss_kernel']}; "
        f"checkpointed layers {layers} of {config.num_hidden_layers}{auto}"
    )
    sharding = "FSDP, fully sharded" if plan["precision"] == "fsdp_bf16" else f"ZeRO stage {plan['zero_stage']}"
    print(
        f"memory per GPU ({sharding}, {world_size} GPU(s)), GB: "
        + ", ".join(f"{key} {value:.2f}" for key, value in memory.items())
    )
    if model_args.use_lora:
        memory = lora_memory(config, num_params, model_args, memory)
        lora = memory.pop("lora")
        print(
            f"LoRA r {model_args.lora_r} on {', '.join(model_args.lora_target_modules)}: trainable "
            f"{lora['trainable']:,} of {num_params:,} ({lora['trainable'] / num_params:.2%}); base "
            f"{'NF4 (QLoRA)' if model_args.load_in_4bit else model_args.torch_dtype}, frozen"
        )
        print("memory per GPU with LoRA, GB: " + ", ".join(f"{key} {value:.2f}" for key, value in memory.items()))
    budget = training_args.gpu_memory_gb
    if memory["total"] <= budget:
        print(f"fits: peak {memory['total']:.1f} GB of gpu_memory_gb {budget:g}")
    else:
        advice = checkpointed_layers_to_fit(config, num_params, AUTO_MEMORY_SHARE * budget, **plan)
        hint = (
            f"gradient_checkpointing_layers: {advice} (or auto)"
            if advice is not None
            else "a smaller micro batch, more GPUs or a higher ZeRO stage"
        )
        print(f"does not fit: peak {memory['total']:.1f} GB > gpu_memory_gb {budget:g}; try {hint}")
    evaluation = {"share": None}
    if fim_budget is not None:
        evaluation = evaluation_cost(
            config, data_args, training_args, world_size=world_size, tokens_per_step=step_tokens, fim_budget=fim_budget
        )
        for line in evaluation["lines"]:
            print(line)
    return {
        "evaluation_share": evaluation["share"],
        "parameters": num_params,
        "tokens_per_step": step_tokens,
        "zero_stage": plan["zero_stage"],
        "checkpointed_layers": layers,
        "plan": plan,
        "memory_gb": memory,
    }
