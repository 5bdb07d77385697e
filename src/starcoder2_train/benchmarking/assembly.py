"""Tokens stored once against per-epoch copies: disk, the per-epoch index, window reads, a prepare task's memory.

    python scripts/benchmark_data.py --assembly 200000 [--index_records 2000000] [--seq_length 4096] \\
        [--num_windows 2000] [--output DIR]
    python scripts/benchmark_data.py --prepare_memory 50      # a 50 MB repository, both preparation paths

1. A synthetic piece store (data/store/pieces.py) of N repositories shaped like The Stack v2's after filtering
   (log-normal files per repository, median 6; log-normal tokens per file, median 400; a name of 6 tokens and a
   path of 10), written with the project's writer; then five data epochs rendered from it (EpochStream) and
   written as today's per-epoch stores (the bytes prepare_data.py --epochs 5 writes for the same data, its
   metadata draws included): bytes on disk per token of one epoch, both ways.
2. The per-epoch index: built for a store of `index_records` records (their tables; the index reads no token),
   timed and sized, and extrapolated linearly to 20M repositories (the build is one pass of numpy over the
   records: linear) and to 3.3T tokens (the index does not depend on tokens).
3. Shuffled windows read per second, EpochStream (read-time assembly) against TokenStore (epoch 0's copy), out of
   the page cache and in it, as multiples of one H100's need (H100_TOKENS_PER_SECOND / seq_length windows a second).
4. `--prepare_memory MB`: one prepare_data.py task on shards holding one repository of MB megabytes of code (and
   five small ones), run in a child process per path, its peak resident memory (ru_maxrss) and seconds: today's
   path (fim_level: file, per-epoch examples held as lists) and the stored-once path (fim_level: window).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from starcoder2_train.benchmarking.data_pipeline import H100_TOKENS_PER_SECOND
from starcoder2_train.benchmarking.documents import SYNTHETIC_SPECIAL
from starcoder2_train.benchmarking.token_store import drop_from_page_cache, read_windows
from starcoder2_train.data.store.pieces import RECORD, PieceStore, PieceWriter, name_hash
from starcoder2_train.data.store.token_store import TokenStore
from starcoder2_train.data.store.token_writer import TokenStoreWriter
from starcoder2_train.data.windows.assembly import EpochStream, build_index, index_path
from starcoder2_train.data.windows.packing import PackedDataset

RUN_REPOSITORIES = 20_000_000
RUN_TOKENS = 3.3e12
EPOCHS = 5


def write_synthetic_pieces(
    directory: str, num_records: int, vocab_size: int, seed: int = 0, content_median: float = 400
) -> PieceStore:
    """A piece store of `num_records` synthetic repositories in one part, written a block of records at a time:
    log-normal files per repository (median 6) and tokens per file (median `content_median`), names of 6 tokens
    and paths of 10."""
    rng = np.random.default_rng(seed)
    writer = PieceWriter(directory, "part-00000-of-00001", vocab_size, SYNTHETIC_SPECIAL)
    block = 100_000
    for start in range(0, num_records, block):
        count = min(block, num_records - start)
        files = np.clip(rng.lognormal(np.log(6), 1.0, count), 1, 500).astype(np.int64)
        content = np.clip(rng.lognormal(np.log(content_median), 1.2, int(files.sum())), 1, 100_000).astype(np.int64)
        firsts = np.concatenate([[0], np.cumsum(files)])
        record_of_file = np.repeat(np.arange(count), files)
        # Pieces record by record: name, then (path, content) per file. Record r's name is piece r + 2·firsts[r],
        # file f's path piece record_of_file[f] + 1 + 2f, its content the one after.
        lengths = np.zeros(count + 2 * int(files.sum()), dtype=np.int64)
        lengths[np.arange(count) + 2 * firsts[:-1]] = 6
        lengths[record_of_file + 1 + 2 * np.arange(len(content))] = 10
        lengths[record_of_file + 2 + 2 * np.arange(len(content))] = content
        values = rng.integers(7, vocab_size, size=int(lengths.sum()))
        table = np.zeros(count, dtype=RECORD)
        table["first_piece"] = writer.tokens.num_examples + np.arange(count) + 2 * firsts[:-1]
        writer.tokens._append(values, np.cumsum(lengths))
        table["name_hash"] = [name_hash(f"synthetic/{start + r}") for r in range(count)]
        table["num_files"], table["name_tokens"], table["path_tokens"] = files, 6, files * 10
        table["content_tokens"] = np.add.reduceat(content, firsts[:-1])
        writer._records.extend(table.tolist())
        writer.num_records += count
        writer._flush()
    writer.close()
    return PieceStore(directory)


def disk_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory) if "." in name)


def stored_once_against_copies(work: str, num_records: int, seq_length: int, num_windows: int, vocab: int) -> dict:
    pieces = write_synthetic_pieces(os.path.join(work, "pieces"), num_records, vocab)
    stored = disk_bytes(pieces.directory)
    copies, epoch_tokens = 0, []
    for epoch in range(EPOCHS):
        stream = EpochStream(pieces, epoch, seed=42, repo_metadata_rate=0.5)
        with TokenStoreWriter(os.path.join(work, f"epoch-{epoch}"), "part-00000-of-00001", vocab) as writer:
            block = 2_000  # ~16M tokens, 128 MB as int64
            for start in range(0, stream.num_examples, block):
                stop = min(start + block, stream.num_examples)
                begin, end = int(stream.offsets[start]), int(stream.offsets[stop])
                writer._append(stream.tokens(begin, end), np.asarray(stream.offsets[start + 1 : stop + 1]) - begin)
            writer.close()
        copies += disk_bytes(os.path.join(work, f"epoch-{epoch}"))
        epoch_tokens.append(stream.num_tokens)
    indexes = sum(
        os.path.getsize(os.path.join(pieces.directory, "epochs", n))
        for n in os.listdir(os.path.join(pieces.directory, "epochs"))
        if n.endswith(".offsets")
    )
    figures = {
        "repositories": num_records,
        "stored_tokens": pieces.tokens.num_tokens,
        "epoch_tokens": epoch_tokens,
        "stored_once_bytes": stored + indexes,
        "per_epoch_copies_bytes": copies,
        "stored_once_bytes_per_epoch_token": (stored + indexes) / sum(epoch_tokens),
        "per_epoch_copies_bytes_per_epoch_token": copies / sum(epoch_tokens),
        "stored_once_over_copies": (stored + indexes) / copies,
    }
    figures.update(window_reads(pieces, work, seq_length, num_windows))
    return figures


def window_reads(pieces: PieceStore, work: str, seq_length: int, num_windows: int) -> dict:
    """Shuffled windows a second: read-time assembly of epoch 0 against epoch 0's per-epoch copy."""
    need = H100_TOKENS_PER_SECOND / seq_length
    figures = {"seq_length": seq_length, "h100_windows_per_second": need}
    sides = {
        "assembly": lambda: EpochStream(pieces, 0, seed=42, repo_metadata_rate=0.5),
        "token_store": lambda: TokenStore(os.path.join(work, "epoch-0")),
    }
    for side, opened in sides.items():
        drop_from_page_cache(pieces.directory)
        drop_from_page_cache(os.path.join(work, "epoch-0"))
        packed = PackedDataset(opened(), seq_length, SYNTHETIC_SPECIAL, shuffle_seed=0)
        count = min(num_windows, len(packed))
        cold, warm = count / read_windows(packed, count), count / read_windows(packed, count)
        figures[f"{side}_windows_per_second"], figures[f"{side}_windows_per_second_warm"] = cold, warm
        figures[f"{side}_times_one_h100"] = cold / need
    return figures


