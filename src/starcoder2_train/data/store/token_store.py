"""The token store: token rows written once as flat files, then read by every rank in place, without a copy.

A store is a directory of parts, each written by one token_writer.TokenStoreWriter (one task, one machine), as files:
- `NAME.tokens`: every token of the part, example after example, raw little-endian uint16 when
  vocab_size <= 65,536 (StarCoder2's 49,152), else uint32;
- `NAME.offsets`: little-endian int64, num_examples + 1 entries: example i is tokens[offsets[i]:offsets[i+1]],
  offsets[0] = 0 and the last is the part's token count (64-bit, so nothing overflows at 2^31 tokens);
- `NAME.json`: format and version, dtype, vocab_size, num_tokens, num_examples, the two files' sizes in bytes
  and their blake2b. The writer writes all three under temporary names and renames them at `close()`, the
  JSON last: a part is complete once its JSON exists, and a writer killed before then leaves no JSON.
`TokenStore(directory)` reads every part in sorted name order (so name them with zero-padded numbers) as one
stream of tokens, each file an `np.memmap` (mode "r", advised for random reads) mapped when first read: the
tokens stay in the page cache, shared by every process of the machine, and a rank's resident memory does not
grow with the corpus. Opening checks what is cheap to check (sizes, first and last offsets, dtype and
vocab_size of every part) and maps nothing; `verify()` reads it all.
The writer, and `write_token_rows` for the pipeline's token rows (data/pipeline.py), are in token_writer.py.

Cost per rank at the mission's scale (3T tokens in 10,000 parts, ~1.5B examples): on disk 2 bytes a token
plus 8 an example (6 TB + 12 GB: 2.004 bytes a token at ~2,000 tokens an example). In memory two int64 a part
(cumulative tokens and examples: 160 KB) and the part names, 6.8 MB resident in all for 10,000 parts
(measured: tests/test_token_store.py's sparse stores, 3T tokens opened in 0.6 s); the offsets (12 GB) stay
on disk, memory-mapped. At most MAPPED_PARTS parts are mapped at once (Python's mmap keeps a file descriptor
for each map: 256 of them). A window reads its own ~8 KB of tokens and the ~18 pages a binary search touches
in one part's offsets.
`TokenStream` is what a store and data/windows/packing.py's `ArrowTokenRows` (token rows still in Arrow) share:
`tokens(begin, end)` and `example_starts_in(begin, end)` over parts read as one stream.
"""

import collections
import hashlib
import json
import mmap
import os

import numpy as np
import pyarrow as pa

FORMAT = "starcoder2-train token store"
VERSION = 1
OFFSETS_DTYPE = np.dtype("<i8")
_FLUSH_OFFSETS = 1 << 20  # example ends kept before they are written: 8 MB
# Parts kept mapped at once. Python's mmap holds a file descriptor per mapping (two a part), and a process may
# have 1,024 by default; the next part maps in ~30 µs (open, mmap, madvise, close).
MAPPED_PARTS = 128


class TokenStoreError(ValueError):
    """A part of a token store is missing, truncated, corrupt or disagrees with the other parts."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 up to 65,536 ids, uint32 beyond (little-endian on every platform)."""
    if not 0 < vocab_size <= 2**32:
        raise ValueError(f"vocab_size must lie in [1, 2**32], got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def part_metadata(vocab_size, num_tokens, num_examples, tokens_blake2b, offsets_blake2b) -> dict:
    """What NAME.json holds; the sizes are what opening checks, the digests what `verify()` checks."""
    dtype = token_dtype(vocab_size)
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "num_tokens": num_tokens,
        "num_examples": num_examples,
        "tokens_bytes": num_tokens * dtype.itemsize,
        "offsets_bytes": (num_examples + 1) * OFFSETS_DTYPE.itemsize,
        "tokens_blake2b": tokens_blake2b,
        "offsets_blake2b": offsets_blake2b,
    }


def is_token_rows(source) -> bool:
    """Whether `source` is Arrow token rows: a datasets.Dataset, a pyarrow Table or a pyarrow list array."""
    return isinstance(source, (pa.Table, pa.ChunkedArray, pa.Array)) or (
        hasattr(source, "data") and hasattr(source, "column_names")
    )


def input_ids_column(token_rows) -> pa.ChunkedArray:
    """The `input_ids` column of a datasets.Dataset (its indices mapping applied), a pyarrow Table, or itself."""
    if isinstance(token_rows, pa.Array):
        column = pa.chunked_array([token_rows])
    elif isinstance(token_rows, (pa.Table, pa.ChunkedArray)):
        column = token_rows.column("input_ids") if isinstance(token_rows, pa.Table) else token_rows
    else:  # a datasets.Dataset
        if getattr(token_rows, "_indices", None) is not None:
            token_rows = token_rows.flatten_indices()
        column = token_rows.data.table.column("input_ids")
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise TypeError(f"input_ids must be a list column of token ids, got {column.type}")
    return column


