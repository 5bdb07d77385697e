"""Prepared data: token stores written ahead of training by scripts/prepare_data.py, and opened by training.

Layout of a prepared directory (data/prepare.py writes it, one part per datatrove task):

    train/epoch-<e>/part-<r>-of-<N>.{tokens,offsets,json}   token-store parts (data/store/token_store.py), epoch e
    eval/epoch-0/part-<r>-of-<N>.{tokens,offsets,json}      the held-out repositories' examples
    eval/repositories/part-<r>-of-<N>.parquet               the held-out repositories themselves (evaluation)
    decontamination/part-<r>-of-<N>.jsonl                   the files decontamination removed, one JSON a line
    near_dedup/{signatures,pairs,remove,logs-*}/            with near_dedup: the MinHash stages and their logs
    logs/                                                   datatrove's logs, task completions and stats

Training only opens it: a store is memory-mapped (nothing is copied or tokenized), and the counts of the
preparation (skips with their reasons, files, FIM) are the datatrove stats of its tasks, summed here. A
store with a part missing is refused, naming the part and the command that makes it.
"""

import glob
import json
import os
import re
from collections import Counter

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.table import InMemoryTable

from starcoder2_train.configs import RecipeError
from starcoder2_train.data.skips import SkipReport

LOGS = "logs"
HELD_OUT = os.path.join("eval", "repositories")
DECONTAMINATION = "decontamination"
NEAR_DEDUP = "near_dedup"
_PART = re.compile(r"part-(\d{5})-of-(\d{5})")


def part_name(rank: int, world_size: int) -> str:
    return f"part-{rank:05d}-of-{world_size:05d}"


def near_dedup_logs(directory: str, stage: str) -> str:
    """The logging directory of one near-deduplication stage (its stats are not the preparation's)."""
    return os.path.join(directory, NEAR_DEDUP, "logs-" + stage.replace(" ", "-"))


def decontamination_entries(directory: str) -> list[dict]:
    """The files decontamination removed, from every task's list (repo_name, path, benchmark, text)."""
    entries = []
    for path in sorted(glob.glob(os.path.join(directory, DECONTAMINATION, "part-*.jsonl"))):
        with open(path, encoding="utf-8") as handle:
            entries += [json.loads(line) for line in handle if line.strip()]
    return entries


def store_directory(directory: str, split: str, epoch: int) -> str:
    return os.path.join(directory, split, f"epoch-{epoch}")


def held_out_part_path(directory: str, rank: int, world_size: int) -> str:
    return os.path.join(directory, HELD_OUT, f"{part_name(rank, world_size)}.parquet")


def check_complete(root: str, suffix: str) -> list[str]:
    """The parts under root, in task order; RecipeError naming the missing ones when some task did not finish."""
    paths = sorted(glob.glob(os.path.join(root, f"part-*-of-*{suffix}")))
    found = {int(m.group(1)): int(m.group(2)) for m in (_PART.search(os.path.basename(p)) for p in paths) if m}
    expected = set(found.values())
    if len(expected) != 1:
        raise RecipeError(f"prepared_data_dir: {root} holds no complete set of parts ({len(paths)} found).")
    (tasks,) = expected
    missing = [part_name(rank, tasks) for rank in range(tasks) if rank not in found]
    if missing:
        raise RecipeError(
            f"prepared_data_dir: {root} lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} of "
            f"{tasks} parts; run scripts/prepare_data.py again with the same arguments (it reruns only the "
            "tasks that did not finish)."
        )
    return paths


def open_store(directory: str, split: str, epoch: int):
    """The TokenStore of one split and epoch, or None for an eval split that holds nothing."""
    from starcoder2_train.data.store.token_store import TokenStore

    root = store_directory(directory, split, epoch)
    if not os.path.isdir(root):
        if split == "eval":
            return None
        raise RecipeError(
            f"prepared_data_dir: {root} does not exist; run scripts/prepare_data.py with --epochs {epoch + 1}."
        )
    check_complete(root, ".json")
    store = TokenStore(root)
    return None if split == "eval" and store.num_examples == 0 else store


def load_held_out_repositories(directory: str) -> datasets.Dataset | None:
    """The held-out repositories (repo_name, files) saved beside the stores, or None when there are none."""
    root = os.path.join(directory, HELD_OUT)
    if not os.path.isdir(root):
        return None
    paths = check_complete(root, ".parquet")
    table = pa.concat_tables([pq.read_table(path) for path in paths])  # a task may hold out nothing: 0 rows
    return datasets.Dataset(InMemoryTable(table)) if table.num_rows else None


def prepared_stats(directory: str) -> Counter:
    """The datatrove stats of every task of the preparation, summed by name (totals only)."""
    totals = Counter()
    for path in sorted(glob.glob(os.path.join(directory, LOGS, "stats", "*.json"))):
        with open(path) as handle:
            for step in json.load(handle):
                for name, value in step.get("stats", {}).items():
                    totals[name] += value["total"] if isinstance(value, dict) else value
    return totals


def prepared_skips(directory: str, stats: Counter | None = None) -> SkipReport:
    """What the preparation left out, by reason: its "files: ...", "repositories: ..." stats (`stats`: those
    prepared_stats(directory) returned, when the caller has them already)."""
    units = ("files: ", "repositories: ", "parquet files: ", "directories: ", "redactions: ")
    stats = prepared_stats(directory) if stats is None else stats
    return SkipReport.from_dict({name: int(count) for name, count in stats.items() if name.startswith(units)})
