"""The file filters: which repositories and files of a shard are kept, and why each other one is left out.

data/sources/shards.py reads the rows; these functions decide, batch by batch, in this order:
1. a repository named in `exclude_repositories` is left out whole, before any of its files is looked at
   (opt_outs.py), and counted once, as opted out;
2. per file: a path (else missing path), `is_vendor` (`exclude_vendor`), `is_generated` (`exclude_generated`),
   `license_type` in `license_types`, a language (the shard's, else from the path: data/sources/languages.py) in
   `languages`, contents that decode (bytes as `src_encoding`, default UTF-8), are not empty, hold no NUL and are
   at most `max_file_bytes` UTF-8 bytes (`decode_content`);
3. a file that holds a benchmark text is left out (decontamination.py, `decontamination_benchmarks`) and named in
   the SkipReport's `contaminated` list.
Every reason is a data/skips.py constant. `filter_repository_rows` (one row per repository) and `filter_file_rows`
(one row per file) apply them; the in-process pipeline (through shards.py's reader) and data/prepare.py's datatrove
reader call the same functions with the same `file_filters(data_args)`.

Cost per task (a datasets worker or a datatrove task). Memory: the opt-out set (about 100 bytes a name) and the
benchmark index (under 1 MB for HumanEval; for StarCoder2's whole benchmark set decontamination.py's 32 MB of
grams, 10 MB of texts and an 8 MB lookup table, about 50 MB), built once by `file_filters` and unpickled once per
task, never per batch. Time: per file a few dict lookups and one pass over its
contents (decode, length, NUL), then decontamination's search, which dominates: 3,832 files/s per worker with the
HumanEval index, 1,659 with a 10M-character index (docs/benchmarks.md, commit 519c805, a shared 2-core CPU). At the
latter, a task of prepare_data.py's 1,000 over ~300M files (the UNVERIFIED order of magnitude of the Stack v2
smol download) filters its ~300,000 files in about 3 minutes.
"""

import functools
import hashlib
import importlib
import inspect

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, Value

from starcoder2_train.configs import DataArguments
from starcoder2_train.data.filters.decontamination import Match, load_benchmark_index
from starcoder2_train.data.filters.opt_outs import load_opt_outs
from starcoder2_train.data.skips import (
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
    VENDOR,
    contamination_reason,
)
from starcoder2_train.data.sources.languages import language_of

# A file decontamination removed, as the report names it (repo_name is added where the repository is known).
CONTAMINATED_FEATURES = {"path": Value("string"), "benchmark": Value("string"), "text": Value("string")}
# The modules whose source shapes the repository rows: the reader, the languages and these filters.
ROW_MODULES = (
    "starcoder2_train.data.sources.shards",
    "starcoder2_train.data.sources.languages",
    __name__,
    "starcoder2_train.data.filters.decontamination",
    "starcoder2_train.data.filters.opt_outs",
)


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


def filter_file_rows(batch: dict, filters: dict) -> dict:
    """Per-file layout: one output row per input row, its `skip` reason empty when the file is kept. An opted-out
    repository's files are marked OPTED_OUT here and counted once per repository by the reader's grouping."""
    out = {"repo_name": [], "path": [], "content": [], "language": [], "skip": [], "benchmark": [], "text": []}
    for values in zip(*batch.values()):
        row = dict(zip(batch, values))
        if not row["repo_name"]:
            checked, reason, match = None, MISSING_REPO_NAME, None
        elif _opted_out(row["repo_name"], filters):
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


def contaminated_files(rows: Dataset) -> list[dict]:
    """{repo_name, path, benchmark, text} of each file decontamination removed (a few per million files), from
    the rows `filter_repository_rows` or `filter_file_rows` wrote."""
    if "contaminated" in rows.column_names:  # per-repository rows: a list per repository
        found = pc.list_value_length(rows.data.column("contaminated")).to_numpy(zero_copy_only=False) > 0
        found = rows.select(np.flatnonzero(found)).select_columns(["repo_name", "contaminated"])
        return [{"repo_name": row["repo_name"], **entry} for row in found for entry in row["contaminated"]]
    found = pc.not_equal(rows.data.column("text"), "").to_numpy(zero_copy_only=False)
    found = rows.select(np.flatnonzero(found)).select_columns(["repo_name", *CONTAMINATED_FEATURES])
    return found.to_list()


def _lowered(values: list[str] | None) -> list[str] | None:
    return None if values is None else sorted({value.lower() for value in values})


@functools.cache
def filters_code() -> str:
    """A hash of the source of every module that shapes the repository rows (ROW_MODULES: the reader in
    data/sources/shards.py, the languages, these filters, decontamination and opt-outs), so that editing any of them
    makes a new datasets cache. The modules are imported when this is first called, not when this module is (the
    reader imports this module)."""
    modules = [importlib.import_module(name) for name in ROW_MODULES]
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
