"""Stack v2-format parquet shards → one row per repository, with every file left out counted by reason.

Two layouts are accepted, recognised per parquet file by its columns:
- per repository (the-stack-v2-train-*-ids with contents added, and what scripts/ingest.py writes):
  `repo_name` and `files`, a list of structs with at least `path` and `content`;
- per file (the-stack-v2 and -dedup with contents added): `repo_name`, `path`, `content`. Rows are
  grouped by `repo_name` across all the files read, repositories and their files in first-seen order.
Optional file fields, used when present: `language` (else derived from the path), `license_type`,
`is_vendor`, `is_generated`, `src_encoding` (to decode contents stored as bytes; default UTF-8).

This module reads: it finds the files (`resolve_data_files`), recognises their layout (`parquet_layout`), reads
them in Arrow batches (`python_rows`) and groups per-file rows by repository. What is kept is decided by
data/filters/files.py (opt-outs, the file filters, decontamination), which `load_repositories` applies to each
batch as it reads and data/prepare.py's datatrove reader applies too.

Output rows: `repo_name: str`, `files: list of {path: str, content: str, language: str}`, in an
order that depends on the input only (not on num_proc). Whatever is left out is counted in a SkipReport
(skips.py). `parquet_layout` is the one test of a shard's layout (tokenizer training uses it too).
"""

import glob
import logging
import os
from collections import Counter

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Dataset, Features, List, Value, concatenate_datasets, load_dataset
from datasets.exceptions import DatasetGenerationError

from starcoder2_train.configs import DataArguments, RecipeError, hub_hint, is_hub_id
from starcoder2_train.data.filters.files import (
    CONTAMINATED_FEATURES,
    contaminated_files,
    file_filters,
    filter_file_rows,
    filter_repository_rows,
)
from starcoder2_train.data.skips import (
    BEYOND_MAX_REPOSITORIES,
    NO_FILE_LEFT,
    OPTED_OUT,
    UNREADABLE_PARQUET,
    SkipReport,
)

logger = logging.getLogger(__name__)
DEFAULT_DATA_FILES = "**/*.parquet"
REPOSITORIES_PER_BATCH = 64
# The file contents a batch of repositories holds as Python strings, at most (a larger repository is a batch
# alone). Without it a batch was 64 repositories whatever their size: 64 parts of max_repository_bytes (32 MB)
# are 2 GB of text, ~4.5 GB with their token arrays (4 bytes a token, ~3.3 bytes of code a token), against the
# 4 GB per CPU of a SLURM preparation task. With it: at most 64 MB plus one repository part (32 MB), ~200 MB.
BATCH_BYTES = 64 * 2**20
OPTIONAL_FILE_COLUMNS = ("language", "license_type", "is_vendor", "is_generated", "src_encoding")
FILE_FEATURES = {"path": Value("string"), "content": Value("string"), "language": Value("string")}
REPOSITORY_FEATURES = Features({"repo_name": Value("string"), "files": List(FILE_FEATURES)})


def _generate_repositories(rows: Dataset, bounds: tuple):
    """Rows sorted so that each repository's files are contiguous; bounds[i]:bounds[i+1] is repository i."""
    for start, end in zip(bounds[:-1], bounds[1:]):
        batch = rows[start:end]
        files = [dict(zip(FILE_FEATURES, values)) for values in zip(*(batch[key] for key in FILE_FEATURES))]
        yield {"repo_name": batch["repo_name"][0], "files": files}


def _group_by_repository(rows: Dataset, report: SkipReport) -> Dataset:
    """Per-file rows → repositories, repositories and files in first-seen order."""
    groups: dict[str, list[int]] = {}
    names, skips = rows.data.column("repo_name").to_pylist(), rows.data.column("skip").to_pylist()
    opted_out = set()
    for index, (name, skip) in enumerate(zip(names, skips)):
        if skip == OPTED_OUT:
            opted_out.add(name)
        elif name:
            indices = groups.setdefault(name, [])
            if not skip:
                indices.append(index)
    if opted_out:
        report.repositories[OPTED_OUT] += len(opted_out)
    report.repositories[NO_FILE_LEFT] += sum(1 for indices in groups.values() if not indices)
    order, bounds = [], [0]
    for indices in groups.values():
        if indices:
            order += indices
            bounds.append(len(order))
    if not order:
        return Dataset.from_dict({"repo_name": [], "files": []}, features=REPOSITORY_FEATURES)
    sorted_rows = rows.select(order).select_columns(["repo_name", *FILE_FEATURES])
    return Dataset.from_generator(
        _generate_repositories, features=REPOSITORY_FEATURES, gen_kwargs={"rows": sorted_rows, "bounds": tuple(bounds)}
    )


