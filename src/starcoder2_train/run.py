"""One training run from parsed recipe arguments: the whole of `scripts/run_pretrain.py`, callable in-process.

`run_training(model_args, data_args, training_args, recipe_values)` is what the script runs and what a notebook
runs (starcoder2_train.api): tokenizer and config first (a wrong recipe fails before any data or weights
are touched), the dry run, resume resolution, data, model (with LoRA or QLoRA when the recipe says so), the
trainer with its callbacks, training, then the final model, evaluation, model card and upload. The steps are
functions of their own so that the notebook API can show what is between them (the packed samples).

A LoRA run (`use_lora: true`) saves the adapter, tokenizer and card in OUTPUT_DIR/adapter (ADAPTER_DIR), which
`scripts/merge_adapter.py` (model/lora.py) merges into a plain model; checkpoints hold the adapter's weights and
optimizer state only.
"""

import dataclasses
import logging
import os
import shutil
import sys

import datasets
import torch
import transformers
from transformers import set_seed

from starcoder2_train.configs import RecipeError, tokens_per_step
from starcoder2_train.data.batches.collators import make_collator
from starcoder2_train.data.pipeline import (
    build_packed_dataset,
    build_training_data,
    evaluation_data_args,
    load_split,
)
from starcoder2_train.data.store.manifest import check_prepared_sources
from starcoder2_train.data.store.prepared import load_held_out_repositories
from starcoder2_train.data.tokens.tokenizer import load_tokenizer
from starcoder2_train.evaluation import held_out
from starcoder2_train.evaluation.callback import EvaluationCallback
from starcoder2_train.evaluation.fim import fim_generation_budget
from starcoder2_train.hub.callback import ModelCardCallback
from starcoder2_train.hub.model_card import write_model_card
from starcoder2_train.hub.upload import push_to_hub
from starcoder2_train.model.factory import choose_attention, create_model, validate_model_and_data, verify_attention
from starcoder2_train.model.flash import activate_flash_impl
from starcoder2_train.model.lora import apply_lora, check_targets_for_config, load_quantized_base, parameter_summary
from starcoder2_train.model.presets import build_config
from starcoder2_train.training.checkpoints import resolve_resume, run_recipe
from starcoder2_train.training.data_position import data_arguments_for_skips
from starcoder2_train.training.distributed import close_process_group
from starcoder2_train.training.dry_run import print_dry_run, resolve_checkpointed_layers
from starcoder2_train.training.loss_curve import LOSS_CURVE, LossCurveCallback
from starcoder2_train.training.preemption import PreemptionCallback
from starcoder2_train.training.spikes import SpikeMonitor
from starcoder2_train.training.trainer import PretrainingTrainer

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # OUTPUT_DIR/adapter: a LoRA run's final adapter, tokenizer and card


@dataclasses.dataclass
class RunData:
    """The data of a run: packed training windows and their report, the held-out windows (the Trainer's
    eval_loss) and the held-out files of the evaluation tasks."""

    train_dataset: object
    report: object
    eval_dataset: object
    loss_rows: list
    fim_problems: list


def configure_logging(training_args) -> None:
    """The main process at the recipe's log level (INFO by default), the others at WARNING, to stdout."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler(sys.stdout)]
        )
    level = training_args.get_process_log_level()
    # transformers' default log_level, passive, leaves its own verbosity (WARNING), which hid this project's INFO
    # lines (the data report, what was skipped and why); the main process logs them unless the recipe says otherwise.
    own = logging.INFO if training_args.log_level == "passive" and training_args.should_log else level
    for log in (logger, logging.getLogger("starcoder2_train")):
        log.setLevel(own)
    for log in (datasets.utils.logging, transformers.utils.logging):
        log.set_verbosity(level)


def build_data(data_args, tokenizer, training_args) -> RunData:
    """Shards → examples → FIM → tokens → packed windows (cached by datasets), or a prepared store opened; the
    held-out repositories are read once, for the Trainer's eval_loss and the evaluation tasks."""
    with training_args.main_process_first(desc="data preprocessing"):
        # skipped windows (spike rollback) are passed over: the data is built for max_steps plus them
        train_dataset, report = build_training_data(data_args, tokenizer, data_arguments_for_skips(training_args))
        eval_args = evaluation_data_args(data_args)  # a mixture: its first repository source's held-out split
        if eval_args.prepared_data_dir is None:
            split = load_split(eval_args, "eval")
            held_out_repositories = split[0]
        else:
            split, held_out_repositories = None, load_held_out_repositories(eval_args.prepared_data_dir)
        eval_dataset, _ = build_packed_dataset(
            eval_args, tokenizer, training_args.seed, split="eval", shuffle=False, repositories=split, report=False
        )
        eval_dataset = held_out.drawn_windows(eval_dataset, training_args.eval_loss_windows, training_args.seed)
        loss_rows, fim_problems = held_out.recipe_task_inputs(  # built by one process a machine, memory-mapped
            held_out_repositories,
            tokenizer,
            training_args,
            training_args.eval_tasks,
            seed=training_args.seed,
            fim_lines_per_file=training_args.fim_eval_lines_per_file,
        )
    for line in report.summary_lines():
        logger.info("data: %s", line)
    return RunData(train_dataset, report, eval_dataset, loss_rows, fim_problems)


