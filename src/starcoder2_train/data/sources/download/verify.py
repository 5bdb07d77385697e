"""Is a downloaded shard the one its record describes? Size, parquet footer row count and sha256.

When the download writes a shard it records the file's facts in `download_state/<shard>.json` under
`shard_file`: `{"bytes": size, "rows": repositories (the footer's row count), "sha256": hex digest}`, the
digest taken by re-reading the finished file right before its rename (pages the writer just wrote, still in
the page cache: ~70 ms for 100 MB on this project's 2-core x86 machine, hashlib's OpenSSL SHA-256 at ~1.4
GB/s, against the seconds a 1,000-repository chunk takes to fetch).

`shard_problem` checks a shard against its record:
- cheap (the default): the file exists, has the recorded size and its footer reads with the recorded row
  count. This suffices against truncation, the failure a killed copy, a full disk or an interrupted sync
  leaves: a parquet file ends with its footer (metadata, its 4-byte length, `PAR1`), so any cut changes the
  size, and a file of the right size whose tail was lost (zero-filled blocks after a crash) has no readable
  footer. Cost: one stat and one footer read (tens of KB) per shard, seconds for ~3,300 shards.
- with `verify_checksums`: also the sha256 of the whole file, which catches a changed byte inside a data page
  (same size, intact footer; pyarrow 26.0.1's writer stores no page CRC, `write_page_checksum=False`). Cost:
  the whole file read once, ~70 ms per 100 MB hashed, the disk's read rate beyond that (~330 GB for the smol
  ids, minutes per machine).
A record written before these facts existed (no `shard_file`) is "unverified": checked by its footer
against the record's `repositories` alone (`old_record_problem`).

`check_downloaded_shards` runs the check before preparation (data/prepare.py's input_plan, data/pipeline.py's
build_training_data) on every input shard that has a record, and refuses the first mismatch in one line
naming the shard, what differs, and the rerun of the download that fetches it again. Shards without a
record (a user's own parquet, scripts/ingest.py output) are not checked. Imports no boto3: preparation may
run where the download's client is not installed.
"""

import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from starcoder2_train.configs import DataArguments, RecipeError
from starcoder2_train.data.sources.shards import resolve_data_files

STATE_DIRECTORY = "download_state"
PLAN = "plan.json"
READ_BYTES = 8 << 20  # sha256 reads; hashlib releases the GIL on buffers this large

# Why a shard failed its check: the keys of the download summary's `shards_refetched`.
MISSING, SIZE, UNREADABLE, ROWS, CHECKSUM = "missing", "size differs", "unreadable", "rows differ", "checksum differs"


def record_path(output_dir: str, shard: str) -> str:
    """download_state/<the shard's path without .parquet>.json: one record per chunk, named after its shard."""
    return os.path.join(output_dir, STATE_DIRECTORY, f"{shard.removesuffix('.parquet')}.json")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def footer_rows(path: str) -> int:
    """The row count in the parquet footer (the file's last bytes only); ArrowException/OSError if unreadable."""
    return pq.read_metadata(path).num_rows


def shard_facts(path: str) -> dict:
    """What a record keeps of a finished shard: {"bytes", "rows", "sha256"}."""
    return {"bytes": os.path.getsize(path), "rows": footer_rows(path), "sha256": sha256_of(path)}


def _unreadable(path: str) -> tuple[int | None, str | None]:
    try:
        return footer_rows(path), None
    except (pa.ArrowException, OSError) as error:
        return None, f"its parquet footer is unreadable ({type(error).__name__}: {error})".replace("\n", " ")


def shard_problem(path: str, facts: dict, verify_checksums: bool = False) -> tuple[str, str] | None:
    """(reason, what differs) when the shard at `path` is not the one `facts` (a record's shard_file) describes."""
    if not os.path.isfile(path):
        return MISSING, "the file is missing"
    size = os.path.getsize(path)
    if size != facts["bytes"]:
        return SIZE, f"{size:,} bytes, its record says {facts['bytes']:,} (truncated or rewritten)"
    rows, error = _unreadable(path)
    if error is not None:
        return UNREADABLE, error
    if rows != facts["rows"]:
        return ROWS, f"{rows:,} rows, its record says {facts['rows']:,}"
    if verify_checksums and sha256_of(path) != facts["sha256"]:
        return CHECKSUM, f"its sha256 differs from its record's {facts['sha256'][:16]}... (same size: a changed byte)"
    return None


def old_record_problem(path: str, record: dict) -> tuple[str, str] | None:
    """The check of a record with no shard_file (written before sizes and checksums were recorded): the footer
    must read with the record's repository count."""
    if not os.path.isfile(path):
        return MISSING, "the file is missing"
    rows, error = _unreadable(path)
    if error is not None:
        return UNREADABLE, error
    if rows != record["repositories"]:
        return ROWS, f"{rows:,} rows, its record says {record['repositories']:,} repositories"
    return None


def read_records(output_dir: str) -> dict[str, dict]:
    """{shard path: record} for every chunk record under output_dir/download_state that names a
    shard (a chunk with no repository left writes none)."""
    records, state = {}, os.path.join(output_dir, STATE_DIRECTORY)
    for directory, _, names in os.walk(state):
        for name in sorted(names):
            if (
                not name.endswith(".json")
                or name.startswith(".")
                or os.path.join(directory, name) == os.path.join(state, PLAN)
            ):
                continue
            path = os.path.join(directory, name)
            try:
                with open(path) as handle:
                    record = json.load(handle)
                shard = record["shard"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise RecipeError(
                    f"{path}: not a readable download record ({type(error).__name__}); delete it and rerun "
                    f"scripts/download_stack_v2.py with --output {output_dir} to fetch its chunk again."
                ) from None
            if shard is not None:
                records[os.path.normpath(os.path.join(output_dir, shard))] = record
    return records


def check_downloaded_shards(data_args: DataArguments, paths: list[str] | None = None) -> int:
    """Refuse, in one line, an input shard that differs from its download record; returns the shards checked.

    Only a local dataset_name_or_path holding download_state/ is checked, and of its records those whose shard
    is among `paths` (the files this run reads; None: data_files and eval_data_files resolved here), plus, when
    neither data_files nor data_dir narrows the input (the whole download is read), those whose shard is missing."""
    source = data_args.dataset_name_or_path
    if source is None or not os.path.isdir(os.path.join(source, STATE_DIRECTORY)):
        return 0
    if paths is None:
        paths = resolve_data_files(data_args)
        paths += resolve_data_files(data_args, data_args.eval_data_files) if data_args.eval_data_files else []
    records = read_records(source)
    wanted = {os.path.normpath(path) for path in paths}
    checked, failures = 0, []
    for shard, record in records.items():
        if shard not in wanted and (data_args.data_files or data_args.data_dir or os.path.exists(shard)):
            continue
        facts = record.get("shard_file")
        if facts is None:
            problem = old_record_problem(shard, record)
        else:
            problem = shard_problem(shard, facts, data_args.verify_download_checksums)
        checked += 1
        if problem is not None:
            failures.append((shard, problem[1]))
    if failures:
        shard, what = failures[0]
        others = f"; {len(failures) - 1} other shard(s) fail too" if len(failures) > 1 else ""
        flag = " --verify_checksums" if data_args.verify_download_checksums else ""
        raise RecipeError(
            f"{shard}: {what}{others}. Fetch it again: rerun scripts/download_stack_v2.py with the same IDS and "
            f"options and --output {source}{flag} (it re-fetches every shard that fails this check), then rerun this."
        )
    return checked
