"""Fetch The Stack v2 file contents from S3 for -ids parquet, into per-repository shards with `content`.

    python scripts/download_stack_v2.py IDS --output DIR [--endpoint_url URL] [--num_workers N] [--bucket B]
        [--prefix P] [--num_shards N --shard_index I] [--anonymous] [--repos_per_shard N] [--max_retries N]
        [--retry_mode adaptive|standard]

IDS: a local parquet file or folder in the the-stack-v2-train-*-ids layout, or a Hub dataset id such as
bigcode/the-stack-v2-train-smol-ids (bulk access to the contents is gated behind Software Heritage's terms).
Each blob is s3://BUCKET/PREFIX<blob_id> (default s3://softwareheritage/content/), gzip-compressed, decoded
with its file's src_encoding. Credentials come from the standard AWS chain (environment, ~/.aws, instance
role) and are never printed; --anonymous sends unsigned requests (public mirrors).

A rerun resumes: finished shards are kept and only the rest is fetched. On N machines (or N processes, past
about a thousand blobs/s per process) run it with --num_shards N --shard_index I, the same IDS and options.
Writes DIR/<input>-rows-<start>-<stop>.parquet, DIR/download_state/ and DIR/download_summary.json, and prints
what was fetched, what was skipped and why, and the speed. Train on it with `dataset_name_or_path: DIR`.
"""

import argparse
import logging
import os
import sys

from starcoder2_train.data.download.fetch import S3Options
from starcoder2_train.data.download.ids import DownloadError
from starcoder2_train.data.download.run import download
from starcoder2_train.progress import FORCE_ENV


def main(argv=None) -> dict:
    defaults = S3Options()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ids", metavar="IDS", help="Ids parquet: a file, a folder or a Hub dataset id.")
    parser.add_argument("--output", required=True, help="Directory for the shards (a rerun resumes it).")
    parser.add_argument("--disable_tqdm", action="store_true", help="No progress bars (none off a terminal).")
    parser.add_argument("--endpoint_url", default=None, help="Another S3 endpoint (a mirror); default AWS.")
    parser.add_argument("--bucket", default=defaults.bucket, help=f"Bucket of the blobs (default {defaults.bucket}).")
    parser.add_argument("--prefix", default=defaults.prefix, help=f"Key prefix of a blob (default {defaults.prefix}).")
    parser.add_argument("--anonymous", action="store_true", help="Unsigned requests, for public mirrors.")
    parser.add_argument("--num_workers", type=int, default=defaults.num_workers, help="Blobs fetched at once.")
    parser.add_argument("--max_retries", type=int, default=defaults.max_retries, help="Retries of a throttled blob.")
    parser.add_argument(
        "--retry_mode",
        choices=("adaptive", "standard"),
        default=defaults.retry_mode,
        help="botocore's retries: adaptive also slows down after throttling (default), standard only retries.",
    )
    parser.add_argument("--repos_per_shard", type=int, default=1000, help="Repositories per output shard.")
    parser.add_argument("--num_shards", type=int, default=1, help="Split the ids across this many machines.")
    parser.add_argument("--shard_index", type=int, default=0, help="This machine's part, in [0, num_shards).")
    args = parser.parse_args(argv)
    if args.disable_tqdm:
        os.environ[FORCE_ENV] = "0"  # starcoder2_train.progress: every bar of this command off
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    try:
        options = S3Options(
            bucket=args.bucket,
            prefix=args.prefix,
            endpoint_url=args.endpoint_url,
            anonymous=args.anonymous,
            num_workers=args.num_workers,
            max_retries=args.max_retries,
            retry_mode=args.retry_mode,
        )
        summary, report = download(
            args.ids, args.output, options, args.repos_per_shard, args.num_shards, args.shard_index
        )
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
    print("\n".join(report.summary_lines()))
    return summary


if __name__ == "__main__":
    main()
