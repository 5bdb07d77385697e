"""The data pipeline: repository rows → examples → FIM → tokens (one cached `datasets.map`) → packed windows.

`tokenize_repositories` runs the middle steps as one batched `datasets.map` (num_proc processes on one
machine, num_shards/shard_index across machines), cached under a fingerprint of everything it depends on,
the code that makes the rows included (`code_fingerprint`: a change to repo_examples, fim, tokenization,
special_tokens or ExampleTransform makes a new cache, with no version number to bump by hand).
`load_token_rows` gives one split's token rows from the raw shards (prepared data is opened as a token store);
`build_packed_dataset` packs them; `build_source_data` makes as many data epochs of one source as the run needs,
each with its own file order and FIM draws, and `build_training_data` joins the recipe's sources by weight
(data/windows/mixture.py; a document source's rows come from data/sources/documents.py; a mixture's held-out
evaluation reads its first repository source: `evaluation_data_args`). `DataReport` (data/report.py) gathers what
each step counted, skipped rows included, and what decontamination, opt-outs, near-deduplication and PII redaction
removed or rewrote (docs/data_filters.md); `decontamination_report` names the removed files.
"""

import functools
import hashlib
import inspect
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, replace

import datasets
import numpy as np
import torch

from starcoder2_train.configs import DataArguments, RecipeError, windows_per_step
from starcoder2_train.configs.data_sources import DOCUMENTS
from starcoder2_train.data import special_tokens
from starcoder2_train.data.examples import fim, repo_examples
from starcoder2_train.data.examples.fim import FimRates, apply_fim, prepared_rates, window_fim
from starcoder2_train.data.examples.repo_examples import build_example
from starcoder2_train.data.filters.decontamination import write_report
from starcoder2_train.data.filters.splits import load_split_repositories, shard_repositories
from starcoder2_train.data.report import DataReport
from starcoder2_train.data.skips import SkipReport
from starcoder2_train.data.sources import documents
from starcoder2_train.data.sources.documents import DocumentTransform, load_documents
from starcoder2_train.data.sources.download.verify import check_downloaded_shards
from starcoder2_train.data.special_tokens import SpecialTokenIds
from starcoder2_train.data.store.prepared import open_store, store_directory, stored_once
from starcoder2_train.data.tokens import tokenization
from starcoder2_train.data.tokens.tokenization import PieceTokenizer
from starcoder2_train.data.windows.epochs import DataEpochs, in_worker_process
from starcoder2_train.data.windows.mixture import MixtureDataset, MixtureSchedule, mixture_rows
from starcoder2_train.data.windows.packing import PackedDataset

__all__ = ["DataReport", "build_packed_dataset", "build_training_data", "load_token_rows", "tokenize_repositories"]

logger = logging.getLogger(__name__)
TOKEN_COLUMNS = ("input_ids", "num_tokens", "repo_name", "language", "num_files", "num_fim_psm", "num_fim_spm")


@dataclass
class ExampleTransform:
    """repository rows (repo_name, files) → token rows; a function of (seed, epoch, row) alone."""

    tokenizer: PieceTokenizer
    rates: FimRates
    repo_metadata_rate: float
    seed: int
    epoch: int

    def __call__(self, batch: dict) -> dict:
        pieces, out = [], {key: [] for key in TOKEN_COLUMNS if key != "input_ids"}
        for repo_name, files in zip(batch["repo_name"], batch["files"]):
            example = build_example(repo_name, files, self.seed, self.epoch, self.repo_metadata_rate)
            result = apply_fim(example, self.rates, self.seed, self.epoch)
            pieces.append(result.pieces)
            sizes = Counter()
            for f in files:
                sizes[f["language"]] += len(f["content"])
            out["repo_name"].append(repo_name)
            out["language"].append(sizes.most_common(1)[0][0] if sizes else "")
            out["num_files"].append(len(files))
            out["num_fim_psm"].append(result.num_psm)
            out["num_fim_spm"].append(result.num_spm)
        # int32 arrays: half the cache of int64, and Arrow takes numpy arrays faster than lists.
        out["input_ids"] = [np.asarray(ids, dtype=np.int32) for ids in self.tokenizer.encode(pieces)]
        out["num_tokens"] = [len(ids) for ids in out["input_ids"]]
        return out