def resolve_data_files(data_args: DataArguments, data_files: list[str] | None = None) -> list[str]:
    """The parquet files to read: each pattern, relative to dataset_name_or_path/data_dir, must match."""
    source, key = data_args.dataset_name_or_path, "data_files" if data_files is None else "eval_data_files"
    patterns = list(data_files or data_args.data_files or [DEFAULT_DATA_FILES])
    if source is None:
        raise RecipeError("dataset_name_or_path: not set; it names the parquet shards to read.")
    if os.path.isfile(source):
        return [source]
    if os.path.isdir(source):
        root = os.path.join(source, data_args.data_dir or "")
        if not os.path.isdir(root):
            raise RecipeError(f"data_dir: {root} is not a directory.")
        found = [
            sorted(p for p in glob.glob(os.path.join(root, pattern), recursive=True) if os.path.isfile(p))
            for pattern in patterns
        ]
    elif is_hub_id(source):
        root = f"datasets/{source}/{data_args.data_dir or ''}".rstrip("/")
        try:
            filesystem = fsspec.filesystem("hf")
            found = [sorted(f"hf://{p}" for p in filesystem.glob(f"{root}/{pattern}")) for pattern in patterns]
        except OSError as error:
            raise RecipeError(
                f"dataset_name_or_path: {source} is not a local directory, and listing it as a Hub dataset failed "
                f"({type(error).__name__}: {error}); {hub_hint(source)}."
            ) from error
    else:
        raise RecipeError(
            f"dataset_name_or_path: {source} is neither a local directory or file nor a Hub id (owner/name)."
        )
    for pattern, files in zip(patterns, found):
        if not files:
            raise RecipeError(f"{key}: the pattern {pattern!r} matches no file under {root}.")
    return list(dict.fromkeys(path for files in found for path in files))


def parquet_layout(path: str, schema: pa.Schema, required=("repo_name", "path", "content")) -> str:
    """ "repository" (a `files` list column) or "file" (one row per file), or RecipeError naming what is missing.

    The one test of a shard's layout, used by the training pipeline and by tokenizer training. `required`:
    the fields needed, `repo_name` as a column, the others as fields of each file (tokenizer training
    needs only `content`).
    """
    names = set(schema.names)
    if "files" in names:
        files_type = schema.field("files").type
        item = files_type.value_type if pa.types.is_list(files_type) or pa.types.is_large_list(files_type) else None
        if item is None or not pa.types.is_struct(item):
            raise RecipeError(
                f"{path}: column files is {files_type}, not a list of structs with path and content (one per file "
                "of the repository); rewrite the shard in that layout (scripts/ingest.py writes it)."
            )
        fields = {item.field(i).name for i in range(item.num_fields)}
        missing = [f"files.{name}" for name in required if name != "repo_name" and name not in fields]
        layout = "repository"
    else:
        fields = names
        missing = [name for name in required if name != "repo_name" and name not in names]
        layout = "file"
    if "repo_name" in required and "repo_name" not in names:
        missing.insert(0, "repo_name")
    if missing:
        hint = (
            " It looks like a content-less Stack v2 -ids/metadata shard (blob_id without content): fetch "
            "the contents from Software Heritage first (s3://softwareheritage/content/{blob_id}, gzip, "
            "decoded with src_encoding; see the dataset card)."
            if "blob_id" in fields
            else ""
        )
        raise RecipeError(
            f"{path}: missing column(s) {', '.join(missing)}. Accepted layouts: one row per repository with "
            "repo_name and files (a list of structs with path and content), or one row per file with "
            f"repo_name, path and content; its columns are {', '.join(schema.names)}.{hint}"
        )
    types = {"repo_name": schema.field("repo_name").type} if "repo_name" in names else {}
    files = item if layout == "repository" else schema
    types.update((name, files.field(name).type) for name in ("path", "content") if files.get_field_index(name) >= 0)
    for name, type_ in types.items():
        text = _is_text(type_) or (name == "content" and _is_text(type_, binary=True))
        if name in required and not text:
            column = name if layout == "file" or name == "repo_name" else f"files.{name}"
            raise RecipeError(
                f"{path}: column {column} is {type_}, not a string{' or bytes' if name == 'content' else ''}; "
                "rewrite the shard with it as text (scripts/ingest.py writes the accepted layout)."
            )
    return layout


def _is_text(type_: pa.DataType, binary: bool = False) -> bool:
    """A string (or with `binary`, a bytes) column, or one that holds only nulls."""
    kinds = (pa.types.is_string, pa.types.is_large_string, pa.types.is_null)
    kinds += (pa.types.is_binary, pa.types.is_large_binary) if binary else ()
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    return any(kind(type_) for kind in kinds)


