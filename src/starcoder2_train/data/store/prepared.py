"""Prepared data: token stores written ahead of training by scripts/prepare_data.py, and opened by training.

Layout of a prepared directory (data/prepare.py writes it, one part per datatrove task):

    train/epoch-<e>/part-<r>-of-<N>.{tokens,offsets,json}   token-store parts (data/store/token_store.py), epoch e
    eval/epoch-0/part-<r>-of-<N>.{tokens,offsets,json}      the held-out repositories' examples
    {train,eval}/pieces/part-<r>-of-<N>.*, pieces.json      or, tokens stored once (no file-level FIM): piece
                                                            stores (data/store/pieces.py), every epoch assembled
                                                            while reading (data/windows/assembly.py), and
    {train,eval}/pieces/epochs/                             the per-epoch indexes it builds (when writable)
    eval/repositories/part-<r>-of-<N>.parquet               the held-out repositories themselves (evaluation)
    decontamination/part-<r>-of-<N>.jsonl                   the files decontamination removed, one JSON a line
    near_dedup/{signatures,pairs,remove,logs-*}/            with near_dedup: the MinHash stages and their logs
    logs/                                                   datatrove's logs, task completions and stats

Training only opens it: a store is memory-mapped (nothing is copied or tokenized), and the counts of the
preparation (skips with their reasons, files, FIM) are the datatrove stats of its tasks, summed here. A
store with a part missing is refused, naming the part and the command that makes it.

Which layout a preparation writes: per-epoch copies only where the prepared tokens carry file-level FIM
(`fim_level: file` with fim_rate > 0: each epoch cuts other files at other places, so the text differs per
epoch), one piece store otherwise. `prepared_epochs` opens either for training; of a piece store any epoch, and
the read-time keys (fim_rate, fim_fragment_rate, fim_spm_rate, repo_metadata_rate, seed, the epochs) can change
without preparing again.
"""

import contextlib
import glob
import json
import os
import re
from collections import Counter
from dataclasses import dataclass

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


def contiguous_part(items: list, rank: int, world_size: int) -> list:
    """Task `rank`'s share of `items`: a contiguous range, the ranges in rank order covering the list once (so the
    parts in name order are the stream one task would write)."""
    return items[len(items) * rank // world_size : len(items) * (rank + 1) // world_size]


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


@contextlib.contextmanager
def decontamination_list(report_dir: str | None, rank: int, world_size: int):
    """A task's list of the files decontamination removed, DIR/decontamination/part-<r>-of-<N>.jsonl: an open text
    file for its JSON lines, renamed into place when the task ends well; None when report_dir is None."""
    if report_dir is None:
        yield None
        return
    os.makedirs(report_dir, exist_ok=True)
    path = os.path.join(report_dir, f"{part_name(rank, world_size)}.jsonl")
    with open(f"{path}.partial", "w", encoding="utf-8") as handle:
        yield handle
    os.replace(f"{path}.partial", path)


def store_directory(directory: str, split: str, epoch: int) -> str:
    return os.path.join(directory, split, f"epoch-{epoch}")


def pieces_directory(directory: str, split: str) -> str:
    return os.path.join(directory, split, "pieces")


def file_level_fim(data_args) -> bool:
    """Whether a recipe's prepared tokens carry file-level FIM (fim_level: file, fim_rate and fim_fragment_rate
    above 0): then each epoch is other text, and the preparation writes per-epoch copies. Never for a document
    source (`dataset_kind: documents`, as a mixture's sources resolve it): its documents have no files to cut,
    in process as prepared (data/sources/documents.py), so its tokens are stored once at either level."""
    if getattr(data_args, "dataset_kind", None) == "documents":
        return False
    return data_args.fim_level == "file" and data_args.fim_rate > 0 and data_args.fim_fragment_rate > 0


def stored_once(directory: str) -> bool:
    """Whether the prepared `directory` holds tokens stored once (a train piece store), not per-epoch stores."""
    from starcoder2_train.data.store.pieces import is_piece_store

    return is_piece_store(pieces_directory(directory, "train"))


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


def open_store(directory: str, split: str, epoch: int, data_args=None, seed: int | None = None):
    """The token stream of one split and epoch: a TokenStore of a per-epoch store, or the EpochStream that
    assembles epoch `epoch` of a piece store (which needs the recipe's `data_args` and `seed`: its draws);
    None for an eval split that holds nothing."""
    from starcoder2_train.data.store.token_store import TokenStore

    if stored_once(directory):
        return _open_pieces(directory, split, epoch, data_args, seed)
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


def _open_pieces(directory: str, split: str, epoch: int, data_args, seed: int | None):
    from starcoder2_train.data.store.pieces import PieceStore
    from starcoder2_train.data.windows.assembly import EpochStream

    if data_args is None or seed is None:
        raise ValueError(f"open_store: {directory} stores its tokens once; an epoch needs data_args and seed")
    if file_level_fim(data_args):
        raise RecipeError(
            f"fim_level: file at fim_rate {data_args.fim_rate} cuts files before packing, and prepared_data_dir "
            f"{directory} holds tokens stored once, without file-level FIM; set fim_level: window (FIM on each "
            "window, read-time) or prepare again with this recipe (per-epoch copies)."
        )
    root = pieces_directory(directory, split)
    if split == "eval" and not os.path.isdir(root):
        return None
    check_complete(root, ".json")
    pieces = PieceStore(root)
    if pieces.num_records == 0:
        if split == "eval":
            return None
        raise RecipeError(f"prepared_data_dir: {root} holds no repository; prepare it again with data in it.")
    return EpochStream(pieces, epoch, seed, data_args.repo_metadata_rate)


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


@dataclass
class PreparedEpochs:
    """make_epoch(e) -> the PackedDataset of data epoch e of prepared `directory`'s train split, as training reads
    it (data/pipeline.py's build_packed_dataset): windows shuffled per epoch (shuffle_seed = seed * 1_000_003 +
    epoch) and window-level FIM at the recipe's rates. Of a piece store any e >= 0, nothing prepared; of per-epoch
    stores those prepared. Picklable (a data-loader worker makes the epochs it reaches; the index is built once per
    machine, data/windows/assembly.py)."""

    directory: str
    data_args: object
    tokenizer: object
    seed: int

    def __call__(self, epoch: int):
        from dataclasses import replace

        from starcoder2_train.data.pipeline import build_packed_dataset  # the one place windows are packed

        data_args = replace(self.data_args, prepared_data_dir=self.directory)
        return build_packed_dataset(data_args, self.tokenizer, self.seed, epoch, report=False)[0]


def prepared_epochs(directory: str, data_args, tokenizer, seed: int):
    """(make_epoch, epoch 0's PackedDataset, the fields of its DataReport) of prepared `directory`'s train split:
    make_epoch is a PreparedEpochs; the report fields are data/report.py DataReport.of_prepared's (repositories, files,
    files_fim_psm, files_fim_spm, tokens, windows, padding_tokens, skipped), from the preparation's stats."""
    from starcoder2_train.data.report import DataReport  # it imports this module

    make_epoch = PreparedEpochs(directory, data_args, tokenizer, seed)
    first = make_epoch(0)
    report = DataReport.of_prepared(directory, "train", first.stream, first)  # the one place they are read
    fields = ("repositories", "files", "files_fim_psm", "files_fim_spm", "tokens", "windows", "padding_tokens")
    report = {key: getattr(report, key) for key in (*fields, "skipped")}
    return make_epoch, first, report
