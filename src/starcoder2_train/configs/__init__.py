"""What a recipe may say: the model, data and training dataclasses, and the facts every stage shares.

A recipe is a flat YAML mapping. Every key belongs to exactly one of `ModelArguments`,
`DataArguments` or `PretrainingArguments` (transformers' `TrainingArguments` plus a few keys of
this project); each key's help says what it does and its unit, and `__post_init__` refuses a bad value
with a RecipeError naming the key. recipe.py reads a recipe file into them.

Where each kind of key lives, one module per thing the keys configure, each with the values its keys may take:
- `model_arguments.py`: `ModelArguments`, the model (checkpoint or preset, dtype, attention kernel, overrides,
  LoRA/QLoRA); `FLASH_IMPLS`, `LORA_TARGET_MODULES`;
- `data_arguments.py`: `DataArguments`, the data (sources and filters, tokenizer, packing, FIM, shards, opt-outs,
  decontamination, PII, near-deduplication); `FIM_LEVELS`, `DECONTAMINATION_BENCHMARKS`, `BENCHMARKS_AS_FILES`;
- `training_arguments.py`: `PretrainingArguments`, the training (transformers' keys and this project's:
  evaluation, dry run, loss kernel, float8, checkpointing, Muon); `LOSS_KERNELS`, `FIM_EVAL_MODES`;
- `shared.py`: the facts every stage shares, defined there once and imported everywhere: `RecipeError`, the
  attention names, the dtypes, the evaluation task names, the Hub-id pattern, the eval-fraction and shard checks,
  windows and tokens per optimizer step. It imports none of the three others.

Every public name is re-exported here: import from `starcoder2_train.configs`, not from its modules.
"""

from starcoder2_train.configs.data_arguments import (
    BENCHMARKS_AS_FILES,
    DECONTAMINATION_BENCHMARKS,
    FIM_LEVELS,
    DataArguments,
)
from starcoder2_train.configs.model_arguments import FLASH_IMPLS, LORA_TARGET_MODULES, ModelArguments
from starcoder2_train.configs.shared import (
    ATTENTION_CHOICES,
    EVAL_TASKS,
    FLASH_ATTENTION_2,
    HUB_ID,
    SDPA_BLOCKED,
    SDPA_VARLEN,
    TORCH_DTYPES,
    TRAINING_EVAL_TASKS,
    RecipeError,
    check_eval_fraction,
    check_shard,
    hub_hint,
    is_hub_id,
    tokens_per_step,
    torch_dtype,
    windows_per_step,
)
from starcoder2_train.configs.training_arguments import FIM_EVAL_MODES, LOSS_KERNELS, PretrainingArguments

__all__ = [
    "ATTENTION_CHOICES",
    "BENCHMARKS_AS_FILES",
    "DECONTAMINATION_BENCHMARKS",
    "EVAL_TASKS",
    "FIM_EVAL_MODES",
    "FIM_LEVELS",
    "FLASH_ATTENTION_2",
    "FLASH_IMPLS",
    "HUB_ID",
    "LORA_TARGET_MODULES",
    "LOSS_KERNELS",
    "SDPA_BLOCKED",
    "SDPA_VARLEN",
    "TORCH_DTYPES",
    "TRAINING_EVAL_TASKS",
    "DataArguments",
    "ModelArguments",
    "PretrainingArguments",
    "RecipeError",
    "check_eval_fraction",
    "check_shard",
    "hub_hint",
    "is_hub_id",
    "tokens_per_step",
    "torch_dtype",
    "windows_per_step",
]
