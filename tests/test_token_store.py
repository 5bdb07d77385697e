"""The token store and the window order: today's windows byte for byte, parts as one stream, past 2^31 tokens,
damage found and named, killed writers invisible, resident memory flat; the permutation a seeded bijection."""

import json
import os
import pickle
import signal
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pytest

from starcoder2_train.data.special_tokens import IGNORE_INDEX, SpecialTokenIds
from starcoder2_train.data.store.token_store import TokenStore, TokenStoreError, part_metadata, token_dtype
from starcoder2_train.data.store.token_writer import TokenStoreWriter, write_token_rows
from starcoder2_train.data.windows.packing import ArrowTokenRows, PackedDataset
from starcoder2_train.data.windows.permutation import Permutation

SPECIAL = SpecialTokenIds(eos=0, fim_prefix=1, fim_middle=2, fim_suffix=3, fim_pad=4, repo_name=5, file_sep=6)
VOCAB = 49152


def random_rows(count, seed=0, vocab=200, max_length=90):
    """Rows ending in <|endoftext|>, a few holding <fim_pad>, lengths from 1 to max_length (some over a window)."""
    rng = np.random.default_rng(seed)
    rows = []
    for length in rng.integers(1, max_length, size=count):
        row = rng.integers(7, vocab, size=length)
        row[rng.random(length) < 0.05] = SPECIAL.fim_pad
        row[-1] = SPECIAL.eos
        rows.append(row.tolist())
    return rows


