"""Preprocessing on datatrove: a recipe's shards → memory-mapped token stores, in N tasks on any executor.

The pipeline is datatrove blocks, each usable alone, in the order of data/filters/splits.py's in-process path:
- `RepositoryReader`: task r of N reads only its own contiguous range of the input parquet files (per-repository
  layout), streams them in batches of rows (memory bounded by one batch, never the file), applies the recipe's
  opt-outs, filters and decontamination with data/sources/shards.py's own `filter_repository_rows`, and counts every
  file, repository and parquet file left out as a pipeline stat named like SkipReport's keys ("files: empty
  content"); the files decontamination removed are listed in OUTPUT/decontamination/part-<r>-of-<N>.jsonl. It
  tags each repository train or eval (eval_data_files, or the eval_fraction hash of data/filters/splits.py).
- with `near_dedup`: data/filters/near_dedup.py's `NearDuplicateFilter`, after three stages that ran first
  (`near_dedup_stages`: the reader and the files' MinHash signatures in the same N tasks, the duplicate pairs in
  one task per band, the groups in one task), so each task drops the same files the in-process path drops;
- with `pii_redaction`: `PiiRedaction`, data/filters/pii.py's `redact_files`, counted as "redactions: <kind>" stats;
Then, where the prepared tokens carry file-level FIM (`fim_level: file`, fim_rate > 0: every epoch is other text),
data/prepare_epochs.py's `ExampleTokenizer` and `StoreWriter`: one token store per data epoch and task. Otherwise
the tokens are stored once (data/prepare_pieces.py): `RepositoryPieces` tokenizes each repository file by file into
arrays and `PieceStoreWriter` writes piece stores (data/store/pieces.py), from which training assembles any data
epoch while reading (data/windows/assembly.py); --epochs then prepares nothing more (build_stages with
first_epoch > 0 gives no stage).
A document source (`dataset_kind: documents`, data/sources/documents.py) is read by data/sources/document_reader.py's
`DocumentReader` instead of the repository reader (no layout or download checks: `document_plan` checks each file's
`content` column before any task), each row a one-file Document, so near-dedup and PII run on it as on a
repository; its tokens are always stored once (a document has no files to FIM-cut), each document a record of 0
files, its declared structure tokens as ids. It has no held-out split, whatever eval_fraction says: evaluation
reads a mixture's first repository source (data/pipeline.py `evaluation_data_args`), as the in-process path does.
The reader cuts a repository over `max_repository_bytes` (32 MB) into parts of whole files, each an example of
its own, counted as "<split> repositories split over max_repository_bytes": what one task holds of a repository
is bounded by it (a 50 MB repository: 1.05 GB peak stored once, 2.9 GB per-epoch; tests/test_store_once.py).
Because a task's files are a contiguous range and parts are named by rank, the parts in name order are the
stream one task would write: N tasks give the store one task gives. datatrove records each finished task in
`logging_dir`; running the same command again runs only the tasks that failed or never ran.
Executors: `local` (processes on this machine), `slurm` (an sbatch array), `ray` (data/ray_executor.py).

Cost per task: one batch of repositories in memory (64 rows as Arrow, the parquet reader's; as Python
strings at most BATCH_BYTES, 64 MB, of them at a time, or one larger repository: data/sources/shards.py), one
open writer per (split, epoch); the index of the input files (a list of paths), the opt-out set and the benchmark
index (data/filters/opt_outs.py, data/filters/decontamination.py say their size) are the structures every task
holds whole.
"""

