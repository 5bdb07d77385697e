"""Pretrain, or continue pretraining, a StarCoder2 model from a YAML recipe.

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml \
        scripts/run_pretrain.py recipes/starcoder2-3b/pretrain.yaml --learning_rate 2e-4

Any recipe key can be overridden as `--key value`; `--dry_run true` checks the recipe and prints the
model size, tokens per step and a memory estimate without training. On one CPU:

    python scripts/run_pretrain.py recipes/tiny/pretrain.yaml
"""

import logging
import os
import sys

import datasets
import transformers
from transformers import Trainer, set_seed
from transformers.trainer_utils import get_last_checkpoint

from starcoder2_train.configs import RecipeParser
from starcoder2_train.data import build_packed_dataset, build_training_data
from starcoder2_train.dry_run import print_dry_run
from starcoder2_train.model_utils import build_config, choose_attention, create_model, validate_model_and_data
from starcoder2_train.packing import PackedCollator
from starcoder2_train.tokenizer_training import load_tokenizer

logger = logging.getLogger(__name__)


def main(argv=None):
    model_args, data_args, training_args = RecipeParser().parse(argv)

    # Logging: the main process at INFO, the others at WARNING.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)])
    level = training_args.get_process_log_level()
    for log in (logger, logging.getLogger("starcoder2_train"), datasets.utils.logging, transformers.utils.logging):
        log.setLevel(level) if isinstance(log, logging.Logger) else log.set_verbosity(level)

    # Tokenizer and model config first: a wrong recipe fails here, before any data or weights are touched.
    tokenizer_name = data_args.tokenizer_name_or_path or model_args.model_name_or_path
    tokenizer = load_tokenizer(tokenizer_name)
    config = build_config(model_args, len(tokenizer))
    validate_model_and_data(config, tokenizer, data_args.seq_length, from_scratch=model_args.model_name_or_path is None)
    attn_implementation = choose_attention(model_args.attn_implementation)
    if training_args.dry_run:
        print_dry_run(config, model_args, data_args, training_args, attn_implementation)
        return None

    # Checkpoint detection: resume from the last checkpoint in output_dir unless told otherwise.
    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.resume_from_checkpoint is None:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None:
            logger.info("resuming from %s", last_checkpoint)
    set_seed(training_args.seed)

    # Data: shards → examples → FIM → tokens → packed windows (cached by datasets).
    with training_args.main_process_first(desc="data preprocessing"):
        train_dataset, report = build_training_data(data_args, tokenizer, training_args)
        eval_dataset, _ = build_packed_dataset(data_args, tokenizer, training_args.seed, split="eval", shuffle=False)
    for line in report.summary_lines():
        logger.info("data: %s", line)

    # Model: from scratch (model_config) or from a checkpoint (model_name_or_path).
    model = create_model(model_args, config, tokenizer, attn_implementation)
    logger.info("model: %s parameters, attention %s", f"{model.num_parameters():,}", attn_implementation)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PackedCollator(flatten=attn_implementation == "flash_attention_2"),
        processing_class=tokenizer,
    )

    # Train.
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint)
    metrics = result.metrics
    metrics["train_tokens"] = report.tokens
    metrics["packing_efficiency"] = report.packing_efficiency
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    # Save: a plain Hugging Face model directory (weights gathered to 16 bits under ZeRO-3).
    trainer.model.config.use_cache = True
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        logger.info("saved the model and tokenizer to %s", training_args.output_dir)

    # Evaluate.
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    return trainer


if __name__ == "__main__":
    main()
