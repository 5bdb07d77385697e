"""Stack v2-format parquet shards → one row per repository, with every file left out counted by reason.

Two layouts are accepted, recognised per parquet file by its columns:
- per repository (the-stack-v2-train-*-ids with contents added, and what scripts/ingest.py writes):
  `repo_name` and `files`, a list of structs with at least `path` and `content`;
- per file (the-stack-v2 and -dedup with contents added): `repo_name`, `path`, `content`. Rows are
  grouped by `repo_name` across all the files read, repositories and their files in first-seen order.
Optional file fields, used when present: `language` (else derived from the path), `license_type`,
`is_vendor`, `is_generated`, `src_encoding` (to decode contents stored as bytes; default UTF-8).

Before any check, a repository named in `exclude_repositories` is removed (data/filters/opt_outs.py); after a file's
checks, a file holding a benchmark text is removed (data/filters/decontamination.py, `decontamination_benchmarks`) and
named in the SkipReport's `contaminated` list. Both are steps of `filter_repository_rows`, which the in-process
pipeline and data/prepare.py's datatrove reader both call.

Output rows: `repo_name: str`, `files: list of {path: str, content: str, language: str}`, in an
order that depends on the input only (not on num_proc). Whatever is left out is counted in a SkipReport
(skips.py). `parquet_layout` is the one test of a shard's layout (tokenizer training uses it too).
"""

import functools
import glob
import hashlib
import inspect
import logging
import os
import sys
from collections import Counter

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Dataset, Features, List, Value, concatenate_datasets, load_dataset
from datasets.exceptions import DatasetGenerationError

from starcoder2_train.configs import DataArguments, RecipeError, hub_hint, is_hub_id
from starcoder2_train.data.filters import decontamination, opt_outs
from starcoder2_train.data.filters.decontamination import Match, load_benchmark_index
from starcoder2_train.data.filters.opt_outs import load_opt_outs
from starcoder2_train.data.skips import (
    BEYOND_MAX_REPOSITORIES,
    BINARY,
    EMPTY,
    GENERATED,
    LANGUAGE_NOT_SELECTED,
    LICENSE_NOT_SELECTED,
    MISSING_CONTENT,
    MISSING_PATH,
    MISSING_REPO_NAME,
    NO_FILE_LEFT,
    OPTED_OUT,
    TOO_LARGE,
    UNDECODABLE,
    UNKNOWN_LANGUAGE,
    UNREADABLE_PARQUET,
    VENDOR,
    SkipReport,
    contamination_reason,
)
from starcoder2_train.data.sources.languages import language_of

logger = logging.getLogger(__name__)
DEFAULT_DATA_FILES = "**/*.parquet"
REPOSITORIES_PER_BATCH = 64
OPTIONAL_FILE_COLUMNS = ("language", "license_type", "is_vendor", "is_generated", "src_encoding")
FILE_FEATURES = {"path": Value("string"), "content": Value("string"), "language": Value("string")}
REPOSITORY_FEATURES = Features({"repo_name": Value("string"), "files": List(FILE_FEATURES)})
# A file decontamination removed, as the report names it (repo_name is added where the repository is known).
CONTAMINATED_FEATURES = {"path": Value("string"), "benchmark": Value("string"), "text": Value("string")}


def decode_content(content, src_encoding: str | None, max_file_bytes: int) -> tuple[str | None, str | None]:
    """(text, None) for usable file contents, (None, reason) otherwise; bytes are decoded as src_encoding."""
    if content is None:
        return None, MISSING_CONTENT
    if len(content) == 0:
        return None, EMPTY
    if isinstance(content, bytes):
        try:
            content = content.decode(src_encoding or "utf-8")
        except LookupError:  # an encoding name Python does not know: UTF-8 is the best guess
            return decode_content(content, "utf-8", max_file_bytes)
        except UnicodeDecodeError:
            return None, BINARY if b"\x00" in content else UNDECODABLE
    # A character takes 1 to 4 bytes in UTF-8: encode only when the length alone cannot decide.
    if len(content) > max_file_bytes or (
        4 * len(content) > max_file_bytes and len(content.encode("utf-8", "surrogatepass")) > max_file_bytes
    ):
        return None, TOO_LARGE
    if "\x00" in content:
        return None, BINARY
    return content, None


def _check_file(file: dict, filters: dict) -> tuple[dict | None, str | None, Match | None]:
    """(file as {path, content, language}, None, None) when kept, else (None, the reason it is left out, and
    when decontamination removed it, the benchmark text it holds)."""
    path = file.get("path")
    if not path:
        return None, MISSING_PATH, None
    if filters["exclude_vendor"] and file.get("is_vendor"):
        return None, VENDOR, None
    if filters["exclude_generated"] and file.get("is_generated"):
        return None, GENERATED, None
    if (
        filters["license_types"] is not None
        and (file.get("license_type") or "").lower() not in filters["license_types"]
    ):
        return None, LICENSE_NOT_SELECTED, None
    language = file.get("language") or language_of(path)
    if language is None:
        return None, UNKNOWN_LANGUAGE, None
    if filters["languages"] is not None and language.lower() not in filters["languages"]:
        return None, LANGUAGE_NOT_SELECTED, None
    text, reason = decode_content(file.get("content"), file.get("src_encoding"), filters["max_file_bytes"])
    if reason is not None:
        return None, reason, None
    match = filters["decontamination"].find(text) if filters["decontamination"] is not None else None
    if match is not None:
        return None, contamination_reason(match.benchmark), match
    return {"path": path, "content": text, "language": language}, None, None


