"""The data pipeline: Stack v2 shards → repository examples → FIM → tokens → packed windows.

`build_token_rows` runs the first steps as one batched, cached `datasets.map` (num_proc processes on
one machine; num_shards/shard_index to split the work across machines); `build_packed_datasets`
adds packing. `DataReport` gathers what each step counted, skipped rows included.
"""

import os

import datasets

from starcoder2_train.configs import RecipeError


def prepared_path(directory: str, split: str, epoch: int, shard_index: int, num_shards: int) -> str:
    return os.path.join(directory, split, f"epoch-{epoch}", f"shard-{shard_index:05d}-of-{num_shards:05d}")


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