import contextlib
import json
import logging
import os
import threading

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from starcoder2_train.configs import DataArguments, RecipeError
from starcoder2_train.configs.data_sources import DOCUMENTS
from starcoder2_train.data.filters.files import file_filters, filter_repository_rows
from starcoder2_train.data.filters.near_dedup import (
    FileSignatures,
    KeepFirstOfCluster,
    NearDuplicateFilter,
    find_pairs,
    minhash_config,
)
from starcoder2_train.data.filters.pii import PiiRedactor, redact_files
from starcoder2_train.data.filters.splits import eval_share
from starcoder2_train.data.prepare_epochs import ExampleTokenizer, StoreWriter
from starcoder2_train.data.prepare_pieces import PieceStoreWriter, RepositoryPieces, repository_parts
from starcoder2_train.data.skips import UNREADABLE_PARQUET
from starcoder2_train.data.sources.document_reader import DocumentReader
from starcoder2_train.data.sources.documents import check_document_file, document_files, source_kind
from starcoder2_train.data.sources.download.verify import check_downloaded_shards
from starcoder2_train.data.sources.shards import (
    REPOSITORIES_PER_BATCH,
    bounded_slices,
    parquet_layout,
    python_rows,
    resolve_data_files,
)
from starcoder2_train.data.special_tokens import SpecialTokenIds
from starcoder2_train.data.store.prepared import (
    DECONTAMINATION,
    LOGS,
    NEAR_DEDUP,
    contiguous_part,
    decontamination_list,
    file_level_fim,
    near_dedup_logs,
)
from starcoder2_train.data.tokens.tokenizer import load_tokenizer
from starcoder2_train.progress import progress

logger = logging.getLogger(__name__)


def input_plan(data_args: DataArguments) -> list[tuple[str, str | None]]:
    """(parquet path, split or None) for every input file: None = split by the eval_fraction hash."""
    _refuse_max_repositories(data_args)
    plan = [(path, None if data_args.eval_data_files is None else "train") for path in resolve_data_files(data_args)]
    if data_args.eval_data_files:
        plan += [(path, "eval") for path in resolve_data_files(data_args, data_args.eval_data_files)]
    check_layouts(plan)
    check_downloaded_shards(data_args, [path for path, _ in plan])  # a damaged download: refused, never skipped
    return plan


def document_plan(data_args: DataArguments) -> list[str]:
    """The files of a document source, each checked for a text `content` column now, before any task starts (the
    repository layouts' checks and the download records do not apply: data/sources/documents.py)."""
    _refuse_max_repositories(data_args)
    if file_level_fim(data_args):  # dataset_kind auto, found to be documents: the manifest would say file
        raise RecipeError(
            f"dataset_kind: auto, and {data_args.dataset_name_or_path} holds documents, which have no files to "
            "FIM-cut at fim_level: file; set dataset_kind: documents (its tokens are then stored once, FIM-less), or "
            "fim_level: window (FIM on each window, documents included)."
        )
    files = document_files(data_args)
    for path in files:
        if not path.startswith("hf://"):
            check_document_file(path)
    return files


def _refuse_max_repositories(data_args: DataArguments) -> None:
    if data_args.max_repositories is not None:
        raise RecipeError(
            "max_repositories: a cut of the first N repositories is global, and prepare_data.py's tasks each read "
            "their own files; unset it (or train without prepared data for a quick run)."
        )


def check_layouts(plan: list[tuple[str, str | None]]) -> None:
    """Refuse a shard of the wrong layout or schema here, before any task starts (one footer read per file), rather
    than in a task whose failure datatrove logs with a traceback. An unreadable file is left to its task, which
    counts it."""
    for path, _ in plan:
        try:
            with fsspec.open(path, "rb") as handle:
                schema = pq.read_schema(handle)
        except (pa.ArrowException, OSError):
            continue
        _check_repository_layout(path, schema)


def _check_repository_layout(path: str, schema: pa.Schema) -> None:
    if parquet_layout(path, schema) != "repository":
        raise RecipeError(
            f"{path}: one row per file; prepare_data.py's tasks read per-repository shards (a task cannot "
            "group a repository's files across other tasks' files). Train from these shards without "
            "prepared data, or convert them to one row per repository first."
        )