def _opted_out(name: str | None, filters: dict) -> bool:
    return bool(name) and filters["opt_outs"] is not None and name in filters["opt_outs"]


def filter_repository_rows(batch: dict, filters: dict) -> dict:
    """Per-repository layout: keep each repository's usable files; list the reasons of the others and the files
    decontamination removed. An opted-out repository is left out whole, before any of its files is looked at."""
    out = {"repo_name": [], "files": [], "skipped": [], "repo_skip": [], "contaminated": []}
    for name, files in zip(batch["repo_name"], batch["files"]):
        kept, skipped, contaminated = [], [], []
        for file in [] if _opted_out(name, filters) else files or []:
            checked, reason, match = _check_file(file, filters)
            if reason is None:
                kept.append(checked)
            else:
                skipped.append(reason)
                if match is not None:
                    contaminated.append({"path": file["path"], "benchmark": match.benchmark, "text": match.name})
        out["repo_name"].append(name or "")
        out["files"].append(kept if name else [])
        out["skipped"].append(skipped if name else [])
        out["contaminated"].append(contaminated if name else [])
        skip = OPTED_OUT if _opted_out(name, filters) else "" if kept else NO_FILE_LEFT
        out["repo_skip"].append(MISSING_REPO_NAME if not name else skip)
    return out


def _filter_file_rows(batch: dict, filters: dict) -> dict:
    """Per-file layout: one output row per input row, its `skip` reason empty when the file is kept."""
    out = {"repo_name": [], "path": [], "content": [], "language": [], "skip": [], "benchmark": [], "text": []}
    for values in zip(*batch.values()):
        row = dict(zip(batch, values))
        if not row["repo_name"]:
            checked, reason, match = None, MISSING_REPO_NAME, None
        elif _opted_out(row["repo_name"], filters):  # counted once per repository by _group_by_repository
            checked, reason, match = None, OPTED_OUT, None
        else:
            checked, reason, match = _check_file(row, filters)
        for key, value in (checked or {"path": row.get("path") or "", "content": "", "language": ""}).items():
            out[key].append(value)
        out["repo_name"].append(row["repo_name"] or "")
        out["skip"].append(reason or "")
        out["benchmark"].append(match.benchmark if match else "")
        out["text"].append(match.name if match else "")
    return out


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


def python_rows(batch: pa.Table | pa.RecordBatch) -> dict:
    """An Arrow batch as Python lists. A string `content` holding bytes that are not UTF-8 (a writer that did not
    validate them) is given as those bytes with src_encoding utf-8, so that decode_content counts that file as
    undecodable instead of the whole parquet file failing; the other files of the batch are read as usual."""
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
        function, batch_size = _filter_file_rows, 1000
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


def _lowered(values: list[str] | None) -> list[str] | None:
    return None if values is None else sorted({value.lower() for value in values})


def _contaminated_files(rows: Dataset) -> list[dict]:
    """{repo_name, path, benchmark, text} of each file decontamination removed (a few per million files)."""
    if "contaminated" in rows.column_names:  # per-repository rows: a list per repository
        found = pc.list_value_length(rows.data.column("contaminated")).to_numpy(zero_copy_only=False) > 0
        found = rows.select(np.flatnonzero(found)).select_columns(["repo_name", "contaminated"])
        return [{"repo_name": row["repo_name"], **entry} for row in found for entry in row["contaminated"]]
    found = pc.not_equal(rows.data.column("text"), "").to_numpy(zero_copy_only=False)
    found = rows.select(np.flatnonzero(found)).select_columns(["repo_name", *CONTAMINATED_FEATURES])
    return found.to_list()


def _kept(repo_skips: list[str]) -> list[bool]:
    return [not skip for skip in repo_skips]


@functools.cache
def filters_code() -> str:
    """A hash of the source of the filters, so that editing them makes a new datasets cache."""
    modules = (sys.modules[__name__], decontamination, opt_outs)
    return hashlib.sha256("".join(inspect.getsource(module) for module in modules).encode()).hexdigest()[:32]


def file_filters(data_args: DataArguments) -> dict:
    """The recipe's file filters, as `filter_repository_rows` takes them: opt-outs and the benchmark index are
    read and built here, once (each pickles compactly into num_proc workers and datatrove tasks)."""
    return {  # plain, sorted values and picklable objects: datasets hashes them into the cache fingerprint
        "languages": _lowered(data_args.languages),
        "license_types": _lowered(data_args.license_types),
        "exclude_vendor": data_args.exclude_vendor,
        "exclude_generated": data_args.exclude_generated,
        "max_file_bytes": data_args.max_file_bytes,
        "opt_outs": load_opt_outs(data_args.exclude_repositories),
        "decontamination": load_benchmark_index(data_args),
        "code": filters_code(),
    }


def load_repositories(data_args: DataArguments, data_files: list[str] | None = None) -> tuple[Dataset, SkipReport]:
    """Read, check and filter Stack v2-format shards; `data_files` (e.g. eval files) overrides data_args'."""
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
        report.contaminated += _contaminated_files(rows)
        rows = rows.filter(_kept, input_columns=["repo_skip"], batched=True, num_proc=data_args.num_proc)
        rows = rows.select_columns(["repo_name", "files"])
    else:
        _count(rows, "skip", report.files)
        report.files.pop(OPTED_OUT, None)  # an opted-out repository is counted once, not per file
        report.contaminated += _contaminated_files(rows)
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
