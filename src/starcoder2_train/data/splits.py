"""Stack v2-format parquet shards → one row per repository, with every file left out counted by reason.

Two layouts are accepted, recognised per parquet file by its columns:
- per repository (the-stack-v2-train-*-ids with contents added, and what scripts/ingest.py writes):
  `repo_name` and `files`, a list of structs with at least `path` and `content`;
- per file (the-stack-v2 and -dedup with contents added): `repo_name`, `path`, `content`. Rows are
  grouped by `repo_name` across all the files read, repositories and their files in first-seen order.
Optional file fields, used when present: `language` (else derived from the path), `license_type`,
`is_vendor`, `is_generated`, `src_encoding` (to decode contents stored as bytes; default UTF-8).

Output rows: `repo_name: str`, `files: list of {path: str, content: str, language: str}`, in an
order that depends on the input only (not on num_proc).
"""

import hashlib
import logging

from datasets import Dataset

from starcoder2_train.configs import DataArguments, RecipeError
from starcoder2_train.data.shards import load_repositories

logger = logging.getLogger(__name__)


def shard_repositories(dataset: Dataset, num_shards: int, shard_index: int) -> Dataset:
    """Contiguous part `shard_index` of `num_shards`; the parts in index order concatenate to `dataset`."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise RecipeError(f"shard_index: must be in [0, num_shards={num_shards}), got {shard_index}.")
    return dataset.shard(num_shards=num_shards, index=shard_index, contiguous=True)


def eval_share(repo_name: str) -> float:
    """A stable number in [0, 1) for a repository name (blake2b: the same across runs and processes)."""
    digest = hashlib.blake2b(repo_name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def repository_split(dataset: Dataset, eval_fraction: float) -> tuple[Dataset, Dataset]:
    """(train, eval): a repository is held out when eval_share(repo_name) < eval_fraction."""
    if not 0.0 <= eval_fraction < 1.0:
        raise RecipeError(f"eval_fraction: must be in [0, 1), got {eval_fraction}.")
    held_out = [eval_share(name) < eval_fraction for name in dataset["repo_name"]]
    train = dataset.select([i for i, flag in enumerate(held_out) if not flag])
    evaluation = dataset.select([i for i, flag in enumerate(held_out) if flag])
    if eval_fraction > 0 and len(evaluation) == 0:
        logger.warning(
            "eval_fraction=%s held out no repository of %d; evaluation will be empty.", eval_fraction, len(dataset)
        )
    return train, evaluation


def load_split_repositories(data_args: DataArguments, split: str = "train"):
    """(repositories of one split or None, SkipReport): eval is eval_data_files, or the eval_fraction hold-out."""
    if split == "eval" and data_args.eval_data_files:
        return load_repositories(data_args, data_files=data_args.eval_data_files)
    repositories, skips = load_repositories(data_args)
    if data_args.eval_data_files is None and data_args.eval_fraction > 0:
        train, held_out = repository_split(repositories, data_args.eval_fraction)
        return (held_out if split == "eval" else train), skips
    return (None if split == "eval" else repositories), skips