@functools.cache
def code_fingerprint() -> str:
    """A hash of the source of everything that turns a repository row into token ids."""
    modules = (repo_examples, fim, tokenization, special_tokens, documents)
    return _fingerprint(*[inspect.getsource(module) for module in modules], inspect.getsource(ExampleTransform))


def _fingerprint(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def tokenize_repositories(
    repositories: datasets.Dataset,
    tokenizer,
    data_args: DataArguments,
    seed: int,
    epoch: int = 0,
    tokenizer_name: str = "the tokenizer",
) -> datasets.Dataset:
    """Examples, FIM and tokens for every repository row, cached by datasets under an explicit fingerprint."""
    piece_tokenizer = PieceTokenizer(tokenizer, tokenizer_name)
    transform = ExampleTransform(
        tokenizer=piece_tokenizer,
        rates=prepared_rates(data_args),
        repo_metadata_rate=data_args.repo_metadata_rate,
        seed=seed,
        epoch=epoch,
    )
    fingerprint = _fingerprint(
        code_fingerprint(),
        repositories._fingerprint,
        piece_tokenizer.backend.to_str(),
        asdict(transform.rates),
        data_args.repo_metadata_rate,
        seed,
        epoch,
    )
    return _token_rows(
        repositories, transform, fingerprint, data_args.num_proc, f"examples + FIM + tokens (epoch {epoch})"
    )


def tokenize_documents(rows: datasets.Dataset, tokenizer, data_args: DataArguments, tokenizer_name: str):
    """A document source's token rows (data/sources/documents.py): the same for every epoch, cached by datasets."""
    transform = DocumentTransform(PieceTokenizer(tokenizer, tokenizer_name), data_args.structure_tokens)
    fingerprint = _fingerprint(
        code_fingerprint(), rows._fingerprint, transform.tokenizer.backend.to_str(), transform.structure_tokens
    )
    return _token_rows(rows, transform, fingerprint, data_args.num_proc, "documents → tokens")


def _token_rows(rows: datasets.Dataset, transform, fingerprint: str, num_proc: int | None, desc: str):
    """rows → token rows (TOKEN_COLUMNS) by `transform`, one batched datasets.map cached under `fingerprint`."""
    return rows.map(
        transform,
        batched=True,
        batch_size=64,
        num_proc=num_proc,
        remove_columns=rows.column_names,
        new_fingerprint=fingerprint,
        desc=desc,
    )


def load_split(data_args: DataArguments, split: str = "train"):
    """(rows, SkipReport) of one split, read and filtered once: repositories (filters/splits.py), or a document
    source's documents (all of them train: a document source has no held-out split; its eval split is None)."""
    if data_args.dataset_kind != DOCUMENTS:
        return load_split_repositories(data_args, split)
    return load_documents(data_args) if split == "train" else (None, SkipReport())


def load_token_rows(
    data_args: DataArguments, tokenizer, seed: int, epoch: int = 0, split: str = "train", repositories=None
) -> tuple[datasets.Dataset, SkipReport]:
    """Token rows of one split from the raw shards (prepared data is a token store: build_packed_dataset opens it).

    repositories: what `load_split_repositories(data_args, split)` returned, when the caller already has it
    (several epochs, or the held-out files for FIM problems): the shards are then read and filtered once.
    """
    if data_args.prepared_data_dir is not None:
        raise RecipeError("prepared_data_dir: holds token stores, not token rows; read it with build_packed_dataset.")
    repositories, skips = repositories or load_split(data_args, split)
    if repositories is None:
        return None, skips
    repositories = shard_repositories(repositories, data_args.num_shards, data_args.shard_index)
    tokenizer_name = data_args.tokenizer_name_or_path or "the tokenizer"
    if data_args.dataset_kind == DOCUMENTS:
        return tokenize_documents(repositories, tokenizer, data_args, tokenizer_name), skips
    if split == "eval" and len(repositories) == 0:
        return None, skips
    if len(repositories) == 0:
        raise RecipeError(
            f"dataset_name_or_path: no repository left for the {split} split after filtering "
            f"({'; '.join(skips.summary_lines())}). Loosen languages/license_types/max_file_bytes."
        )
    return tokenize_repositories(repositories, tokenizer, data_args, seed, epoch, tokenizer_name), skips


def build_packed_dataset(
    data_args: DataArguments,
    tokenizer,
    seed: int,
    epoch: int = 0,
    split: str = "train",
    shuffle: bool = True,
    repositories=None,
    report: bool = True,
):
    """(PackedDataset, DataReport) for one split and epoch; (None, None) when the split has no data.

    With `prepared_data_dir` the epoch's token store is only opened (memory-mapped); else the raw shards are
    read, filtered and tokenized (cached by datasets). `report=False`: no DataReport (None), so that later
    epochs and the eval split do not read every task's stats, or sum the token rows, for a report nobody reads.
    """
    if data_args.prepared_data_dir is not None:
        source = open_store(data_args.prepared_data_dir, split, epoch, data_args, seed)  # any epoch when stored once
    else:
        source, skips = load_token_rows(data_args, tokenizer, seed, epoch, split, repositories)
    if source is None:
        return None, None
    packed = PackedDataset(
        source,
        data_args.seq_length,
        SpecialTokenIds.from_tokenizer(tokenizer),
        cross_document_attention=data_args.cross_document_attention,
        shuffle_seed=(seed * 1_000_003 + epoch) if shuffle else None,
        fim=window_fim(data_args, tokenizer, seed, epoch),
    )
    if not report:
        return packed, None
    if data_args.prepared_data_dir is not None:
        data_report = DataReport.of_prepared(data_args.prepared_data_dir, split, source, packed)
        if packed.fim is not None and data_report.files_fim_psm + data_report.files_fim_spm:
            raise RecipeError(
                f"fim_level: window FIM-transforms each window in training, but prepared_data_dir "
                f"{data_args.prepared_data_dir} holds file-level FIM already; prepare it again with "
                "--fim_level window."
            )
    else:
        data_report = DataReport.of(source, packed, skips)
    return packed, data_report.with_window_fim(packed)


@dataclass
class EpochMaker:
    """Makes data epoch e of the training split (a picklable callable for DataEpochs)."""

    data_args: DataArguments
    tokenizer: object
    seed: int
    repositories: object  # what load_split_repositories returned (None with prepared data)

    def __call__(self, epoch: int) -> PackedDataset:
        data_args = self.data_args
        if in_worker_process() and data_args.num_proc:  # a data-loader worker may not start processes
            data_args = replace(data_args, num_proc=None)
        logger.info("making data epoch %d (its own file order and FIM draws)", epoch)
        return build_packed_dataset(
            data_args, self.tokenizer, self.seed, epoch, repositories=self.repositories, report=False
        )[0]


def build_source_data(data_args: DataArguments, tokenizer, training_args, needed: int | None):
    """One source's training windows over as many data epochs as the run needs, each with its own file order and
    FIM; `data_args`: the source's (DataSource.data_args), `needed`: the windows the run reads of it (None: no
    max_steps, one source).

    With `needed`: `DataEpochs` of exactly the windows the run reads. Before step 1 only epoch 0 is made
    (from the raw shards), or every prepared epoch's store is opened and counted, so that too few prepared
    epochs fail now rather than mid-run; later raw epochs are made when training reaches them (data/windows/epochs.py).
    Without max_steps: ceil(num_train_epochs) epochs made now, and num_train_epochs rescaled to the share of
    their concatenation that it asks for. Returns (dataset, DataReport of epoch 0).
    """
    seed = training_args.seed
    if data_args.prepared_data_dir is None and data_args.dataset_kind != DOCUMENTS:
        check_downloaded_shards(data_args)  # a shard that differs from its download record: refused, not skipped
    # Read and filter the shards once; each epoch only redraws order and FIM over the same repositories.
    loaded = None if data_args.prepared_data_dir is not None else load_split(data_args, "train")
    first, report = build_packed_dataset(data_args, tokenizer, seed, epoch=0, repositories=loaded)
    make_epoch = EpochMaker(data_args, tokenizer, seed, loaded)
    if needed is not None:
        if needed <= len(first):
            return first, report
        made = [first]
        if data_args.prepared_data_dir is not None and not stored_once(data_args.prepared_data_dir):
            # per-epoch stores (file-level FIM): opening is cheap, count every prepared epoch now
            windows = len(first)
            while windows < needed and os.path.isdir(store_directory(data_args.prepared_data_dir, "train", len(made))):
                made.append(make_epoch(len(made)))
                windows += len(made[-1])
            if windows < needed:
                raise RecipeError(
                    f"prepared_data_dir: its {len(made)} data epoch(s) hold {windows:,} windows and max_steps needs "
                    f"{needed:,}; run scripts/prepare_data.py with more --epochs."
                )
        key = _fingerprint(loaded[0]._fingerprint if loaded else data_args.prepared_data_dir, asdict(data_args), seed)
        return DataEpochs(made, make_epoch, needed, key=key), report
    num_epochs = max(1, int(-(-training_args.num_train_epochs // 1)))
    training_args.num_train_epochs = training_args.num_train_epochs / num_epochs
    epochs = [first] + [make_epoch(e) for e in range(1, num_epochs)]
    return (epochs[0] if num_epochs == 1 else torch.utils.data.ConcatDataset(epochs)), report


def build_training_data(data_args: DataArguments, tokenizer, training_args):
    """The training windows of the recipe's sources (DataArguments.sources()), drawn by weight.

    One source (dataset_name_or_path alone, or a one-entry dataset_mixture): `build_source_data`'s windows as they
    are, the run's `max_steps × windows per step` (or num_train_epochs' epochs). Several: max_steps is needed (the
    weights share a number of windows); data/windows/mixture.py's schedule gives each source the windows its
    weight asks for (`windows_extent`), each source is a `build_source_data` of exactly those, and the result is a
    MixtureDataset. Returns (dataset, DataReport): a mixture's report is its first source's with every source's
    report and the mixture's rows (weights, shares, tokens, passes) beside it. The files decontamination removed,
    of every source, are written once to decontamination_report.
    """
    sources = data_args.sources()
    total = training_args.max_steps * windows_per_step(training_args) if training_args.max_steps > 0 else None
    if total is None and len(sources) > 1:
        raise RecipeError(
            f"max_steps: a dataset_mixture of {len(sources)} sources needs max_steps > 0 (the weights share the "
            "run's windows); set max_steps instead of num_train_epochs."
        )
    schedule = MixtureSchedule([source.weight for source in sources], training_args.seed)
    extents = schedule.windows_extent(total) if total is not None else [None]
    built = [build_source_data(s.data_args, tokenizer, training_args, n) for s, n in zip(sources, extents)]
    for source, (_, report) in zip(sources, built):
        report.kind = source.kind
    contaminated = [item for _, report in built for item in report.contaminated]
    if (
        data_args.decontamination_report
        and data_args.prepared_data_dir is None
        and getattr(training_args, "process_index", 0) == 0
    ):
        write_report(data_args.decontamination_report, contaminated)  # one writer of the one list
    if len(sources) == 1:
        return built[0]
    read = schedule.windows_read(total)
    report = replace(built[0][1], contaminated=contaminated)
    report.sources = {source.name: asdict(r) for source, (_, r) in zip(sources, built)}
    report.mixture = mixture_rows(
        [s.name for s in sources],
        [s.kind for s in sources],
        [s.weight for s in sources],
        read,
        [r.windows for _, r in built],
        data_args.seq_length,
    )
    names = [source.name for source in sources]
    return MixtureDataset([dataset for dataset, _ in built], names, schedule, total), report


def evaluation_data_args(data_args: DataArguments) -> DataArguments:
    """The DataArguments the held-out evaluation reads: the one source's, or a mixture's first repository
    source's (a document source has no held-out split; evaluating each source would read and tokenize every
    source's held-out part at start-up for a loss per source: not done). A mixture without a repository source:
    its first source's, whose eval split is empty."""
    sources = data_args.sources()
    repositories = [source for source in sources if source.kind != DOCUMENTS]
    return (repositories or sources)[0].data_args
