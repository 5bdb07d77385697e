"""The input of a download: the-stack-v2-train-*-ids parquet → deterministic chunks of repositories.

The ids are a local parquet file or folder, or a Hub dataset id (listed and read through fsspec's `hf://`,
as data/shards.resolve_data_files does), one row per repository: `repo_name` and `files`, a list of structs
with at least `blob_id` (and path, src_encoding, language, ...). `plan_chunks` cuts each file into chunks of
at most `repos_per_shard` rows that never span a parquet row group; a chunk becomes one output shard named
after its input file and rows (`data/train-00003-of-00064-rows-000001000-000002000.parquet`), so that reruns
and machines agree on every name. `--num_shards N --shard_index I` gives machine I the row groups whose
index, counted across all input files in order, is I modulo N.

Cost at the scale of the-stack-v2-train-smol-ids (~3.3M repositories): planning reads one parquet footer per
input file; a machine then reads each of its row groups once (`IdsReader` keeps the last one for the next
chunk) and holds the rows of one row group and the contents of one chunk in memory.
"""

import os
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from starcoder2_train.configs import DataArguments, RecipeError, is_hub_id
from starcoder2_train.data.sources.shards import resolve_data_files


class DownloadError(ValueError):
    """An input, output or S3 answer that stops the download; the message names it and says what to do."""


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of one ids parquet file, inside its row group `row_group`; one output shard."""

    source: str  # the ids file as fsspec opens it (a local path or hf://...)
    row_group: int
    row_group_start: int  # the file's row where the row group begins
    start: int
    stop: int
    shard: str  # the output shard, relative to the output folder
    assignment: int  # the row group's index across all input files: machine `assignment % num_shards` has it


def resolve_ids_files(ids: str) -> tuple[list[str], str]:
    """(the ids parquet files, sorted, and the root the output names are taken relative to)."""
    try:
        files = resolve_data_files(DataArguments(dataset_name_or_path=ids))
    except RecipeError as error:
        message = str(error).removeprefix("dataset_name_or_path: ")
        raise DownloadError(f"IDS {ids}: {message}") from None
    if os.path.isfile(ids):
        return files, os.path.dirname(os.path.abspath(ids))
    return files, f"hf://datasets/{ids}" if is_hub_id(ids) else os.path.abspath(ids)


def check_ids_schema(path: str, schema: pa.Schema) -> None:
    """DownloadError unless `schema` is the per-repository -ids layout: repo_name, files[{blob_id, ...}]."""
    names = set(schema.names)
    if "blob_id" in names and "files" not in names:
        raise DownloadError(
            f"{path}: one row per file (blob_id is a column), the layout of bigcode/the-stack-v2; this downloader "
            "reads the per-repository -ids layout (repo_name and files, a list of structs with blob_id), "
            "e.g. bigcode/the-stack-v2-train-smol-ids."
        )
    files_type = schema.field("files").type if "files" in names else None
    is_list = files_type is not None and (pa.types.is_list(files_type) or pa.types.is_large_list(files_type))
    item = files_type.value_type if is_list else pa.null()
    fields = {item.field(i).name for i in range(item.num_fields)} if pa.types.is_struct(item) else set()
    missing = [
        name
        for name, found in (("repo_name", "repo_name" in names), ("files.blob_id", "blob_id" in fields))
        if not found
    ]
    if missing:
        raise DownloadError(
            f"{path}: missing {', '.join(missing)}; an ids parquet has one row per repository with repo_name "
            f"and files, a list of structs with blob_id (its columns are {', '.join(schema.names)})."
        )


def output_schema(schema: pa.Schema) -> pa.Schema:
    """The ids schema with `content` (string) added to each file struct; the Hub's `huggingface` metadata
    is dropped, since its features would not name `content` and datasets would read by them."""
    files_type = schema.field("files").type
    item = files_type.value_type
    fields = [item.field(i) for i in range(item.num_fields) if item.field(i).name != "content"]
    struct = pa.struct([*fields, pa.field("content", pa.string())])
    list_type = pa.large_list(struct) if pa.types.is_large_list(files_type) else pa.list_(struct)
    return schema.set(schema.get_field_index("files"), pa.field("files", list_type)).remove_metadata()


def _open_parquet(path: str):
    """(handle, ParquetFile) of one ids file, or DownloadError naming it."""
    try:
        handle = fsspec.open(path, "rb").open()
        return handle, pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as error:
        raise DownloadError(
            f"{path}: not a readable parquet file ({type(error).__name__}: {error}); repair or remove it."
        ) from None


def plan_chunks(files: list[str], root: str, repos_per_shard: int) -> tuple[list[Chunk], dict]:
    """(every chunk of the input, in order; {input name: its number of rows and row group sizes})."""
    if repos_per_shard < 1:
        raise DownloadError(f"--repos_per_shard must be positive, got {repos_per_shard}.")
    chunks, inputs, assignment = [], {}, 0
    for path in files:
        handle, parquet = _open_parquet(path)
        with handle:
            check_ids_schema(path, parquet.schema_arrow)
            sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
        name = os.path.relpath(path, root) if "://" not in path else path.removeprefix(f"{root}/")
        stem = name.replace(os.sep, "/").removesuffix(".parquet")
        inputs[stem] = {"rows": sum(sizes), "row_groups": sizes}
        row_group_start = 0
        for row_group, size in enumerate(sizes):
            for start in range(row_group_start, row_group_start + size, repos_per_shard):
                stop = min(start + repos_per_shard, row_group_start + size)
                shard = f"{stem}-rows-{start:09d}-{stop:09d}.parquet"
                chunks.append(Chunk(path, row_group, row_group_start, start, stop, shard, assignment))
            row_group_start += size
            assignment += 1
    return chunks, inputs


class IdsReader:
    """The rows of a chunk as dicts, and the output schema of its file; keeps the last row group read."""

    def __init__(self):
        self._key, self._table = None, None

    def rows(self, chunk: Chunk) -> tuple[list[dict], pa.Schema]:
        if self._key != (chunk.source, chunk.row_group):
            handle, parquet = _open_parquet(chunk.source)
            with handle:
                self._table = parquet.read_row_group(chunk.row_group)
            self._key = (chunk.source, chunk.row_group)
        part = self._table.slice(chunk.start - chunk.row_group_start, chunk.stop - chunk.start)
        return part.to_pylist(), output_schema(self._table.schema)
