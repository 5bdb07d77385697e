"""Pretrain, or continue pretraining, a StarCoder2 model from a YAML recipe.

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml \
        scripts/run_pretrain.py recipes/starcoder2-3b/pretrain.yaml --learning_rate 2e-4

Any recipe key can be overridden as `--key value`; `--dry_run true` checks the recipe and prints the
model size, tokens per step and a memory estimate without training. On one CPU:

    python scripts/run_pretrain.py recipes/tiny/pretrain.yaml
"""

from starcoder2_train.cli import recipe_words, run_script


def main(argv=None):
    """Parse the recipe and its overrides, then run it (starcoder2_train.run); returns the trainer."""
    words = recipe_words(__doc__, argv)  # checked before transformers is imported
    from starcoder2_train.recipe import RecipeParser
    from starcoder2_train.run import run_training
    from starcoder2_train.training.distributed import match_process_group

    parser = RecipeParser()
    model_args, data_args, training_args = parser.parse(words)
    training_args = match_process_group(training_args)  # DeepSpeed on CPUs: see training/distributed.py
    return run_training(
        model_args, data_args, training_args, parser.recipe_values,
        dry_run_bf16=parser.dry_run_bf16, cpu_fallback=parser.cpu_fallback,
    )  # fmt: skip


if __name__ == "__main__":
    run_script(main)  # a bad recipe, input or path: one `error:` line, no traceback (starcoder2_train.cli)
