"""The download: every chunk of the ids → its blobs fetched by a thread pool → one per-repository shard.

`download(ids, output_dir, options)` plans the chunks (ids.py), takes this machine's part, and for each chunk
not done yet fetches its distinct blobs concurrently (fetch.py), decodes each file as its src_encoding says
(data/filters/files.decode_content: an unknown encoding is read as UTF-8, undecodable bytes are counted), and writes
the repositories with `content` added to each file struct, every other field kept (`num_files` is set to the
files kept). What gets no content is counted by reason in a SkipReport: missing or denied blobs, blobs that
are not gzip, undecodable, binary or empty files, and repositories with no file left.

Resuming: a shard is written under a temporary name and renamed once complete, then its record
(`download_state/<shard>.json`: counts, skips and `shard_file`, the shard's size, row count and sha256 taken
before the rename; data/sources/download/verify.py) is written the same way. A chunk with a record is done, and is
not fetched again if its shard passes verify.py's check (size and footer row count; the sha256 too with
`verify_checksums`); one that fails it (missing, truncated, unreadable, changed) loses its record and shard
and is fetched again, counted by reason in the summary's `shards_refetched`. A record written before
`shard_file` existed is upgraded when its shard's footer reads with the recorded repository count (counted in
`records_upgraded`), else fetched again. So a run killed mid-way loses at most the chunk in flight.
`download_state/plan.json` holds the input's names, row counts and `repos_per_shard`; a rerun with other ones
is refused, since the shard names would then mean other rows. `download_summary.json` (per machine:
`download_summary-IIIII-of-NNNNN.json`) sums the records and this run's speed.

Cost at the scale of the-stack-v2-train-smol-ids (~3.3M repositories, hundreds of millions of blobs): ~3,300
shards and records at the default 1,000 repositories per shard; a chunk's contents (1,000 repositories, on
the order of 100 MB) are held in memory once, and written in row batches of at most 64 repositories.
"""

import json
import logging
import os
import socket
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from starcoder2_train.configs import RecipeError, check_shard
from starcoder2_train.data.filters.files import decode_content
from starcoder2_train.data.skips import DENIED_BLOB, MISSING_BLOB_ID, MISSING_REPO_NAME, NO_FILE_FETCHED, SkipReport
from starcoder2_train.data.sources.download.fetch import BlobFetcher, S3Options
from starcoder2_train.data.sources.download.ids import Chunk, DownloadError, IdsReader, plan_chunks, resolve_ids_files
from starcoder2_train.data.sources.download.verify import (
    PLAN,
    STATE_DIRECTORY,
    old_record_problem,
    record_path,
    shard_facts,
    shard_problem,
)
from starcoder2_train.progress import progress

logger = logging.getLogger(__name__)
ROWS_PER_WRITE, BYTES_PER_WRITE = 64, 256_000_000  # bounds Arrow's 2 GiB string columns and memory per write
DETAILS_PER_CHUNK = 20  # lines naming a skipped file, per chunk record (the counts are always complete)
UPGRADED = "records upgraded"  # a key of `resumed` beside verify.py's reasons for fetching a shard again
COUNTS = ("repositories", "files", "blobs", "requests", "compressed_bytes", "bytes")


def summary_name(num_shards: int, shard_index: int) -> str:
    return (
        "download_summary.json" if num_shards == 1 else f"download_summary-{shard_index:05d}-of-{num_shards:05d}.json"
    )


def write_json_atomically(path: str, data) -> None:
    """Whole or not at all; the temporary name is this process's, since machines share plan.json."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{socket.gethostname()}.{os.getpid()}")
    with open(partial, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(partial, path)


def prepare_output(output_dir: str, ids: str, plan: dict) -> None:
    """Refuse an output inside a local ids folder, foreign parquet files, or a plan other than this run's."""
    if os.path.isdir(ids):
        inside = os.path.relpath(os.path.realpath(output_dir), os.path.realpath(ids))
        if not inside.startswith(os.pardir):
            raise DownloadError(f"--output {output_dir} lies inside IDS {ids}, which a rerun would read as input.")
    plan_path = os.path.join(output_dir, STATE_DIRECTORY, PLAN)
    if os.path.exists(plan_path):
        with open(plan_path) as handle:
            if json.load(handle) != plan:
                raise DownloadError(
                    f"{output_dir} holds a download of other ids or another --repos_per_shard ({plan_path}); "
                    "rerun with the same IDS and --repos_per_shard to resume it, or choose another --output."
                )
    elif os.path.isdir(output_dir):
        for directory, _, names in os.walk(output_dir):
            foreign = [name for name in names if name.endswith(".parquet")]
            if foreign:
                raise DownloadError(
                    f"{output_dir} holds parquet files this downloader did not write "
                    f"({os.path.join(directory, foreign[0])}, ...) that readers would mix in; choose another --output."
                )
    write_json_atomically(plan_path, plan)


