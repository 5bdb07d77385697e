"""Instruction fine-tuning (SFT) of a StarCoder2 checkpoint with LoRA through TRL's SFTTrainer, from a YAML recipe.

    accelerate launch --config_file accelerate_configs/ddp.yaml \
        scripts/run_sft.py recipes/starcoder2-3b/sft_lora.yaml --dataset_name_or_path data/sft.jsonl

Any recipe key can be overridden as `--key value`. On one GPU or the CPU:

    python scripts/run_sft.py recipes/starcoder2-3b/sft_lora.yaml --learning_rate 1e-4

The adapter, the tokenizer and its chat template go to OUTPUT_DIR/adapter; scripts/merge_adapter.py merges them
into a plain model. What the data, chat template, loss mask and packing do: src/starcoder2_train/sft.py.
"""

import sys

from starcoder2_train.configs import RecipeError
from starcoder2_train.sft import run_sft

if __name__ == "__main__":
    try:
        run_sft()
    except RecipeError as error:  # a bad recipe, row, template or path: its message says what to do; no traceback
        sys.exit(f"error: {error}")
