"""Preprocess a recipe's data into memory-mapped token stores, with datatrove, on one machine or a cluster.

    python scripts/prepare_data.py recipes/starcoder2-3b/pretrain.yaml --output DIR --tasks 64 --workers 8
    python scripts/prepare_data.py RECIPE.yaml --output DIR --tasks 1000 --executor slurm \
        --slurm_partition cpu --slurm_time 04:00:00 --slurm_venv_path .venv        # an sbatch array
    python scripts/prepare_data.py RECIPE.yaml --output DIR --tasks 1000 --executor ray
                                 # RAY_ADDRESS's cluster, or a local Ray instance (data/ray_executor.py)
    python scripts/prepare_data.py RECIPE.yaml --output DIR --tasks 16 --num_shards 16 --shard_index $I
                                                   # by hand: machine I runs task I of 16

Task r of --tasks reads only its own contiguous range of the input files and writes its own parts
(data/prepare.py); the parts read in order are what one task would have written. DIR/manifest.json records what
the folder holds (the tokenizer, the data keys that shaped the tokens, the tasks done per stage:
data/store/manifest.py), written before the tasks start and when they end. The same command again resumes: only
the tasks without a datatrove completion run (on slurm: once the arrays have left squeue; that run also writes the
manifest's counts of them, data/slurm_executor.py). With file-level FIM (a copy per data epoch) a larger --epochs
prepares only the new epochs, in a logging dir of their own (DIR/logs-epochs-<first>-<last>); tokens stored once
hold every epoch, and a larger --epochs prepares nothing. A run with other
settings into DIR is refused before any task, naming each key with both values; so is a DIR prepared before
manifests. A recipe with dataset_mixture prepares each source into DIR/<name>/, one after the other (on slurm each
stage's job waits for the one before). Train with `--prepared_data_dir DIR`: training checks the manifest against
its recipe, then only opens the stores. Any recipe key can be overridden as --key value.
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
    parser.add_argument("--workers", type=int, default=-1, help="Tasks run at once (local, ray; -1: all).")
    parser.add_argument("--executor", default="local", choices=("local", "slurm", "ray"), help="Where tasks run.")
    parser.add_argument("--slurm_partition", help="slurm: partition.")
    parser.add_argument("--slurm_time", default="04:00:00", help="slurm: time limit per task.")
    parser.add_argument("--slurm_cpus_per_task", type=int, default=1, help="slurm: CPUs per task.")
    parser.add_argument(
        "--slurm_mem_per_cpu_gb",
        type=int,
        default=4,
        help="slurm: memory per CPU. 4 holds one task at max_repository_bytes' default (32 MB): a 50 MB repository's "
        "task peaked at 1.0 GB with tokens stored once, 3.0 GB (1 epoch) and 3.3 GB (3 epochs) with file-level FIM "
        "(docs/benchmarks.md).",
    )
    parser.add_argument(
        "--slurm_venv_path",
        help="slurm: the venv the tasks activate (folder or bin/activate; default: this Python's).",
    )
    parser.add_flag("--disable_tqdm", help="No progress bar (it is off anyway when stderr is not a terminal).")
    return parser.parse_with_overrides(argv, recipe_first=True)


def main(argv=None):
    own_args, recipe_argv = parse_args(argv)
    # Imported after the parse: a mistyped word is refused before the data libraries and transformers load.
    from starcoder2_train.configs import RecipeError
    from starcoder2_train.data.prepare import build_stages, make_executor, task_progress
    from starcoder2_train.data.sources.documents import source_kind
    from starcoder2_train.data.store.manifest import build_manifest, preparation_runs, stage_record, write_manifest
    from starcoder2_train.data.store.prepared import (
        DECONTAMINATION,
        LOGS,
        decontamination_entries,
        file_level_fim,
        prepared_skips,
        prepared_stats,
    )
    from starcoder2_train.data.tokens.tokenizer import load_tokenizer
    from starcoder2_train.recipe import RecipeParser

    model_args, data_args, training_args = RecipeParser().parse(recipe_argv)
    tokenizer = load_tokenizer(data_args.tokenizer_name_or_path)  # refused here, before any task starts
    seed = training_args.seed
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
    elif own_args.executor == "slurm":  # the tasks' environment, the partition, failed stages: data/slurm_executor.py
        from starcoder2_train.data.slurm_executor import slurm_options

        slurm = ("partition", "time", "cpus_per_task", "mem_per_cpu_gb", "venv_path")
        options = slurm_options(**{key: getattr(own_args, f"slurm_{key}") for key in slurm})
    # A mixture: source NAME into OUTPUT/NAME/ (DataSource.subdirectory), one after the other; else OUTPUT itself.
    mixture = getattr(data_args, "dataset_mixture", None) is not None
    sources = data_args.sources() if mixture else [None]
    targets = [
        (os.path.join(own_args.output, source.subdirectory), source.data_args, source)
        if source is not None
        else (own_args.output, data_args, None)
        for source in sources
    ]
    # Each folder's manifest against this command: a folder of other settings is refused here, before any task.
    # Tokens stored once (no file-level FIM) hold every epoch: --epochs asks them for nothing (epochs=1).
    plans = [
        preparation_runs(
            directory,
            args,
            tokenizer,
            epochs=own_args.epochs if file_level_fim(args) else 1,
            tasks=own_args.tasks,
            seed=seed,
        )
        for directory, args, _ in targets
    ]
    executor, watched, records = None, [], []
    for (directory, args, source), runs in zip(targets, plans):
        stages, seen = [], set()
        for first_epoch, epochs in runs:  # the runs prepared before (resumed) and the new epochs, if any
            built = build_stages(args, directory, seed, epochs, len(tokenizer), first_epoch=first_epoch)
            for index, (name, pipeline, tasks, logging_dir) in enumerate(built):
                if logging_dir in seen:  # a near-dedup stage of an earlier run: done once
                    continue
                seen.add(logging_dir)
                label = name if source is None else f"{source.name} {name}"
                named = (
                    {**options, "job_name": f"prepare_data-{label.replace(' ', '-')}"}
                    if own_args.executor == "slurm"
                    else options
                )
                if tasks is not None and own_args.executor == "local":  # a stage of its own task count: this machine
                    named = {}
                executor = make_executor(  # each stage waits for the one before: a mixture's sources in turn
                    own_args.executor,
                    pipeline,
                    tasks=tasks or own_args.tasks,
                    workers=own_args.workers,
                    logging_dir=logging_dir,
                    **({"depends": executor} if executor is not None else {}),
                    **named,
                )
                watched.append((logging_dir, tasks or own_args.tasks))
                epoch_range = (first_epoch, epochs) if index == len(built) - 1 else None  # the tokens stage
                stages.append((name, logging_dir, tasks or own_args.tasks, epoch_range))
        records.append((directory, args, source, max(end for _, end in runs), stages))

    def write_manifests():  # what each folder holds, with the tasks datatrove has marked complete by now
        for directory, args, source, epochs, stages in records:
            stage_records = [stage_record(directory, *stage) for stage in stages]
            manifest = build_manifest(
                args, tokenizer, seed=seed, epochs=epochs, tasks=own_args.tasks, stages=stage_records, source=source
            )
            write_manifest(directory, manifest)

    write_manifests()
    if own_args.executor == "slurm":  # submitted, not run here: squeue and DIR/logs show the progress
        from starcoder2_train.data.slurm_executor import submit

        folders = ", ".join(os.path.join(directory, LOGS) for directory, *_ in records)
        if not submit(executor, own_args.output):  # all done: the manifest now counts their completions
            print(f"every task is complete: nothing submitted; manifest.json records them ({folders})")
            return None
        print(f"submitted the tasks without a completion; logs and completions in {folders} (stages: manifest.json)")
        return None
    try:
        with task_progress(watched, disable=True if own_args.disable_tqdm else None):
            executor.run()  # the last stage; datatrove runs the stages it depends on first
    finally:
        write_manifests()  # a failed task: the manifest says which stage lacks it, the rerun does only that
    stats = None
    for directory, args, source, _, _ in records:
        stats = prepared_stats(directory)
        prefix = "" if source is None else f"{source.name}: "
        documents = source_kind(args) == "documents"  # no held-out split; a document counts as a file
        # Per-epoch copies: epoch 0's example tokens; stored once: the tokens stored, repository names and paths
        # included (each epoch draws which examples show them, so an epoch holds fewer).
        stored = "tokens stored" + ("" if documents else " (names and paths included)")
        stored = "tokens (epoch 0)" if file_level_fim(args) else stored
        for split in ("train",) if documents else ("train", "eval"):
            counts = f"{int(stats[f'{split} repositories']):,} repositories, {int(stats[f'{split} files']):,} files"
            counts = f"{int(stats[f'{split} files']):,} documents" if documents else counts
            print(f"{prefix}{split}: {counts}, {int(stats[f'{split} tokens']):,} {stored}")
        print("\n".join(prefix + line for line in prepared_skips(directory).summary_lines()))
        removed = decontamination_entries(directory)
        print(
            f"{prefix}decontamination: {len(removed):,} files removed, listed in "
            f"{os.path.join(directory, DECONTAMINATION)}"
        )
    return stats


if __name__ == "__main__":
    run_script(main)  # a bad recipe, input or path: one `error:` line, no traceback (starcoder2_train.cli)