def _fetch_all(pool: ThreadPoolExecutor, fetcher: BlobFetcher, blob_ids: list[str]) -> dict:
    futures = [pool.submit(fetcher.fetch, blob_id) for blob_id in blob_ids]
    try:
        return {blob_id: future.result() for blob_id, future in zip(blob_ids, futures)}
    except BaseException:  # a fatal answer or Ctrl-C: do not wait for the rest of the chunk
        for future in futures:
            future.cancel()
        raise


def _repositories(rows: list[dict], blobs: dict, report: SkipReport, details: list[str]) -> tuple[list, int]:
    """(the repositories with contents, bytes of the files kept); every file or repository left out counted."""
    repositories, kept_bytes = [], 0
    for row in rows:
        files = []
        for file in row["files"] or []:
            blob = blobs.get(file.get("blob_id"))
            reason = MISSING_BLOB_ID if blob is None else blob.reason
            if reason is None:
                text, reason = decode_content(blob.data, file.get("src_encoding"), sys.maxsize)
            if reason is not None:
                report.files[reason] += 1
                if len(details) < DETAILS_PER_CHUNK:
                    where = f"{row['repo_name']}/{file.get('path')} (blob {file.get('blob_id')})"
                    details.append(f"{reason}: {where}, src_encoding {file.get('src_encoding')}")
                continue
            files.append({**file, "content": text})
            kept_bytes += len(blob.data)
        if not files:
            report.repositories[NO_FILE_FETCHED] += 1
            continue
        repositories.append({**row, "files": files, **({"num_files": len(files)} if "num_files" in row else {})})
    return repositories, kept_bytes


