"""Evaluate a saved model: held-out loss and FIM exact match per language, HumanEval pass@k.

    HF_ALLOW_CODE_EVAL=1 python scripts/evaluate.py MODEL_DIR --tasks loss,fim,humaneval \
        --data HELD_OUT_PARQUET_DIR --num_samples 20 --temperature 0.2 --k 1,10 --output results.json
    python scripts/evaluate.py MODEL_DIR --recipe RECIPE.yaml [--key value ...]   # its held-out repositories

Held-out files: with --recipe, exactly the held-out set training scored (the recipe's eval_tokens_per_language,
eval_languages and fim_eval_problems, drawn by seed; opened from, or built into, its eval_cache_dir or
OUTPUT_DIR/held_out: starcoder2_train/evaluation/held_out_set.py), scored as the training-time evaluation scores
it, under the same metric names (starcoder2_train/evaluation/held_out.py); with --data, the files of those shards
(or, with --eval_fraction, of the repositories such a recipe holds out), at most --limit per language.

- loss: each held-out file scored alone as `<file_sep>code<|endoftext|>` (a one-file repository without
  metadata, as in training), in windows of --seq_length tokens; loss and perplexity per language.
- fim: one masked line per held-out file (--fim_lines_per_file), greedy PSM (or --fim_mode spm) infilling, exact
  match per language.
- humaneval: --num_samples completions per problem, executed sandboxed (needs HF_ALLOW_CODE_EVAL=1;
  see starcoder2_train/evaluation/execution.py for what is and is not contained), pass@k for each --k; prompts,
  stop words, budget and post-processing as bigcode-evaluation-harness's `humaneval` task (docs/humaneval.md;
  the StarCoder2 model cards' pass@1: --num_samples 50 --temperature 0.2 --top_p 0.95).
--data takes Stack v2-format parquet (per-repository rows with a `files` list, or per-file rows), read with
the training pipeline's reader and default filters. --limit caps HumanEval problems and held-out files per language.
Prints a table with the time each task took; --output writes the results as JSON, and --update_model_card
puts them into MODEL_DIR/README.md (table and model-index metadata).
"""

import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from starcoder2_train.cli import ScriptParser, run_script
from starcoder2_train.configs import EVAL_TASKS, TORCH_DTYPES, DataArguments, RecipeError, torch_dtype
from starcoder2_train.data.filters.splits import load_split_repositories, repository_split
from starcoder2_train.data.pipeline import evaluation_data_args
from starcoder2_train.data.sources.shards import load_repositories
from starcoder2_train.data.tokens.tokenizer import load_tokenizer
from starcoder2_train.evaluation import held_out
from starcoder2_train.evaluation.chart import draw_language_chart
from starcoder2_train.evaluation.execution import require_code_execution_allowed
from starcoder2_train.evaluation.fim import evaluate_fim, fim_generation_budget, is_exact_match
from starcoder2_train.evaluation.humaneval import evaluate_humaneval
from starcoder2_train.evaluation.loss import evaluate_loss
from starcoder2_train.hub.model_card import update_model_card_results
from starcoder2_train.progress import FORCE_ENV
from starcoder2_train.recipe import RecipeParser


