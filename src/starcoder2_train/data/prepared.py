"""Prepared data: token rows written ahead of training by scripts/prepare_data.py, and read back by training.

Layout: `DIR/<split>/epoch-<e>/shard-<i>-of-<n>/`, one `datasets.save_to_disk` folder per machine that
prepared part `i` of `n` (data/splits.shard_repositories), with `skipped.json` beside the rows (the
SkipReport as a flat dict); and `DIR/eval/repositories/shard-<i>-of-<n>/`, the held-out repositories
themselves (repo_name, files), from which the evaluation tasks build their rows exactly as from raw shards.
`load_prepared` concatenates the shards of one split and epoch in index order, which is what one machine
would have made; a missing shard is an error that names it. Every machine reads and filters the whole
input before it takes its part, so any shard's skipped.json holds the totals (`load_prepared_skips`).
"""

import glob
import json
import os
from pathlib import Path

import datasets

from starcoder2_train.configs import RecipeError
from starcoder2_train.data.skips import SkipReport

SKIPS_FILE = "skipped.json"


HELD_OUT_REPOSITORIES = os.path.join("eval", "repositories")


def _part(root: str, shard_index: int, num_shards: int) -> str:
    return os.path.join(root, f"shard-{shard_index:05d}-of-{num_shards:05d}")


def _load_parts(root: str, what: str) -> datasets.Dataset:
    """The parts under root, concatenated in index order; RecipeError when one is missing."""
    names = sorted(os.listdir(root))
    expected = int(names[0].rsplit("-", 1)[1]) if names else 0
    if not names or len(names) != expected:
        raise RecipeError(
            f"prepared_data_dir: {root} holds {len(names)} of {expected} shards of {what}; "
            "run scripts/prepare_data.py for the missing --shard_index values."
        )
    return datasets.concatenate_datasets([datasets.load_from_disk(os.path.join(root, name)) for name in names])


def prepared_path(directory: str, split: str, epoch: int, shard_index: int, num_shards: int) -> str:
    return _part(os.path.join(directory, split, f"epoch-{epoch}"), shard_index, num_shards)


def save_prepared(
    rows: datasets.Dataset,
    skips: SkipReport,
    directory: str,
    split: str,
    epoch: int,
    shard_index: int,
    num_shards: int,
) -> str:
    """Write one machine's token rows and skip counts; the folder written."""
    path = prepared_path(directory, split, epoch, shard_index, num_shards)
    rows.save_to_disk(path)
    with open(os.path.join(path, SKIPS_FILE), "w") as handle:
        json.dump(skips.as_dict(), handle, indent=1, sort_keys=True)
    return path


def load_prepared(directory: str, split: str, epoch: int) -> datasets.Dataset:
    """Concatenate the shards written by scripts/prepare_data.py in shard order (= one machine's output)."""
    root = os.path.join(directory, split, f"epoch-{epoch}")
    if not os.path.isdir(root):
        raise RecipeError(f"prepared_data_dir: {root} does not exist; run scripts/prepare_data.py for epoch {epoch}.")
    return _load_parts(root, f"{split} epoch {epoch}")


def save_held_out_repositories(repositories: datasets.Dataset, directory: str, shard_index: int, num_shards: int):
    """Write this machine's part of the held-out repositories (the rows of data/shards.load_repositories)."""
    path = _part(os.path.join(directory, HELD_OUT_REPOSITORIES), shard_index, num_shards)
    repositories.save_to_disk(path)
    return path


def load_held_out_repositories(directory: str) -> datasets.Dataset | None:
    """The held-out repositories saved by scripts/prepare_data.py, or None where it saved none."""
    root = os.path.join(directory, HELD_OUT_REPOSITORIES)
    return _load_parts(root, "held-out repositories") if os.path.isdir(root) else None


def load_prepared_skips(directory: str, split: str) -> SkipReport:
    """The skip counts saved beside the prepared shards of `split` (empty when there are none)."""
    paths = sorted(glob.glob(os.path.join(directory, split, "epoch-*", "*", SKIPS_FILE)))
    return SkipReport.from_dict(json.loads(Path(paths[0]).read_text()) if paths else {})
