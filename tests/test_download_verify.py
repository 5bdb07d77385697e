"""Downloaded shards checked against their records (data/sources/download/verify.py): on resume by the download, which
fetches a damaged shard again, and before preparation, which refuses it. Reuses test_download.py's moto S3 server.
"""

import json
import os

import pytest
from conftest import load_script
from test_download import environment, options, put, read_output, s3, simple_repositories, write_ids  # noqa: F401

from starcoder2_train.configs import DataArguments, RecipeError
from starcoder2_train.data.sources.download.ids import DownloadError
from starcoder2_train.data.sources.download.run import download
from starcoder2_train.data.sources.download.verify import (
    CHECKSUM,
    SIZE,
    check_downloaded_shards,
    record_path,
    sha256_of,
)

FIRST = "data/train-00000-of-00001-rows-000000000-000000002.parquet"
SECOND = "data/train-00000-of-00001-rows-000000002-000000004.parquet"


@pytest.fixture
def fetched(s3, tmp_path):  # noqa: F811
    """(ids folder, bucket, the keys of each chunk, a complete download of it): 6 repositories, 3 shards."""
    rows, blobs = simple_repositories(6, tag=f"verify-{tmp_path.name}-")
    bucket = "verify"
    put(s3, bucket, blobs)
    write_ids(tmp_path / "ids" / "data" / "train-00000-of-00001.parquet", rows, row_group_size=4)
    keys = [
        [f"content/{f['blob_id']}" for row in rows[a:b] for f in row["files"]] for a, b in ((0, 2), (2, 4), (4, 6))
    ]
    reference = tmp_path / "reference"
    download(str(tmp_path / "ids"), str(reference), options(s3, bucket), repos_per_shard=2)
    return str(tmp_path / "ids"), bucket, keys, reference


def record(directory, shard: str) -> dict:
    with open(record_path(str(directory), shard)) as handle:
        return json.load(handle)


def resume(s3, ids, bucket, output, **keywords):  # noqa: F811
    """(summary, GETs of each key) of a rerun of the download into `output`."""
    before = s3.gets.copy()
    summary, _ = download(ids, str(output), options(s3, bucket), repos_per_shard=2, **keywords)
    return summary, s3.gets - before


def flip_middle_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_record_holds_the_shards_size_rows_and_sha256(fetched):
    _, _, _, reference = fetched
    facts = record(reference, FIRST)["shard_file"]
    path = reference / FIRST
    assert facts == {"bytes": path.stat().st_size, "rows": 2, "sha256": sha256_of(str(path))}


def test_a_truncated_shard_of_an_interrupted_run_is_fetched_again(s3, fetched, tmp_path):  # noqa: F811
    ids, bucket, keys, reference = fetched
    output = tmp_path / "out"
    s3.fail(keys[1][0], 403, "InvalidAccessKeyId")  # stops the run in the second chunk, as a kill would
    with pytest.raises(DownloadError):
        download(ids, str(output), options(s3, bucket), repos_per_shard=2)
    s3.faults.clear()
    shard = output / FIRST
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # the copy of the shard cut in half

    summary, fetched_now = resume(s3, ids, bucket, output)
    assert all(fetched_now[key] == 1 for chunk in keys for key in chunk)  # the cut shard's chunk too
    assert summary["shards_refetched"] == {SIZE: 1} and summary["chunks_fetched_this_run"] == 3
    assert read_output(output) == read_output(reference)
    assert record(output, FIRST)["shard_file"] == record(reference, FIRST)["shard_file"]

    summary, fetched_now = resume(s3, ids, bucket, output)
    assert not fetched_now and summary["shards_refetched"] == {} and summary["chunks_already_done"] == 3


