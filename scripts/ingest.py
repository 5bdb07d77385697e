"""Turn local folders or git checkouts into Stack v2-format parquet shards, one row per repository.

    python scripts/ingest.py PATH... --output DIR [--max_file_bytes N] [--repos_per_shard N] [--overwrite]

Each PATH is the root of one repository, named owner/name after its git remote when it has one, else
after the folder. With no PATH the standard library of this Python is ingested (no download needed):
    python scripts/ingest.py --output data/stdlib

Writes DIR/train-00000-of-0000N.parquet and DIR/ingest_summary.json, and prints what was kept, what
was skipped and why, and the reading speed. Read the shards with `dataset_name_or_path: DIR`.
"""

import os
import sys

from starcoder2_train.cli import ScriptParser
from starcoder2_train.progress import FORCE_ENV


def parse_args(argv=None):
    parser = ScriptParser(description=__doc__)
    parser.add_argument("paths", nargs="*", metavar="PATH", help="Repository folders; none: this Python's stdlib.")
    parser.add_argument("--output", required=True, help="Directory for the parquet shards.")
    parser.add_flag("--disable_tqdm", help="No progress bars (none off a terminal).")
    parser.add_argument("--max_file_bytes", type=int, default=1_000_000, help="Skip larger files (bytes).")
    parser.add_argument("--repos_per_shard", type=int, default=1000, help="Repositories per parquet file.")
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="NAME",
        help="Leave out directories of this name wherever they occur (repeatable), e.g. --exclude test.",
    )
    parser.add_flag(
        "--overwrite",
        help="Replace shards in --output that an earlier ingest did not write (its own are always replaced).",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from starcoder2_train.data.sources.local.ingest import (  # after the parse: it loads transformers
        IngestError,
        ingest,
    )

    if args.disable_tqdm:
        os.environ[FORCE_ENV] = "0"  # starcoder2_train.progress: every bar of this command off
    try:
        summary, report = ingest(
            args.paths, args.output, args.max_file_bytes, args.repos_per_shard, args.overwrite, tuple(args.exclude)
        )
    except IngestError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    print(
        f"ingested {summary['repositories']:,} repositories, {summary['files']:,} files, "
        f"{summary['bytes_kept'] / 1e6:.1f} MB into {len(summary['shards'])} shard(s) in {args.output}"
    )
    print(
        f"read {summary['bytes_read'] / 1e6:.1f} MB in {summary['seconds']:.2f} s "
        f"({summary['read_mb_per_second']:.1f} MB/s)"
    )
    print("languages: " + ", ".join(f"{name} {count:,}" for name, count in summary["languages"].items()))
    print("license_type (repositories): " + ", ".join(f"{k} {v}" for k, v in summary["license_types"].items()))
    print("\n".join(report.summary_lines()))
    return summary


if __name__ == "__main__":
    main()
