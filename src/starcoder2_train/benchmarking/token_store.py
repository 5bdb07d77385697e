"""The token store at scale: write N synthetic tokens with the project's writer, open them as training does,
read shuffled windows, and measure what one rank pays.

    python scripts/benchmark_data.py --scale_tokens 2500000000 --seq_length 4096 --vocab_size 49152 \\
        --num_windows 2000 --output DIR

1. write: documents of log-normal lengths (median 2,000 tokens, documents.synthetic_documents), a batch at a
   time through `TokenStoreWriter` (memory bounded by one batch, whatever N is);
2. open: `PackedDataset(TokenStore(...), seq_length, shuffle_seed=0)`, as training does;
3. read: the first `num_windows` windows in shuffled order (random places in the store), first with the
   store's pages dropped from the page cache (at 3T tokens every window of an epoch is read once, from disk),
   then again from the page cache.
Figures: tokens, windows_read, windows_per_second (cold) and _warm, peak_rss_gb (ru_maxrss of the whole
process, writing included), open_seconds, bytes_per_token (tokens + offsets on disk over tokens), and the goals
set for the mission: ≤ 2 GB resident, ≤ 2.2 bytes a token, ≥ 300 windows/s (about 50 times the ~6 windows of
4,096 tokens a second one H100 trains on; `times_one_h100` uses data_pipeline's 20,000 tokens/s for
StarCoder2-3B). A window across 2^31 is checked against the file itself.
"""

import json
import os
import resource
import shutil
import time

import numpy as np

from starcoder2_train.benchmarking.data_pipeline import H100_TOKENS_PER_SECOND
from starcoder2_train.benchmarking.documents import SYNTHETIC_SPECIAL, synthetic_documents
from starcoder2_train.data.store.token_store import TokenStore
from starcoder2_train.data.store.token_writer import TokenStoreWriter
from starcoder2_train.data.windows.packing import PackedDataset

GOALS = {"peak_rss_gb_at_most": 2.0, "bytes_per_token_at_most": 2.2, "windows_per_second_at_least": 300}
DOCUMENTS_PER_BATCH = 2_000  # ~8M tokens, ~70 MB as int64: the writer's memory, whatever the store's size


def write_synthetic_store(directory: str, num_tokens: int, vocab_size: int, seed: int = 0) -> dict:
    """Exactly `num_tokens` tokens of synthetic documents as one part; the writer's metadata."""
    with TokenStoreWriter(directory, "part-00000", vocab_size) as writer:
        batch = 0
        while writer.num_tokens < num_tokens:
            for document in synthetic_documents(DOCUMENTS_PER_BATCH, vocab_size, seed=seed * 1_000_003 + batch):
                left = num_tokens - writer.num_tokens
                if len(document) >= left:  # the last document, cut to fit, still ends in <|endoftext|>
                    writer.add(np.append(document[: left - 1], SYNTHETIC_SPECIAL.eos))
                    break
                writer.add(document)
            batch += 1
        return writer.close()


def drop_from_page_cache(directory: str) -> None:
    """Ask the kernel to forget the store's pages (they are written and synced: clean), so reads go to disk."""
    for entry in os.listdir(directory):
        descriptor = os.open(os.path.join(directory, entry), os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def read_windows(packed: PackedDataset, count: int) -> float:
    """Seconds to read windows 0..count-1 (shuffled: random places in the store)."""
    start = time.perf_counter()
    for index in range(count):
        window = packed[index]
        assert len(window["input_ids"]) == packed.seq_length
    return time.perf_counter() - start


def check_across_2_31(store: TokenStore, seq_length: int) -> bool | None:
    """Whether the window holding token 2^31 equals the tokens file read directly (None below 2^31 tokens)."""
    if store.num_tokens <= 2**31:
        return None
    index = 2**31 // seq_length
    window = PackedDataset(store, seq_length, SYNTHETIC_SPECIAL)[index]
    path = os.path.join(store.directory, f"{store.names[0]}.tokens")
    begin = index * seq_length
    direct = np.fromfile(path, store.dtype, seq_length, offset=begin * store.bytes_per_token).astype(np.int64)
    return bool(np.array_equal(window["input_ids"], direct))


def token_store_at_scale(work: str, num_tokens: int, seq_length: int, vocab_size: int, num_windows: int) -> dict:
    directory = os.path.join(work, "token_store")
    shutil.rmtree(directory, ignore_errors=True)  # this benchmark's own store, written again
    start = time.perf_counter()
    write_synthetic_store(directory, num_tokens, vocab_size)
    write_seconds = time.perf_counter() - start
    drop_from_page_cache(directory)

    start = time.perf_counter()
    packed = PackedDataset(TokenStore(directory), seq_length, SYNTHETIC_SPECIAL, shuffle_seed=0)
    open_seconds = time.perf_counter() - start
    windows_read = min(num_windows, len(packed))
    cold_seconds = read_windows(packed, windows_read)
    warm_seconds = read_windows(packed, windows_read)
    store = packed.stream
    disk_bytes = sum(
        os.path.getsize(os.path.join(directory, f"{name}.{suffix}"))
        for name in store.names
        for suffix in ("tokens", "offsets")
    )
    windows_per_second = windows_read / cold_seconds
    h100_windows_per_second = H100_TOKENS_PER_SECOND / seq_length
    figures = {
        "tokens": store.num_tokens,
        "examples": store.num_examples,
        "parts": len(store.names),
        "seq_length": seq_length,
        "vocab_size": vocab_size,
        "windows": len(packed),
        "windows_read": windows_read,
        "windows_per_second": windows_per_second,
        "windows_per_second_warm": windows_read / warm_seconds,
        "times_one_h100": windows_per_second / h100_windows_per_second,
        "h100_windows_per_second": h100_windows_per_second,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,  # KB on Linux
        "open_seconds": open_seconds,
        "write_seconds": write_seconds,
        "write_tokens_per_second": store.num_tokens / write_seconds,
        "bytes_per_token": disk_bytes / store.num_tokens,
        "window_across_2_31_matches_file": check_across_2_31(store, seq_length),
        "store_directory": directory,
        "goals": GOALS,
    }
    figures["goals_met"] = (
        figures["peak_rss_gb"] <= GOALS["peak_rss_gb_at_most"]
        and figures["bytes_per_token"] <= GOALS["bytes_per_token_at_most"]
        and figures["windows_per_second"] >= GOALS["windows_per_second_at_least"]
        and figures["window_across_2_31_matches_file"] is not False
    )
    return figures


def print_token_store(figures: dict) -> None:
    """A few readable lines, then the figures as one line of JSON (the last line, for scripts to read)."""
    print(
        f"token store: {figures['tokens']:,} tokens, {figures['examples']:,} examples, "
        f"{figures['bytes_per_token']:.4f} bytes/token on disk; written in {figures['write_seconds']:.0f} s, "
        f"opened in {figures['open_seconds']:.3f} s"
    )
    print(
        f"{figures['windows_read']:,} shuffled windows of {figures['seq_length']}: "
        f"{figures['windows_per_second']:,.0f}/s out of the page cache "
        f"({figures['times_one_h100']:,.0f} times one H100), {figures['windows_per_second_warm']:,.0f}/s in it; "
        f"peak resident memory {figures['peak_rss_gb']:.2f} GB; goals met: {figures['goals_met']}"
    )
    print(json.dumps(figures))
