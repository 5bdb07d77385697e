"""The steps after the filters, over the repository rows of the in-process pipeline: near-deduplication, then PII.

data/sources/shards.py has read the shards and data/filters/files.py removed opted-out repositories and
contaminated files and applied the filters; `clean_repositories` then runs, in this order:
- near-deduplication (`near_dedup`): the blocks of data/filters/near_dedup.py run here in one process (rank 0 of 1,
  in a temporary folder), then one `datasets.map` drops the removed files. In one process: for data a machine tokenizes
  in process; at scale scripts/prepare_data.py runs the same blocks as datatrove tasks;
- PII redaction (`pii_redaction`): data/filters/pii.py's `redact_files` on every file, one batched `datasets.map` in
  num_proc processes (the PiiRedactor, its compiled patterns and no model, is pickled into each).
data/prepare.py runs the same functions as datatrove blocks (NearDuplicateFilter, PiiRedaction), so both paths
remove and rewrite the same files. Each map has an explicit fingerprint of its input, its settings and the source
of the code that does the work: a change of either makes a new datasets cache, and so new token rows.
"""

import functools
import hashlib
import inspect
import logging
import sys
import tempfile
from collections import Counter

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, Features, List, Value

from starcoder2_train.configs import DataArguments
from starcoder2_train.data.filters import near_dedup, pii
from starcoder2_train.data.filters.near_dedup import (
    FileSignatures,
    KeepFirstOfCluster,
    find_pairs,
    keep_files,
    minhash_config,
    removed_files,
    similarity_threshold,
)
from starcoder2_train.data.skips import NEAR_DUPLICATE, NO_FILE_LEFT, SkipReport
from starcoder2_train.data.sources.shards import FILE_FEATURES, REPOSITORIES_PER_BATCH

logger = logging.getLogger(__name__)
DEDUP_FEATURES = Features({"repo_name": Value("string"), "files": List(FILE_FEATURES), "dropped": Value("int64")})
PII_FEATURES = Features(
    {"repo_name": Value("string"), "files": List(FILE_FEATURES), "redacted": List(Value("string"))}
)


@functools.cache
def _source(module) -> str:
    return inspect.getsource(module)


def _fingerprint(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _repository_documents(rows: Dataset):
    from datatrove.data import Document

    for batch in rows.select_columns(["repo_name", "files"]).iter(batch_size=REPOSITORIES_PER_BATCH):
        for name, files in zip(batch["repo_name"], batch["files"]):
            yield Document(text="", id=name, metadata={"files": files})


def near_duplicate_files(rows: Dataset, data_args: DataArguments) -> np.ndarray:
    """The indices (in row, then file order) of the files near_dedup removes: stages 1-3 in one process."""
    from loguru import logger as datatrove_logger

    config = minhash_config(data_args)
    datatrove_logger.disable("datatrove")  # two log lines per band and stage: not for an in-process run
    try:
        with tempfile.TemporaryDirectory(prefix="near-dedup-") as folder:
            FileSignatures(f"{folder}/signatures", config).run(_repository_documents(rows), 0, 1)
            pairs = find_pairs(f"{folder}/signatures", f"{folder}/pairs", config)
            for band in range(config.num_buckets):
                pairs.run(None, band, config.num_buckets)
            KeepFirstOfCluster(f"{folder}/pairs", f"{folder}/remove").run(None, 0, 1)
            return removed_files(f"{folder}/remove", 0).copy()
    finally:
        datatrove_logger.enable("datatrove")


def _file_counts(rows: Dataset) -> np.ndarray:
    """Files per row, in the order of the rows (a filtered Dataset's rows are not its table's), in Arrow batches."""
    batches = rows.select_columns(["files"]).with_format("arrow").iter(batch_size=1000)
    counts = [pc.list_value_length(batch["files"]).to_numpy(zero_copy_only=False) for batch in batches]
    return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


def _drop_files(batch: dict, indices: list[int], starts: np.ndarray, removed: np.ndarray) -> dict:
    out = {"repo_name": batch["repo_name"], "files": [], "dropped": []}
    for row, files in zip(indices, batch["files"]):
        kept, dropped = keep_files(files, int(starts[row]), removed)
        out["files"].append(kept)
        out["dropped"].append(dropped)
    return out


def deduplicate_repositories(rows: Dataset, data_args: DataArguments, report: SkipReport) -> Dataset:
    """Rows without the files near_dedup removes (counted; repositories left empty dropped and counted)."""
    removed = near_duplicate_files(rows, data_args)
    logger.info(
        "near_dedup: %d of the files are near-duplicates (MinHash, Jaccard threshold about %.2f)",
        len(removed),
        similarity_threshold(minhash_config(data_args)),
    )
    if not len(removed):
        return rows
    starts = np.concatenate([[0], np.cumsum(_file_counts(rows))])
    settings = (data_args.near_dedup_ngrams, data_args.near_dedup_buckets, data_args.near_dedup_hashes_per_bucket)
    rows = rows.map(
        _drop_files,
        batched=True,
        batch_size=REPOSITORIES_PER_BATCH,
        with_indices=True,
        fn_kwargs={"starts": starts, "removed": removed},
        features=DEDUP_FEATURES,
        num_proc=data_args.num_proc,
        new_fingerprint=_fingerprint(rows._fingerprint, settings, _source(near_dedup), _source(sys.modules[__name__])),
        desc="near-deduplication",
    )
    report.files[NEAR_DUPLICATE] += int(np.sum(rows.data.column("dropped").to_numpy()))
    empty = np.flatnonzero(_file_counts(rows) == 0)
    if len(empty):
        report.repositories[NO_FILE_LEFT] += len(empty)
        rows = rows.select(np.setdiff1d(np.arange(len(rows)), empty))
    return rows.select_columns(["repo_name", "files"])


def _redact(batch: dict, redactor: pii.PiiRedactor) -> dict:
    out = {"repo_name": batch["repo_name"], "files": batch["files"], "redacted": []}
    for files in batch["files"]:
        counts = pii.redact_files(files, redactor)
        out["redacted"].append([kind for kind, count in sorted(counts.items()) for _ in range(count)])
    return out


def redact_repositories(rows: Dataset, data_args: DataArguments, report: SkipReport) -> Dataset:
    """Rows with personal data replaced (data/filters/pii.py), the replacements counted by kind in
    report.redactions."""
    redactor = pii.PiiRedactor(data_args.pii_model_path)
    rows = rows.map(
        _redact,
        batched=True,
        batch_size=REPOSITORIES_PER_BATCH,
        fn_kwargs={"redactor": redactor},
        features=PII_FEATURES,
        num_proc=data_args.num_proc,
        new_fingerprint=_fingerprint(
            rows._fingerprint, data_args.pii_model_path, _source(pii), _source(sys.modules[__name__])
        ),
        desc="PII redaction",
    )
    counts = Counter()
    for item in pc.value_counts(pc.list_flatten(rows.data.column("redacted"))).to_pylist():
        counts[item["values"]] += item["counts"]
    report.redactions.update(counts)
    return rows.select_columns(["repo_name", "files"])


def clean_repositories(rows: Dataset, data_args: DataArguments, report: SkipReport) -> Dataset:
    """Near-deduplication, then PII redaction, as the recipe asks; what they do is added to `report`."""
    if data_args.near_dedup and len(rows):
        rows = deduplicate_repositories(rows, data_args, report)
    if data_args.pii_redaction and len(rows):
        rows = redact_repositories(rows, data_args, report)
    return rows
