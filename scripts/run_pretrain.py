"""Pretrain, or continue pretraining, a StarCoder2 model from a YAML recipe.

    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml \
        scripts/run_pretrain.py recipes/starcoder2-3b/pretrain.yaml --learning_rate 2e-4

Any recipe key can be overridden as `--key value`; `--dry_run true` checks the recipe and prints the
model size, tokens per step and a memory estimate without training. On one CPU:

    python scripts/run_pretrain.py recipes/tiny/pretrain.yaml
"""

import logging
import sys

import datasets
import torch
import transformers
from transformers import set_seed

from starcoder2_train.configs import RecipeError, tokens_per_step
from starcoder2_train.data.collators import make_collator
from starcoder2_train.data.pipeline import build_packed_dataset, build_training_data
from starcoder2_train.data.prepared import load_held_out_repositories
from starcoder2_train.data.splits import load_split_repositories
from starcoder2_train.data.tokenizer import load_tokenizer
from starcoder2_train.evaluation import held_out
from starcoder2_train.evaluation.callback import EvaluationCallback
from starcoder2_train.evaluation.fim import fim_generation_budget
from starcoder2_train.hub.callback import ModelCardCallback
from starcoder2_train.hub.model_card import write_model_card
from starcoder2_train.hub.upload import push_to_hub
from starcoder2_train.model.factory import choose_attention, create_model, validate_model_and_data, verify_attention
from starcoder2_train.model.flash import activate_flash_impl
from starcoder2_train.model.presets import build_config
from starcoder2_train.recipe import RecipeParser
from starcoder2_train.training.checkpoints import resolve_resume, run_recipe
from starcoder2_train.training.distributed import close_process_group, match_process_group
from starcoder2_train.training.dry_run import print_dry_run, resolve_checkpointed_layers
from starcoder2_train.training.preemption import PreemptionCallback
from starcoder2_train.training.trainer import PretrainingTrainer

logger = logging.getLogger(__name__)