def chunk_arrays(chunk) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of one Arrow list chunk, zero-copy: its rows are values[offsets[0]:offsets[-1]]."""
    return chunk.values.to_numpy(zero_copy_only=False), chunk.offsets.to_numpy(zero_copy_only=False)


class TokenStream:
    """Parts read as one stream of tokens: part p holds stream tokens [token_starts[p], token_starts[p + 1]).

    A subclass gives `_part(p)` = (values, offsets): the part's examples are values[offsets[j]:offsets[j + 1]]
    (offsets[0] need not be 0). Index memory: two int64 per part.
    """

    def _index(self, token_counts, example_counts) -> None:
        self.token_starts = np.concatenate([[0], np.cumsum(token_counts, dtype=np.int64)]).astype(np.int64)
        self.example_starts = np.concatenate([[0], np.cumsum(example_counts, dtype=np.int64)]).astype(np.int64)
        self.num_tokens = int(self.token_starts[-1])
        self.num_examples = int(self.example_starts[-1])

    def _part(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _check_range(self, begin: int, end: int) -> None:
        if not 0 <= begin <= end <= self.num_tokens:
            raise IndexError(f"token range [{begin}, {end}) outside the stream's {self.num_tokens} tokens")

    def tokens(self, begin: int, end: int) -> np.ndarray:
        """Stream tokens [begin, end) as int64, across parts where the range spans several."""
        self._check_range(begin, end)
        pieces = []
        p = int(np.searchsorted(self.token_starts, begin, side="right")) - 1
        while begin < end:
            values, offsets = self._part(p)
            start, stop = int(self.token_starts[p]), min(end, int(self.token_starts[p + 1]))
            base = int(offsets[0]) - start
            pieces.append(values[base + begin : base + stop])
            begin, p = stop, p + 1
        return np.array(pieces[0] if len(pieces) == 1 else np.concatenate(pieces or [[]]), dtype=np.int64)

    def example_starts_in(self, begin: int, end: int) -> np.ndarray:
        """Stream positions of the example starts strictly inside (begin, end), int64, in order."""
        self._check_range(begin, end)
        # Part p's example starts lie in [token_starts[p], token_starts[p + 1]]: those that may hold one.
        first = int(np.searchsorted(self.token_starts[1:], begin, side="right"))
        last = int(np.searchsorted(self.token_starts[:-1], end, side="left"))
        found = []
        for p in range(first, last):
            _, offsets = self._part(p)
            starts = offsets[:-1]
            start, stop = int(self.token_starts[p]), int(self.token_starts[p + 1])
            shift = int(offsets[0]) - start  # stream position + shift = offset in this part
            # Searched for in the offsets' own dtype (no copy), so only for positions that fit in it.
            low = 0 if begin < start else np.searchsorted(starts, starts.dtype.type(begin + shift), side="right")
            high = len(starts) if end > stop else np.searchsorted(starts, starts.dtype.type(end + shift), "left")
            found.append(np.array(starts[low:high], dtype=np.int64) - shift)
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def first_token_of_example_at(self, position: int) -> int:
        """The first token of the example that holds stream position `position` (its start, or before it)."""
        self._check_range(position, position + 1)
        p = int(np.searchsorted(self.token_starts, position, side="right")) - 1
        values, offsets = self._part(p)
        shift = int(offsets[0]) - int(self.token_starts[p])
        j = int(np.searchsorted(offsets[:-1], offsets.dtype.type(position + shift), side="right")) - 1
        return int(values[int(offsets[j])])

    def example(self, index: int) -> np.ndarray:
        """Example `index` (counting over all parts) as int64 tokens."""
        if not 0 <= index < self.num_examples:
            raise IndexError(f"example {index} out of range for {self.num_examples} examples")
        p = int(np.searchsorted(self.example_starts, index, side="right")) - 1
        values, offsets = self._part(p)
        j = index - int(self.example_starts[p])
        return np.array(values[offsets[j] : offsets[j + 1]], dtype=np.int64)


def _map_for_random_reads(path: str, dtype: np.dtype) -> np.memmap:
    """The file as a read-only np.memmap, advised MADV_RANDOM: windows are read in shuffled order, and the
    kernel's readahead (~128 KB a page fault) would read 16 times the 8 KB a window needs (measured on a 2 GB
    file out of the page cache: 3.0 ms a 4k window with readahead, 0.2 ms without)."""
    array = np.memmap(path, dtype=dtype, mode="r")
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)
    return array


class TokenStore(TokenStream):
    """The complete parts of the store in `directory`, in sorted name order, as one read-only stream.

    Attributes: `num_tokens`, `num_examples`, `vocab_size`, `dtype`, `bytes_per_token`, `names` (the parts).
    A pickled store (a spawned data-loader worker) carries only its directory and part names and maps the
    files again, checking that it finds the same parts.
    """

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"token store {self.directory}: no such directory")
        found = [entry[: -len(".json")] for entry in sorted(os.listdir(self.directory)) if entry.endswith(".json")]
        parts = [(name, metadata) for name in found if (metadata := self._metadata(name)) is not None]
        if not parts:
            raise TokenStoreError(f"token store {self.directory}: no complete part (NAME.json) in it")
        self.names = [name for name, _ in parts]
        first_name, first = parts[0]
        self.vocab_size, self.dtype = first["vocab_size"], token_dtype(first["vocab_size"])
        self.bytes_per_token = self.dtype.itemsize
        for name, metadata in parts:
            if (metadata["vocab_size"], metadata["dtype"]) != (first["vocab_size"], first["dtype"]):
                raise TokenStoreError(
                    f"token store {self.directory}: part {name} has vocab_size {metadata['vocab_size']} and "
                    f"dtype {metadata['dtype']}, part {first_name} {first['vocab_size']} and {first['dtype']}"
                )
            self._check_part(name, metadata)
        self._index([m["num_tokens"] for _, m in parts], [m["num_examples"] for _, m in parts])
        self._mapped: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()

    def _path(self, name: str, suffix: str) -> str:
        return os.path.join(self.directory, f"{name}.{suffix}")

    def _metadata(self, name: str) -> dict | None:
        """NAME.json, or None where the JSON is not a token-store part (another file in the directory)."""
        try:
            with open(self._path(name, "json")) as handle:
                metadata = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise TokenStoreError(
                f"token store {self.directory}: part {name}: unreadable {name}.json ({error})"
            ) from error
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
            return None
        if metadata.get("version") != VERSION:
            raise TokenStoreError(
                f"token store {self.directory}: part {name} has format version {metadata.get('version')}, "
                f"this code reads {VERSION}"
            )
        try:
            counts = [metadata[key] for key in ("vocab_size", "num_tokens", "num_examples")]
            expected = part_metadata(*counts, "", "")
        except (KeyError, TypeError, ValueError) as error:
            raise TokenStoreError(
                f"token store {self.directory}: part {name}: {name}.json incomplete ({error!r})"
            ) from error
        for key in ("dtype", "tokens_bytes", "offsets_bytes"):
            if metadata.get(key) != expected[key]:
                raise TokenStoreError(
                    f"token store {self.directory}: part {name}: {key} {metadata.get(key)} "
                    f"disagrees with its vocab_size and counts ({expected[key]})"
                )
        return metadata

    def _check_part(self, name: str, metadata: dict) -> None:
        """The files' sizes and the first and last offsets, read without mapping anything."""
        for suffix in ("tokens", "offsets"):
            path, expected = self._path(name, suffix), metadata[f"{suffix}_bytes"]
            size = os.path.getsize(path) if os.path.exists(path) else None
            if size != expected:
                what = "missing" if size is None else f"{size:,} bytes, not {expected:,}: truncated or overwritten"
                raise TokenStoreError(f"token store {self.directory}: part {name}: {name}.{suffix} {what}")
        path = self._path(name, "offsets")
        first, last = (
            int(np.fromfile(path, OFFSETS_DTYPE, 1, offset=at)[0]) for at in (0, metadata["offsets_bytes"] - 8)
        )
        if first != 0 or last != metadata["num_tokens"]:
            raise TokenStoreError(
                f"token store {self.directory}: part {name}: {name}.offsets runs from {first} to {last}, "
                f"not from 0 to {metadata['num_tokens']}: corrupt"
            )

    def _part(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """Part p's tokens and offsets, mapped on first use; the MAPPED_PARTS used last stay mapped."""
        arrays = self._mapped.get(p)
        if arrays is not None:
            self._mapped.move_to_end(p)
            return arrays
        name = self.names[p]
        empty = int(self.token_starts[p + 1]) == int(self.token_starts[p])  # np.memmap cannot map an empty file
        tokens = np.zeros(0, self.dtype) if empty else _map_for_random_reads(self._path(name, "tokens"), self.dtype)
        arrays = tokens, _map_for_random_reads(self._path(name, "offsets"), OFFSETS_DTYPE)
        self._mapped[p] = arrays
        if len(self._mapped) > MAPPED_PARTS:
            self._mapped.popitem(last=False)  # unmapped, and its file descriptors closed, once no window holds it
        return arrays

    def verify(self) -> None:
        """Read every byte and check it against the digests and the offsets' order; TokenStoreError if not."""
        for name in self.names:
            metadata = self._metadata(name)
            for suffix in ("tokens", "offsets"):
                digest = hashlib.blake2b(digest_size=16)
                with open(self._path(name, suffix), "rb") as handle:
                    while block := handle.read(1 << 24):
                        digest.update(block)
                if digest.hexdigest() != metadata[f"{suffix}_blake2b"]:
                    raise TokenStoreError(
                        f"token store {self.directory}: part {name}: {name}.{suffix} "
                        "does not match its digest: corrupt"
                    )
            _, offsets = self._part(self.names.index(name))
            if np.any(np.diff(offsets) < 0):
                raise TokenStoreError(f"token store {self.directory}: part {name}: offsets decrease: corrupt")

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "names": self.names}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"])
        if self.names != state["names"]:
            raise TokenStoreError(f"token store {self.directory}: its parts changed since it was opened")

    def __repr__(self) -> str:
        return (
            f"TokenStore({self.directory!r}: {len(self.names)} parts, {self.num_tokens:,} tokens, "
            f"{self.num_examples:,} examples, {self.dtype.name})"
        )
