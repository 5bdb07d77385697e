"""scripts/prepare_data.py on datatrove: tasks, reruns, stats, and the stores training opens."""

import os

import numpy as np
import pytest
from conftest import load_script, prepare_recipe, random_repositories, write_repository_shards

from starcoder2_train.configs import DataArguments, RecipeError
from starcoder2_train.data import prepare
from starcoder2_train.data.pipeline import build_packed_dataset, load_token_rows
from starcoder2_train.data.store.prepared import open_store, prepared_skips

prepare_data = load_script("prepare_data")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four per-repository shards, one file and one repository that the filters leave out."""
    repositories = random_repositories(60, seed=5)
    repositories[3]["files"].append({"path": "empty.py", "content": "", "language": "Python"})
    repositories[7]["files"] = [{"path": "only.bin", "content": "", "language": "Python"}]
    return write_repository_shards(tmp_path_factory.mktemp("prepare") / "shards", repositories, num_files=4)


recipe = prepare_recipe


def stream(store) -> np.ndarray:
    return store.tokens(0, store.num_tokens)


def test_tasks_write_the_store_one_task_writes_and_training_reads_it(
    shards, tokenizer_dir, tokenizer, tmp_path, monkeypatch, capsys
):
    from starcoder2_train.progress import FORCE_ENV

    monkeypatch.setenv(FORCE_ENV, "1")  # bars as on a terminal, unless --disable_tqdm
    path = recipe(tmp_path, shards, tokenizer_dir)
    prepare_data.main([path, "--output", str(tmp_path / "one"), "--epochs", "2", "--disable_tqdm"])
    assert "prepare: tasks" not in capsys.readouterr().err
    prepare_data.main([path, "--output", str(tmp_path / "three"), "--epochs", "2", "--tasks", "3", "--workers", "2"])
    bar = capsys.readouterr().err
    assert "prepare: tasks" in bar and "3/3" in bar and "task" in bar.rsplit("3/3", 1)[1], bar[-1000:]
    for split, epoch in (("train", 0), ("train", 1), ("eval", 0)):
        one, three = open_store(str(tmp_path / "one"), split, epoch), open_store(str(tmp_path / "three"), split, epoch)
        assert one.num_examples == three.num_examples > 0 and np.array_equal(stream(one), stream(three))
    # The store holds exactly the token rows of the in-process pipeline, and packs into the same windows.
    direct_args = DataArguments(
        dataset_name_or_path=shards, tokenizer_name_or_path=tokenizer_dir, seq_length=64, eval_fraction=0.1
    )
    rows, direct_skips = load_token_rows(direct_args, tokenizer, seed=42)
    assert np.array_equal(stream(open_store(str(tmp_path / "three"), "train", 0)), np.concatenate(rows["input_ids"]))
    prepared_args = DataArguments(prepared_data_dir=str(tmp_path / "three"), seq_length=64)
    direct, direct_report = build_packed_dataset(direct_args, tokenizer, seed=42)
    opened, opened_report = build_packed_dataset(prepared_args, tokenizer, seed=42)
    assert len(opened) == len(direct)
    assert all(np.array_equal(opened[i]["input_ids"], direct[i]["input_ids"]) for i in range(len(direct)))
    # The skips are datatrove's stats, and say what the in-process pipeline says.
    assert prepared_skips(str(tmp_path / "three")).as_dict() == direct_skips.as_dict() != {}
    assert opened_report.skipped == direct_report.skipped
    assert (opened_report.files, opened_report.repositories) == (direct_report.files, direct_report.repositories)


def test_a_failed_task_reruns_alone(shards, tokenizer_dir, tmp_path, monkeypatch):
    path, output = recipe(tmp_path, shards, tokenizer_dir), tmp_path / "prepared"
    original = prepare.StoreWriter.run

    def failing(self, data=None, rank=0, world_size=1):
        if rank == 1:
            raise OSError("disk quota exceeded (injected)")
        yield from original(self, data, rank, world_size)

    monkeypatch.setattr(prepare.StoreWriter, "run", failing)
    with pytest.raises(OSError, match="injected"):
        prepare_data.main([path, "--output", str(output), "--tasks", "2", "--workers", "1"])
    with pytest.raises(RecipeError, match="lacks part-00001-of-00002"):
        open_store(str(output), "train", 0)
    done = output / "train" / "epoch-0" / "part-00000-of-00002.tokens"
    written = os.stat(done).st_mtime_ns
    monkeypatch.setattr(prepare.StoreWriter, "run", original)
    prepare_data.main([path, "--output", str(output), "--tasks", "2", "--workers", "1"])
    assert os.stat(done).st_mtime_ns == written  # task 0 was not run again
    assert open_store(str(output), "train", 0).num_examples > 0


def test_inputs_prepare_data_cannot_split_are_refused(tokenizer_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    per_file = tmp_path / "per_file"
    per_file.mkdir()
    pq.write_table(pa.table({"repo_name": ["a/b"], "path": ["x.py"], "content": ["x = 1\n"]}), per_file / "0.parquet")
    with pytest.raises(RecipeError, match="one row per file; prepare_data.py's tasks read per-repository shards"):
        prepare_data.main([recipe(tmp_path, str(per_file), tokenizer_dir), "--output", str(tmp_path / "out")])
    shards = write_repository_shards(tmp_path / "s", random_repositories(4, seed=1), num_files=1)
    with pytest.raises(RecipeError, match="max_repositories: a cut of the first N repositories is global"):
        prepare_data.main(
            [recipe(tmp_path, shards, tokenizer_dir), "--output", str(tmp_path / "o2"), "--max_repositories", "2"]
        )


def test_nothing_held_out_opens_as_no_eval_data(shards, tokenizer_dir, tmp_path):
    from starcoder2_train.data.store.prepared import load_held_out_repositories

    path = recipe(tmp_path, shards, tokenizer_dir)
    prepare_data.main(
        [path, "--output", str(tmp_path / "p"), "--tasks", "2", "--workers", "1", "--eval_fraction", "0"]
    )
    assert load_held_out_repositories(str(tmp_path / "p")) is None  # parts with no rows, not an error
    assert open_store(str(tmp_path / "p"), "eval", 0) is None
    assert open_store(str(tmp_path / "p"), "train", 0).num_examples == 59  # 60 less the one with no file left