def content_sizes(batch: pa.RecordBatch) -> list[int]:
    """Each row's bytes of file content: its `files[].content` summed (per-repository layout), or its `content`."""
    if "files" not in batch.schema.names:
        return pc.fill_null(pc.binary_length(batch.column("content")), 0).to_pylist()
    files = batch.column("files")
    lengths = pc.fill_null(pc.binary_length(pc.list_flatten(files).field("content")), 0).to_numpy()
    rows = pc.list_parent_indices(files).to_numpy()
    return np.bincount(rows, weights=lengths, minlength=len(batch)).astype(np.int64).tolist()


def bounded_slices(batch: pa.RecordBatch, max_bytes: int | None = None):
    """`batch` in consecutive slices whose rows hold at most `max_bytes` (None: BATCH_BYTES) of file content
    together (a row larger than that is a slice alone), so that what python_rows makes of a slice is bounded
    whatever the rows' sizes."""
    max_bytes = BATCH_BYTES if max_bytes is None else max_bytes
    start, size = 0, 0
    for index, row_size in enumerate(content_sizes(batch)):
        if index > start and size + row_size > max_bytes:
            yield batch.slice(start, index - start)
            start, size = index, 0
        size += row_size
    if len(batch) > start:
        yield batch.slice(start)


def python_rows(batch: pa.Table | pa.RecordBatch) -> dict:
    """An Arrow batch as Python lists. A string `content` holding bytes that are not UTF-8 (a writer that did not
    validate them) is given as those bytes with src_encoding utf-8, so that data/filters/files.py's decode_content
    counts that file as undecodable instead of the whole parquet file failing; the other files of the batch are
    read as usual."""
    try:
        return batch.to_pydict()
    except UnicodeDecodeError:
        pass
    layout = "repository" if "files" in batch.schema.names else "file"
    binary = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}

    def as_binary(field: pa.Field) -> pa.Field:
        return field.with_type(binary.get(field.type, field.type)) if field.name == "content" else field

    if layout == "repository":
        files_type = batch.schema.field("files").type
        item = pa.struct([as_binary(field) for field in files_type.value_type])
        list_type = pa.large_list(item) if pa.types.is_large_list(files_type) else pa.list_(item)
        schema = pa.schema([f.with_type(list_type) if f.name == "files" else f for f in batch.schema])
    else:
        schema = pa.schema([as_binary(field) for field in batch.schema])
    rows = batch.cast(schema).to_pydict()
    files = [file for files in rows["files"] for file in files or ()] if layout == "repository" else None
    if files is None:  # per-file rows: the columns themselves
        contents = rows["content"]
        rows.setdefault("src_encoding", [None] * len(contents))
        for index, content in enumerate(contents):
            contents[index], encoding = _utf8_or_bytes(content)
            rows["src_encoding"][index] = encoding or rows["src_encoding"][index]
    else:
        for file in files:
            file["content"], encoding = _utf8_or_bytes(file.get("content"))
            file["src_encoding"] = encoding or file.get("src_encoding")
    return rows


def _utf8_or_bytes(content) -> tuple:
    """(text, None) for UTF-8 bytes, (the bytes, "utf-8") for the others (decode_content then counts them)."""
    if not isinstance(content, bytes):
        return content, None
    try:
        return content.decode("utf-8"), None
    except UnicodeDecodeError:
        return content, "utf-8"


def _rows_from_arrow(batch: pa.Table, function, filters: dict) -> dict:
    return function(python_rows(batch), filters)


def _columns_to_read(path: str, schema: pa.Schema, filters: dict) -> tuple[str, list[str]]:
    """(layout, the columns the pipeline reads); license_types needs a license_type field."""
    layout = parquet_layout(path, schema)
    if layout == "repository":
        item = schema.field("files").type.value_type
        has_license = "license_type" in {item.field(i).name for i in range(item.num_fields)}
        columns = ["repo_name", "files"]
    else:
        has_license = "license_type" in schema.names
        columns = ["repo_name", "path", "content", *[name for name in OPTIONAL_FILE_COLUMNS if name in schema.names]]
    if filters["license_types"] is not None and not has_license:
        raise RecipeError(f"license_types: is set but {path} has no license_type; unset license_types to read it.")
    return layout, columns


