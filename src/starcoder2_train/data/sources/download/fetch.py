"""One blob from S3: GET s3://{bucket}/{prefix}{blob_id}, retried, gunzipped; what cannot be had, by reason.

`S3Options` says where the blobs are (bucket, key prefix, endpoint; the standard AWS credential chain, or
anonymous requests for a public mirror) and how hard to try. `BlobFetcher` holds one boto3 client that all
worker threads share: clients are thread-safe, and botocore's adaptive retry mode paces requests per client,
so one client paces the whole pool. `fetch` returns a `Blob`: the gunzipped bytes, or a reason for a key that
is missing (404), denied (403) or not gzip. Throttling (SlowDown, 503, RequestLimitExceeded, ...) and
transient errors are retried by botocore first, then by `fetch` itself with exponential backoff and full
jitter, which also covers errors while the body streams (botocore never retries those). Anything else (bad
credentials, no such bucket, retries exhausted) raises DownloadError naming the key; credentials never
appear in a message: every text taken from an answer passes `redact`.

Cost at the scale of the-stack-v2-train-smol-ids (hundreds of millions of blobs): one GET per distinct blob
of a chunk. A blob costs the client ~1.5 ms of CPU, mostly botocore's request handling under the GIL
(scripts/benchmark_data.py --download, on a 2-thread x86 machine), so one process tops out near 650 blobs/s
however many threads it has; against S3, whose latency is tens of ms, ~32 threads reach that. Past it, run
more processes or machines with --num_shards/--shard_index. Memory: one blob per worker in flight.
"""

import gzip
import random
import time
import zlib
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)

from starcoder2_train.data.skips import DENIED_BLOB, MISSING_BLOB, NOT_GZIP
from starcoder2_train.data.sources.download.ids import DownloadError

# Why a file gets no content from S3 (keys of SkipReport.files, beside those of data/skips.py).

THROTTLING_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "RequestThrottled",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
}
RETRYABLE_STATUS = {429, 500, 502, 503, 504}
# Network-level failures, while connecting or while the body streams (ReadTimeout, ResponseStreamingError).
TRANSIENT_ERRORS = (ConnectionError, HTTPClientError, IncompleteReadError)


@dataclass
class S3Options:
    """Where the blobs are and how hard to try for each."""

    bucket: str = "softwareheritage"
    prefix: str = "content/"  # the key of a blob is prefix + blob_id
    endpoint_url: str | None = None  # another S3 endpoint (a mirror, MinIO); None: AWS
    anonymous: bool = False  # unsigned requests (public mirrors); else the standard AWS credential chain
    region_name: str | None = None  # None: from the AWS environment/config
    num_workers: int = 32  # threads fetching at once
    max_retries: int = 5  # this module's retries of a throttled or transient failure, after botocore's own
    retry_base_seconds: float = 0.5  # backoff: a uniform draw in [0, min(max, base * 2**retry)]
    retry_max_seconds: float = 20.0
    botocore_max_attempts: int = 3  # botocore's attempts per request (1: botocore does not retry)
    # botocore's retry mode: adaptive also slows the client's request rate after throttling (S3 limits the GETs
    # per second of a key prefix, and every blob shares content/), standard only retries.
    retry_mode: str = "adaptive"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def __post_init__(self):
        if self.num_workers < 1:
            raise DownloadError(f"--num_workers must be at least 1, got {self.num_workers}.")
        if self.max_retries < 0 or self.botocore_max_attempts < 1:
            raise DownloadError("--max_retries must be >= 0 and botocore_max_attempts >= 1.")
        if self.retry_mode not in ("adaptive", "standard"):
            raise DownloadError(f"--retry_mode must be adaptive or standard, got {self.retry_mode!r}.")

    def location(self) -> str:
        """s3://bucket/prefix at the endpoint, for messages and the summary (no user:password of the URL)."""
        where = f"s3://{self.bucket}/{self.prefix}"
        return where if self.endpoint_url is None else f"{where} at {endpoint_without_userinfo(self.endpoint_url)}"


def endpoint_without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))


class Blob(NamedTuple):
    data: bytes | None  # gunzipped contents, None when `reason` says why not
    reason: str | None
    requests: int  # GETs this module sent (botocore's own retries not counted)
    compressed_bytes: int


class BlobFetcher:
    """One shared boto3 S3 client and `fetch(blob_id)`, safe to call from many threads."""

    def __init__(self, options: S3Options):
        self.options = options
        session = boto3.session.Session()
        config = Config(
            retries={"total_max_attempts": options.botocore_max_attempts, "mode": options.retry_mode},
            max_pool_connections=options.num_workers,
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
            signature_version=UNSIGNED if options.anonymous else None,
        )
        self._secrets: tuple[str, ...] = ()
        if not options.anonymous:
            credentials = session.get_credentials()
            if credentials is None:
                raise DownloadError(
                    f"no AWS credentials found for {options.location()} (environment, ~/.aws/config or "
                    "credentials, instance role); set them, or pass --anonymous for a public mirror."
                )
            frozen = credentials.get_frozen_credentials()
            self._secrets = tuple(value for value in (frozen.access_key, frozen.secret_key, frozen.token) if value)
        self.client = session.client(
            "s3", endpoint_url=options.endpoint_url, region_name=options.region_name, config=config
        )

    def redact(self, text: str) -> str:
        """`text` with every credential value of this client replaced by ***."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def close(self) -> None:
        self.client.close()

    def fetch(self, blob_id: str) -> Blob:
        options = self.options
        key = f"{options.prefix}{blob_id}"
        requests = 0
        while True:
            requests += 1
            try:
                response = self.client.get_object(Bucket=options.bucket, Key=key)
                body = response["Body"].read()
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in ("NoSuchKey", "NotFound") or status == 404:
                    return Blob(None, MISSING_BLOB, requests, 0)
                if code == "AccessDenied":
                    return Blob(None, DENIED_BLOB, requests, 0)
                cause = f"{code or 'error'} (HTTP {status})"
                if code not in THROTTLING_CODES and status not in RETRYABLE_STATUS:
                    message = self.redact(str(error.response.get("Error", {}).get("Message", "")))
                    raise DownloadError(
                        f"s3://{options.bucket}/{key}: {cause}: {message}; check the bucket, --prefix, "
                        "--endpoint_url and the credentials (the AWS environment/config, or --anonymous)."
                    ) from None
            except (NoCredentialsError, PartialCredentialsError) as error:
                raise DownloadError(
                    f"s3://{options.bucket}/{key}: {type(error).__name__}; set AWS credentials or pass --anonymous."
                ) from None
            except TRANSIENT_ERRORS as error:
                cause = self.redact(f"{type(error).__name__}: {error}")
            else:
                try:
                    return Blob(gzip.decompress(body), None, requests, len(body))
                except (OSError, EOFError, zlib.error):
                    return Blob(None, NOT_GZIP, requests, len(body))
            if requests > options.max_retries:
                raise DownloadError(
                    f"s3://{options.bucket}/{key}: still failing after {requests} attempts ({cause}). The shards "
                    "written so far are complete: rerun the same command to resume, with fewer --num_workers "
                    "if the endpoint throttles."
                ) from None
            ceiling = min(options.retry_max_seconds, options.retry_base_seconds * 2 ** (requests - 1))
            time.sleep(random.uniform(0, ceiling))  # full jitter: throttled workers do not retry in step
