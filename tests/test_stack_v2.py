"""Reading Stack v2-format shards: both layouts, every filter counted, bad files, sharding, splits."""

import json
import logging
import os
import random
from collections import Counter

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import random_repositories

from starcoder2_train.configs import DataArguments, RecipeError
from starcoder2_train.data import skips
from starcoder2_train.data.filters import files as files_module
from starcoder2_train.data.filters.files import decode_content
from starcoder2_train.data.filters.splits import eval_share, repository_split, shard_repositories
from starcoder2_train.data.skips import SkipReport
from starcoder2_train.data.sources.shards import load_repositories


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Each test writes its datasets cache under its own tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))


def write(path, rows, schema=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


def load(directory, **kwargs):
    return load_repositories(DataArguments(dataset_name_or_path=str(directory), **kwargs))


def per_file_rows(repos):
    return [{"repo_name": r["repo_name"], **f} for r in repos for f in r["files"]]


def test_repository_layout_keeps_rows_and_file_order(tmp_path):
    repos = random_repositories(12, seed=3)
    write(tmp_path / "data" / "train-0.parquet", repos[:7])
    write(tmp_path / "data" / "train-1.parquet", repos[7:])
    dataset, report = load(tmp_path / "data")
    assert dataset.column_names == ["repo_name", "files"]
    assert dataset.to_list() == repos
    assert report == SkipReport()
    assert report.summary_lines() == ["skipped nothing"]


def test_file_layout_groups_by_repository_in_first_seen_order(tmp_path):
    rows = [
        {"repo_name": "b/two", "path": "x.py", "content": "x = 1\n"},
        {"repo_name": "a/one", "path": "main.go", "content": "package main\n"},
        {"repo_name": "b/two", "path": "README.md", "content": "# two\n"},
    ]
    later = [
        {"repo_name": "c/three", "path": "lib.rs", "content": "fn f() {}\n"},
        {"repo_name": "a/one", "path": "util.go", "content": "package util\n"},
    ]
    write(tmp_path / "data" / "Python" / "train-00000.parquet", rows)
    write(tmp_path / "data" / "Rust" / "train-00000.parquet", later)
    dataset, report = load(tmp_path, data_dir="data")
    assert dataset.to_list() == [
        {"repo_name": "b/two", "files": [
            {"path": "x.py", "content": "x = 1\n", "language": "Python"},
            {"path": "README.md", "content": "# two\n", "language": "Markdown"},
        ]},
        {"repo_name": "a/one", "files": [
            {"path": "main.go", "content": "package main\n", "language": "Go"},
            {"path": "util.go", "content": "package util\n", "language": "Go"},
        ]},
        {"repo_name": "c/three", "files": [{"path": "lib.rs", "content": "fn f() {}\n", "language": "Rust"}]},
    ]  # fmt: skip
    assert report.total("files") == 0


def test_every_filter_counts_its_files(tmp_path):
    def file(path, content="ok = 1\n", language="Python", license_type="permissive", vendor=False, generated=False):
        return {"path": path, "content": content, "language": language, "license_type": license_type,
                "is_vendor": vendor, "is_generated": generated}  # fmt: skip

    repos = [
        {"repo_name": "k/kept", "files": [
            file("keep.py"),
            file("vendor/dep.py", vendor=True),
            file("gen_pb2.py", generated=True),
            file("gpl.py", license_type="non_permissive"),
            file("Main.java", language="Java"),
            file("notes.unknownext", language=None),
            file("big.py", content="é" * 300),  # 300 characters, 600 bytes of UTF-8
            file("empty.py", content=""),
            file("none.py", content=None),
            file("blob.py", content="abc\x00def"),
            file("", content="no path"),
        ]},
        {"repo_name": "k/all-skipped", "files": [file("only.py", content="")]},
        {"repo_name": "k/no-files", "files": []},
        {"repo_name": None, "files": [file("orphan.py")]},
        {"repo_name": "k/second", "files": [file("b.py")]},
        {"repo_name": "k/third", "files": [file("c.py")]},
    ]  # fmt: skip
    write(tmp_path / "d" / "0.parquet", repos)
    dataset, report = load(
        tmp_path / "d", languages=["python"], license_types=["Permissive"], max_file_bytes=599, max_repositories=2
    )
    assert list(dataset["repo_name"]) == ["k/kept", "k/second"]
    assert [f["path"] for f in dataset[0]["files"]] == ["keep.py"]
    assert report.files == Counter({
        skips.VENDOR: 1, skips.GENERATED: 1, skips.LICENSE_NOT_SELECTED: 1,
        skips.LANGUAGE_NOT_SELECTED: 1, skips.UNKNOWN_LANGUAGE: 1, skips.TOO_LARGE: 1,
        skips.EMPTY: 2, skips.MISSING_CONTENT: 1, skips.BINARY: 1, skips.MISSING_PATH: 1,
    })  # fmt: skip
    assert report.repositories == Counter(
        {skips.NO_FILE_LEFT: 2, skips.MISSING_REPO_NAME: 1, skips.BEYOND_MAX_REPOSITORIES: 1}
    )
    # With the filters off, the same shard keeps vendor, generated, copyleft, Java and the 600-byte file.
    dataset, report = load(tmp_path / "d", exclude_vendor=False, exclude_generated=False, max_file_bytes=600)
    assert len(dataset[0]["files"]) == 6
    assert report.files[skips.TOO_LARGE] == 0 and report.files[skips.VENDOR] == 0


def test_bytes_contents_are_decoded_with_src_encoding(tmp_path):
    schema = pa.schema([("repo_name", pa.string()), ("path", pa.string()), ("content", pa.binary()),
                        ("src_encoding", pa.string())])  # fmt: skip
    rows = [
        {"repo_name": "e/x", "path": "latin.py", "content": "s = 'café'\n".encode("latin-1"),
         "src_encoding": "ISO-8859-1"},
        {"repo_name": "e/x", "path": "utf8.py", "content": "s = 'ñ'\n".encode(), "src_encoding": None},
        {"repo_name": "e/x", "path": "bad.py", "content": b"s = '\xe9\xff'\n", "src_encoding": "UTF-8"},
        {"repo_name": "e/x", "path": "bin.py", "content": b"\x00\xff\xfe\x00", "src_encoding": "UTF-8"},
        {"repo_name": "e/x", "path": "odd.py", "content": b"s = 1\n", "src_encoding": "no-such-codec"},
    ]  # fmt: skip
    write(tmp_path / "e" / "0.parquet", rows, schema)
    dataset, report = load(tmp_path / "e")
    assert [(f["path"], f["content"]) for f in dataset[0]["files"]] == [
        ("latin.py", "s = 'café'\n"), ("utf8.py", "s = 'ñ'\n"), ("odd.py", "s = 1\n")
    ]  # fmt: skip
    assert report.files == Counter({skips.UNDECODABLE: 1, skips.BINARY: 1})


def test_fifty_megabyte_file_is_counted_not_loaded(tmp_path):
    repos = [{"repo_name": "big/one", "files": [
        {"path": "huge.py", "content": "x" * 50_000_000}, {"path": "small.py", "content": "y = 2\n"}
    ]}]  # fmt: skip
    write(tmp_path / "big" / "0.parquet", repos)
    dataset, report = load(tmp_path / "big")
    assert dataset[0]["files"] == [{"path": "small.py", "content": "y = 2\n", "language": "Python"}]
    assert report.files == Counter({skips.TOO_LARGE: 1})


def test_decode_content_measures_utf8_bytes():
    text = "日" * 300  # 900 bytes of UTF-8
    assert decode_content(text, None, 900) == (text, None)
    assert decode_content(text, None, 899) == (None, skips.TOO_LARGE)
    assert decode_content("a" * 10, None, 10) == ("a" * 10, None)
    assert decode_content(b"", "UTF-8", 10) == (None, skips.EMPTY)


@pytest.mark.parametrize("edited", files_module.ROW_MODULES)
def test_the_filters_fingerprint_follows_every_module_that_shapes_the_rows(edited, monkeypatch):
    """The reader (sources/shards.py) and the filters live in two modules: an edit of either, or of the languages,
    opt-outs or decontamination, must still give the datasets cache a new fingerprint."""
    import importlib
    import inspect

    module, real = importlib.import_module(edited), inspect.getsource
    original = files_module.filters_code()
    monkeypatch.setattr(inspect, "getsource", lambda obj: real(obj) + ("\n# edited" if obj is module else ""))
    files_module.filters_code.cache_clear()
    try:
        assert files_module.filters_code() != original
    finally:
        monkeypatch.undo()
        files_module.filters_code.cache_clear()
    assert files_module.filters_code() == original


def test_corrupted_parquet_files_are_counted_and_the_good_ones_read(tmp_path, caplog):
    repos = random_repositories(20, seed=5)
    good = write(tmp_path / "s" / "a-good.parquet", repos)
    data = open(good, "rb").read()
    footer = int.from_bytes(data[-8:-4], "little") + 8  # footer length, then the magic bytes PAR1
    bad = {
        "b-random.parquet": random.Random(0).randbytes(5000),
        "c-truncated.parquet": data[: len(data) // 2],
        # intact footer, garbled pages: only reading the rows finds out
        "d-garbled.parquet": data[:4] + random.Random(1).randbytes(len(data) - footer - 4) + data[-footer:],
    }
    for name, payload in bad.items():
        (tmp_path / "s" / name).write_bytes(payload)
    with caplog.at_level(logging.WARNING, logger="starcoder2_train.data.sources.shards"):
        dataset, report = load(tmp_path / "s")
    assert dataset.to_list() == repos
    assert report.parquet_files == Counter({skips.UNREADABLE_PARQUET: 3})
    for name in bad:
        assert sum(name in line for line in report.details) == 1
        assert name in caplog.text
    # the garbled file passes the footer check; reading its rows is what fails
    assert "magic bytes" not in next(line for line in report.details if "d-garbled" in line)
    assert any(name in line for line in report.summary_lines() for name in bad)


def test_every_file_unreadable_is_an_error_naming_them(tmp_path):
    for name in ("x.parquet", "y.parquet"):
        (tmp_path / name).write_bytes(b"not parquet at all")
    with pytest.raises(RecipeError, match=r"no readable parquet file.*x\.parquet.*y\.parquet"):
        load(tmp_path)


def test_missing_columns_name_the_file_and_the_columns(tmp_path):
    write(tmp_path / "f" / "rows.parquet", [{"repo_name": "a/b", "path": "x.py", "language": "Python"}])
    with pytest.raises(RecipeError, match=r"rows\.parquet: missing column\(s\) content\. Accepted layouts"):
        load(tmp_path / "f")
    ids = [{"repo_name": "a/b", "num_files": 1, "files": [{"blob_id": "ab12", "path": "x.py", "language": "Python"}]}]
    write(tmp_path / "ids" / "train-00000-of-00001.parquet", ids)
    with pytest.raises(
        RecipeError, match=r"train-00000-of-00001\.parquet: missing column\(s\) files\.content"
    ) as error:
        load(tmp_path / "ids")
    assert "Software Heritage" in str(error.value)


def test_license_filter_needs_a_license_column(tmp_path):
    write(tmp_path / "g" / "0.parquet", [{"repo_name": "a/b", "files": [{"path": "x.py", "content": "x"}]}])
    with pytest.raises(RecipeError, match=r"license_types.*0\.parquet has no license_type"):
        load(tmp_path / "g", license_types=["permissive"])


def test_mixed_layouts_are_refused(tmp_path):
    write(tmp_path / "m" / "1-repos.parquet", [{"repo_name": "a/b", "files": [{"path": "x.py", "content": "x"}]}])
    write(tmp_path / "m" / "2-files.parquet", [{"repo_name": "a/b", "path": "y.py", "content": "y"}])
    with pytest.raises(RecipeError, match=r"1-repos\.parquet has one row per repository but .*2-files\.parquet"):
        load(tmp_path / "m")


def test_nothing_matched_names_the_pattern(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=r"data_files: the pattern '\*\*/\*\.parquet' matches no file under"):
        load(tmp_path / "empty")
    write(tmp_path / "h" / "train.parquet", [{"repo_name": "a/b", "path": "y.py", "content": "y"}])
    with pytest.raises(RecipeError, match=r"eval_data_files: the pattern 'eval-\*\.parquet' matches no file"):
        load_repositories(DataArguments(dataset_name_or_path=str(tmp_path / "h")), data_files=["eval-*.parquet"])
    with pytest.raises(RecipeError, match=r"is neither a local directory"):
        load(tmp_path / "no" / "such" / "dir")


def test_data_files_select_eval_files(tmp_path):
    write(tmp_path / "h" / "train.parquet", [{"repo_name": "t/t", "path": "t.py", "content": "t"}])
    write(tmp_path / "h" / "eval.parquet", [{"repo_name": "e/e", "path": "e.py", "content": "e"}])
    data_args = DataArguments(dataset_name_or_path=str(tmp_path / "h"), data_files=["train.parquet"])
    assert list(load_repositories(data_args)[0]["repo_name"]) == ["t/t"]
    assert list(load_repositories(data_args, data_files=["eval.parquet"])[0]["repo_name"]) == ["e/e"]


@pytest.mark.parametrize("layout", ["repository", "file"])
def test_num_proc_does_not_change_output_or_counts(tmp_path, monkeypatch, layout):
    repos = random_repositories(40, seed=7)
    repos[3]["files"].append({"path": "empty.py", "content": "", "language": "Python"})
    repos[9]["files"] = [{"path": "b.py", "content": "\x00", "language": "Python"}]
    rows = repos if layout == "repository" else per_file_rows(repos)
    write(tmp_path / "n" / "0.parquet", rows[: len(rows) // 2])
    write(tmp_path / "n" / "1.parquet", rows[len(rows) // 2 :])
    results = []
    for num_proc in (None, 2):  # a cache of its own for each, so that the second run cannot reuse the first
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / f"cache-{num_proc}"))
        dataset, report = load(tmp_path / "n", num_proc=num_proc)
        results.append((dataset.to_list(), report))
    assert results[0] == results[1]
    assert results[0][1].files == Counter({skips.EMPTY: 1, skips.BINARY: 1})
    assert len(results[0][0]) == 39 and results[0][1].repositories == Counter({skips.NO_FILE_LEFT: 1})


def test_shards_concatenate_to_the_unsharded_dataset(tmp_path):
    write(tmp_path / "p" / "0.parquet", random_repositories(11, seed=2))
    dataset, _ = load(tmp_path / "p")
    for num_shards in (1, 2, 3):
        parts = [shard_repositories(dataset, num_shards, index) for index in range(num_shards)]
        assert [row for part in parts for row in part.to_list()] == dataset.to_list()
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    with pytest.raises(RecipeError, match="shard_index"):
        shard_repositories(dataset, 2, 2)


def test_repository_split_is_a_stable_hash_of_the_name():
    names = [f"owner{i % 13}/repo-{i}" for i in range(2000)]
    dataset = datasets.Dataset.from_dict({"repo_name": names, "files": [[] for _ in names]})
    train, held_out = repository_split(dataset, 0.2)
    assert sorted(list(train["repo_name"]) + list(held_out["repo_name"])) == sorted(names)
    assert all(eval_share(name) < 0.2 for name in held_out["repo_name"])
    assert 300 < len(held_out) < 500
    shuffled = dataset.shuffle(seed=1)
    assert sorted(repository_split(shuffled, 0.2)[1]["repo_name"]) == sorted(held_out["repo_name"])
    assert eval_share("bigcode/starcoder2") == eval_share("bigcode/starcoder2")
    assert len(repository_split(dataset, 0.0)[1]) == 0
    with pytest.raises(RecipeError, match="eval_fraction"):
        repository_split(dataset, 1.0)


def test_skip_report_merges_and_round_trips(tmp_path):
    first = SkipReport(files=Counter({"empty content": 2}), details=["unreadable parquet file: a.parquet"])
    second = SkipReport(files=Counter({"empty content": 1, "x": 4}), repositories=Counter({"y": 1}))
    merged = first + second
    assert merged.files == Counter({"empty content": 3, "x": 4}) and merged.repositories == Counter({"y": 1})
    assert first.files == Counter({"empty content": 2})  # + leaves its operands alone
    assert merged.summary_lines()[:3] == ["skipped 7 files:", "           4  x", "           3  empty content"]
    assert merged.summary_lines()[-1] == "unreadable parquet file: a.parquet"
    first.update(second)
    assert first.files == merged.files
    loaded = SkipReport.from_dict(json.loads(json.dumps(merged.as_dict())))  # as written beside prepared data
    assert loaded.files == merged.files and loaded.repositories == merged.repositories
    assert SkipReport.from_dict({}) == SkipReport()


def test_unknown_path_names_both_readings(tmp_path):
    import huggingface_hub

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (set by conftest) so that no request leaves the machine")
    with pytest.raises(RecipeError, match=r"not-here/shards is not a local directory, and listing it as a Hub"):
        load_repositories(DataArguments(dataset_name_or_path="not-here/shards"))
