"""Prepared data: token rows written ahead of training by scripts/prepare_data.py, and read back by training.

Layout: `DIR/<split>/epoch-<e>/shard-<i>-of-<n>/`, one `datasets.save_to_disk` folder per machine that
prepared part `i` of `n` (data/splits.shard_repositories), with `skipped.json` beside the rows (the
SkipReport as a flat dict). `load_prepared` concatenates the shards of one split and epoch in index order,
which is what one machine would have made; a missing shard is an error that names it.
Every machine reads and filters the whole input before it takes its part, so any shard's skipped.json holds
the totals (`load_prepared_skips`).
"""

import glob
import json
import os
from pathlib import Path

import datasets

from starcoder2_train.configs import RecipeError
from starcoder2_train.data.skips import SkipReport

SKIPS_FILE = "skipped.json"


def prepared_path(directory: str, split: str, epoch: int, shard_index: int, num_shards: int) -> str:
    return os.path.join(directory, split, f"epoch-{epoch}", f"shard-{shard_index:05d}-of-{num_shards:05d}")


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
    names = sorted(os.listdir(root))
    expected = int(names[0].rsplit("-", 1)[1]) if names else 0
    if not names or len(names) != expected:
        raise RecipeError(
            f"prepared_data_dir: {root} holds {len(names)} of {expected} shards; "
            "run scripts/prepare_data.py for the missing --shard_index values."
        )
    return datasets.concatenate_datasets([datasets.load_from_disk(os.path.join(root, n)) for n in names])


def load_prepared_skips(directory: str, split: str) -> SkipReport:
    """The skip counts saved beside the prepared shards of `split` (empty when there are none)."""
    paths = sorted(glob.glob(os.path.join(directory, split, "epoch-*", "*", SKIPS_FILE)))
    return SkipReport.from_dict(json.loads(Path(paths[0]).read_text()) if paths else {})