def _write_shard(path: str, repositories: list[dict], schema: pa.Schema) -> dict:
    """Write to a temporary name, then rename: the shard exists whole or not at all. Returns its facts for the
    record (verify.shard_facts: size, footer row count, sha256), read from the finished file before the rename."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
    with pq.ParquetWriter(partial, schema) as writer:
        batch, batch_bytes = [], 0
        for repository in repositories:
            batch.append(repository)
            batch_bytes += sum(len(file["content"]) for file in repository["files"])
            if len(batch) == ROWS_PER_WRITE or batch_bytes >= BYTES_PER_WRITE:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch, batch_bytes = [], 0
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    facts = shard_facts(partial)
    os.replace(partial, path)
    return facts


def download_chunk(chunk: Chunk, reader: IdsReader, fetcher: BlobFetcher, pool, output_dir: str) -> dict:
    """Fetch, decode and write one chunk; returns its record (also written to download_state/)."""
    start = time.perf_counter()
    rows, schema = reader.rows(chunk)
    report, details = SkipReport(), []
    named = [row for row in rows if row.get("repo_name")]
    if len(named) < len(rows):
        report.repositories[MISSING_REPO_NAME] += len(rows) - len(named)
    blob_ids = list(dict.fromkeys(f["blob_id"] for row in named for f in row["files"] or [] if f.get("blob_id")))
    blobs = _fetch_all(pool, fetcher, blob_ids)
    if blob_ids and all(blob.reason == DENIED_BLOB for blob in blobs.values()):
        raise DownloadError(
            f"every blob of {chunk.shard} ({len(blob_ids)}) was denied (AccessDenied) at "
            f"{fetcher.options.location()}: the credentials lack read access; check them, the bucket and --prefix, "
            "or pass --anonymous."
        )
    repositories, kept_bytes = _repositories(named, blobs, report, details)
    facts = _write_shard(os.path.join(output_dir, chunk.shard), repositories, schema) if repositories else None
    record = {
        "shard": chunk.shard if repositories else None,
        "input_rows": [chunk.start, chunk.stop],
        "repositories": len(repositories),
        "files": sum(len(repository["files"]) for repository in repositories),
        "blobs": len(blob_ids),
        "requests": sum(blob.requests for blob in blobs.values()),
        "compressed_bytes": sum(blob.compressed_bytes for blob in blobs.values()),
        "bytes": kept_bytes,
        "seconds": round(time.perf_counter() - start, 3),
        "skipped": report.as_dict(),
        "details": details,
        **({"shard_file": facts} if facts is not None else {}),
    }
    write_json_atomically(record_path(output_dir, chunk.shard), record)
    return record


def _load_record(output_dir: str, chunk: Chunk, verify_checksums: bool, resumed: Counter) -> dict | None:
    """The chunk's record if its shard passes the check (an old record upgraded), else None: the record and the
    shard are removed (record first: a kill in between leaves a chunk to fetch, never a record without its
    shard) and the reason counted in `resumed`."""
    path = record_path(output_dir, chunk.shard)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        record = json.load(handle)
    if record["shard"] is None:
        return record
    shard = os.path.join(output_dir, record["shard"])
    if "shard_file" in record:
        problem = shard_problem(shard, record["shard_file"], verify_checksums)
        if problem is None:
            return record
    else:  # written before records held the shard's facts: unverified until its footer is read
        problem = old_record_problem(shard, record)
        if problem is None:
            record["shard_file"] = shard_facts(shard)
            write_json_atomically(path, record)
            resumed[UPGRADED] += 1
            logger.info("%s: an old record (no size, rows, sha256); its footer holds the %d repositories it records: "
                        "record upgraded.", record["shard"], record["repositories"])  # fmt: skip
            return record
    reason, what = problem
    logger.warning("%s: %s; its record and shard removed, fetching it again.", record["shard"], what)
    os.remove(path)
    if os.path.exists(shard):
        os.remove(shard)
    resumed[reason] += 1
    return None


def download(
    ids: str,
    output_dir: str,
    options: S3Options | None = None,
    repos_per_shard: int = 1000,
    num_shards: int = 1,
    shard_index: int = 0,
    verify_checksums: bool = False,
) -> tuple[dict, SkipReport]:
    """Fetch this machine's part of `ids` into `output_dir`; returns the summary and what was left out.

    verify_checksums: a shard already written is kept only if its sha256 matches its record (else size and
    footer row count suffice; data/sources/download/verify.py says why and what each costs)."""
    options = options or S3Options()
    try:
        check_shard(num_shards, shard_index)
    except RecipeError as error:
        raise DownloadError(f"--{error}") from None
    files, root = resolve_ids_files(ids)
    chunks, inputs = plan_chunks(files, root, repos_per_shard)
    prepare_output(output_dir, ids, {"inputs": inputs, "repos_per_shard": repos_per_shard})
    mine = [chunk for chunk in chunks if chunk.assignment % num_shards == shard_index]
    start, totals, this_run, report, details, shards = time.perf_counter(), Counter(), Counter(), SkipReport(), [], []
    resumed = Counter()  # shards fetched again, by reason, and old records upgraded
    reader, fetcher = IdsReader(), BlobFetcher(options)
    try:
        with ThreadPoolExecutor(options.num_workers, thread_name_prefix="fetch") as pool:
            chunks_bar = progress(enumerate(mine, 1), desc="download", total=len(mine), unit="chunk")
            for number, chunk in chunks_bar:
                record = _load_record(output_dir, chunk, verify_checksums, resumed)
                if record is None:
                    record = download_chunk(chunk, reader, fetcher, pool, output_dir)
                    this_run.update({key: record[key] for key in ("blobs", "requests", "compressed_bytes")})
                    this_run["chunks"] += 1
                    logger.info(
                        "%d/%d %s: %d repositories, %d blobs in %.1f s", number, len(mine), chunk.shard,
                        record["repositories"], record["blobs"], record["seconds"],
                    )  # fmt: skip
                totals.update({key: record[key] for key in COUNTS})
                shards += [record["shard"]] if record["shard"] else []
                report.update(SkipReport.from_dict(record["skipped"]))
                details.extend(record["details"])
    finally:
        fetcher.close()
    seconds = time.perf_counter() - start
    summary = {
        "ids": ids,
        "source": options.location(),
        "num_shards": num_shards,
        "shard_index": shard_index,
        "repos_per_shard": repos_per_shard,
        "chunks": len(mine),
        "chunks_of_all_machines": len(chunks),
        "chunks_fetched_this_run": this_run["chunks"],
        "chunks_already_done": len(mine) - this_run["chunks"],
        "shards_refetched": {reason: count for reason, count in resumed.items() if reason != UPGRADED},
        "records_upgraded": resumed[UPGRADED],
        "verify_checksums": verify_checksums,
        "shards": shards,
        **{key: totals[key] for key in COUNTS},
        "this_run": {
            "blobs": this_run["blobs"],
            "requests": this_run["requests"],
            "retries": this_run["requests"] - this_run["blobs"],
            "compressed_bytes": this_run["compressed_bytes"],
            "seconds": round(seconds, 3),
            "num_workers": options.num_workers,
            "blobs_per_second": round(this_run["blobs"] / max(seconds, 1e-9), 1),
            "megabytes_per_second": round(this_run["compressed_bytes"] / 1e6 / max(seconds, 1e-9), 3),
        },
        "skipped": report.as_dict(),
        "details": details[:200]
        + ([f"... {len(details) - 200} more in {STATE_DIRECTORY}/"] if len(details) > 200 else []),
    }
    write_json_atomically(os.path.join(output_dir, summary_name(num_shards, shard_index)), summary)
    report.details = summary["details"]
    return summary, report
