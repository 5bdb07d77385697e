"""Preprocess a recipe's data into memory-mapped token stores, with datatrove, on one machine or a cluster.

    python scripts/prepare_data.py recipes/starcoder2-3b/pretrain.yaml --output DIR --tasks 64 --workers 8
    python scripts/prepare_data.py RECIPE.yaml --output DIR --tasks 1000 --executor slurm \
        --slurm_partition cpu --slurm_time 04:00:00 --slurm_venv_path .venv        # an sbatch array
    python scripts/prepare_data.py RECIPE.yaml --output DIR --tasks 16 --num_shards 16 --shard_index $I
                                                   # by hand: machine I runs task I of 16

Task r of --tasks reads only its own contiguous range of the input files and writes its own parts
(data/prepare.py); the parts read in order are what one task would have written. A task that fails is rerun
alone by running the same command again (datatrove keeps the completions in DIR/logs). Train with
`--prepared_data_dir DIR`: training then only opens the stores. Any recipe key can be overridden as --key value.
On a terminal a bar counts the finished tasks with their rate and an ETA (--disable_tqdm: none).
With `near_dedup: true` three MinHash runs come first (DIR/near_dedup/), each waiting for the one before; the files
decontamination removed are listed in DIR/decontamination/ (docs/data_filters.md).
"""

import os

from starcoder2_train.cli import ScriptParser, run_script


def parse_args(argv=None):
    """(this script's options, RECIPE.yaml and its `--key value` overrides), read before the data libraries are
    imported; the overrides' keys and values are RecipeParser's to check."""
    parser = ScriptParser(description=__doc__, usage="%(prog)s RECIPE.yaml --output DIR [options] [--key value ...]")
    parser.add_argument("--output", required=True, help="Directory for the token stores (and logs/).")
    parser.add_argument("--epochs", type=int, default=1, help="Data epochs to prepare (each has its own FIM draws).")
    parser.add_argument(
        "--tasks", type=int, default=1, help="datatrove tasks; each reads a contiguous part of the files."
    )
    parser.add_argument("--workers", type=int, default=-1, help="Tasks run at once (local executor; -1: all).")
    parser.add_argument("--executor", default="local", choices=("local", "slurm", "ray"), help="Where tasks run.")
    parser.add_argument("--slurm_partition", help="slurm: partition.")
    parser.add_argument("--slurm_time", default="04:00:00", help="slurm: time limit per task.")
    parser.add_argument("--slurm_cpus_per_task", type=int, default=1, help="slurm: CPUs per task.")
    parser.add_argument("--slurm_mem_per_cpu_gb", type=int, default=4, help="slurm: memory per CPU.")
    parser.add_argument("--slurm_venv_path", help="slurm: virtual environment the tasks activate.")
    parser.add_flag("--disable_tqdm", help="No progress bar (it is off anyway when stderr is not a terminal).")
    return parser.parse_with_overrides(argv, recipe_first=True)


def main(argv=None):
    own_args, recipe_argv = parse_args(argv)
    # Imported after the parse: a mistyped word is refused before the data libraries and transformers load.
    from starcoder2_train.configs import RecipeError
    from starcoder2_train.data.prepare import build_stages, make_executor, task_progress
    from starcoder2_train.data.store.prepared import (
        DECONTAMINATION,
        LOGS,
        decontamination_entries,
        prepared_skips,
        prepared_stats,
    )
    from starcoder2_train.data.tokens.tokenizer import load_tokenizer
    from starcoder2_train.recipe import RecipeParser

    model_args, data_args, training_args = RecipeParser().parse(recipe_argv)
    tokenizer = load_tokenizer(data_args.tokenizer_name_or_path)  # refused here, before any task starts
    options = {}
    if own_args.executor == "local" and data_args.num_shards > 1:  # this machine runs one task of many
        options = {"local_tasks": 1, "local_rank_offset": data_args.shard_index}
        if own_args.tasks != data_args.num_shards:
            raise RecipeError("--num_shards must equal --tasks when each machine runs one task by hand.")
        if data_args.near_dedup:
            raise RecipeError(
                "near_dedup: every task's MinHash signatures must exist before any task filters, which machines run "
                "by hand (--num_shards) cannot wait for; use --executor slurm or ray, or run the tasks on one machine."
            )
    elif own_args.executor == "slurm":
        options = {
            "partition": own_args.slurm_partition,
            "time": own_args.slurm_time,
            "cpus_per_task": own_args.slurm_cpus_per_task,
            "mem_per_cpu_gb": own_args.slurm_mem_per_cpu_gb,
            "venv_path": own_args.slurm_venv_path,
            "job_name": "prepare_data",
        }
    executor, watched = None, []
    for name, pipeline, tasks, logging_dir in build_stages(
        data_args, own_args.output, training_args.seed, own_args.epochs, len(tokenizer)
    ):
        named = (
            {**options, "job_name": f"prepare_data-{name.replace(' ', '-')}"}
            if own_args.executor == "slurm"
            else options
        )
        if tasks is not None and own_args.executor == "local":  # a stage of its own task count runs on this machine
            named = {}
        executor = make_executor(
            own_args.executor,
            pipeline,
            tasks=tasks or own_args.tasks,
            workers=own_args.workers,
            logging_dir=logging_dir,
            **({"depends": executor} if executor is not None else {}),
            **named,
        )
        watched.append((logging_dir, tasks or own_args.tasks))
    if own_args.executor == "slurm":  # submitted, not run here: squeue and DIR/logs show the progress
        executor.run()
        print(f"submitted {own_args.tasks} tasks; logs and completions in {os.path.join(own_args.output, LOGS)}")
        return None
    with task_progress(watched, disable=True if own_args.disable_tqdm else None):
        executor.run()  # the last stage; datatrove runs the stages it depends on first
    stats = prepared_stats(own_args.output)
    for split in ("train", "eval"):
        print(
            f"{split}: {int(stats[f'{split} repositories']):,} repositories, {int(stats[f'{split} files']):,} files, "
            f"{int(stats[f'{split} tokens']):,} tokens (epoch 0)"
        )
    print("\n".join(prepared_skips(own_args.output).summary_lines()))
    removed = decontamination_entries(own_args.output)
    print(
        f"decontamination: {len(removed):,} files removed, listed in {os.path.join(own_args.output, DECONTAMINATION)}"
    )
    return stats


if __name__ == "__main__":
    run_script(main)  # a bad recipe, input or path: one `error:` line, no traceback (starcoder2_train.cli)