def reference_windows(rows, seq_length, special=SPECIAL, cross_document_attention=False):
    """Today's PackedDataset.__getitem__ (before the token store: the stream and its example starts in memory)."""
    flat = np.array([t for row in rows for t in row], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int64)
    total = int(starts[-1])
    windows = []
    for index in range(-(-total // seq_length)):
        begin = index * seq_length
        end = min(begin + seq_length, total)
        tokens = flat[begin:end].copy()
        first = np.searchsorted(starts, begin, side="right")
        last = np.searchsorted(starts, end, side="left")
        inner_starts = starts[first:last] - begin
        length = end - begin
        pad = seq_length - length
        labels = tokens.copy()
        labels[tokens == special.fim_pad] = IGNORE_INDEX
        if cross_document_attention:
            position_ids = np.arange(seq_length, dtype=np.int64)
        else:
            segment_starts = np.concatenate([[0], inner_starts]).astype(np.int64)
            segment_lengths = np.diff(np.concatenate([segment_starts, [length]]))
            position_ids = np.arange(length, dtype=np.int64) - np.repeat(segment_starts, segment_lengths)
            labels[inner_starts] = IGNORE_INDEX
            if pad:
                position_ids = np.concatenate([position_ids, np.arange(pad, dtype=np.int64)])
        if pad:
            tokens = np.concatenate([tokens, np.full(pad, special.eos, dtype=np.int64)])
            labels = np.concatenate([labels, np.full(pad, IGNORE_INDEX, dtype=np.int64)])
        windows.append({"input_ids": tokens, "labels": labels, "position_ids": position_ids})
    return windows


def assert_same_windows(packed, expected):
    assert len(packed) == len(expected)
    for index, want in enumerate(expected):
        got = packed[index]
        for key in ("input_ids", "labels", "position_ids"):
            assert got[key].dtype == np.int64 and got[key].tobytes() == want[key].tobytes(), (index, key)


def write_parts(directory, groups, vocab_size=VOCAB):
    for number, group in enumerate(groups):
        with TokenStoreWriter(directory, f"part-{number:05d}", vocab_size) as writer:
            for row in group:
                writer.add(row)


def move_part(source, name, directory, new_name):
    for suffix in ("tokens", "offsets", "json"):
        os.replace(os.path.join(source, f"{name}.{suffix}"), os.path.join(directory, f"{new_name}.{suffix}"))


def sparse_part(directory, name, num_tokens, ends, written, vocab_size=VOCAB):
    """A part of `num_tokens` tokens that costs no disk: zeros except `written` {position: ids}, examples ending
    at `ends`. Its digests are not computed (that would read it all); opening does not need them."""
    dtype = token_dtype(vocab_size)
    with open(os.path.join(directory, f"{name}.tokens"), "wb") as handle:
        handle.truncate(num_tokens * dtype.itemsize)
        for position, ids in written.items():
            handle.seek(position * dtype.itemsize)
            handle.write(np.asarray(ids, dtype=dtype).tobytes())
    np.array([0, *ends], dtype="<i8").tofile(os.path.join(directory, f"{name}.offsets"))
    with open(os.path.join(directory, f"{name}.json"), "w") as handle:
        json.dump({"name": name, **part_metadata(vocab_size, num_tokens, len(ends), "-", "-")}, handle)


def resident_bytes() -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


# --- the windows are today's windows --------------------------------------------------------------------------


@pytest.mark.parametrize("cross_document_attention", [False, True])
@pytest.mark.parametrize("seq_length", [1, 7, 32, 100])
def test_windows_equal_todays_from_rows_from_a_store_and_from_its_directory(
    tmp_path, seq_length, cross_document_attention
):
    rows = random_rows(60, seed=seq_length)
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    expected = reference_windows(rows, seq_length, cross_document_attention=cross_document_attention)
    write_token_rows(dataset, tmp_path, "part-00000", VOCAB)
    for source in (dataset, TokenStore(tmp_path), str(tmp_path), tmp_path):
        packed = PackedDataset(source, seq_length, SPECIAL, cross_document_attention=cross_document_attention)
        assert packed.total_tokens == sum(len(row) for row in rows)
        assert_same_windows(packed, expected)


def test_rows_in_many_chunks_slices_and_index_mappings_give_todays_windows():
    rows = random_rows(80, seed=1)
    pieces = [datasets.Dataset.from_dict({"input_ids": rows[i : i + 13]}) for i in range(0, 80, 13)]
    chunked = datasets.concatenate_datasets(pieces)  # several Arrow chunks
    assert chunked.data.table.column("input_ids").num_chunks > 1
    sliced = chunked.select(range(5, 71))  # contiguous: chunks sliced, their offsets not starting at 0
    shuffled = chunked.shuffle(seed=0)  # an indices mapping
    large_list = pa.large_list(pa.int64())
    large = pa.table(
        {"input_ids": pa.chunked_array([pa.array(rows[:40], large_list), pa.array(rows[40:], large_list)])}
    )
    cases = [
        (chunked, rows),
        (sliced, rows[5:71]),
        (shuffled, shuffled["input_ids"]),
        (large, rows),
        (chunked.data.table, rows),
        (chunked.data.table.column("input_ids"), rows),  # a pyarrow ChunkedArray
        (pa.array(rows, pa.list_(pa.int32())), rows),  # a pyarrow Array
        (pa.table({"input_ids": pa.array([], pa.list_(pa.int32()))}), []),
    ]
    for source, expected_rows in cases:
        assert_same_windows(PackedDataset(source, 24, SPECIAL), reference_windows(expected_rows, 24))
    assert len(ArrowTokenRows(chunked).token_starts) == chunked.data.table.column("input_ids").num_chunks + 1


def test_shuffle_reads_the_same_windows_in_permutation_order(tmp_path):
    rows = random_rows(50, seed=2)
    write_token_rows(datasets.Dataset.from_dict({"input_ids": rows}), tmp_path, "part-00000", VOCAB)
    plain = PackedDataset(tmp_path, 16, SPECIAL)
    shuffled = PackedDataset(tmp_path, 16, SPECIAL, shuffle_seed=11)
    order = Permutation(len(plain), 11)
    for index in range(len(plain)):
        assert shuffled[index]["input_ids"].tobytes() == plain[order[index]]["input_ids"].tobytes()
    assert sorted(order[i] for i in range(len(plain))) == list(range(len(plain)))
    with pytest.raises(IndexError):
        shuffled[len(plain)]


# --- parts as one stream ------------------------------------------------------------------------------------------


def test_many_parts_read_as_one_stream_with_windows_across_parts(tmp_path):
    rows = random_rows(120, seed=3)
    cuts = [0, 1, 1, 9, 30, 31, 70, 120]  # one empty part, one of a single example
    groups = [rows[a:b] for a, b in zip(cuts, cuts[1:])]
    groups[3] = groups[3] + [[]]  # an empty example at a part's end
    write_parts(tmp_path, groups)
    all_rows = [row for group in groups for row in group]
    store = TokenStore(tmp_path)
    flat = np.array([t for row in all_rows for t in row], dtype=np.int64)
    starts = np.cumsum([0] + [len(row) for row in all_rows])[:-1]
    assert (store.num_tokens, store.num_examples, store.vocab_size) == (len(flat), len(all_rows), VOCAB)
    assert store.names == [f"part-{n:05d}" for n in range(len(groups))] and store.bytes_per_token == 2
    rng = np.random.default_rng(0)
    for begin, end in [(0, len(flat)), (0, 0), (len(flat), len(flat))] + [
        tuple(sorted(rng.integers(0, len(flat) + 1, size=2))) for _ in range(300)
    ]:
        assert store.tokens(begin, end).tolist() == flat[begin:end].tolist()
        inside = [int(s) for s in starts if begin < s < end]
        assert store.example_starts_in(begin, end).tolist() == inside, (begin, end)
    assert all(store.example(i).tolist() == row for i, row in enumerate(all_rows))
    for seq_length in (5, 64, 1000):
        assert_same_windows(PackedDataset(store, seq_length, SPECIAL), reference_windows(all_rows, seq_length))
    with pytest.raises(IndexError):
        store.tokens(0, len(flat) + 1)


def test_writer_rows_and_examples_agree_and_ids_are_checked(tmp_path):
    rows = random_rows(30, seed=4, vocab=70000)
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    metadata = write_token_rows(dataset, tmp_path / "a", "rows", vocab_size=70000)
    with TokenStoreWriter(tmp_path / "b", "rows", vocab_size=70000) as writer:
        writer.add_rows(np.asarray(row, dtype=np.int32) for row in rows)
    one, two = TokenStore(tmp_path / "a"), TokenStore(tmp_path / "b")
    assert one.tokens(0, one.num_tokens).tolist() == two.tokens(0, two.num_tokens).tolist()
    assert one.dtype == np.dtype("<u4") and one.bytes_per_token == 4 and metadata["dtype"] == "uint32"
    assert (tmp_path / "a" / "rows.tokens").read_bytes() == (tmp_path / "b" / "rows.tokens").read_bytes()
    assert one.tokens(0, one.num_tokens).tolist() == [t for row in rows for t in row]
    assert metadata["num_examples"] == 30 and os.path.getsize(tmp_path / "a" / "rows.offsets") == 31 * 8
    one.verify()
    with TokenStoreWriter(tmp_path / "c", "bad", vocab_size=100) as writer:
        with pytest.raises(ValueError, match="token id 100 outside"):
            writer.add([5, 100])
        with pytest.raises(TypeError):
            writer.add([1.5])
        with pytest.raises(ValueError, match="1-d"):
            writer.add([[1, 2]])
    assert TokenStore(tmp_path / "c").num_examples == 0  # nothing half-added


def test_pickled_store_carries_its_directory_not_its_tokens(tmp_path):
    write_parts(tmp_path, [random_rows(400, seed=5, max_length=500)])
    store = TokenStore(tmp_path)
    packed = PackedDataset(store, 64, SPECIAL, shuffle_seed=1)
    blob = pickle.dumps(packed)
    assert len(blob) < 2000 < store.num_tokens * 2
    again = pickle.loads(blob)
    assert all(again[i]["input_ids"].tobytes() == packed[i]["input_ids"].tobytes() for i in range(len(packed)))
    write_parts(tmp_path / "x", [[[1, 0]]])
    move_part(tmp_path / "x", "part-00000", tmp_path, "part-00001")
    with pytest.raises(TokenStoreError, match="changed"):
        pickle.loads(pickle.dumps(store))


# --- past 2^31 tokens, without writing them ----------------------------------------------------------------------


def test_more_than_2_to_the_31_tokens_read_right_near_and_past_the_boundary(tmp_path):
    edge = 2**31
    near = np.arange(edge - 40, edge + 40) % 1000 + 7  # real ids around 2^31
    near[[37, 45]] = SPECIAL.eos  # examples end at 2^31 - 3 and 2^31 + 5
    total = edge + 1000
    sparse_part(tmp_path, "part-00000", total, [edge - 2, edge + 6, total], {edge - 40: near})
    tail = [[9, 8, 7, 0], [6, 0]]
    write_parts(tmp_path / "next", [tail])
    move_part(tmp_path / "next", "part-00000", tmp_path, "part-00001")
    store = TokenStore(tmp_path)
    assert store.num_tokens == total + 6 > 2**31 and store.num_examples == 5
    assert store.tokens(edge - 40, edge + 40).tolist() == near.tolist()
    assert store.tokens(total - 2, total + 6).tolist() == [0, 0, 9, 8, 7, 0, 6, 0]  # across the parts
    assert store.example_starts_in(edge - 100, edge + 100).tolist() == [edge - 2, edge + 6]
    assert store.example_starts_in(total - 1, total + 5).tolist() == [total, total + 4]
    assert store.example(4).tolist() == [6, 0] and store.example(1).tolist() == near[38:46].tolist()
    seq = 4096
    packed = PackedDataset(store, seq, SPECIAL, shuffle_seed=0)
    window = PackedDataset(store, seq, SPECIAL)[edge // seq]  # starts at exactly 2^31
    assert window["input_ids"][:40].tolist() == near[40:].tolist()
    assert window["position_ids"][:8].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]  # a continuation restarts at 0
    assert window["labels"][6] == IGNORE_INDEX and window["labels"][5] == near[45]
    last = PackedDataset(store, seq, SPECIAL)[len(packed) - 1]  # the sparse part's end, the second part, padding
    assert last["input_ids"][1000:1006].tolist() == [9, 8, 7, 0, 6, 0]
    assert last["position_ids"][1000:1008].tolist() == [0, 1, 2, 3, 0, 1, 0, 1]
    assert len(packed) == -(-(total + 6) // seq) == len(np.unique(packed.order.take(np.arange(len(packed)))))


# --- damage is found and named ------------------------------------------------------------------------------------


def test_truncated_corrupt_or_disagreeing_parts_are_clear_errors(tmp_path):
    write_parts(tmp_path, [random_rows(20, seed=6), random_rows(20, seed=7)])
    tokens = tmp_path / "part-00001.tokens"
    data = tokens.read_bytes()
    tokens.write_bytes(data[:-2])
    with pytest.raises(TokenStoreError, match=r"part part-00001: part-00001\.tokens .*truncated"):
        TokenStore(tmp_path)
    tokens.unlink()
    with pytest.raises(TokenStoreError, match=r"part-00001\.tokens missing"):
        TokenStore(tmp_path)
    tokens.write_bytes(data)
    offsets = tmp_path / "part-00000.offsets"
    good = offsets.read_bytes()
    offsets.write_bytes(good[:-8] + np.array([3], dtype="<i8").tobytes())
    with pytest.raises(TokenStoreError, match=r"part part-00000: .*corrupt"):
        TokenStore(tmp_path)
    offsets.write_bytes(good)
    tokens.write_bytes(data[:-2] + b"\xff\x00")  # same size, one id changed: only verify() reads it all
    with pytest.raises(TokenStoreError, match=r"part-00001\.tokens does not match its digest"):
        TokenStore(tmp_path).verify()
    tokens.write_bytes(data)
    TokenStore(tmp_path).verify()
    write_parts(tmp_path / "wide", [[[70000, 0]]], vocab_size=100000)
    move_part(tmp_path / "wide", "part-00000", tmp_path, "part-00002")
    with pytest.raises(TokenStoreError, match=r"part part-00002 has vocab_size 100000 .* part part-00000 49152"):
        TokenStore(tmp_path)
    (tmp_path / "part-00002.json").write_text("{not json")
    with pytest.raises(TokenStoreError, match=r"part part-00002: unreadable"):
        TokenStore(tmp_path)


def test_a_writer_killed_before_close_leaves_nothing_that_opens(tmp_path):
    write_parts(tmp_path, [[[1, 2, 0]]])  # one complete part beside the killed writer's
    code = (
        "import os, signal\n"
        "from starcoder2_train.data.store.token_writer import TokenStoreWriter\n"
        f"writer = TokenStoreWriter({str(tmp_path)!r}, 'part-00001', 1000)\n"
        "for i in range(20000): writer.add(list(range(1, i % 50 + 2)))\n"
        "for handle in writer._files.values(): handle.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    assert os.path.getsize(tmp_path / "part-00001.tokens.partial") > 0
    store = TokenStore(tmp_path)
    assert store.names == ["part-00000"] and store.num_tokens == 3
    # A rewrite of a complete part removes its JSON first: killed half-way, it is not read as the old part.
    code = code.replace("part-00001", "part-00000")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    with pytest.raises(TokenStoreError, match="no complete part"):
        TokenStore(tmp_path)


def test_an_exception_while_writing_or_closing_leaves_no_part(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError):
        with TokenStoreWriter(tmp_path, "part-00000", VOCAB) as writer:
            writer.add([1, 2, 0])
            raise RuntimeError("the task failed")
    assert os.listdir(tmp_path) == []
    writer = TokenStoreWriter(tmp_path, "part-00000", VOCAB)
    writer.add([1, 2, 0])
    monkeypatch.setattr(json, "dump", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed after the data files are renamed, before the JSON is
        writer.close()
    monkeypatch.undo()
    assert os.path.exists(tmp_path / "part-00000.tokens")
    with pytest.raises(TokenStoreError, match="no complete part"):
        TokenStore(tmp_path)


# --- resident memory does not grow with the corpus ----------------------------------------------------------------


def test_resident_memory_stays_flat_for_a_trillion_token_store(tmp_path):
    parts, per_part = 100, 2**34  # 1.7T tokens (3.4 TB of sparse files, no disk), ~420M windows of 4096
    for number in range(parts):
        ends = [per_part // 3, per_part // 2, per_part]
        sparse_part(tmp_path, f"part-{number:05d}", per_part, ends, {per_part // 2 - 2: [11, 0, 12, 13]})
    before = resident_bytes()
    store = TokenStore(tmp_path)
    packed = PackedDataset(store, 4096, SPECIAL, shuffle_seed=3)  # np.random.permutation: 3.4 GB
    lengths = {len(packed[i]["input_ids"]) for i in range(300)}  # windows from all over the parts
    grown = resident_bytes() - before
    assert store.num_tokens == parts * per_part and len(packed) == parts * per_part // 4096 and lengths == {4096}
    assert grown < 64 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MB"
    middle = per_part + per_part // 2  # the second part's example start
    assert store.tokens(middle - 2, middle + 2).tolist() == [11, 0, 12, 13]
    assert store.example_starts_in(per_part - 1, middle + 1).tolist() == [per_part, per_part + per_part // 3, middle]


# --- the permutation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 9, 31, 1000, 1023, 1024, 1025, 2**16, 2**16 + 1, 100_003])
def test_permutation_is_a_bijection(n):
    for seed in (0, 1, 12345):
        values = Permutation(n, seed).take(np.arange(n))
        assert values.dtype == np.int64 and np.array_equal(np.sort(values), np.arange(n))


def test_permutation_depends_on_the_seed_and_looks_shuffled():
    n = 200_000
    one, two = Permutation(n, 0).take(np.arange(n)), Permutation(n, 1).take(np.arange(n))
    assert (one == two).sum() < 10  # about 1 expected
    for values in (one, two):
        assert (np.diff(values) == 1).sum() < 10  # consecutive windows stay apart: about 1 expected
        assert abs(np.corrcoef(np.arange(n), values)[0, 1]) < 0.02
        assert abs(np.corrcoef(values[:-1], values[1:])[0, 1]) < 0.02
        assert np.histogram(values[: n // 10], bins=10, range=(0, n))[0].min() > n // 100 * 0.85  # spread out
    small = [tuple(Permutation(5, seed).take(np.arange(5))) for seed in range(200)]
    assert len(set(small)) > 80  # many of the 120 orders of 5 appear


def test_permutation_resumes_anywhere_and_is_the_same_in_every_process():
    n, seed = 1_000_003, 2024
    full = Permutation(n, seed).take(np.arange(n))
    for k in (0, 1, 999, 500_000, n - 1):
        assert np.array_equal(Permutation(n, seed).take(np.arange(k, n)), full[k:])
        assert Permutation(n, seed)[k] == full[k]
    # Pinned: a change here changes the window order of every run, resumed ones included.
    assert Permutation(800_000_000, 7).take(np.arange(5)).tolist() == [
        200677642,
        579732210,
        254208790,
        549436981,
        258806919,
    ]
    code = (
        "from starcoder2_train.data.windows.permutation import Permutation\n"
        "print(Permutation(1_000_003, 2024).take(range(0, 1_000_003, 9973)).tolist())"
    )
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(printed) == full[::9973].tolist()
    big = Permutation(2**63, -5)
    assert 0 <= big[2**63 - 1] < 2**63 and big.take([[1, 2], [3, 4]]).shape == (2, 2)
    with pytest.raises(IndexError):
        Permutation(10, 0)[10]
    with pytest.raises(IndexError):
        Permutation(10, 0).take([-1])


# --- the benchmark's wiring ---------------------------------------------------------------------------------------


def test_benchmark_data_at_scale_writes_opens_reads_and_prints_its_figures(tmp_path, capsys):
    from conftest import load_script

    words = ["--scale_tokens", "300000", "--seq_length", "512", "--vocab_size", "49152", "--num_windows", "50"]
    figures = load_script("benchmark_data").main([*words, "--output", str(tmp_path)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(figures)) and {"commit", "date", "command", "machine"} <= printed.keys()
    assert printed["tokens"] == 300_000 and printed["windows_read"] == 50 and printed["windows"] == -(-300_000 // 512)
    assert 2.0 < printed["bytes_per_token"] < 2.2 and printed["windows_per_second"] > 0 and printed["peak_rss_gb"] > 0
    assert printed["window_across_2_31_matches_file"] is None  # a store this small does not reach 2^31
    store = TokenStore(printed["store_directory"])
    store.verify()
    assert all(store.example(i)[-1] == SPECIAL.eos for i in range(store.num_examples))