def test_a_flipped_byte_passes_the_cheap_check_and_not_the_checksum(s3, fetched, capsys):  # noqa: F811
    ids, bucket, keys, output = fetched
    good = read_output(output)
    flip_middle_byte(output / SECOND)

    summary, fetched_now = resume(s3, ids, bucket, output)
    assert not fetched_now and summary["shards_refetched"] == {}  # same size, footer intact: not seen

    script = load_script("download_stack_v2")
    words = [ids, "--output", str(output), "--endpoint_url", s3.url, "--bucket", bucket, "--repos_per_shard", "2"]
    before = s3.gets.copy()
    summary = script.main([*words, "--verify_checksums"])
    assert summary["shards_refetched"] == {CHECKSUM: 1} and summary["verify_checksums"] is True
    fetched_now = s3.gets - before
    assert set(fetched_now) == set(keys[1]) and read_output(output) == good
    assert "resume check (sha256): 1 shard(s) fetched again (1 checksum differs)" in capsys.readouterr().out

    summary = script.main([*words, "--verify_checksums", "false"])
    assert summary["shards_refetched"] == {} and summary["chunks_fetched_this_run"] == 0


def test_old_records_are_upgraded_or_their_shard_fetched_again(s3, fetched):  # noqa: F811
    ids, bucket, keys, output = fetched
    facts = record(output, FIRST)["shard_file"]
    for shard in (FIRST, SECOND):  # as the code before shard_file wrote them
        old = record(output, shard)
        del old["shard_file"]
        with open(record_path(str(output), shard), "w") as handle:
            json.dump(old, handle)
    (output / SECOND).write_bytes((output / SECOND).read_bytes()[:-100])  # its footer cut off

    summary, fetched_now = resume(s3, ids, bucket, output)
    assert summary["records_upgraded"] == 1 and summary["shards_refetched"] == {"unreadable": 1}
    assert set(fetched_now) == set(keys[1])
    assert record(output, FIRST)["shard_file"] == facts  # upgraded: the size, rows and sha256 of its shard
    assert "shard_file" in record(output, SECOND)


def test_preparation_refuses_a_damaged_download_before_any_task(fetched, tokenizer_dir, tmp_path):
    _, _, _, download_dir = fetched
    arguments = DataArguments(dataset_name_or_path=str(download_dir))
    assert check_downloaded_shards(arguments) == 3
    foreign = download_dir / "data" / "own.parquet"  # a parquet of the user's, no record: not checked
    foreign.write_bytes(b"PAR1 not a parquet file")
    assert check_downloaded_shards(arguments) == 3
    foreign.unlink()

    flip_middle_byte(download_dir / SECOND)
    assert check_downloaded_shards(arguments) == 3
    checksums = DataArguments(dataset_name_or_path=str(download_dir), verify_download_checksums=True)
    with pytest.raises(RecipeError, match=rf"{SECOND}: its sha256 differs .*--verify_checksums"):
        check_downloaded_shards(checksums)

    shard = download_dir / FIRST
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    recipe = tmp_path / "recipe.yaml"
    values = dict(
        model_config="test",
        dataset_name_or_path=str(download_dir),
        tokenizer_name_or_path=tokenizer_dir,
        seq_length=64,
        output_dir=str(tmp_path / "o"),
    )
    recipe.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in values.items()))
    output = tmp_path / "prepared"
    with pytest.raises(RecipeError) as refused:
        load_script("prepare_data").main([str(recipe), "--output", str(output), "--tasks", "2", "--workers", "2"])
    message = str(refused.value)
    assert "\n" not in message and message.startswith(str(download_dir / FIRST))
    assert "bytes, its record says" in message and "download_stack_v2.py with the same IDS" in message
    assert f"--output {download_dir}" in message
    assert not os.path.exists(output / "logs")  # no task started
    with pytest.raises(RecipeError, match=rf"^{download_dir / FIRST}: .* its record says"):
        load_script("inspect_data").main([str(recipe), "--output", str(tmp_path / "samples.jsonl")])

    os.remove(download_dir / FIRST)  # a shard gone from under its record
    with pytest.raises(RecipeError, match=rf"{FIRST}: the file is missing"):
        check_downloaded_shards(arguments)