def parse_args(argv=None):
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="A saved model directory (config, weights, tokenizer) or a Hub id.")
    parser.add_argument("--tasks", default="loss,fim", help=f"Comma-separated, among {', '.join(EVAL_TASKS)}.")
    parser.add_argument(
        "--recipe",
        help="A training recipe: score the repositories it held out, as training does; other --key value "
        "arguments override its keys (e.g. --dataset_name_or_path).",
    )
    parser.add_argument("--data", help="Held-out parquet shards (directory or file), for loss and fim.")
    parser.add_argument(
        "--eval_fraction",
        type=float,
        help="--data is a recipe's training set: score only the "
        "repositories that a recipe with this eval_fraction held out.",
    )
    parser.add_argument("--languages", nargs="*", help="Keep only held-out files in these languages.")
    parser.add_argument("--limit", type=int, help="At most this many HumanEval problems / files per language.")
    parser.add_argument(
        "--fim_lines_per_file",
        type=int,
        help="Lines masked per held-out file (default: with --recipe, the recipe's fim_eval_lines_per_file; else 1).",
    )
    parser.add_argument(
        "--fim_mode",
        choices=("psm", "spm"),
        help="FIM prompt order (default: with --recipe, the recipe's fim_eval_mode; else psm).",
    )
    parser.add_argument("--batch_size", type=int, default=8, help="Sequences per forward or generate call.")
    parser.add_argument("--seq_length", type=int, help="Loss window and FIM context (default: the recipe's, or 4096).")
    parser.add_argument(
        "--max_new_tokens",
        type=int,
        help="FIM: new tokens per hole (default min(64, seq_length/4)). HumanEval's budget is "
        "--max_length_generation, which this does not cap.",
    )
    parser.add_argument(
        "--max_length_generation", type=int, default=512,
        help="HumanEval: prompt + generation tokens, as bigcode-evaluation-harness counts them (docs/humaneval.md).",
    )  # fmt: skip
    parser.add_flag("--unstripped", help="HumanEval: the harness's humaneval-unstripped (prompt as given).")
    parser.add_argument("--num_samples", type=int, default=1, help="HumanEval completions per problem (n).")
    parser.add_argument("--temperature", type=float, default=0.2, help="HumanEval sampling temperature; 0: greedy.")
    parser.add_argument("--top_p", type=float, default=0.95, help="HumanEval nucleus sampling.")
    parser.add_argument("--k", default="1", help="Comma-separated k of pass@k, each at most --num_samples.")
    parser.add_argument("--num_workers", type=int, default=4, help="HumanEval programs run at the same time.")
    parser.add_argument("--timeout", type=float, default=3.0, help="Seconds each HumanEval program may run.")
    parser.add_argument("--seed", type=int, help="Seed of the FIM line choice and of sampling (recipe's, or 0).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--torch_dtype", default="auto", choices=TORCH_DTYPES, help="dtype of the loaded weights.")
    parser.add_argument("--output", help="Write {model, results, seconds, settings} to this JSON file.")
    parser.add_argument(
        "--fim_predictions",
        help="Write each FIM problem to this JSONL file: path, line, expected, generated (null where the model went "
        "on writing the line before), exact_match.",
    )
    parser.add_flag("--disable_tqdm", help="No progress bars (none off a terminal).")
    parser.add_flag("--update_model_card", help="Write the results into MODEL_DIR/README.md.")
    args, args.recipe_overrides = parser.parse_with_overrides(argv)  # recipe overrides: their grammar checked
    if args.disable_tqdm:
        os.environ[FORCE_ENV] = "0"  # starcoder2_train.progress: every bar of this command off
    if args.recipe_overrides and not args.recipe:
        parser.error(f"unrecognized arguments: {' '.join(args.recipe_overrides)}")
    args.tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    try:
        args.k = [int(value) for value in args.k.split(",")]
    except ValueError:
        parser.error(f"--k: comma-separated whole numbers, got '{args.k}'.")
    unknown = [task for task in args.tasks if task not in EVAL_TASKS]
    if unknown or not args.tasks:
        parser.error(f"--tasks: {', '.join(unknown) or 'none given'}; choose among {', '.join(EVAL_TASKS)}.")
    if {"loss", "fim"} & set(args.tasks) and bool(args.data) == bool(args.recipe):
        parser.error("--data or --recipe (one of them): the loss and fim tasks need held-out repositories.")
    if args.fim_lines_per_file is not None and args.fim_lines_per_file < 1:
        parser.error(f"--fim_lines_per_file: must be at least 1, got {args.fim_lines_per_file}.")
    if "humaneval" in args.tasks and max(args.k) > args.num_samples:
        parser.error(f"--k {max(args.k)} needs --num_samples of at least {max(args.k)}.")
    return args


def write_fim_predictions(path: str, predictions) -> None:
    """One JSON line per FIM problem, in the order scored: what was masked and what the model wrote there."""
    with open(path, "w", encoding="utf-8") as handle:
        for problem, line in predictions:
            row = {
                "path": problem.path,
                "language": problem.language,
                "line": problem.prefix.count("\n") + 1,
                "expected": problem.middle,
                "generated": line,
                "exact_match": is_exact_match(line, problem.middle),
            }
            handle.write(json.dumps(row) + "\n")
    print(f"FIM predictions: {path}")


def held_out_repositories(args):
    """(the held-out repositories, and the recipe's data and training arguments or None, None).

    --recipe: exactly the repositories training held out (its data, filters, eval_fraction or eval_data_files);
    --data: the repositories of those shards, or with --eval_fraction the ones a recipe with it held out.
    """
    if args.recipe:
        overrides = ["--languages", *args.languages] if args.languages else []
        _, data_args, training_args = RecipeParser().parse([args.recipe, *args.recipe_overrides, *overrides])
        # a mixture's held-out repositories: its first repository source's, as training evaluates
        repositories, _ = load_split_repositories(evaluation_data_args(data_args), "eval")
        if repositories is None:
            raise RecipeError(f"--recipe {args.recipe}: holds nothing out; set eval_fraction or eval_data_files.")
        return repositories, data_args, training_args
    repositories, _ = load_repositories(DataArguments(dataset_name_or_path=args.data, languages=args.languages))
    if args.eval_fraction:
        repositories = repository_split(repositories, args.eval_fraction)[1]
    return repositories, None, None


