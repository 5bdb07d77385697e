"""Which repositories a process works on: the held-out split and the part of one machine.

- `repository_split`: a repository is held out for evaluation when a hash of its name falls below
  `eval_fraction`; stable across runs, machines, shards and num_proc, and independent of the order of
  the input. `load_split_repositories` reads the shards once, cleans them (near_dedup, pii_redaction) and
  returns one split (or `eval_data_files`).
- `shard_repositories`: the contiguous part `shard_index` of `num_shards` (scripts/prepare_data.py on N
  machines); the parts in index order concatenate to what one machine would have made.
Cost per rank: one boolean per repository for the split (3.3M repositories in the-stack-v2-train-smol: 3 MB).
"""

import hashlib
import logging

from datasets import Dataset

from starcoder2_train.configs import DataArguments, check_eval_fraction, check_shard
from starcoder2_train.data.filters.cleaning import clean_repositories
from starcoder2_train.data.sources.shards import load_repositories

logger = logging.getLogger(__name__)


def shard_repositories(dataset: Dataset, num_shards: int, shard_index: int) -> Dataset:
    """Contiguous part `shard_index` of `num_shards`; the parts in index order concatenate to `dataset`."""
    check_shard(num_shards, shard_index)
    return dataset.shard(num_shards=num_shards, index=shard_index, contiguous=True)


def eval_share(repo_name: str) -> float:
    """A stable number in [0, 1) for a repository name (blake2b: the same across runs and processes)."""
    digest = hashlib.blake2b(repo_name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def repository_split(dataset: Dataset, eval_fraction: float) -> tuple[Dataset, Dataset]:
    """(train, eval): a repository is held out when eval_share(repo_name) < eval_fraction."""
    check_eval_fraction(eval_fraction)
    held_out = [eval_share(name) < eval_fraction for name in dataset["repo_name"]]
    train = dataset.select([i for i, flag in enumerate(held_out) if not flag])
    evaluation = dataset.select([i for i, flag in enumerate(held_out) if flag])
    if eval_fraction > 0 and len(evaluation) == 0:
        logger.warning(
            "eval_fraction=%s held out no repository of %d; evaluation will be empty.", eval_fraction, len(dataset)
        )
    return train, evaluation


def load_split_repositories(data_args: DataArguments, split: str = "train"):
    """(repositories of one split or None, SkipReport): eval is eval_data_files, or the eval_fraction hold-out.

    The shards are read and filtered (data/sources/shards.py), then near-deduplicated and PII-redacted
    (data/filters/cleaning.py) before the split, so that a near-copy is kept once across both splits."""
    if split == "eval" and data_args.eval_data_files:
        repositories, skips = load_repositories(data_args, data_files=data_args.eval_data_files)
        return clean_repositories(repositories, data_args, skips), skips
    repositories, skips = load_repositories(data_args)
    repositories = clean_repositories(repositories, data_args, skips)
    if data_args.eval_data_files is None and data_args.eval_fraction > 0:
        train, held_out = repository_split(repositories, data_args.eval_fraction)
        return (held_out if split == "eval" else train), skips
    return (None if split == "eval" else repositories), skips
