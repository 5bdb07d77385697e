"""A child of benchmark.py: one path (ours, plain, flattening, a variant of ours) and one repeat, the profile
pass, or the GEMM benchmark, in this process; `measure_one` returns the JSON the child writes.

It parses the recipe and its overrides (a `--model_config` given on the command line trains that architecture
from scratch), loads the documents, applies `--config key=value` to the model config, builds its path
(paths.py), trains it (steps.py) and adds the FLOP figures (hardware_flops.py) to the ThroughputCallback's.
"""

import json
import shutil
import tempfile

import torch

from starcoder2_train.benchmarking.aggregate import BEST_BY
from starcoder2_train.benchmarking.documents import describe, first_documents, load_documents, save_token_file
from starcoder2_train.benchmarking.gemm import gemm_benchmark
from starcoder2_train.benchmarking.hardware_flops import (
    checkpointed_layers,
    loss_recomputes_logits,
    throughput_figures,
)
from starcoder2_train.benchmarking.paths import flattening_path, ours_path, plain_path
from starcoder2_train.benchmarking.steps import Timing, run_path
from starcoder2_train.model.factory import choose_attention
from starcoder2_train.model.flops import peak_flops_for_device
from starcoder2_train.model.presets import build_config
from starcoder2_train.recipe import RecipeParser, parse_overrides
from starcoder2_train.training.dry_run import resolve_checkpointed_layers
from starcoder2_train.training.loss import resolve_loss_kernel

MAX_STEPS = 1_000_000  # never reached: TimedSteps stops training
FORCED = {
    "max_steps": MAX_STEPS,
    "logging_steps": MAX_STEPS,  # TimedSteps asks for the one log it needs
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "push_to_hub": "false",
    "disable_tqdm": "true",
}


class BenchmarkRecipeParser(RecipeParser):
    """A `--model_config` given on the command line trains that architecture from scratch, whatever
    model_name_or_path the recipe names (long_context.yaml starts from a checkpoint a benchmark lacks)."""

    def load(self, recipe_path, override_words):
        values = super().load(recipe_path, override_words)
        if "model_config" in parse_overrides(override_words):
            values.pop("model_name_or_path", None)
        return values


def parse_recipe(recipe: str | None, recipe_words: list[str], output_dir: str):
    forced = [word for key, value in {"output_dir": output_dir, **FORCED}.items() for word in (f"--{key}", str(value))]
    words = [recipe] if recipe else ["--dataset_name_or_path", "(benchmark data)"]
    return BenchmarkRecipeParser().parse([*words, *recipe_words, *forced])


def config_value(text: str):
    """A `--config key=value` value: a number, true/false/null, JSON, else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def build_model_config(model_args, vocab_needed: int, items: list[str]):
    config = build_config(model_args, vocab_needed)
    for item in items:
        key, _, value = item.partition("=")
        setattr(config, key, config_value(value))
    return config


def measure_one(args, recipe_words: list[str]) -> dict:
    """The child: one path (or `gemm`), one repeat; its JSON {"path", "repeat", "context", "result"}."""
    work = tempfile.mkdtemp(prefix="benchmark-")  # the Trainer's output_dir; nothing is saved there
    model_args, data_args, training_args = parse_recipe(args.recipe, recipe_words, work)
    documents, special, vocab_needed, source = load_documents(
        model_args, data_args, training_args, token_file=args.token_file, synthetic=args.synthetic
    )
    if args.max_tokens:
        documents = first_documents(documents, args.max_tokens)
    if args.save_token_file:
        save_token_file(args.save_token_file, documents, special)
        print(f"wrote {len(documents)} documents to {args.save_token_file}", flush=True)
    config = build_model_config(model_args, vocab_needed, args.config)
    seq_length = data_args.seq_length
    cuda = torch.cuda.is_available() and not training_args.use_cpu
    context = {
        "model": model_args.model_config or model_args.model_name_or_path,
        "recipe": args.recipe,
        "recipe_overrides": recipe_words,
        "config_overrides": args.config,
        "seq_length": seq_length,
        "micro_batch": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "bf16": training_args.bf16,
        "deepspeed_config": training_args.deepspeed,
        "attention_dropout": getattr(config, "attention_dropout", None),
        "data": {"source": source, **describe(documents, seq_length)},
    }
    name = args.only_path
    if name == "gemm":
        tokens = seq_length * training_args.per_device_train_batch_size
        return {"path": name, "context": context, "result": gemm_benchmark(config, tokens)}
    attention = choose_attention(model_args.attn_implementation)
    if name == "plain":
        path = plain_path(model_args, training_args, args.plain, work, documents, seq_length, special.eos)
    elif name == "flattening":
        path = flattening_path(model_args, training_args, args.flattening, work, documents, seq_length)
    else:  # ours, or a variant of it (its words are already in recipe_words)
        # gradient_checkpointing_layers: auto -> the fewest layers the memory estimate allows, as run_pretrain.py.
        resolve_checkpointed_layers(config, model_args, data_args, training_args)
        path = ours_path(model_args, data_args, training_args, attention, documents, special)
    context["path_details"] = path.details
    path_args = path.training_args
    kernel = resolve_loss_kernel(path_args.loss_kernel, path_args.loss_chunk_size, "cuda" if cuda else "cpu")
    checkpointed = checkpointed_layers(path_args, config.num_hidden_layers)
    recompute = loss_recomputes_logits(kernel, path_args.loss_chunk_size, cuda)
    # The profile: its own process (--profile), else the first process of ours, after its timed interval.
    after = args.profile_steps if name == "ours" and args.repeat_index == 0 and not args.profile else 0
    timing = Timing(args.warmup, args.seconds, args.steps, args.profile_steps if args.profile else 0, after)
    result = run_path(name, path, config, timing)
    shutil.rmtree(work, ignore_errors=True)
    result.update(loss_kernel=kernel, checkpointed_layers=checkpointed, loss_recomputes_logits=recompute)
    peak = training_args.peak_flops or (peak_flops_for_device(torch.cuda.get_device_name()) if cuda else None)
    if result.get(BEST_BY):
        result.update(throughput_figures(result[BEST_BY], config, seq_length, peak, checkpointed, recompute))
    return {"path": name, "repeat": args.repeat_index, "context": context, "result": result}
