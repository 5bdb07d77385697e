"""Local folders, git checkouts or this Python's standard library → Stack v2-format parquet shards.

Each input folder is one repository, named by metadata.repository_name. Without inputs, the standard
library of the running Python is ingested, each top-level package a repository (`cpython/json`,
`cpython/asyncio`, ...) and the loose top-level modules one more (`cpython/Lib`); site-packages is left
out (third-party code).

The shards hold one row per repository, in the layout of the-stack-v2-train-*-ids plus `content`:
`repo_name`, `num_files`, `files` (a list of structs: blob_id, path, content, language, length_bytes,
src_encoding, license_type, detected_licenses, is_vendor, is_generated, num_lines, avg_line_length,
max_line_length, alphanum_fraction, alpha_fraction). Walks are sorted, so the output depends on the
inputs only. Every file or directory left out is counted by reason in the printed summary and in
`ingest_summary.json` beside the shards. License detection: metadata.py.
"""

import hashlib
import json
import os
import re
import stat
import sys
import sysconfig
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from starcoder2_train.data.filters.files import decode_content
from starcoder2_train.data.skips import EMPTY, NO_FILE_LEFT, TOO_LARGE, UNKNOWN_LANGUAGE, SkipReport
from starcoder2_train.data.sources.languages import language_of
from starcoder2_train.data.sources.local.metadata import detect_licenses, repository_name
from starcoder2_train.progress import progress

SYMBOLIC_LINK = "symbolic link"
UNREADABLE = "unreadable (permission or I/O error)"
NOT_REGULAR = "not a regular file (fifo, socket, device)"
VCS_DIRECTORY = "version-control directory"
CACHE_DIRECTORY = "cache directory"
OUTPUT_DIRECTORY = "the output directory itself"
THIRD_PARTY = "site-packages (third-party code, not the standard library)"
EXCLUDED_BY_OPTION = "excluded by --exclude"
VCS_DIRECTORIES = {".git", ".hg", ".svn", ".bzr", "CVS", "_darcs", ".jj"}
CACHE_DIRECTORIES = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".tox", ".ipynb_checkpoints"}
VENDOR_DIRECTORIES = {"vendor", "vendors", "third_party", "third-party", "thirdparty", "3rdparty", "node_modules"}
GENERATED_NAME = re.compile(r"(_pb2(_grpc)?\.pyi?|\.pb\.(go|cc|h)|\.min\.(js|css)|package-lock\.json)$")

GENERATED_HEADER = re.compile(
    r"auto-?generated|automatically generated|@generated|do not edit|generated (by|from)", re.I
)

SUMMARY_FILE = "ingest_summary.json"

FILE_TYPE = pa.struct(
    [
        ("blob_id", pa.string()),
        ("path", pa.string()),
        ("content", pa.string()),
        ("language", pa.string()),
        ("length_bytes", pa.int64()),
        ("src_encoding", pa.string()),
        ("license_type", pa.string()),
        ("detected_licenses", pa.list_(pa.string())),
        ("is_vendor", pa.bool_()),
        ("is_generated", pa.bool_()),
        ("num_lines", pa.int64()),
        ("avg_line_length", pa.float64()),
        ("max_line_length", pa.int64()),
        ("alphanum_fraction", pa.float64()),
        ("alpha_fraction", pa.float64()),
    ]
)

SCHEMA = pa.schema([("repo_name", pa.string()), ("num_files", pa.int64()), ("files", pa.list_(FILE_TYPE))])
_ALPHA = bytes(range(65, 91)) + bytes(range(97, 123))
_ALNUM = bytes(range(48, 58)) + _ALPHA
_ASCII_RUNS = re.compile(r"[\x00-\x7f]+")


class IngestError(ValueError):
    """An input or output path cannot be used; the message names it and says what to do."""


def _directory_skip(name: str, path: str, excluded: str | None, exclude_dirs=frozenset()) -> str | None:
    if name in exclude_dirs:
        return EXCLUDED_BY_OPTION
    if name in VCS_DIRECTORIES:
        return VCS_DIRECTORY
    if name in CACHE_DIRECTORIES:
        return CACHE_DIRECTORY
    if os.path.islink(path):
        return SYMBOLIC_LINK
    if excluded is not None and os.path.realpath(path) == excluded:
        return OUTPUT_DIRECTORY
    return None


def _file_skip(status: os.stat_result, language: str | None, max_file_bytes: int) -> str | None:
    """The reason to leave a file out that its lstat and name give, before it is read."""
    if stat.S_ISLNK(status.st_mode):
        return SYMBOLIC_LINK
    if not stat.S_ISREG(status.st_mode):
        return NOT_REGULAR
    if language is None:
        return UNKNOWN_LANGUAGE
    if status.st_size == 0:
        return EMPTY
    if status.st_size > max_file_bytes:
        return TOO_LARGE
    return None