class RepositoryReader(PipelineStep):
    """Per-repository parquet → one Document per kept repository (metadata: files, split); skips as stats.

    filters: data/sources/shards.py's `file_filters` (opt-outs and the benchmark index in it), built once by the
    caller;
    report_dir: where each task lists the files decontamination removed (None: not listed)."""

    name, type = "Stack v2 repositories", "📖 - READER"

    def __init__(
        self, plan: list[tuple[str, str | None]], data_args: DataArguments, filters=None, report_dir: str | None = None
    ):
        super().__init__()
        self.plan, self.eval_fraction, self.report_dir = plan, data_args.eval_fraction, report_dir
        self.max_repository_bytes = data_args.max_repository_bytes
        self.filters = file_filters(data_args) if filters is None else filters

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        with decontamination_list(self.report_dir, rank, world_size) as report:
            for path, split in contiguous_part(self.plan, rank, world_size):
                try:
                    parquet = pq.ParquetFile(path)
                except (pa.ArrowException, OSError) as error:
                    kind = type(error).__name__
                    logger.warning("Skipping %s: not a readable parquet file (%s: %s).", path, kind, error)
                    self.stat_update(f"parquet files: {UNREADABLE_PARQUET}")
                    continue
                _check_repository_layout(path, parquet.schema_arrow)
                for batch in parquet.iter_batches(batch_size=REPOSITORIES_PER_BATCH, columns=["repo_name", "files"]):
                    for rows in bounded_slices(batch):  # Python strings of at most BATCH_BYTES at a time
                        yield from self._documents(python_rows(rows), split, report)

    def _documents(self, batch: dict, split: str | None, report):
        out = filter_repository_rows(batch, self.filters)
        rows = zip(out["repo_name"], out["files"], out["skipped"], out["repo_skip"], out["contaminated"])
        for name, files, skipped, repo_skip, contaminated in rows:
            for reason in skipped:
                self.stat_update(f"files: {reason}")
            for entry in contaminated if report is not None else ():
                report.write(json.dumps({"repo_name": name, **entry}, ensure_ascii=False) + "\n")
            if repo_skip:
                self.stat_update(f"repositories: {repo_skip}")
                continue
            held_out = split == "eval" if split is not None else eval_share(name) < self.eval_fraction
            parts = repository_parts(files, self.max_repository_bytes)
            if len(parts) > 1:  # bounded memory downstream; counted, never dropped
                self.stat_update(f"{'eval' if held_out else 'train'} repositories split over max_repository_bytes")
            for number, part in enumerate(parts):
                key = name if len(parts) == 1 else f"{name}\x00part {number}"  # the key of its per-epoch draws
                metadata = {"files": part, "split": "eval" if held_out else "train", "key": key}
                yield Document(text="", id=name, metadata=metadata)


class PiiRedaction(PipelineStep):
    """Documents → the same, with personal data in their files replaced (data/filters/pii.py), counted by kind."""

    name, type = "PII redaction", "🔏 - PII"

    def __init__(self, model_path: str | None = None):
        super().__init__()
        self.redactor = PiiRedactor(model_path)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for document in data or ():
            with self.track_time():
                counts = redact_files(document.metadata["files"], self.redactor)
            for kind, count in counts.items():
                self.stat_update(f"redactions: {kind}", value=count)
            yield document


def stores_once(data_args: DataArguments) -> bool:
    """Whether the preparation writes the tokens once (a piece store): when they carry no file-level FIM."""
    return not file_level_fim(data_args)


