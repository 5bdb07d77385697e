"""Evaluate a saved model: held-out loss and FIM exact match per language, HumanEval pass@k.

    HF_ALLOW_CODE_EVAL=1 python scripts/evaluate.py MODEL_DIR --tasks loss,fim,humaneval \
        --data HELD_OUT_PARQUET_DIR --num_samples 20 --temperature 0.2 --k 1,10 --output results.json

- loss: each held-out file scored alone as `<file_sep>code<|endoftext|>` (a one-file repository without
  metadata, as in training), in windows of --seq_length tokens; loss and perplexity per language.
- fim: one masked line per held-out file, greedy PSM infilling, exact match per language.
- humaneval: --num_samples completions per problem, executed sandboxed (needs HF_ALLOW_CODE_EVAL=1;
  see starcoder2_train/execution.py for what is and is not contained), pass@k for each --k.
--data takes Stack v2-format parquet (per-repository rows with a `files` list, or per-file rows), read with
the training pipeline's reader and filters. --limit caps HumanEval problems and held-out files per language.
Prints a table with the time each task took; --output writes the results as JSON, and --update_model_card
puts them into MODEL_DIR/README.md (table and model-index metadata).
"""

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import torch
from transformers import AutoModelForCausalLM

from starcoder2_train.configs import TORCH_DTYPES, DataArguments, torch_dtype
from starcoder2_train.data.shards import load_repositories
from starcoder2_train.data.splits import repository_split
from starcoder2_train.data.tokenization import PieceTokenizer
from starcoder2_train.data.tokenizer import load_tokenizer
from starcoder2_train.evaluation import TASKS, build_fim_problems, evaluate_fim, evaluate_humaneval, evaluate_loss
from starcoder2_train.evaluation.execution import require_code_execution_allowed
from starcoder2_train.hub.model_card import update_model_card_results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="A saved model directory (config, weights, tokenizer) or a Hub id.")
    parser.add_argument("--tasks", default="loss,fim", help=f"Comma-separated, among {', '.join(TASKS)}.")
    parser.add_argument("--data", help="Held-out parquet shards (directory or file), for loss and fim.")
    parser.add_argument(
        "--eval_fraction",
        type=float,
        help="--data is a recipe's training set: score only the "
        "repositories that a recipe with this eval_fraction held out.",
    )
    parser.add_argument("--languages", nargs="*", help="Keep only held-out files in these languages.")
    parser.add_argument("--limit", type=int, help="At most this many HumanEval problems / files per language.")
    parser.add_argument("--batch_size", type=int, default=8, help="Sequences per forward or generate call.")
    parser.add_argument("--seq_length", type=int, default=4096, help="Loss window and FIM context, in tokens.")
    parser.add_argument("--max_new_tokens", type=int, help="Generation budget (default: fim 64, humaneval 512).")
    parser.add_argument("--num_samples", type=int, default=1, help="HumanEval completions per problem (n).")
    parser.add_argument("--temperature", type=float, default=0.2, help="HumanEval sampling temperature; 0: greedy.")
    parser.add_argument("--top_p", type=float, default=0.95, help="HumanEval nucleus sampling.")
    parser.add_argument("--k", default="1", help="Comma-separated k of pass@k, each at most --num_samples.")
    parser.add_argument("--num_workers", type=int, default=4, help="HumanEval programs run at the same time.")
    parser.add_argument("--timeout", type=float, default=3.0, help="Seconds each HumanEval program may run.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the FIM line choice and of sampling.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--torch_dtype", default="auto", choices=TORCH_DTYPES, help="dtype of the loaded weights.")
    parser.add_argument("--output", help="Write {model, results, seconds, settings} to this JSON file.")
    parser.add_argument("--update_model_card", action="store_true", help="Write the results into MODEL_DIR/README.md.")
    args = parser.parse_args(argv)
    args.tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    args.k = [int(value) for value in args.k.split(",")]
    unknown = [task for task in args.tasks if task not in TASKS]
    if unknown or not args.tasks:
        parser.error(f"--tasks: {', '.join(unknown) or 'none given'}; choose among {', '.join(TASKS)}.")
    if {"loss", "fim"} & set(args.tasks) and not args.data:
        parser.error("--data: the loss and fim tasks need held-out parquet shards (--data DIR).")
    if "humaneval" in args.tasks and max(args.k) > args.num_samples:
        parser.error(f"--k {max(args.k)} needs --num_samples of at least {max(args.k)}.")
    return args


def load_held_out_files(
    data: str, languages: list[str] | None, limit: int | None, eval_fraction: float | None = None
) -> list[dict]:
    """Files ({path, content, language}) of the held-out shards, at most `limit` per language.

    eval_fraction: `data` is a training set; keep only the repositories a recipe with this eval_fraction held out.
    """
    repositories, _ = load_repositories(DataArguments(dataset_name_or_path=data, languages=languages))
    if eval_fraction:
        repositories = repository_split(repositories, eval_fraction)[1]
    files, per_language = [], defaultdict(int)
    for repository in repositories:
        for file in repository["files"]:
            language = file["language"] or "unknown"
            if limit is None or per_language[language] < limit:
                per_language[language] += 1
                files.append(
                    {
                        "path": f"{repository['repo_name']}/{file['path']}",
                        "content": file["content"],
                        "language": language,
                    }
                )
    return files


def loss_rows(tokenizer, files: list[dict]) -> list[dict]:
    pieces = PieceTokenizer(tokenizer)
    special = pieces.special
    return [
        {"input_ids": [special.file_sep, *ids, special.eos], "language": file["language"]}
        for ids, file in zip(pieces.encode_texts([file["content"] for file in files]), files)
    ]


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

    # Held-out data.
    files = (
        load_held_out_files(args.data, args.languages, args.limit, args.eval_fraction)
        if {"loss", "fim"} & set(args.tasks)
        else []
    )

    # Tasks, each timed.
    results, seconds = {}, {}
    for task in args.tasks:
        start = time.perf_counter()
        if task == "loss":
            results[task] = evaluate_loss(
                model, loss_rows(tokenizer, files), seq_length=args.seq_length, batch_size=args.batch_size
            )
        elif task == "fim":
            max_new_tokens = args.max_new_tokens or 64
            results[task] = evaluate_fim(
                model,
                tokenizer,
                build_fim_problems(files, seed=args.seed),
                batch_size=args.batch_size,
                max_new_tokens=max_new_tokens,
                max_prompt_tokens=args.seq_length - max_new_tokens,
            )
        else:
            results[task] = evaluate_humaneval(
                model,
                tokenizer,
                num_samples=args.num_samples,
                temperature=args.temperature,
                top_p=args.top_p,
                k=args.k,
                max_new_tokens=args.max_new_tokens or 512,
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
    if args.update_model_card:
        update_model_card_results(args.model_dir, results)
    return results


if __name__ == "__main__":
    main()