def main(argv=None):
    parser = RecipeParser()
    model_args, data_args, training_args = parser.parse(argv)
    training_args = match_process_group(training_args)  # DeepSpeed on CPUs: see training/distributed.py

    # Logging: the main process at INFO, the others at WARNING.
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)]
    )
    level = training_args.get_process_log_level()
    for log in (logger, logging.getLogger("starcoder2_train"), datasets.utils.logging, transformers.utils.logging):
        log.setLevel(level) if isinstance(log, logging.Logger) else log.set_verbosity(level)

    if training_args.push_to_hub and not training_args.hub_model_id:
        raise RecipeError("hub_model_id: push_to_hub needs the repository to push to (user-or-org/model-name).")

    # Tokenizer and model config first: a wrong recipe fails here, before any data or weights are touched.
    tokenizer = load_tokenizer(data_args.tokenizer_name_or_path)
    config = build_config(model_args, len(tokenizer))
    validate_model_and_data(
        config, tokenizer, data_args.seq_length, from_scratch=model_args.model_name_or_path is None
    )
    attn_implementation = choose_attention(model_args.attn_implementation)
    if training_args.dry_run:
        print_dry_run(config, model_args, data_args, training_args, attn_implementation, bf16=parser.dry_run_bf16)
        return None
    # gradient_checkpointing_layers: auto → the fewest layers the memory estimate allows on these GPUs.
    layers = resolve_checkpointed_layers(config, model_args, data_args, training_args)
    if training_args.gradient_checkpointing:
        logger.info("activation checkpointing: %d of %d decoder layers", layers, config.num_hidden_layers)

    # Resume: resume_from_checkpoint, else the newest complete checkpoint in output_dir; another recipe's run or
    # checkpoint is refused (training/checkpoints.py). SIGTERM/SIGUSR1 from here on: a checkpoint, then exit 75.
    recipe = run_recipe(model_args, data_args, training_args, parser.recipe_values)
    resume = resolve_resume(training_args, recipe)
    preemption = PreemptionCallback().install()
    set_seed(training_args.seed)

    # Data: shards → examples → FIM → tokens → packed windows (cached by datasets), or a prepared store opened.
    with training_args.main_process_first(desc="data preprocessing"):
        train_dataset, report = build_training_data(data_args, tokenizer, training_args)
        # The held-out repositories are read once: packed windows for the Trainer's eval_loss, and their files
        # for the evaluation tasks, built as scripts/evaluate.py builds them (evaluation/held_out.py).
        if data_args.prepared_data_dir is None:
            split = load_split_repositories(data_args, "eval")
            held_out_repositories = split[0]
        else:
            split, held_out_repositories = None, load_held_out_repositories(data_args.prepared_data_dir)
        eval_dataset, _ = build_packed_dataset(
            data_args, tokenizer, training_args.seed, split="eval", shuffle=False, repositories=split, report=False
        )
        loss_rows, fim_problems = held_out.task_inputs(
            held_out_repositories,
            tokenizer,
            training_args.eval_tasks,
            seed=training_args.seed,
            max_fim_problems=training_args.fim_eval_problems,
        )
    for line in report.summary_lines():
        logger.info("data: %s", line)

    # Model: from scratch (model_config) or from a checkpoint (model_name_or_path).
    model = create_model(model_args, config, tokenizer, attn_implementation)
    if training_args.device.type == "cuda":  # built on the CPU; route and check the kernels where they will run
        activate_flash_impl(model_args.flash_attention_impl, config.attention_dropout, device=training_args.device)
        dtype = torch.bfloat16 if training_args.bf16 else model.dtype
        verify_attention(attn_implementation, model.config, training_args.device, dtype)
    logger.info("model: %s parameters, attention %s", f"{model.num_parameters():,}", attn_implementation)

    # The Hub upload is ours (model card, dry run), not the Trainer's.
    push, training_args.push_to_hub = training_args.push_to_hub, False
    # PretrainingTrainer: the Trainer plus tokens/s, MFU, peak memory and data wait on every log line, and the
    # fast-path keys (loss_chunk_size, gradient_checkpointing_layers, compile_layers).
    collator = make_collator(attn_implementation)
    trainer = PretrainingTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        run_recipe=recipe,
    )
    trainer.add_callback(preemption)
    evaluation = None
    if loss_rows or fim_problems:
        evaluation = EvaluationCallback(
            trainer,
            tokenizer,
            loss_dataset=loss_rows,
            fim_problems=fim_problems,
            seq_length=data_args.seq_length,
            max_new_tokens=fim_generation_budget(data_args.seq_length),
        )
        trainer.add_callback(evaluation)
    elif training_args.eval_tasks and data_args.prepared_data_dir is not None:
        logger.warning(  # prepared by an older prepare_data.py, which did not keep the held-out repositories
            "eval_tasks %s need the held-out files, which prepared data does not keep: only the "
            "Trainer's eval_loss runs; score the model with scripts/evaluate.py --recipe.",
            training_args.eval_tasks,
        )
    step_tokens = tokens_per_step(training_args, data_args.seq_length)
    trainer.add_callback(
        ModelCardCallback(
            parser.recipe_values,
            tokens_per_step=step_tokens,
            evaluation=evaluation,
            hub_model_id=training_args.hub_model_id,
            private=bool(training_args.hub_private_repo),
            hub_strategy=training_args.hub_strategy if push else "end",
            hub_revision=training_args.hub_revision,
            hub_token=training_args.hub_token,
            # uploads during training, offline: a mirror of the repository beside the final dry run's folder
            dry_run_dir=f"{training_args.hub_dry_run_dir.rstrip('/')}.during-training"
            if training_args.hub_dry_run_dir
            else None,
        )
    )

    # Train.
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        preemption.uninstall()
    if preemption.requested:  # a complete checkpoint at the step every rank stopped at: exit for the requeue
        preemption.exit_for_requeue(trainer, close_process_group)
    metrics = result.metrics
    metrics["train_tokens"] = report.tokens
    metrics["packing_efficiency"] = report.packing_efficiency
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    # Save: a plain Hugging Face model directory (weights gathered to 16 bits under ZeRO-3), saved with
    # use_cache on for generation.
    trainer.model.config.use_cache = True
    if trainer.is_fsdp_enabled:  # FSDP saves sharded state during training; the final model is one file
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(training_args.output_dir)
    trainer.model.config.use_cache = False  # packed evaluation needs it off (data/packing.py)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        logger.info("saved the model and tokenizer to %s", training_args.output_dir)

    # Evaluate: the Trainer's loss, plus loss per language and FIM exact match on held-out repositories.
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)

    # Model card, then the upload (or, with hub_dry_run_dir, the folder that would be uploaded).
    if trainer.is_world_process_zero():
        write_model_card(
            training_args.output_dir,
            parser.recipe_values,
            tokens_seen=trainer.state.global_step * step_tokens,
            eval_results=evaluation.latest_results if evaluation else None,
            hub_model_id=training_args.hub_model_id,
        )
        if push:
            push_to_hub(
                training_args.output_dir,
                training_args.hub_model_id,
                private=bool(training_args.hub_private_repo),
                revision=training_args.hub_revision,
                dry_run_dir=training_args.hub_dry_run_dir,
            )
    close_process_group()
    return trainer


if __name__ == "__main__":
    try:
        main()
    except RecipeError as error:  # a bad recipe, input or path: its message says what to do; no traceback
        sys.exit(f"error: {error}")
