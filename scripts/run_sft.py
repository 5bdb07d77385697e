"""Instruction fine-tuning (SFT) of a StarCoder2 checkpoint with LoRA through TRL's SFTTrainer, from a YAML recipe.

    accelerate launch --config_file accelerate_configs/ddp.yaml \
        scripts/run_sft.py recipes/starcoder2-3b/sft_lora.yaml --dataset_name_or_path data/sft.jsonl

Any recipe key can be overridden as `--key value`. On one GPU or the CPU:

    python scripts/run_sft.py recipes/starcoder2-3b/sft_lora.yaml --learning_rate 1e-4

The adapter, the tokenizer and its chat template go to OUTPUT_DIR/adapter; scripts/merge_adapter.py merges them
into a plain model. What the data, chat template, loss mask and packing do: src/starcoder2_train/sft.py.
"""

from starcoder2_train.cli import recipe_words, run_script


def main(argv=None):
    words = recipe_words(__doc__, argv)  # checked before transformers is imported
    from starcoder2_train.sft import run_sft

    return run_sft(words)


if __name__ == "__main__":
    run_script(main)  # a bad recipe, row, template or path: one `error:` line, no traceback (starcoder2_train.cli)