def _read_file(path: str, filters: dict, num_proc: int | None, report: SkipReport) -> tuple[str, Dataset] | None:
    """One parquet file, filtered; None (and counted) when it cannot be read."""
    try:
        with fsspec.open(path, "rb") as handle:
            schema = pq.read_schema(handle)
    except (pa.ArrowException, OSError) as error:
        _unreadable(path, error, report)
        return None
    layout, columns = _columns_to_read(path, schema, filters)
    try:
        dataset = load_dataset("parquet", data_files={"train": [path]}, split="train", columns=columns)
    except (DatasetGenerationError, pa.ArrowException, OSError) as error:
        _unreadable(path, error, report)
        return None
    if layout == "repository":  # a repository row can hold thousands of files: small batches bound memory
        function, batch_size = filter_repository_rows, REPOSITORIES_PER_BATCH
        features = Features(
            {
                **REPOSITORY_FEATURES,
                "skipped": List(Value("string")),
                "repo_skip": Value("string"),
                "contaminated": List(CONTAMINATED_FEATURES),
            }
        )
    else:
        function, batch_size = filter_file_rows, 1000
        features = Features(
            {"repo_name": Value("string"), **FILE_FEATURES, "skip": Value("string"), **CONTAMINATED_FEATURES}
        )
    dataset = dataset.with_format("arrow")  # Arrow batches, which python_rows reads
    dataset = dataset.map(
        _rows_from_arrow,
        batched=True,
        batch_size=batch_size,
        writer_batch_size=batch_size,
        fn_kwargs={"function": function, "filters": filters},
        features=features,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc=f"Checking files of {os.path.basename(path)}",
    )
    return layout, dataset.with_format(None)


def _unreadable(path: str, error: Exception, report: SkipReport) -> None:
    cause = error.__cause__ or error  # datasets wraps the reader's error in DatasetGenerationError
    logger.warning("Skipping %s: not a readable parquet file (%s: %s).", path, type(cause).__name__, cause)
    report.parquet_files[UNREADABLE_PARQUET] += 1
    report.details.append(f"{UNREADABLE_PARQUET}: {path} ({type(cause).__name__}: {cause})")


def _count(dataset: Dataset, column: str, counter: Counter, flatten: bool = False) -> None:
    values = dataset.data.column(column)
    for item in pc.value_counts(pc.list_flatten(values) if flatten else values).to_pylist():
        if item["values"]:
            counter[item["values"]] += item["counts"]


def _kept(repo_skips: list[str]) -> list[bool]:
    return [not skip for skip in repo_skips]


def load_repositories(data_args: DataArguments, data_files: list[str] | None = None) -> tuple[Dataset, SkipReport]:
    """Read, check and filter Stack v2-format shards; `data_files` (e.g. eval files) overrides data_args'.

    Reading and filtering together, and here, with the reader: the filters (data/filters/files.py) run inside the
    read's `datasets.map`, one batch at a time (a per-repository row can hold thousands of files), so only the
    filtered rows are ever written to the datasets cache, and the per-file layout can be grouped by repository
    only after its rows are filtered. The filters know nothing of parquet files or of how they are read."""
    filters = file_filters(data_args)
    paths, report = resolve_data_files(data_args, data_files), SkipReport()
    parts = {}
    for path in paths:
        result = _read_file(path, filters, data_args.num_proc, report)
        if result is not None:
            parts.setdefault(result[0], []).append((path, result[1]))
    if not parts:
        raise RecipeError(f"no readable parquet file among {', '.join(paths)}:\n" + "\n".join(report.details))
    if len(parts) > 1:
        raise RecipeError(
            f"{parts['repository'][0][0]} has one row per repository but {parts['file'][0][0]} one "
            "row per file; read the two layouts separately (data_files)."
        )
    ((layout, read),) = parts.items()
    rows = concatenate_datasets([dataset for _, dataset in read])
    if layout == "repository":
        _count(rows, "skipped", report.files, flatten=True)
        _count(rows, "repo_skip", report.repositories)
        report.contaminated += contaminated_files(rows)
        rows = rows.filter(_kept, input_columns=["repo_skip"], batched=True, num_proc=data_args.num_proc)
        rows = rows.select_columns(["repo_name", "files"])
    else:
        _count(rows, "skip", report.files)
        report.files.pop(OPTED_OUT, None)  # an opted-out repository is counted once, not per file
        report.contaminated += contaminated_files(rows)
        rows = _group_by_repository(rows, report)
    if data_args.max_repositories is not None and len(rows) > data_args.max_repositories:
        report.repositories[BEYOND_MAX_REPOSITORIES] += len(rows) - data_args.max_repositories
        rows = rows.select(range(data_args.max_repositories))
    if len(rows) == 0:
        raise RecipeError(
            f"no repository left after filtering {', '.join(paths)}:\n"
            + "\n".join(report.summary_lines())
            + "\nCheck languages, license_types and max_file_bytes."
        )
    return rows, report