def walk(root: str, prefix: str, report: SkipReport, excluded: str | None = None, exclude_dirs=frozenset()):
    """(path inside the repository, path on disk) of every file under `root`, sorted; skipped dirs counted."""

    def count_error(error: OSError) -> None:
        report.directories[UNREADABLE] += 1
        report.details.append(f"unreadable directory: {error.filename} ({error.strerror})")

    for directory, subdirectories, files in os.walk(root, onerror=count_error):
        kept = []
        for name in sorted(subdirectories):
            reason = _directory_skip(name, os.path.join(directory, name), excluded, exclude_dirs)
            if reason:
                report.directories[reason] += 1
            else:
                kept.append(name)
        subdirectories[:] = kept
        relative_directory = os.path.relpath(directory, root).replace(os.sep, "/")
        for name in sorted(files):
            relative = name if relative_directory == "." else f"{relative_directory}/{name}"
            yield f"{prefix}{relative}", os.path.join(directory, name)


def file_record(path: str, data: bytes, text: str, language: str, licenses: tuple[str, list[str]]) -> dict:
    """One entry of `files`, with the statistics The Stack v2 carries for each file."""
    lines = text.splitlines() or [""]
    # str.isalnum / str.isalpha per character, fast: bytes.translate counts the ASCII ones in C (bytes of
    # multi-byte UTF-8 characters are >= 0x80, never counted there), Python looks at the others only.
    others = "" if text.isascii() else _ASCII_RUNS.sub("", text)
    alnum = len(data) - len(data.translate(None, _ALNUM)) + sum(c.isalnum() for c in others)
    alpha = len(data) - len(data.translate(None, _ALPHA)) + sum(c.isalpha() for c in others)
    header = "\n".join(text[:2000].splitlines()[:5])
    return {
        "blob_id": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),  # git's object id of the blob
        "path": path,
        "content": text,
        "language": language,
        "length_bytes": len(data),
        "src_encoding": "UTF-8",
        "license_type": licenses[0],
        "detected_licenses": licenses[1],
        "is_vendor": any(part in VENDOR_DIRECTORIES for part in path.split("/")[:-1]),
        "is_generated": bool(GENERATED_NAME.search(path) or GENERATED_HEADER.search(header)),
        "num_lines": len(lines),
        "avg_line_length": sum(map(len, lines)) / len(lines),
        "max_line_length": max(map(len, lines)),
        "alphanum_fraction": alnum / len(text),
        "alpha_fraction": alpha / len(text),
    }


def read_repository(name: str, entries, licenses, max_file_bytes: int, report: SkipReport, stats: Counter) -> dict:
    """A repository row from (path, path on disk) entries; each file left out is counted in `report`."""
    files = []
    for path, disk_path in entries:
        language = language_of(path)
        try:
            reason = _file_skip(os.lstat(disk_path), language, max_file_bytes)
            if reason is None:
                with open(disk_path, "rb") as handle:
                    data = handle.read()
                stats["bytes_read"] += len(data)
                text, reason = decode_content(data, "utf-8", max_file_bytes)
        except OSError:
            reason = UNREADABLE
        if reason is not None:
            report.files[reason] += 1
            continue
        files.append(file_record(path, data, text, language, licenses))
        stats["bytes_kept"] += len(data)
    return {"repo_name": name, "num_files": len(files), "files": files}


def stdlib_sources(report: SkipReport, excluded: str | None = None, exclude_dirs=frozenset()) -> list[tuple]:
    """(repo_name, license directory, entries) for each top-level package and module of this Python's stdlib."""
    stdlib = sysconfig.get_paths()["stdlib"]
    sources, loose = [], []
    for name in sorted(os.listdir(stdlib)):
        path = os.path.join(stdlib, name)
        if name in ("site-packages", "dist-packages"):
            report.directories[THIRD_PARTY] += 1
        elif name in exclude_dirs:
            report.directories[EXCLUDED_BY_OPTION] += 1
        elif os.path.isdir(path) and (name in VCS_DIRECTORIES or name in CACHE_DIRECTORIES):
            report.directories[VCS_DIRECTORY if name in VCS_DIRECTORIES else CACHE_DIRECTORY] += 1
        elif os.path.isdir(path) and not os.path.islink(path):
            sources.append((f"cpython/{name}", stdlib, walk(path, f"{name}/", report, excluded, exclude_dirs)))
        elif name.endswith(".py"):  # a top-level module is a small repository of its own
            sources.append((f"cpython/{name[:-3]}", stdlib, [(name, path)]))
        else:
            loose.append((name, path))
    return [("cpython/Lib", stdlib, loose), *sources]


def folder_sources(paths: list[str]) -> list[tuple]:
    """(repo_name, license directory, entries) for each input folder; names must be distinct."""
    sources, seen = [], {}
    for path in paths:
        if not os.path.isdir(path):
            raise IngestError(f"{path}: not a directory; each PATH is the root folder of one repository.")
        name = repository_name(path)
        if name in seen:
            raise IngestError(
                f"{seen[name]} and {path} are both named {name}; ingest them in separate runs or rename one folder."
            )
        seen[name] = path
        sources.append((name, path, None))
    return sources