def print_table(results: dict, seconds: dict) -> None:
    print(f"{'task':<10} {'metric':<32} {'value':>12}")
    for task, metrics in results.items():
        for key, value in metrics.items():
            print(
                f"{task:<10} {key:<32} {value:>12.4f}"
                if isinstance(value, float)
                else f"{task:<10} {key:<32} {value:>12}"
            )
        print(f"{task:<10} {'(seconds)':<32} {seconds[task]:>12.1f}")


def keep_the_evaluate_library_importable() -> None:
    """This script shares its name with the `evaluate` library, which the code_eval metric needs. Python puts the
    script's folder first on sys.path, where `import evaluate` would find this file: take that folder off."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [path for path in sys.path if os.path.abspath(path or os.curdir) != here]


def main(argv=None):
    keep_the_evaluate_library_importable()
    args = parse_args(argv)
    if "humaneval" in args.tasks:
        require_code_execution_allowed()  # refuse before loading anything

    # Tokenizer and model.
    tokenizer = load_tokenizer(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch_dtype(args.torch_dtype)).to(args.device)
    model.eval()

    # Held-out data: the same rows and problems as the training-time evaluation builds.
    scored = {"loss", "fim"} & set(args.tasks)
    repositories, data_args, training_args = held_out_repositories(args) if scored else (None, None, None)
    args.seq_length = args.seq_length or (data_args.seq_length if data_args else 4096)
    args.seed = args.seed if args.seed is not None else (training_args.seed if training_args else 0)
    fim_lines_per_file = args.fim_lines_per_file or (training_args.fim_eval_lines_per_file if training_args else 1)
    if training_args is not None:  # --recipe: the held-out set training scored (built once, under its cache folder)
        loss_rows, fim_problems = held_out.recipe_task_inputs(
            repositories, tokenizer, training_args, args.tasks, seed=args.seed, fim_lines_per_file=fim_lines_per_file
        )
    else:
        loss_rows, fim_problems = held_out.task_inputs(
            repositories,
            tokenizer,
            args.tasks,
            seed=args.seed,
            fim_lines_per_file=fim_lines_per_file,
            limit=args.limit,
        )

    # Tasks, each timed.
    results, seconds = {}, {}
    for task in args.tasks:
        start = time.perf_counter()
        if task == "loss":
            results[task] = evaluate_loss(model, loss_rows, seq_length=args.seq_length, batch_size=args.batch_size)
        elif task == "fim":
            max_new_tokens = args.max_new_tokens or fim_generation_budget(args.seq_length)
            results[task], predictions = evaluate_fim(
                model,
                tokenizer,
                fim_problems,
                batch_size=args.batch_size,
                max_new_tokens=max_new_tokens,
                max_prompt_tokens=args.seq_length - max_new_tokens,
                mode=args.fim_mode or (training_args.fim_eval_mode if training_args else "psm"),
                return_predictions=True,
            )
            if args.fim_predictions:
                write_fim_predictions(args.fim_predictions, predictions)
        else:
            results[task] = evaluate_humaneval(
                model,
                tokenizer,
                num_samples=args.num_samples,
                temperature=args.temperature,
                top_p=args.top_p,
                k=args.k,
                max_length_generation=args.max_length_generation,  # its only budget: --max_new_tokens is FIM's
                strip_prompt=not args.unstripped,
                batch_size=args.batch_size,
                limit=args.limit,
                num_workers=args.num_workers,
                timeout=args.timeout,
                seed=args.seed,
            )
        seconds[task] = time.perf_counter() - start

    # Report.
    print_table(results, seconds)
    if args.output:
        settings = {key: value for key, value in vars(args).items() if key not in ("output", "update_model_card")}
        with open(args.output, "w") as handle:
            json.dump(
                {"model": args.model_dir, "results": results, "seconds": seconds, "settings": settings},
                handle,
                indent=1,
            )
        chart = draw_language_chart(results, os.path.splitext(args.output)[0] + ".png", title=args.model_dir)
        if chart:
            print(f"per-language chart: {chart}")
    if args.update_model_card:
        update_model_card_results(args.model_dir, results)
    return results


if __name__ == "__main__":
    run_script(main)  # a bad recipe, input or path: one `error:` line, no traceback (starcoder2_train.cli)
