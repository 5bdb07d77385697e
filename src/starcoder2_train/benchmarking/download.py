"""The download benchmark: blobs/s of data/download against a real S3 protocol server on loopback.

`download_throughput(num_blobs, work)` starts moto's S3 server in a subprocess on 127.0.0.1 (its own process,
so that it does not share this one's GIL with the fetching threads), uploads `num_blobs` synthetic gzip blobs
(log-normal sizes, median 2 kB, about the size of a Stack v2 file) under dummy credentials, writes their ids
parquet, and runs the downloader with each worker count, reporting blobs/s, blobs/s per worker and MB/s.
Loopback has no latency, so the figures bound the client's own cost per blob (with moto's); against S3, each
request waits tens of milliseconds and many more workers are needed for the same rate.
`moto_server_process`, `dummy_aws_credentials` and `upload_blobs` serve the tests too.
"""

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from starcoder2_train.data.sources.download.fetch import S3Options
from starcoder2_train.data.sources.download.run import download

SERVER = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the parent closes stdin
server.stop()
"""
LOOPBACK_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "benchmark-access-key",
    "AWS_SECRET_ACCESS_KEY": "benchmark-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1",  # loopback traffic never goes through an HTTP proxy of the environment
    "no_proxy": "127.0.0.1",
}
WORDS = b"def return self if else for in import class None True 0 1 x y value items ( ) : , = + . [ ] \n    ".split(
    b" "
)


@contextmanager
def moto_server_process(log_path: str = os.devnull):
    """moto's S3 server in a subprocess on 127.0.0.1; yields its endpoint URL."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
        )
    try:
        port = process.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"moto's S3 server did not start (is moto[server] installed?); see {log_path}.")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def dummy_aws_credentials():
    """The AWS environment set to dummy credentials, no config files and no proxy for 127.0.0.1 (restored after)."""
    saved = {name: os.environ.get(name) for name in [*LOOPBACK_ENVIRONMENT, "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(LOOPBACK_ENVIRONMENT)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def upload_blobs(endpoint_url: str, bucket: str, objects: dict[str, bytes], num_workers: int = 8) -> None:
    """Create `bucket` and put each key's bytes as they are (gzip them first for blobs)."""
    client = boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    with ThreadPoolExecutor(num_workers) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=bucket, Key=item[0], Body=item[1]), objects.items()))


def synthetic_ids(num_blobs: int, files_per_repository: int = 10, seed: int = 0) -> tuple[list[dict], dict]:
    """(ids rows, {blob_id: contents}): code-like text of log-normal sizes, median 2 kB."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.lognormal(np.log(2000), 1.0, num_blobs), 20, 200_000).astype(int)
    words = np.array(WORDS, dtype=object)
    contents, rows = {}, []
    for size in sizes:
        data = b" ".join(words[rng.integers(0, len(words), size // 3)])[:size] + b"\n"
        contents[hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()] = data
    blob_ids = list(contents)
    for start in range(0, len(blob_ids), files_per_repository):
        files = [
            {"blob_id": blob_id, "path": f"src/file_{i}.py", "language": "Python", "src_encoding": "UTF-8",
             "length_bytes": len(contents[blob_id]), "is_vendor": False, "is_generated": False}
            for i, blob_id in enumerate(blob_ids[start : start + files_per_repository])
        ]  # fmt: skip
        rows.append({"repo_name": f"bench/repo-{start // files_per_repository}", "files": files})
    return rows, contents


def download_throughput(num_blobs: int, work: str | None = None, workers=(1, 4)) -> dict:
    """Blobs/s, blobs/s per worker and MB/s of the downloader for each worker count, on loopback moto."""
    work = work or tempfile.mkdtemp(prefix="benchmark_download_")
    rows, contents = synthetic_ids(num_blobs)
    ids = os.path.join(work, "ids", "train-00000-of-00001.parquet")
    os.makedirs(os.path.dirname(ids), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), ids)
    blobs = {f"content/{blob_id}": gzip.compress(data) for blob_id, data in contents.items()}
    figures = {
        "blobs": len(blobs),
        "repositories": len(rows),
        "megabytes": sum(map(len, contents.values())) / 1e6,
        "compressed_megabytes": sum(map(len, blobs.values())) / 1e6,
        "server": "moto S3 server, its own process on 127.0.0.1",
        "runs": [],
    }
    with dummy_aws_credentials(), moto_server_process(os.path.join(work, "moto.log")) as endpoint:
        upload_blobs(endpoint, "softwareheritage", blobs)
        for num_workers in workers:
            output = os.path.join(work, f"workers-{num_workers}")
            shutil.rmtree(output, ignore_errors=True)  # a fresh download, not a resumed one
            options = S3Options(endpoint_url=endpoint, num_workers=num_workers)
            cpu = time.process_time()  # this process only: the fetching threads, not the server
            summary, report = download(ids, output, options, repos_per_shard=max(1, len(rows) // 4))
            cpu_ms_per_blob = (time.process_time() - cpu) * 1e3 / len(blobs)
            if report.total("files") or summary["files"] != len(blobs):
                raise RuntimeError(f"the benchmark download lost files: {report.as_dict()}")
            run = summary["this_run"]
            figures["runs"].append(
                {
                    "num_workers": num_workers,
                    "seconds": run["seconds"],
                    "blobs_per_second": run["blobs_per_second"],
                    "blobs_per_second_per_worker": run["blobs_per_second"] / num_workers,
                    "megabytes_per_second": run["megabytes_per_second"],
                    "decoded_megabytes_per_second": summary["bytes"] / 1e6 / run["seconds"],
                    "client_cpu_ms_per_blob": cpu_ms_per_blob,
                    # One process's Python holds the GIL for about this long per blob: its ceiling, server aside.
                    "client_ceiling_blobs_per_second": 1e3 / cpu_ms_per_blob,
                }
            )
    figures["work_directory"] = work
    return figures


def print_download(figures: dict) -> None:
    print(
        f"download: {figures['blobs']:,} blobs ({figures['megabytes']:.1f} MB, {figures['compressed_megabytes']:.1f} "
        f"MB gzip) in {figures['repositories']:,} repositories; {figures['server']}"
    )
    print(
        f"{'workers':>8} {'seconds':>8} {'blobs/s':>9} {'per worker':>11} {'MB/s gzip':>10} {'MB/s text':>10} "
        f"{'client CPU ms/blob':>19} {'client ceiling blobs/s':>23}"
    )
    for run in figures["runs"]:
        print(
            f"{run['num_workers']:>8} {run['seconds']:>8.2f} {run['blobs_per_second']:>9,.0f} "
            f"{run['blobs_per_second_per_worker']:>11,.0f} {run['megabytes_per_second']:>10.2f} "
            f"{run['decoded_megabytes_per_second']:>10.2f} {run['client_cpu_ms_per_blob']:>19.2f} "
            f"{run['client_ceiling_blobs_per_second']:>23,.0f}"
        )
    print(
        "blobs/s on loopback is bounded by moto (one Python process serving every GET); the client ceiling is what "
        "one downloader process could reach against a faster server, by its own CPU time per blob."
    )
