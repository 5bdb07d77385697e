"""Preprocess a recipe's data ahead of training, on one machine or split across many.

    python scripts/prepare_data.py recipes/starcoder2-3b/pretrain.yaml --output DIR \
        --num_shards 16 --shard_index $SLURM_ARRAY_TASK_ID [--epochs 1]

Each machine tokenizes a disjoint, contiguous part of the repositories; training with
`--prepared_data_dir DIR` reads the shards back in index order, which gives exactly what one machine
would have produced. Skip counts are written beside each shard, and the held-out repositories themselves
beside the eval split, so that training-time evaluation scores the same files as from the raw shards.
"""

import argparse
import sys

from starcoder2_train.data.pipeline import load_token_rows
from starcoder2_train.data.prepared import save_held_out_repositories, save_prepared
from starcoder2_train.data.splits import load_split_repositories, shard_repositories
from starcoder2_train.data.tokenizer import load_tokenizer
from starcoder2_train.recipe import RecipeParser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--output", required=True, help="Directory for the token shards.")
    own.add_argument("--epochs", type=int, default=1, help="Data epochs to prepare (each has its own FIM draws).")
    own_args, recipe_argv = own.parse_known_args(argv)
    model_args, data_args, training_args = RecipeParser().parse(recipe_argv)
    tokenizer = load_tokenizer(data_args.tokenizer_name_or_path)
    for split in ("train", "eval"):
        repositories = load_split_repositories(data_args, split)  # read once, tokenized per epoch
        for epoch in range(own_args.epochs if split == "train" else 1):
            rows, skips = load_token_rows(data_args, tokenizer, training_args.seed, epoch, split, repositories)
            if rows is None:
                continue
            path = save_prepared(
                rows, skips, own_args.output, split, epoch, data_args.shard_index, data_args.num_shards
            )
            print(f"{split} epoch {epoch}: {len(rows):,} repositories, {sum(rows['num_tokens']):,} tokens -> {path}")
        if split == "eval" and repositories[0] is not None:  # for the evaluation tasks, as from raw shards
            part = shard_repositories(repositories[0], data_args.num_shards, data_args.shard_index)
            written = save_held_out_repositories(part, own_args.output, data_args.shard_index, data_args.num_shards)
            print(f"held-out repositories: {len(part):,} -> {written}")


if __name__ == "__main__":
    main()
