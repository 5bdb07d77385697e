"""Stack v2-format parquet shards → one row per repository, with every file left out counted by reason.

Two layouts are accepted, recognised per parquet file by its columns:
- per repository (the-stack-v2-train-*-ids with contents added, and what scripts/ingest.py writes):
  `repo_name` and `files`, a list of structs with at least `path` and `content`;
- per file (the-stack-v2 and -dedup with contents added): `repo_name`, `path`, `content`. Rows are
  grouped by `repo_name` across all the files read, repositories and their files in first-seen order.
Optional file fields, used when present: `language` (else derived from the path), `license_type`,
`is_vendor`, `is_generated`, `src_encoding` (to decode contents stored as bytes; default UTF-8).

Output rows: `repo_name: str`, `files: list of {path: str, content: str, language: str}`, in an
order that depends on the input only (not on num_proc).
"""

import glob
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Why a file, repository or parquet file is left out (the keys of SkipReport's counters).
MISSING_REPO_NAME = "missing repo_name"
MISSING_PATH = "missing path"
MISSING_CONTENT = "missing content"
VENDOR = "vendor file (is_vendor, exclude_vendor)"
GENERATED = "generated file (is_generated, exclude_generated)"
LICENSE_NOT_SELECTED = "license_type not in license_types"
UNKNOWN_LANGUAGE = "unknown language (no language given, none derivable from the path)"
LANGUAGE_NOT_SELECTED = "language not in languages"
EMPTY = "empty content"
TOO_LARGE = "larger than max_file_bytes"
BINARY = "binary content (NUL byte)"
UNDECODABLE = "content not decodable as its src_encoding"
NO_FILE_LEFT = "no file left after filtering"
BEYOND_MAX_REPOSITORIES = "beyond max_repositories"
UNREADABLE_PARQUET = "unreadable parquet file"


@dataclass
class SkipReport:
    """What was left out, counted by reason, per unit; `+` and `update` merge reports."""

    files: Counter = field(default_factory=Counter)
    repositories: Counter = field(default_factory=Counter)
    parquet_files: Counter = field(default_factory=Counter)
    directories: Counter = field(default_factory=Counter)
    details: list[str] = field(default_factory=list)  # one line per item worth naming (an unreadable file)

    UNITS = ("files", "repositories", "parquet_files", "directories")

    def update(self, other: "SkipReport") -> "SkipReport":
        for unit in self.UNITS:
            getattr(self, unit).update(getattr(other, unit))
        self.details.extend(other.details)
        return self

    def __add__(self, other: "SkipReport") -> "SkipReport":
        return SkipReport().update(self).update(other)

    def total(self, unit: str) -> int:
        return sum(getattr(self, unit).values())

    def as_dict(self) -> dict[str, int]:
        """Flat {"<unit>: <reason>": count}, as written beside prepared shards and shown in data reports."""
        return {
            f"{unit.replace('_', ' ')}: {reason}": count
            for unit in self.UNITS
            for reason, count in getattr(self, unit).items()
        }

    @classmethod
    def load(cls, directory: str, split: str) -> "SkipReport":
        """The as_dict() saved beside prepared shards (skipped.json). Every machine counts the whole input
        before it takes its shard, so any one shard's file holds the totals."""
        report, paths = cls(), sorted(glob.glob(os.path.join(directory, split, "epoch-*", "*", "skipped.json")))
        for key, count in (json.loads(Path(paths[0]).read_text()) if paths else {}).items():
            unit, _, reason = key.partition(": ")
            getattr(report, unit.replace(" ", "_"))[reason] += count
        return report

    def summary_lines(self) -> list[str]:
        lines = []
        for unit in self.UNITS:
            counter = getattr(self, unit)
            if counter:
                lines.append(f"skipped {self.total(unit):,} {unit.replace('_', ' ')}:")
                for reason, count in sorted(counter.items(), key=lambda item: (-item[1], item[0])):
                    lines.append(f"  {count:>10,}  {reason}")
        return (lines + self.details) or ["skipped nothing"]
