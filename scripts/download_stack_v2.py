"""Fetch The Stack v2 file contents from S3 for -ids parquet, into per-repository shards with `content`.

    python scripts/download_stack_v2.py IDS --output DIR [--endpoint_url URL] [--num_workers N] [--bucket B]
        [--prefix P] [--num_shards N --shard_index I] [--anonymous] [--repos_per_shard N] [--max_retries N]
        [--retry_mode adaptive|standard] [--verify_checksums]

IDS: a local parquet file or folder in the the-stack-v2-train-*-ids layout, or a Hub dataset id such as
bigcode/the-stack-v2-train-smol-ids (bulk access to the contents is gated behind Software Heritage's terms).
Each blob is s3://BUCKET/PREFIX<blob_id> (default s3://softwareheritage/content/), gzip-compressed, decoded
with its file's src_encoding. Credentials come from the standard AWS chain (environment, ~/.aws, instance
role) and are never printed; --anonymous sends unsigned requests (public mirrors).

A rerun resumes: finished shards are kept and only the rest is fetched. A shard kept must match the size and
row count its record holds (--verify_checksums: its sha256 too, which reads every shard once); one that does
not (missing, truncated, changed) is fetched again and counted by reason. On N machines (or N processes, past
about a thousand blobs/s per process) run it with --num_shards N --shard_index I, the same IDS and options.
Writes DIR/<input>-rows-<start>-<stop>.parquet, DIR/download_state/ and DIR/download_summary.json, and prints
what was fetched, what was skipped and why, and the speed. Train on it with `dataset_name_or_path: DIR`.
"""

import logging
import os
import sys

from starcoder2_train.cli import ScriptParser
from starcoder2_train.progress import FORCE_ENV

S3_KEYS = ("bucket", "prefix", "endpoint_url", "anonymous", "num_workers", "max_retries", "retry_mode")


def parse_args(argv=None):
    """The options; the S3 ones left unset (None) take S3Options' defaults (data/sources/download/fetch.py), which are
    read after the parse, with boto3 and the data package."""
    parser = ScriptParser(description=__doc__)
    parser.add_argument("ids", metavar="IDS", help="Ids parquet: a file, a folder or a Hub dataset id.")
    parser.add_argument("--output", required=True, help="Directory for the shards (a rerun resumes it).")
    parser.add_flag("--disable_tqdm", help="No progress bars (none off a terminal).")
    parser.add_argument("--endpoint_url", default=None, help="Another S3 endpoint (a mirror); default AWS.")
    parser.add_argument("--bucket", help="Bucket of the blobs (default: The Stack v2's, softwareheritage).")
    parser.add_argument("--prefix", help="Key prefix of a blob (default: content/).")
    parser.add_flag("--anonymous", help="Unsigned requests, for public mirrors.")
    parser.add_argument("--num_workers", type=int, help="Blobs fetched at once (default: S3Options.num_workers).")
    parser.add_argument(
        "--max_retries", type=int, help="Retries of a throttled blob (default: S3Options.max_retries)."
    )
    parser.add_argument(
        "--retry_mode",
        choices=("adaptive", "standard"),
        help="botocore's retries: adaptive also slows down after throttling (default), standard only retries.",
    )
    parser.add_argument("--repos_per_shard", type=int, default=1000, help="Repositories per output shard.")
    parser.add_argument("--num_shards", type=int, default=1, help="Split the ids across this many machines.")
    parser.add_argument("--shard_index", type=int, default=0, help="This machine's part, in [0, num_shards).")
    parser.add_flag(
        "--verify_checksums",
        help="On resume, keep a shard only if its sha256 matches its record (default: size and row count).",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Imported after the parse: a mistyped word is refused before boto3 and transformers load.
    from starcoder2_train.data.sources.download.fetch import S3Options
    from starcoder2_train.data.sources.download.ids import DownloadError
    from starcoder2_train.data.sources.download.run import download

    if args.disable_tqdm:
        os.environ[FORCE_ENV] = "0"  # starcoder2_train.progress: every bar of this command off
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    try:
        options = S3Options(**{key: getattr(args, key) for key in S3_KEYS if getattr(args, key) is not None})
        summary, report = download(
            args.ids, args.output, options, args.repos_per_shard, args.num_shards, args.shard_index,
            verify_checksums=args.verify_checksums,
        )  # fmt: skip
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    run = summary["this_run"]
    print(
        f"{summary['repositories']:,} repositories, {summary['files']:,} files, {summary['bytes'] / 1e6:.1f} MB in "
        f"{len(summary['shards'])} shard(s) in {args.output}, from {summary['source']}"
    )
    print(
        f"this run: {summary['chunks_fetched_this_run']} chunk(s) fetched, {summary['chunks_already_done']} already "
        f"done; {run['blobs']:,} blobs, {run['compressed_bytes'] / 1e6:.1f} MB compressed, {run['retries']:,} "
        f"retries, in {run['seconds']:.1f} s: {run['blobs_per_second']:,.0f} blobs/s, "
        f"{run['megabytes_per_second']:.2f} MB/s with {run['num_workers']} workers"
    )
    refetched = summary["shards_refetched"]
    if refetched or summary["records_upgraded"]:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(refetched.items()))
        print(
            f"resume check ({'sha256' if summary['verify_checksums'] else 'size and row count'}): "
            f"{sum(refetched.values())} shard(s) fetched again{f' ({reasons})' if reasons else ''}, "
            f"{summary['records_upgraded']} old record(s) upgraded with size, row count and sha256"
        )
    print("\n".join(report.summary_lines()))
    return summary


if __name__ == "__main__":
    main()
