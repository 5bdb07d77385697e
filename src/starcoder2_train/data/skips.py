"""Why a file, repository or parquet file is left out, and `SkipReport`, which counts them by reason.

Nothing is dropped silently: every step that leaves something out adds it to a SkipReport under one of the
reasons below; reports merge with `+` (several files, several machines) and print as `summary_lines()`.
What PII redaction rewrote is counted the same way, by kind, under the unit `redactions` (nothing is left out
there), and the files that decontamination removed are also named one by one (`contaminated`, for the report
file of data/filters/decontamination.py).
"""

from collections import Counter
from dataclasses import dataclass, field

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
# Fetching contents from Software Heritage (data/sources/download/).
MISSING_BLOB = "blob not in the bucket (NoSuchKey, HTTP 404)"
DENIED_BLOB = "blob access denied (AccessDenied, HTTP 403)"
NOT_GZIP = "blob is not valid gzip"
MISSING_BLOB_ID = "missing blob_id"
NO_FILE_FETCHED = "no file fetched (every blob missing, denied or undecodable)"
# The steps of StarCoder2's preprocessing (docs/data_filters.md).
OPTED_OUT = "opted-out repository (exclude_repositories)"
NEAR_DUPLICATE = "near-duplicate of a file kept elsewhere (near_dedup, MinHash)"
FILES_REDACTED = "files with a redaction"  # a key of SkipReport.redactions beside the kinds of data/filters/pii.py


def contamination_reason(benchmark: str) -> str:
    """The reason of a file removed for holding a text of `benchmark` (one reason per benchmark)."""
    return f"contains {benchmark} benchmark text (decontamination)"


@dataclass
class SkipReport:
    """What was left out, counted by reason, per unit; `+` and `update` merge reports."""

    files: Counter = field(default_factory=Counter)
    repositories: Counter = field(default_factory=Counter)
    parquet_files: Counter = field(default_factory=Counter)
    directories: Counter = field(default_factory=Counter)
    redactions: Counter = field(default_factory=Counter)  # PII spans replaced, by kind; FILES_REDACTED files
    details: list[str] = field(default_factory=list)  # one line per item worth naming (an unreadable file)
    contaminated: list[dict] = field(default_factory=list)  # {repo_name, path, benchmark, text} per removed file

    UNITS = ("files", "repositories", "parquet_files", "directories", "redactions")

    def update(self, other: "SkipReport") -> "SkipReport":
        for unit in self.UNITS:
            getattr(self, unit).update(getattr(other, unit))
        self.details.extend(other.details)
        self.contaminated.extend(other.contaminated)
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
            if count  # a reason counted zero times is no skip
        }

    @classmethod
    def from_dict(cls, flat: dict[str, int]) -> "SkipReport":
        """The report back from its as_dict()."""
        report = cls()
        for key, count in flat.items():
            unit, _, reason = key.partition(": ")
            getattr(report, unit.replace(" ", "_"))[reason] += count
        return report

    def summary_lines(self) -> list[str]:
        lines = []
        for unit in self.UNITS:
            counter = getattr(self, unit)
            if counter:
                header = "redacted (pii_redaction), spans by kind:" if unit == "redactions" else None
                lines.append(header or f"skipped {self.total(unit):,} {unit.replace('_', ' ')}:")
                for reason, count in sorted(counter.items(), key=lambda item: (-item[1], item[0])):
                    lines.append(f"  {count:>10,}  {reason}")
        return (lines + self.details) or ["skipped nothing"]