class ShardWriter:
    """Writes shards of `repos_per_shard` repositories (fewer when their contents pass `max_shard_bytes`,
    which bounds memory and keeps Arrow's 2 GiB string columns safe), then names them
    train-XXXXX-of-NNNNN.parquet once their number is known."""

    def __init__(self, output_dir: str, repos_per_shard: int, max_shard_bytes: int = 512_000_000):
        self.output_dir, self.repos_per_shard, self.max_shard_bytes = output_dir, repos_per_shard, max_shard_bytes
        self.rows, self.bytes, self.written = [], 0, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.bytes += sum(file["length_bytes"] for file in row["files"])
        if len(self.rows) == self.repos_per_shard or self.bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            path = os.path.join(self.output_dir, f".train-{len(self.written):05d}.parquet.partial")
            pq.write_table(pa.Table.from_pylist(self.rows, schema=SCHEMA), path)
            self.written.append(path)
            self.rows, self.bytes = [], 0

    def close(self) -> list[str]:
        self.flush()
        names = [f"train-{i:05d}-of-{len(self.written):05d}.parquet" for i in range(len(self.written))]
        for partial, name in zip(self.written, names):
            os.replace(partial, os.path.join(self.output_dir, name))
        return names


def prepare_output(output_dir: str, overwrite: bool) -> None:
    """Make `output_dir` ready: the shards of an earlier ingest (it left ingest_summary.json) are replaced;
    shards of unknown origin only with `overwrite`; other parquet files never (readers would mix them in)."""
    os.makedirs(output_dir, exist_ok=True)
    names = sorted(os.listdir(output_dir))
    ours = [name for name in names if re.fullmatch(r"\.?train-\d{5}(-of-\d{5})?\.parquet(\.partial)?", name)]
    others = [name for name in names if name.endswith(".parquet") and name not in ours]
    if others:
        raise IngestError(
            f"{output_dir} holds other parquet files ({others[0]}, ...) that readers of the directory would mix "
            "with the new shards; choose another --output."
        )
    if ours and SUMMARY_FILE not in names and not overwrite:
        raise IngestError(
            f"{output_dir} already holds shards ({ours[0]}, ...) that scripts/ingest.py did not write; pass "
            "--overwrite to replace them or choose another --output."
        )
    for name in ours + ([SUMMARY_FILE] if SUMMARY_FILE in names else []):
        os.remove(os.path.join(output_dir, name))


def ingest(
    paths: list[str],
    output_dir: str,
    max_file_bytes: int = 1_000_000,
    repos_per_shard: int = 1000,
    overwrite: bool = False,
    exclude_dirs: tuple[str, ...] = (),
    disable_progress: bool | None = None,
) -> tuple[dict, SkipReport]:
    """Write the shards and ingest_summary.json; return the summary and the report of what was left out.
    A progress bar counts the repositories (quiet off a terminal or with `disable_progress`).

    exclude_dirs: directory names to leave out wherever they occur (e.g. test suites), counted.
    """
    exclude_dirs = frozenset(exclude_dirs)
    if max_file_bytes < 1 or repos_per_shard < 1:
        raise IngestError("--max_file_bytes and --repos_per_shard must be positive.")
    start, report, stats = time.perf_counter(), SkipReport(), Counter()
    excluded = os.path.realpath(output_dir)
    sources = folder_sources(paths) if paths else stdlib_sources(report, excluded, exclude_dirs)
    prepare_output(output_dir, overwrite)
    writer, languages, license_types = ShardWriter(output_dir, repos_per_shard), Counter(), Counter()
    repositories = 0
    for name, license_directory, entries in progress(sources, desc="ingest", unit="repo", disable=disable_progress):
        licenses = detect_licenses(license_directory, report)
        entries = walk(license_directory, "", report, excluded, exclude_dirs) if entries is None else entries
        row = read_repository(name, entries, licenses, max_file_bytes, report, stats)
        if not row["files"]:
            report.repositories[NO_FILE_LEFT] += 1
            continue
        writer.add(row)
        repositories += 1
        languages.update(file["language"] for file in row["files"])
        license_types[licenses[0]] += 1
    shards = writer.close()
    seconds = time.perf_counter() - start
    summary = {
        "inputs": list(paths) or [f"stdlib of Python {sys.version.split()[0]}: {sysconfig.get_paths()['stdlib']}"],
        "shards": shards,
        "repositories": repositories,
        "files": sum(languages.values()),
        "bytes_kept": stats["bytes_kept"],
        "bytes_read": stats["bytes_read"],
        "seconds": round(seconds, 3),
        "read_mb_per_second": round(stats["bytes_read"] / 1e6 / max(seconds, 1e-9), 2),
        "languages": dict(languages.most_common()),
        "license_types": dict(license_types),
        "skipped": report.as_dict(),
        "details": report.details,
    }
    with open(os.path.join(output_dir, SUMMARY_FILE), "w") as handle:
        json.dump(summary, handle, indent=1)
    if not shards:
        raise IngestError(
            f"no file of a known language in {', '.join(summary['inputs'])}; nothing written "
            "but the summary:\n" + "\n".join(report.summary_lines())
        )
    return summary, report