def index_at_scale(work: str, num_records: int, vocab: int) -> dict:
    """The per-epoch index of a store of `num_records` records: build seconds and bytes, and at 20M repositories."""
    pieces = write_synthetic_pieces(os.path.join(work, "index_pieces"), num_records, vocab, seed=1, content_median=1)
    path = index_path(pieces, 0, 42, 0.5)
    start = time.perf_counter()
    build_index(pieces, 0, 42, 0.5, path)
    seconds = time.perf_counter() - start
    size = os.path.getsize(path)
    return {
        "index_records": num_records,
        "index_build_seconds": seconds,
        "index_bytes": size,
        "index_bytes_per_record": size / (num_records + 1),
        "run_repositories": RUN_REPOSITORIES,
        "run_tokens": RUN_TOKENS,
        "index_bytes_at_run": (RUN_REPOSITORIES + 1) * 8,
        "index_build_seconds_at_run": seconds * RUN_REPOSITORIES / num_records,
    }


def assembly_benchmark(work: str | None, num_records: int, index_records: int, seq_length: int, num_windows: int):
    work = work or tempfile.mkdtemp(prefix="benchmark_assembly_")
    figures = stored_once_against_copies(work, num_records, seq_length, num_windows, vocab=49152)
    figures.update(index_at_scale(work, index_records, vocab=49152))
    figures["work_directory"] = work
    return figures


def print_assembly(figures: dict) -> None:
    f = figures
    print(
        f"{f['repositories']:,} repositories, {f['stored_tokens']:,} tokens stored; {EPOCHS} epochs: stored once "
        f"{f['stored_once_bytes'] / 1e6:,.1f} MB ({f['stored_once_bytes_per_epoch_token']:.3f} bytes a trained "
        f"token), per-epoch copies {f['per_epoch_copies_bytes'] / 1e6:,.1f} MB "
        f"({f['per_epoch_copies_bytes_per_epoch_token']:.3f}): {f['stored_once_over_copies']:.3f} of it"
    )
    print(
        f"index of {f['index_records']:,} records: {f['index_build_seconds']:.2f} s, {f['index_bytes'] / 1e6:.1f} MB; "
        f"at {RUN_REPOSITORIES:,} repositories (any token count, 3.3T included): "
        f"{f['index_bytes_at_run'] / 1e6:.0f} MB, ~{f['index_build_seconds_at_run']:.0f} s once per machine and epoch"
    )
    for side in ("assembly", "token_store"):
        print(
            f"{side}: {f[f'{side}_windows_per_second']:,.0f} windows/s of {f['seq_length']} out of the page cache "
            f"({f[f'{side}_times_one_h100']:,.0f}x one H100), {f[f'{side}_windows_per_second_warm']:,.0f}/s in it"
        )
    print(json.dumps(figures))


