"""The facts every stage shares, each defined once: RecipeError, the attention and dtype names, the evaluation
task names, the Hub-id pattern, the eval-fraction and shard checks, windows and tokens per optimizer step.

The standard library only at import time (huggingface_hub inside `hub_hint`, torch inside `torch_dtype`); the
modules of the three argument dataclasses import from here, and this module imports none of them.
"""

import os
import re

# Attention kernels a recipe may name. sdpa_varlen and sdpa_blocked are this project's (model/attention.py).
FLASH_ATTENTION_2 = "flash_attention_2"
SDPA_VARLEN = "sdpa_varlen"
SDPA_BLOCKED = "sdpa_blocked"
ATTENTION_CHOICES = ("auto", FLASH_ATTENTION_2, "sdpa", "eager", "flex_attention", SDPA_VARLEN, SDPA_BLOCKED)
# dtypes a recipe may give for the weights (`torch_dtype`); "auto": a checkpoint's own dtype.
TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")
# Evaluation tasks (evaluation/): all of them run in scripts/evaluate.py; the cheap ones also during training.
EVAL_TASKS = ("loss", "fim", "humaneval")
TRAINING_EVAL_TASKS = ("loss", "fim")
# A Hub repository id: owner/name (a dataset, model or tokenizer).
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class RecipeError(ValueError):
    """A recipe key has a wrong or inconsistent value; the message names the key."""


def is_hub_id(name: str | None) -> bool:
    """True for an `owner/name` that is not a path on this machine (a local path always wins)."""
    return bool(name) and not os.path.exists(name) and HUB_ID.fullmatch(name) is not None


def hub_hint(name: str) -> str:
    """What to do when `name`, a path or Hub id, could not be loaded: offline, only the cache is looked at."""
    from huggingface_hub import constants

    if os.path.exists(name):
        return f"{name} exists on this machine but does not hold what is needed; check what is in it"
    if not is_hub_id(name):
        return f"{name} is neither an existing local path nor a Hub id (owner/name); check it"
    if constants.HF_HUB_OFFLINE:
        return (
            f"HF_HUB_OFFLINE is set, so the Hub id {name} was looked up in the local cache only and is not there: "
            "unset HF_HUB_OFFLINE to download it, or give a local directory"
        )
    return (
        f"check that the Hub id {name} exists (https://huggingface.co/{name}), and for a private or gated "
        "repository that HF_TOKEN grants access to it"
    )


def torch_dtype(name: str):
    """A `torch_dtype` value as transformers takes it: "auto", or the torch.dtype of that name."""
    if name not in TORCH_DTYPES:
        raise RecipeError(f"torch_dtype: {name!r} is not one of {', '.join(TORCH_DTYPES)}.")
    if name == "auto":
        return name
    import torch

    return getattr(torch, name)


def check_eval_fraction(value: float) -> None:
    """eval_fraction: a share of repositories in [0, 1); 1 would leave nothing to train on."""
    if not 0.0 <= value < 1.0:
        raise RecipeError(
            f"eval_fraction: must be in [0, 1) so that some repositories remain for training, got {value}."
        )


def check_shard(num_shards: int, shard_index: int) -> None:
    """num_shards / shard_index: this machine's part of the preprocessing."""
    if num_shards < 1:
        raise RecipeError(f"num_shards: must be at least 1, got {num_shards}.")
    if not 0 <= shard_index < num_shards:
        raise RecipeError(f"shard_index: must be in [0, num_shards={num_shards}), got {shard_index}.")


def windows_per_step(training_args) -> int:
    """Packed windows consumed by one optimizer step across all processes."""
    return (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
    )


def tokens_per_step(training_args, seq_length: int) -> int:
    """Tokens (padding included) in one optimizer step across all processes: windows × seq_length."""
    return windows_per_step(training_args) * seq_length