def build_stages(
    data_args: DataArguments, output_dir: str, seed: int, epochs: int, vocab_size: int, first_epoch: int = 0
) -> list:
    """(name, pipeline, tasks, logging_dir) of each datatrove run, in order; tasks None: the --tasks of the call.

    Without near_dedup one run; with it, three before the main one (each must finish before the next starts).
    first_epoch > 0: the train epochs [first_epoch, epochs) of a store prepared before, in a logging dir of their
    own (logs-epochs-<first>-<last>: the first run's completions must not mark them done), nothing else written."""
    if stores_once(data_args) and first_epoch > 0:
        return []  # every epoch of tokens stored once is assembled while reading: nothing more to prepare
    documents = source_kind(data_args) == DOCUMENTS
    plan = document_plan(data_args) if documents else input_plan(data_args)  # read once, pickled into tasks
    filters = file_filters(data_args)  # documents: its benchmark index only (languages etc. describe files)

    def reader(report_dir=None):
        if documents:
            return DocumentReader(plan, filters["decontamination"], report_dir)
        return RepositoryReader(plan, data_args, filters, report_dir=report_dir)

    main = [reader(os.path.join(output_dir, DECONTAMINATION) if first_epoch == 0 else None)]
    stages = []
    if data_args.near_dedup:
        folder, config = os.path.join(output_dir, NEAR_DEDUP), minhash_config(data_args)
        stages = [
            (
                "near-dup signatures",
                [reader(), FileSignatures(f"{folder}/signatures", config)],
                None,
            ),
            ("near-dup pairs", [find_pairs(f"{folder}/signatures", f"{folder}/pairs", config)], config.num_buckets),
            ("near-dup groups", [KeepFirstOfCluster(f"{folder}/pairs", f"{folder}/remove")], 1),
        ]
        stages = [(name, pipeline, tasks, near_dedup_logs(output_dir, name)) for name, pipeline, tasks in stages]
        main.append(NearDuplicateFilter(f"{folder}/remove"))
    if data_args.pii_redaction:
        main.append(PiiRedaction(data_args.pii_model_path))
    if stores_once(data_args):  # no file-level FIM: the tokens once, every epoch assembled while reading
        special = SpecialTokenIds.from_tokenizer(load_tokenizer(data_args.tokenizer_name_or_path))
        main += [
            RepositoryPieces(data_args.tokenizer_name_or_path, data_args.structure_tokens if documents else ()),
            PieceStoreWriter(output_dir, vocab_size, special),
        ]
    else:
        main += [
            ExampleTokenizer(data_args, seed, epochs, first_epoch),
            StoreWriter(output_dir, epochs, vocab_size, first_epoch),
        ]
    logs = LOGS if first_epoch == 0 else f"{LOGS}-epochs-{first_epoch}-{epochs - 1}"
    return stages + [("tokens", main, None, os.path.join(output_dir, logs))]


def make_executor(kind: str, pipeline: list, tasks: int, logging_dir: str, workers: int = -1, **options):
    """A datatrove executor for `pipeline`: local (options: local_tasks, local_rank_offset), slurm (its sbatch
    options: time, partition, cpus_per_task, mem_per_cpu_gb, venv_path, sbatch_args, ...) or ray."""
    if kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        local_tasks = options.get("local_tasks", tasks)
        workers = local_tasks if workers == -1 else min(workers, local_tasks)  # 1: in this process, no pool
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir, **options)
    if kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        return SlurmPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir, **options)
    if kind == "ray":  # connects, chains the stages and fails loudly: data/ray_executor.py
        from starcoder2_train.data.ray_executor import RayStage

        return RayStage(pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir, **options)
    raise RecipeError(f"--executor: {kind!r} is not local, slurm or ray.")


def completed_tasks(logging_dir: str) -> int:
    """Tasks datatrove has marked complete in `logging_dir` (its completions/ folder, on any fsspec filesystem)."""
    fs, path = fsspec.core.url_to_fs(logging_dir)
    folder = f"{path.rstrip('/')}/completions"
    return len(fs.ls(folder, detail=False)) if fs.isdir(folder) else 0


@contextlib.contextmanager
def task_progress(stages: list[tuple[str, int]], *, disable: bool | None = None, interval: float = 1.0):
    """A tqdm bar over the tasks of `stages` ((logging_dir, tasks) pairs) while the block runs them: tasks done of
    all tasks, with the rate and an ETA, read from datatrove's completion marks by a polling thread.

    Task granularity is what datatrove exposes (a task reports nothing until it ends): at scale, 1,000 tasks give a
    smooth bar; one task gives 0 → 1. Tasks completed by an earlier run (a rerun after a failure) count from the
    start. Cost: one listing of each completions/ folder per `interval`; on S3 a LIST call each."""
    total = sum(tasks for _, tasks in stages)
    count = lambda: min(total, sum(completed_tasks(folder) for folder, _ in stages))  # noqa: E731
    bar = progress(desc="prepare: tasks", total=total, unit="task", disable=disable)
    bar.update(count())
    stop = threading.Event()

    def poll():
        while not stop.wait(interval):
            bar.update(count() - bar.n)

    thread = threading.Thread(target=poll, name="prepare-progress", daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()
        bar.update(count() - bar.n)
        bar.close()