def build_model(model_args, config, tokenizer, attn_implementation: str, training_args):
    """From scratch (model_config) or a checkpoint (model_name_or_path); QLoRA's 4-bit base (load_in_4bit);
    LoRA adapters on lora_target_modules (use_lora). Kernels are routed and checked where they will run."""
    if model_args.load_in_4bit:
        model = load_quantized_base(model_args, tokenizer, attn_implementation)
    else:
        model = create_model(model_args, config, tokenizer, attn_implementation)
        if training_args.device.type == "cuda":  # built on the CPU; route and check the kernels on the GPU
            activate_flash_impl(model_args.flash_attention_impl, config.attention_dropout, device=training_args.device)
            dtype = torch.bfloat16 if training_args.bf16 else model.dtype
            verify_attention(attn_implementation, model.config, training_args.device, dtype)
    logger.info("model: %s parameters, attention %s", f"{model.num_parameters():,}", attn_implementation)
    if model_args.use_lora:
        model = apply_lora(
            model,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
            quantized=model_args.load_in_4bit,
        )
        logger.info("LoRA on %s: %s", ", ".join(model_args.lora_target_modules), parameter_summary(model))
    return model


def build_trainer(
    model, tokenizer, data: RunData, attn_implementation: str, data_args, training_args, recipe: dict, recipe_values
):
    """PretrainingTrainer (tokens/s, MFU, memory, data wait; the fast-path keys) with the evaluation tasks and the
    model card (and the uploads during training) as callbacks. Returns (trainer, evaluation callback or None,
    whether the final model is to be pushed)."""
    push, training_args.push_to_hub = training_args.push_to_hub, False  # the Hub upload is ours (card, dry run)
    if data.eval_dataset is None and training_args.eval_strategy != "no":
        # A few repositories at eval_fraction 0.05 often hold none out: transformers would refuse the run at its
        # start ("you didn't pass an eval_dataset"), after the data was built. Training goes on, and says so.
        logger.warning(
            "no held-out windows (eval_fraction %s held out no repository of this data): eval_strategy %s -> no; "
            "raise eval_fraction or add repositories to evaluate during training",
            data_args.eval_fraction, training_args.eval_strategy.value,
        )  # fmt: skip
        training_args.eval_strategy, training_args.do_eval = transformers.IntervalStrategy.NO, False
    collator = make_collator(attn_implementation)
    trainer = PretrainingTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        run_recipe=recipe,
    )
    evaluation = None
    if data.loss_rows or data.fim_problems:
        evaluation = EvaluationCallback(
            trainer,
            tokenizer,
            loss_dataset=data.loss_rows,
            fim_problems=data.fim_problems,
            seq_length=data_args.seq_length,
            max_new_tokens=fim_generation_budget(data_args.seq_length),
            fim_mode=training_args.fim_eval_mode,
        )
        trainer.add_callback(evaluation)
    elif training_args.eval_tasks and data_args.prepared_data_dir is not None:
        logger.warning(  # prepared by an older prepare_data.py, which did not keep the held-out repositories
            "eval_tasks %s need the held-out files, which prepared data does not keep: only the "
            "Trainer's eval_loss runs; score the model with scripts/evaluate.py --recipe.",
            training_args.eval_tasks,
        )
    trainer.add_callback(
        ModelCardCallback(
            recipe_values,
            tokens_per_step=tokens_per_step(training_args, data_args.seq_length),
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
    source = recipe_values.get("model_name_or_path") or recipe_values.get("model_config") or ""
    trainer.add_callback(LossCurveCallback(tokens_per_step(training_args, data_args.seq_length), title=str(source)))
    return trainer, evaluation, push


def final_model_dir(model_args, training_args) -> str:
    """Where the final model goes: OUTPUT_DIR, or OUTPUT_DIR/adapter for a LoRA run."""
    output_dir = training_args.output_dir
    return os.path.join(output_dir, ADAPTER_DIR) if model_args.use_lora else output_dir


def save_final_model(trainer, tokenizer, model_args, training_args) -> str:
    """The trainer state, then the final model (weights gathered to 16 bits under ZeRO-3; the adapter alone for
    LoRA) with use_cache on for generation, and the tokenizer, in final_model_dir; returns that folder. Pretraining
    and SFT (sft.py) end with it."""
    trainer.save_state()
    model_dir = final_model_dir(model_args, training_args)
    trainer.model.config.use_cache = True
    if trainer.is_fsdp_enabled:  # FSDP saves sharded state during training; the final model is one file
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(model_dir)
    trainer.model.config.use_cache = False  # packed evaluation needs it off (data/windows/packing.py)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(model_dir)
        logger.info("saved the %s and tokenizer to %s", "adapter" if model_args.use_lora else "model", model_dir)
    return model_dir


def save_evaluate_publish(trainer, tokenizer, data: RunData, evaluation, model_args, data_args, training_args,
                          recipe_values: dict, push: bool) -> str:  # fmt: skip
    """The final model (save_final_model), the Trainer's eval_loss and the evaluation tasks, the model card and
    the upload. Returns the model's folder."""
    model_dir = save_final_model(trainer, tokenizer, model_args, training_args)
    if data.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    if trainer.is_world_process_zero():
        curve = os.path.join(training_args.output_dir, LOSS_CURVE)
        if model_dir != training_args.output_dir and os.path.exists(curve):  # LoRA: the card is the adapter's
            shutil.copyfile(curve, os.path.join(model_dir, LOSS_CURVE))
        write_model_card(
            model_dir,
            recipe_values,
            tokens_seen=trainer.state.global_step * tokens_per_step(training_args, data_args.seq_length),
            eval_results=evaluation.latest_results if evaluation else None,
            hub_model_id=training_args.hub_model_id,
        )
        if push:
            push_to_hub(
                model_dir,
                training_args.hub_model_id,
                private=bool(training_args.hub_private_repo),
                revision=training_args.hub_revision,
                dry_run_dir=training_args.hub_dry_run_dir,
            )
    return model_dir


def run_training(model_args, data_args, training_args, recipe_values: dict, *, dry_run_bf16=None, cpu_fallback=None):
    """Train as the recipe says; returns the trainer (None after a dry run). On SIGTERM/SIGUSR1: a complete
    checkpoint, then exit 75 for the requeue (training/preemption.py); on a spike (spike_detection), exit 76 for a
    rollback (training/spikes.py). `cpu_fallback`: what the parser changed for
    a machine without CUDA (RecipeParser.cpu_fallback, training/cpu_fallback.py), logged here in one line."""
    configure_logging(training_args)
    if cpu_fallback is not None:
        cpu_fallback.check()  # a GPU-only value asked for on a machine without CUDA: refused before any work
        if training_args.should_log:
            cpu_fallback.log(logger)
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise RecipeError("hub_model_id: push_to_hub needs the repository to push to (user-or-org/model-name).")
    tokenizer = load_tokenizer(data_args.tokenizer_name_or_path)
    config = build_config(model_args, len(tokenizer))
    validate_model_and_data(
        config, tokenizer, data_args.seq_length, from_scratch=model_args.model_name_or_path is None
    )
    if model_args.use_lora:
        check_targets_for_config(config, model_args.lora_target_modules)
    attn_implementation = choose_attention(model_args.attn_implementation)
    if training_args.dry_run:
        budget = fim_generation_budget(data_args.seq_length)  # the evaluation's share of training time, printed
        print_dry_run(config, model_args, data_args, training_args, attn_implementation, dry_run_bf16, budget)
        return None
    # A prepared store whose manifest differs from the recipe (tokenizer, a data key): refused before anything is
    # written to output_dir (data/store/manifest.py).
    check_prepared_sources(data_args, tokenizer)
    layers = resolve_checkpointed_layers(config, model_args, data_args, training_args)
    if training_args.gradient_checkpointing:
        logger.info("activation checkpointing: %d of %d decoder layers", layers, config.num_hidden_layers)
    # Resume: resume_from_checkpoint, else the newest complete checkpoint in output_dir; another recipe's run or
    # checkpoint is refused (training/checkpoints.py).
    recipe = run_recipe(model_args, data_args, training_args, recipe_values)
    resume = resolve_resume(training_args, recipe)
    preemption = PreemptionCallback().install()
    try:
        set_seed(training_args.seed)
        data = build_data(data_args, tokenizer, training_args)
        model = build_model(model_args, config, tokenizer, attn_implementation, training_args)
        trainer, evaluation, push = build_trainer(
            model, tokenizer, data, attn_implementation, data_args, training_args, recipe, recipe_values
        )
        trainer.add_callback(preemption)
        spikes = SpikeMonitor.attach(trainer)  # spike_detection: added last, its veto of a save comes last
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        preemption.uninstall()
    if spikes is not None and spikes.spike is not None:  # before any save: back to the newest complete checkpoint
        spikes.exit_for_rollback(trainer, close_process_group)
    if preemption.requested:  # a complete checkpoint at the step every rank stopped at: exit for the requeue
        preemption.exit_for_requeue(trainer, close_process_group)
    metrics = dict(result.metrics, train_tokens=data.report.tokens, packing_efficiency=data.report.packing_efficiency)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    save_evaluate_publish(
        trainer, tokenizer, data, evaluation, model_args, data_args, training_args, recipe_values, push
    )
    close_process_group(exit_code=0)  # a multi-process run ends here (training/distributed.py says why)
    return trainer
