"""Tokens stored once: epochs assembled while reading equal the in-process rendering of the same draws, any epoch
is read without preparing again, N tasks give one task's windows, a big repository prepares in bounded memory."""

import json
import os
import pickle

import numpy as np
import pytest
from conftest import load_script, prepare_recipe, random_repositories, write_repository_shards

from starcoder2_train.configs import DataArguments, RecipeError
from starcoder2_train.data.examples.fim import FimRates, apply_fim
from starcoder2_train.data.examples.repo_examples import RepoExample
from starcoder2_train.data.prepare_pieces import canonical_files, repository_parts
from starcoder2_train.data.store.pieces import PieceStore, PieceWriter, name_hash
from starcoder2_train.data.store.prepared import open_store, pieces_directory, prepared_epochs, stored_once
from starcoder2_train.data.tokens.tokenization import PieceTokenizer
from starcoder2_train.data.windows.assembly import EpochStream, file_order, with_metadata
from starcoder2_train.data.windows.packing import PackedDataset

prepare_data = load_script("prepare_data")


def write_pieces(directory, repositories, tokenizer, parts=2):
    """A piece store of `repositories` in `parts` parts, written as the preparation writes it."""
    pieces = PieceTokenizer(tokenizer)
    per_part = -(-len(repositories) // parts)
    for number in range(parts):
        writer = PieceWriter(directory, f"part-{number:05d}-of-{parts:05d}", len(tokenizer), pieces.special)
        for repository in repositories[number * per_part : (number + 1) * per_part]:
            files = canonical_files(repository["files"])
            arrays = pieces.encode_arrays([repository["repo_name"]] + [t for p, c in files for t in (f"{p}\n", c)])
            writer.add_repository(repository["repo_name"], arrays[0], list(zip(arrays[1::2], arrays[2::2])))
        writer.close()
    return PieceStore(directory)


def in_process_example(repository, tokenizer, seed, epoch, rate) -> list[int]:
    """Today's rendering (build_example's format, apply_fim with no file-level FIM, PieceTokenizer) of one
    repository, with the file order and metadata that the assembly drew for it."""
    key = name_hash(repository["repo_name"])
    files = canonical_files(repository["files"])
    order = file_order(len(files), key, seed, epoch)
    metadata = bool(with_metadata(np.array([key], dtype=np.uint64), seed, epoch, rate)[0])
    example = RepoExample(repository["repo_name"], metadata, [files[i] for i in order])
    return PieceTokenizer(tokenizer).encode([apply_fim(example, FimRates(0, 0, 0), seed, epoch).pieces])[0]


def test_an_assembled_epoch_is_the_in_process_rendering_of_its_draws(tokenizer, tmp_path):
    repositories = random_repositories(40, seed=8)
    # Where `path\n` and content are tokenized apart, a content opening with whitespace may tokenize otherwise at
    # that boundary (data/store/pieces.py); this data has none, so the streams must be equal token for token.
    assert not any(f["content"][:1].isspace() or f["path"][-1:].isspace() for r in repositories for f in r["files"])
    pieces = write_pieces(tmp_path / "pieces", repositories, tokenizer)
    assert pieces.num_records == 40
    for epoch, rate in ((0, 0.5), (3, 0.5), (1, 1.0), (2, 0.0)):
        stream = EpochStream(pieces, epoch, seed=11, repo_metadata_rate=rate)
        order = [stream.record_at(i) for i in range(40)]
        assert sorted(order) == list(range(40)) and (epoch == 0 or order != list(range(40)))
        expected = [in_process_example(repositories[r], tokenizer, 11, epoch, rate) for r in order]
        flat = np.concatenate([np.array(e) for e in expected])
        assert stream.num_tokens == len(flat) and stream.num_examples == 40
        assert np.array_equal(stream.tokens(0, stream.num_tokens), flat)
        assert all(np.array_equal(stream.example(i), expected[i]) for i in range(40))
        starts = np.cumsum([0] + [len(e) for e in expected])[:-1]
        rng = np.random.default_rng(epoch)
        for begin in rng.integers(0, len(flat) - 1, size=50):
            end = int(min(len(flat), begin + rng.integers(1, 200)))
            assert np.array_equal(stream.tokens(int(begin), end), flat[begin:end])
            inside = starts[(starts > begin) & (starts < end)]
            assert np.array_equal(stream.example_starts_in(int(begin), end), inside)
            assert stream.first_token_of_example_at(int(begin)) == flat[starts[starts <= begin][-1]]
    fifth = EpochStream(pieces, 5, 11, 0.5)
    metadata = [fifth.first_token_of_example_at(int(s)) for s in fifth.offsets[:-1]]
    assert 0.2 < np.mean(np.array(metadata) == pieces.special.repo_name) < 0.8  # repo_metadata_rate 0.5
    # A worker gets the stream pickled: the same windows, the index mapped again.
    packed = PackedDataset(stream, 32, pieces.special, shuffle_seed=4)
    again = pickle.loads(pickle.dumps(packed))
    assert all(np.array_equal(packed[i]["input_ids"], again[i]["input_ids"]) for i in range(len(packed)))


def test_the_epoch_index_is_built_once_and_found_where_the_store_is_read_only(tokenizer, tmp_path, monkeypatch):
    pieces = write_pieces(tmp_path / "pieces", random_repositories(10, seed=2), tokenizer, parts=1)
    EpochStream(pieces, 0, 1, 0.5)
    (built,) = [name for name in os.listdir(tmp_path / "pieces" / "epochs") if name.endswith(".offsets")]
    assert os.path.getsize(tmp_path / "pieces" / "epochs" / built) == 8 * 11  # an int64 a record, and the end
    written = os.stat(tmp_path / "pieces" / "epochs" / built).st_mtime_ns
    EpochStream(pieces, 0, 1, 0.5)
    assert os.stat(tmp_path / "pieces" / "epochs" / built).st_mtime_ns == written  # mapped, not built again
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only store
    stream = EpochStream(pieces, 1, 1, 0.5)
    assert str(tmp_path / "cache" / "starcoder2-train" / "epoch-indexes") in stream.offsets.filename


def test_a_big_repository_is_cut_into_parts_of_whole_files():
    files = [{"path": f"f{i}.py", "content": "x" * 300} for i in (3, 1, 2, 0)]
    assert repository_parts(files, 1200) == [files]
    parts = repository_parts(files, 700)
    assert [[f["path"] for f in part] for part in parts] == [["f0.py", "f1.py"], ["f2.py", "f3.py"]]
    assert [len(part) for part in repository_parts(files, 100)] == [1, 1, 1, 1]  # a file over the bound: alone


def test_batches_are_bounded_by_their_contents_not_only_their_count():
    import pyarrow as pa
    from datatrove.data import Document

    from starcoder2_train.data.prepare_pieces import in_batches
    from starcoder2_train.data.sources.shards import bounded_slices, content_sizes

    sizes = [10, 50, 5, 100, 1]
    rows = [{"repo_name": f"r{i}", "files": [{"path": "a", "content": "x" * (n - 1)}, {"path": "b", "content": "é"}]}
            for i, n in enumerate(sizes)]  # fmt: skip
    rows[2]["files"].append({"path": "c", "content": None})  # a missing content counts 0
    batch = pa.RecordBatch.from_pylist(rows)
    assert content_sizes(batch) == [n + 1 for n in sizes]  # "é" is 2 bytes
    slices = [[row["repo_name"] for row in part.to_pylist()] for part in bounded_slices(batch, 62)]
    assert slices == [["r0", "r1"], ["r2"], ["r3"], ["r4"]]  # 11+51, then 6 (+101 over), 101 alone, 2
    assert [len(part) for part in bounded_slices(batch, 10**9)] == [5]
    files = pa.RecordBatch.from_pylist([{"content": "abc"}, {"content": None}, {"content": "de"}])
    assert content_sizes(files) == [3, 0, 2]
    documents = [Document(text="", id=f"d{n}", metadata={"files": [{"content": "y" * n}]}) for n in sizes]
    batches = [[d.id for d in batch] for batch in in_batches(documents, size=64, max_bytes=60)]
    assert batches == [["d10", "d50"], ["d5"], ["d100"], ["d1"]]
    assert [[d.id for d in batch] for batch in in_batches(documents, size=2)] == [
        ["d10", "d50"],
        ["d5", "d100"],
        ["d1"],
    ]
    assert list(in_batches(None)) == []


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_repository_shards(tmp_path_factory.mktemp("once") / "shards", random_repositories(40, seed=9), 3)


def recipe(tmp_path, shards, tokenizer_dir, **overrides) -> str:
    return prepare_recipe(tmp_path, shards, tokenizer_dir, **{"fim_level": "window", **overrides})


def windows(packed) -> list:
    return [packed[i]["input_ids"].tolist() for i in range(len(packed))]


def test_two_tasks_store_what_one_does_and_training_reads_any_epoch(shards, tokenizer_dir, tokenizer, tmp_path):
    from transformers import TrainingArguments

    from starcoder2_train.data.pipeline import build_packed_dataset, build_training_data
    from starcoder2_train.data.windows.epochs import DataEpochs

    path = recipe(tmp_path, shards, tokenizer_dir)
    prepare_data.main([path, "--output", str(tmp_path / "one"), "--disable_tqdm"])
    prepare_data.main([path, "--output", str(tmp_path / "two"), "--tasks", "2", "--workers", "2", "--disable_tqdm"])
    for output in ("one", "two"):
        assert stored_once(str(tmp_path / output))
        assert not os.path.exists(tmp_path / output / "train" / "epoch-0")  # no per-epoch copy
    one = DataArguments(prepared_data_dir=str(tmp_path / "one"), seq_length=64, fim_level="window")
    two = DataArguments(prepared_data_dir=str(tmp_path / "two"), seq_length=64, fim_level="window")
    for split in ("train", "eval"):
        for epoch in (0, 1) if split == "train" else (0,):
            a, b = (build_packed_dataset(args, tokenizer, 42, epoch, split)[0] for args in (one, two))
            assert len(a) > 0 and windows(a) == windows(b)
    assert len(PieceStore(pieces_directory(str(tmp_path / "two"), "train")).tokens.names) == 2
    # Training far past the first epoch: every epoch assembled, none prepared (epoch 6 here).
    first, report = build_packed_dataset(two, tokenizer, 42, 0)
    assert report.repositories + open_store(str(tmp_path / "two"), "eval", 0, two, 42).num_examples == 40
    needed = 6 * len(first) + 3
    training = TrainingArguments(output_dir=str(tmp_path), max_steps=needed, per_device_train_batch_size=1, seed=42)
    dataset, _ = build_training_data(two, tokenizer, training)
    assert isinstance(dataset, DataEpochs) and len(dataset) == needed
    last = dataset[needed - 1]["input_ids"]
    epoch = dataset.epochs_made - 1  # the epochs differ in length (their own metadata draws): 6 or so
    assert epoch >= 5 and not os.path.exists(tmp_path / "two" / "train" / f"epoch-{epoch}")
    made = build_packed_dataset(two, tokenizer, 42, epoch)[0]
    assert made.fim is not None and np.array_equal(last, made[needed - 1 - dataset.starts[epoch]]["input_ids"])
    # B's contract: prepared_epochs gives a picklable make_epoch for any epoch, and epoch 0 with its report.
    make_epoch, epoch0, fields = prepared_epochs(str(tmp_path / "two"), two, tokenizer, 42)
    assert windows(epoch0) == windows(first) and fields["windows"] == len(first) and fields["repositories"] == 37
    assert windows(pickle.loads(pickle.dumps(make_epoch))(9)) == windows(
        build_packed_dataset(two, tokenizer, 42, 9)[0]
    )
    # The read-time keys change nothing on disk; a recipe that wants file-level FIM from this store is refused.
    file_level = DataArguments(prepared_data_dir=str(tmp_path / "two"), seq_length=64, fim_level="file")
    with pytest.raises(RecipeError, match="fim_level: file at fim_rate 0.5 .* holds tokens stored once"):
        build_packed_dataset(file_level, tokenizer, 42, 0)
    no_fim = DataArguments(prepared_data_dir=str(tmp_path / "two"), seq_length=64, fim_level="file", fim_rate=0.0)
    assert build_packed_dataset(no_fim, tokenizer, 42, 0)[0].fim is None


def test_more_epochs_of_tokens_stored_once_prepare_nothing(shards, tokenizer_dir, tmp_path, capsys):
    """--epochs 4 into a folder stored once: no stage runs, nothing is written, the manifest stays; the summary
    names the tokens stored (names and paths included), not an epoch's."""
    from starcoder2_train.data.prepare import build_stages
    from starcoder2_train.data.store.manifest import read_manifest

    path, output = recipe(tmp_path, shards, tokenizer_dir), tmp_path / "p"
    prepare_data.main([path, "--output", str(output), "--tasks", "2", "--disable_tqdm"])
    assert "tokens stored (names and paths included)" in capsys.readouterr().out
    files = lambda: {p: os.stat(p).st_mtime_ns for p in output.rglob("*") if p.is_file()}  # noqa: E731
    before, manifest = files(), read_manifest(str(output))
    prepare_data.main([path, "--output", str(output), "--tasks", "2", "--epochs", "4", "--disable_tqdm"])
    after = files()
    assert {p: t for p, t in after.items() if p.name != "manifest.json"} == {
        p: t for p, t in before.items() if p.name != "manifest.json"
    }
    assert read_manifest(str(output))["stages"] == manifest["stages"] and manifest["epochs"] is None
    args = DataArguments(dataset_name_or_path=shards, tokenizer_name_or_path=tokenizer_dir, fim_level="window")
    assert build_stages(args, str(output), 42, 4, 100, first_epoch=1) == []  # every epoch assembled while reading


def test_file_level_fim_keeps_per_epoch_copies(shards, tokenizer_dir, tmp_path):
    path = recipe(tmp_path, shards, tokenizer_dir, fim_level="file")
    prepare_data.main([path, "--output", str(tmp_path / "p"), "--epochs", "2", "--disable_tqdm"])
    assert not stored_once(str(tmp_path / "p"))
    assert all(os.path.isdir(tmp_path / "p" / "train" / f"epoch-{e}") for e in (0, 1))


@pytest.mark.slow
def test_a_50_mb_repository_prepares_under_a_memory_limit(tokenizer_dir, tmp_path):
    """One task on a repository of 50 MB of code, its address space capped (RLIMIT_AS) at what its imports hold
    plus 1.2 GB. Measured on the 2-core CPU machine (ru_maxrss): 458 MB for small repositories alone; with the
    50 MB one 1,052 MB stored once, 2,865 MB on the per-epoch path (fim_level: file: the repository as pieces of
    text and lists of ids), which under this same limit never finished (it hung in tokenization)."""
    from starcoder2_train.benchmarking.assembly import run_prepare_task, write_big_repository_shards
    from starcoder2_train.data.store.prepared import prepared_stats

    shards = write_big_repository_shards(str(tmp_path / "shards"), 50_000_000)
    figures = run_prepare_task(shards, tokenizer_dir, str(tmp_path / "p"), "window", budget_mb=1200, timeout=900)
    assert isinstance(figures, dict), figures.stderr[-3000:]
    pieces = PieceStore(pieces_directory(str(tmp_path / "p"), "train"))
    assert pieces.num_records == 5 + 2  # five small repositories, the big one cut in two parts of <= 32 MB
    assert prepared_stats(str(tmp_path / "p"))["train repositories split over max_repository_bytes"] == 1
    stream = EpochStream(pieces, 0, 42, 0.5)
    assert stream.num_tokens > 10_000_000 and len(stream.tokens(stream.num_tokens - 4096, stream.num_tokens)) == 4096


@pytest.mark.parametrize("fim_level", ["window", "file"])
def test_a_store_does_not_depend_on_how_its_repositories_were_batched(
    shards, tokenizer_dir, tmp_path, monkeypatch, fim_level
):
    """Each repository in a batch of its own (BATCH_BYTES 1, in the reader and the tokenizer step) writes the same
    store, byte for byte, as the default batches of 64 repositories."""
    from starcoder2_train.data.sources import shards as shard_module

    path = recipe(tmp_path, shards, tokenizer_dir, fim_level=fim_level)
    prepare_data.main([path, "--output", str(tmp_path / "default"), "--disable_tqdm"])
    monkeypatch.setattr(shard_module, "BATCH_BYTES", 1)
    prepare_data.main([path, "--output", str(tmp_path / "one_by_one"), "--disable_tqdm"])

    def stored(root):
        return {
            str(file.relative_to(root)): file.read_bytes()
            for split in ("train", "eval")
            for file in sorted((root / split).rglob("*"))
            if file.is_file()
        }

    def tokenizer_batches(root):  # datatrove's stats of the tokenizing step (its timer's unit: a batch; no n for 1)
        return json.loads((root / "logs" / "stats" / "00000.json").read_text())[1]["time_stats"].get("n", 1)

    default, one_by_one = stored(tmp_path / "default"), stored(tmp_path / "one_by_one")
    assert len(default) > 4 and default == one_by_one
    assert tokenizer_batches(tmp_path / "default") < tokenizer_batches(tmp_path / "one_by_one") == 40
