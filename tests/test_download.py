"""Fetching Stack v2 contents from S3: a real S3 server (moto) on loopback, behind a proxy that injects faults.

Covered: encodings, missing/denied/non-gzip blobs and undecodable files counted, HTTP 503 throttling retried,
an interrupted run resumed without refetching, machines splitting the input, credentials never written, the
shards read back by data/shards.load_repositories, the script's output and its exit code 2 on bad input.
"""

import gzip
import hashlib
import http.client
import json
import os
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import load_script

from starcoder2_train.benchmarking.download import upload_blobs
from starcoder2_train.configs import DataArguments
from starcoder2_train.data.skips import (
    DENIED_BLOB,
    MISSING_BLOB,
    MISSING_REPO_NAME,
    NO_FILE_FETCHED,
    NOT_GZIP,
    UNDECODABLE,
)
from starcoder2_train.data.sources.download.fetch import S3Options
from starcoder2_train.data.sources.download.ids import DownloadError
from starcoder2_train.data.sources.download.run import download
from starcoder2_train.data.sources.shards import load_repositories

ACCESS_KEY = "AKIATESTDONOTLEAK0001"
SECRET_KEY = "secret/DoNotLeak+0123456789abcdefghij"


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of moto: counts the GETs of each key, answers injected S3 errors."""

    def __init__(self, upstream_port: int):
        self.upstream_port, self.lock = upstream_port, threading.Lock()
        self.gets, self.unsigned, self.faults = Counter(), Counter(), {}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy.handle(self)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def fail(self, key: str, status: int, code: str, times: int | None = None, message: str = "injected") -> None:
        """Answer the next `times` GETs of `key` (all of them: None) with this S3 error."""
        with self.lock:
            self.faults[key] = [status, code, times, message]

    def _fault(self, key: str):
        with self.lock:
            fault = self.faults.get(key)
            if fault is None or fault[2] == 0:
                return None
            if fault[2] is not None:
                fault[2] -= 1
            return fault

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        key = request.path.split("?")[0].split("/", 2)[-1]
        if request.command == "GET":
            with self.lock:
                self.gets[key] += 1
                self.unsigned[key] += "Authorization" not in request.headers
        fault = self._fault(key)
        if fault is not None:
            status, code, _, message = fault
            payload = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
            headers = {"Content-Type": "application/xml"}
        else:
            upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
            upstream.request(request.command, request.path, body=body, headers=dict(request.headers))
            response = upstream.getresponse()
            status, payload = response.status, response.read()
            skip = {"transfer-encoding", "connection", "content-length"}
            headers = {name: value for name, value in response.getheaders() if name.lower() not in skip}
            upstream.close()
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(payload)


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server and the fault proxy in front of it, both on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = FaultProxy(server.get_host_and_port()[1])
    proxy.moto_url = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    yield proxy
    proxy.server.shutdown()
    server.stop()


@pytest.fixture(autouse=True)
def environment(tmp_path, monkeypatch):
    """Dummy credentials, no AWS config, no HTTP proxy for loopback; each test its own datasets cache."""
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    values = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def file_entry(path: str, data: bytes, src_encoding: str = "UTF-8") -> dict:
    return {
        "blob_id": blob_id(data),
        "path": path,
        "content_id": blob_id(data[::-1]),
        "language": "Python",
        "length_bytes": len(data),
        "detected_licenses": ["mit"],
        "license_type": "permissive",
        "src_encoding": src_encoding,
        "is_vendor": False,
        "is_generated": False,
    }


def write_ids(path, rows: list[dict], row_group_size: int | None = None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return str(path)


def put(s3, bucket: str, blobs: dict[str, bytes], compress: bool = True) -> None:
    """Upload straight to moto (not through the proxy), gzipped as Software Heritage stores them."""
    objects = {f"content/{key}": gzip.compress(data) if compress else data for key, data in blobs.items()}
    upload_blobs(s3.moto_url, bucket, objects)


def simple_repositories(count: int, files: int = 2, tag: str = "") -> tuple[list[dict], dict[str, bytes]]:
    rows, blobs = [], {}
    for r in range(count):
        entries = []
        for f in range(files):
            data = f"# {tag} repository {r} file {f}\nvalue_{f} = {r * 10 + f}\n".encode()
            blobs[blob_id(data)] = data
            entries.append(file_entry(f"pkg/module_{f}.py", data))
        rows.append({"repo_name": f"owner/{tag}repo-{r}", "num_files": files, "files": entries})
    return rows, blobs


def options(s3, bucket: str, **overrides) -> S3Options:
    values = {"bucket": bucket, "endpoint_url": s3.url, "num_workers": 4, "retry_base_seconds": 0.01}
    values["retry_mode"] = "standard"  # adaptive would slow the client down after the injected throttling
    return S3Options(**{**values, **overrides})


def read_output(directory) -> dict:
    """{shard name: its rows} for every shard under `directory`."""
    shards = {}
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            if name.endswith(".parquet"):
                path = os.path.join(root, name)
                shards[os.path.relpath(path, directory)] = pq.read_table(path).to_pylist()
    return shards


def test_encodings_and_every_failure_counted_then_read_back(s3, tmp_path):
    texts = {
        "utf8.py": ("UTF-8", "print('héllo — 日本語')\n"),
        "latin1.py": ("ISO-8859-1", "s = 'café, naïve, ½'\n"),
        "utf16.py": ("UTF-16", "u = 'ünïcödé ∑'\n"),
        "sjis.py": ("Shift_JIS", "x = 'こんにちは世界'\n"),
        "unknown.py": ("x-no-such-encoding", "y = 'read as UTF-8: ñ'\n"),
    }
    encoded = {
        path: text.encode(encoding if path != "unknown.py" else "utf-8") for path, (encoding, text) in texts.items()
    }
    good = [file_entry(path, encoded[path], texts[path][0]) for path in texts]
    undecodable, not_gzip, denied = b"caf\xe9 \xff\xfe\n", b"print('stored raw')\n", b"x = 'denied'\n"
    missing = [b"never uploaded 1\n", b"never uploaded 2\n", b"never uploaded 3\n"]
    rows = [
        {"repo_name": "enc/all-encodings", "num_files": 5, "files": good},
        {
            "repo_name": "enc/mixed",
            "num_files": 5,
            "files": [
                file_entry("missing.py", missing[0]),
                file_entry("bad.py", undecodable),
                file_entry("raw.py", not_gzip),
                file_entry("denied.py", denied),
                good[0] | {"path": "copy_of_utf8.py"},  # the same blob again: fetched once per chunk
            ],
        },
        {
            "repo_name": "enc/all-missing",
            "num_files": 2,
            "files": [file_entry(f"m{i}.py", missing[i]) for i in (1, 2)],
        },
        {"repo_name": None, "num_files": 1, "files": [good[1]]},
    ]
    bucket = "encodings"
    put(s3, bucket, {blob_id(data): data for data in [*encoded.values(), undecodable, denied]})
    put(s3, bucket, {blob_id(not_gzip): not_gzip}, compress=False)
    s3.fail(f"content/{blob_id(denied)}", 403, "AccessDenied", message="Access Denied")
    ids = write_ids(tmp_path / "ids" / "train-00000-of-00001.parquet", rows)
    output = tmp_path / "out"

    summary, report = download(ids, str(output), options(s3, bucket), repos_per_shard=2)

    assert report.files == Counter({MISSING_BLOB: 3, UNDECODABLE: 1, NOT_GZIP: 1, DENIED_BLOB: 1})
    assert report.repositories == Counter({NO_FILE_FETCHED: 1, MISSING_REPO_NAME: 1})
    assert any("enc/mixed/bad.py" in line and UNDECODABLE in line for line in report.details)
    assert summary["repositories"] == 2 and summary["files"] == 6
    assert summary["blobs"] == 5 + 4 + 2  # the copy of utf8.py is not fetched twice
    with open(output / "download_summary.json") as handle:
        assert json.load(handle) == summary
    assert s3.gets[f"content/{good[0]['blob_id']}"] == 1

    repositories, skips = load_repositories(DataArguments(dataset_name_or_path=str(output)))
    contents = {(repo["repo_name"], f["path"]): f["content"] for repo in repositories for f in repo["files"]}
    expected = {("enc/all-encodings", path): text for path, (_, text) in texts.items()}
    expected[("enc/mixed", "copy_of_utf8.py")] = texts["utf8.py"][1]
    assert contents == expected
    assert skips.total("files") == 0
    (stored,) = [row for rows in read_output(output).values() for row in rows if row["repo_name"] == "enc/mixed"]
    assert stored["num_files"] == 1  # the files kept
    assert {k: v for k, v in stored["files"][0].items() if k != "content"} == rows[1]["files"][4]


def test_throttling_is_retried_with_backoff(s3, tmp_path):
    rows, blobs = simple_repositories(3, tag="throttle-")
    bucket = "throttling"
    put(s3, bucket, blobs)
    keys = [f"content/{file['blob_id']}" for file in rows[0]["files"]]
    s3.fail(keys[0], 503, "SlowDown", times=2, message="Please reduce your request rate.")
    s3.fail(keys[1], 503, "RequestLimitExceeded", times=1)
    ids = write_ids(tmp_path / "ids.parquet", rows)

    # botocore retries off: this module's own retries (exponential backoff, jitter) take the 503s.
    summary, report = download(ids, str(tmp_path / "own"), options(s3, bucket, botocore_max_attempts=1))
    assert report.total("files") == 0 and summary["files"] == 6
    assert (s3.gets[keys[0]], s3.gets[keys[1]]) == (3, 2)
    assert summary["this_run"]["retries"] == 3

    # botocore's own retries (standard mode) take them first: this module sees one request.
    s3.fail(keys[0], 503, "SlowDown", times=1)
    summary, _ = download(ids, str(tmp_path / "botocore"), options(s3, bucket, botocore_max_attempts=3))
    assert s3.gets[keys[0]] == 5 and summary["this_run"]["retries"] == 0 and summary["files"] == 6

    s3.fail(keys[0], 503, "SlowDown")  # for ever: the run stops, naming the key and how to resume
    with pytest.raises(DownloadError, match=rf"{keys[0]}: still failing after 3 attempts \(SlowDown.*rerun"):
        download(ids, str(tmp_path / "stuck"), options(s3, bucket, botocore_max_attempts=1, max_retries=2))


def test_interrupted_run_resumes_without_refetching(s3, tmp_path):
    rows, blobs = simple_repositories(6, tag="resume-")
    bucket = "resume"
    put(s3, bucket, blobs)
    write_ids(tmp_path / "ids" / "data" / "train-00000-of-00001.parquet", rows, row_group_size=4)
    chunk_keys = [
        [f"content/{f['blob_id']}" for row in rows[a:b] for f in row["files"]] for a, b in ((0, 2), (2, 4), (4, 6))
    ]
    reference = tmp_path / "reference"
    download(str(tmp_path / "ids"), str(reference), options(s3, bucket), repos_per_shard=2)

    # The second chunk meets a fatal answer (as a kill would stop it): the first shard is complete, no other.
    message = f"key {ACCESS_KEY} with {SECRET_KEY} is not valid"
    s3.fail(chunk_keys[1][0], 403, "InvalidAccessKeyId", message=message)
    output = tmp_path / "out"
    with pytest.raises(DownloadError) as raised:
        download(str(tmp_path / "ids"), str(output), options(s3, bucket), repos_per_shard=2)
    assert chunk_keys[1][0] in str(raised.value) and "InvalidAccessKeyId" in str(raised.value)
    assert ACCESS_KEY not in str(raised.value) and SECRET_KEY not in str(raised.value) and "***" in str(raised.value)
    first = "data/train-00000-of-00001-rows-000000000-000000002.parquet"
    assert list(read_output(output)) == [first]
    partial = output / "data" / ".train-00000-of-00001-rows-000000002-000000004.parquet.partial"
    partial.write_bytes(b"left by a killed writer")

    s3.faults.clear()
    before = s3.gets.copy()
    summary, _ = download(str(tmp_path / "ids"), str(output), options(s3, bucket), repos_per_shard=2)
    fetched = s3.gets - before
    assert all(fetched[key] == 0 for key in chunk_keys[0])
    assert all(fetched[key] == 1 for key in chunk_keys[1] + chunk_keys[2])
    assert (summary["chunks_already_done"], summary["chunks_fetched_this_run"]) == (1, 2)
    assert read_output(output) == read_output(reference)
    with open(reference / "download_summary.json") as handle:
        uninterrupted = json.load(handle)
    for key in ("shards", "repositories", "files", "blobs", "bytes", "compressed_bytes", "skipped"):
        assert summary[key] == uninterrupted[key], key
    assert not partial.exists()

    before = s3.gets.copy()
    summary, _ = download(str(tmp_path / "ids"), str(output), options(s3, bucket), repos_per_shard=2)
    assert s3.gets == before and summary["chunks_already_done"] == 3

    with pytest.raises(DownloadError, match="another --repos_per_shard"):
        download(str(tmp_path / "ids"), str(output), options(s3, bucket), repos_per_shard=3)


def test_machines_split_the_input_by_row_group(s3, tmp_path):
    bucket = "machines"
    rows_a, blobs_a = simple_repositories(5, tag="a-")
    rows_b, blobs_b = simple_repositories(3, tag="b-")
    put(s3, bucket, blobs_a | blobs_b)
    write_ids(tmp_path / "ids" / "part-a.parquet", rows_a, row_group_size=2)
    write_ids(tmp_path / "ids" / "part-b.parquet", rows_b, row_group_size=2)
    download(str(tmp_path / "ids"), str(tmp_path / "one"), options(s3, bucket), repos_per_shard=1)
    shared = tmp_path / "shared"
    summaries = [
        download(str(tmp_path / "ids"), str(shared), options(s3, bucket), 1, num_shards=2, shard_index=index)[0]
        for index in (0, 1)
    ]
    assert not set(summaries[0]["shards"]) & set(summaries[1]["shards"])
    assert read_output(shared) == read_output(tmp_path / "one")
    assert len(read_output(shared)) == 8
    assert os.path.exists(shared / "download_summary-00001-of-00002.json")
    repositories, _ = load_repositories(DataArguments(dataset_name_or_path=str(shared)))
    assert sorted(repositories["repo_name"]) == sorted(row["repo_name"] for row in rows_a + rows_b)


def test_script_prints_what_it_did_and_never_the_credentials(s3, tmp_path, capsys, caplog):
    rows, blobs = simple_repositories(4, tag="script-")
    rows[0]["files"].append(file_entry("gone.py", b"not in the bucket\n"))
    bucket = "script"
    put(s3, bucket, blobs)
    ids = write_ids(tmp_path / "ids.parquet", rows)
    output = tmp_path / "out"
    script = load_script("download_stack_v2")
    summary = script.main([ids, "--output", str(output), "--endpoint_url", s3.url, "--bucket", bucket])
    printed = capsys.readouterr()
    assert summary["files"] == 8 and summary["repositories"] == 4
    assert "4 repositories, 8 files" in printed.out and "blobs/s" in printed.out
    assert f"1  {MISSING_BLOB}" in printed.out
    written = b"".join(path.read_bytes() for path in output.rglob("*") if path.is_file())
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert secret not in printed.out + printed.err + caplog.text
        assert secret.encode() not in written

    anonymous, before = tmp_path / "anonymous", s3.unsigned.copy()
    client = boto3.client("s3", endpoint_url=s3.moto_url)
    for key in blobs:  # a public mirror: objects anyone may read
        client.put_object_acl(Bucket=bucket, Key=f"content/{key}", ACL="public-read")
    script.main([ids, "--output", str(anonymous), "--endpoint_url", s3.url, "--bucket", bucket, "--anonymous"])
    assert sum((s3.unsigned - before).values()) == 9  # unsigned GETs: no Authorization header


def test_bad_inputs_fail_clearly_with_exit_code_2(s3, tmp_path, capsys):
    script = load_script("download_stack_v2")

    def fails(*words) -> str:
        with pytest.raises(SystemExit) as raised:
            script.main([*words, "--output", str(tmp_path / "out"), "--endpoint_url", s3.url])
        assert raised.value.code == 2
        return capsys.readouterr().err

    no_blob_id = write_ids(tmp_path / "a" / "no_blob_id.parquet", [{"repo_name": "a/b", "files": [{"path": "x.py"}]}])
    assert re.search(r"no_blob_id\.parquet: missing files\.blob_id", fails(no_blob_id))
    per_file = write_ids(tmp_path / "b" / "per_file.parquet", [{"repo_name": "a/b", "blob_id": "0" * 40, "path": "x"}])
    assert "one row per file" in fails(per_file)
    assert "/no/such/ids is neither a local directory or file nor a Hub id" in fails("/no/such/ids")
    message = fails("bigcode/the-stack-v2-train-smol-ids")
    # The tests run offline (conftest): the message says so and what to do.
    assert "bigcode/the-stack-v2-train-smol-ids" in message and "unset HF_HUB_OFFLINE to download it" in message
    assert "--num_workers must be at least 1" in fails(no_blob_id, "--num_workers", "0")
    assert "--shard_index: must be in [0, num_shards=2)" in fails(
        no_blob_id, "--num_shards", "2", "--shard_index", "2"
    )

    foreign = tmp_path / "foreign"
    write_ids(foreign / "other.parquet", [{"repo_name": "x/y"}])
    rows, _ = simple_repositories(1, tag="bad-")
    ids = write_ids(tmp_path / "c" / "ids.parquet", rows)
    with pytest.raises(DownloadError, match="parquet files this downloader did not write"):
        download(ids, str(foreign), options(s3, "script"))
    with pytest.raises(DownloadError, match="lies inside IDS"):
        download(str(tmp_path / "c"), str(tmp_path / "c" / "out"), options(s3, "script"))