SNIPPETS = (
    "def add(a, b):\n    return a + b\n",
    "for name in os.listdir('.'):\n    print(name, file=sys.stderr)\n",
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
)


def big_repository(total_bytes: int, file_bytes: int = 900_000, seed: int = 0) -> dict:
    """One repository of about `total_bytes` of code-like text (snippets, random identifiers, a little unicode)
    in files of `file_bytes`, under max_file_bytes' default; no file opens with whitespace."""
    import random

    rng, files, size = random.Random(seed), [], 0
    letters = "abcdefghijklmnopqrstuvwxyz_éλ"
    while size < total_bytes:
        lines, length = [], 0
        while length < file_bytes:
            if rng.random() < 0.3:
                line = rng.choice(SNIPPETS)
            else:
                name = "".join(rng.choice(letters) for _ in range(rng.randint(1, 10)))
                line = f"{name} = {rng.randint(0, 10**6)}  # {name}\n"
            lines.append(line)
            length += len(line.encode())
        text = "".join(lines)
        files.append({"path": f"src/big_{len(files):04d}.py", "content": text, "language": "Python"})
        size += len(text.encode())
    return {"repo_name": "big/monorepo", "files": files}


def write_big_repository_shards(directory: str, total_bytes: int) -> str:
    """A per-repository parquet shard: the big repository and five small ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    small = [
        {"repo_name": f"small/{n}", "files": [{"path": "a.py", "content": SNIPPETS[n % 3], "language": "Python"}]}
        for n in range(5)
    ]
    pq.write_table(pa.Table.from_pylist(small + [big_repository(total_bytes)]), os.path.join(directory, "0.parquet"))
    return directory


# One prepare task in this process: argv shards, tokenizer, output, fim_level[, memory budget in MB over what the
# imports hold: RLIMIT_AS set to VmSize + budget]. Prints its peak resident memory and seconds as JSON.
PREPARE_CHILD = """
import json, os, resource, sys, time
shards, tokenizer, out, level = sys.argv[1:5]
from starcoder2_train.configs import DataArguments
from starcoder2_train.data.prepare import build_stages, make_executor
from starcoder2_train.data.tokens.tokenizer import load_tokenizer
vocab_size = len(load_tokenizer(tokenizer))
if len(sys.argv) > 5:
    size = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize")][0] << 10
    limit = size + (int(sys.argv[5]) << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
args = DataArguments(dataset_name_or_path=shards, tokenizer_name_or_path=tokenizer, eval_fraction=0.0, fim_level=level)
start = time.time()
for name, pipeline, tasks, logs in build_stages(args, out, 42, 1, vocab_size):
    make_executor("local", pipeline, tasks=1, workers=1, logging_dir=logs).run()
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.time() - start}))
"""


def prepare_memory(work: str | None, megabytes: int, tokenizer_dir: str | None = None) -> dict:
    """Peak memory of one prepare task on a repository of `megabytes` MB of code, today's path and stored once;
    tokenizer_dir None: a byte-level BPE of 600 ids trained here on the repository's first file (the test's)."""
    work = work or tempfile.mkdtemp(prefix="benchmark_prepare_memory_")
    if tokenizer_dir is None:
        from starcoder2_train.data.tokens.tokenizer import train_tokenizer

        tokenizer_dir = os.path.join(work, "tokenizer")
        train_tokenizer(iter([big_repository(1_000_000)["files"][0]["content"]]), 600, output_dir=tokenizer_dir)
    shards = write_big_repository_shards(os.path.join(work, "shards"), megabytes * 1_000_000)
    small = write_big_repository_shards(os.path.join(work, "small"), 0)
    figures = {"repository_megabytes": megabytes}
    for side, level, data in (
        ("baseline", "window", small),
        ("per_epoch_today", "file", shards),
        ("stored_once", "window", shards),
    ):
        figures[side] = run_prepare_task(data, tokenizer_dir, os.path.join(work, side), level)
    return figures


def run_prepare_task(shards: str, tokenizer_dir: str, out: str, level: str, budget_mb: int | None = None, **kwargs):
    """PREPARE_CHILD in a child process (one Rust thread, two malloc arenas); its figures, or the CompletedProcess
    when it failed."""
    env = dict(os.environ, RAYON_NUM_THREADS="1", MALLOC_ARENA_MAX="2", HF_HUB_OFFLINE="1")
    argv = [sys.executable, "-c", PREPARE_CHILD, shards, tokenizer_dir, out, level]
    done = subprocess.run(
        argv + ([str(budget_mb)] if budget_mb else []), env=env, capture_output=True, text=True, **kwargs
    )
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else done
