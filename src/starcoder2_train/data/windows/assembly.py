"""Data epochs assembled while reading, from tokens stored once (data/store/pieces.py).

Epoch e of a piece store is its records in a seeded order, each rendered as the in-process pipeline renders a
repository (data/examples/repo_examples.py, data/examples/fim.py with no file-level FIM):

    [<repo_name> name] (<file_sep> [path\\n] content)* <|endoftext|>        a repository
    content <|endoftext|>                                                 a document (0 files)

Every draw is a function of (seed, epoch, the record's name hash) alone, so any process, worker or machine
renders the same epoch, and any epoch can be read without preparing anything:
- the record order: windows/permutation.py's Permutation over the records, keyed by blake2b(seed, epoch);
- the metadata (the bracketed parts), with probability repo_metadata_rate: splitmix64 of the name hash xored
  with a key of (seed, epoch), its top 53 bits as a uniform in [0, 1);
- the file order: the files (stored in canonical (path, content) order) sorted by splitmix64 of their number
  xored with a second key of (seed, epoch, name hash): a uniform shuffle, drawn per record when it is read.
These are the same format and rates as the in-process pipeline's `build_example`, not its draws (that one uses
Python's random seeded by the name): a stored-once epoch and an in-process epoch hold the same examples with
other file orders and metadata choices.

The per-epoch index: the int64 token offset of each record's example in epoch order (R + 1 entries, 8 bytes a
record: 160 MB at 20M repositories, whatever the tokens), built with numpy from the stores' record tables (token
counts, no token read) in chunks of 4M records, once per machine under a file lock and renamed into place, then
memory-mapped by every process (page cache shared). It lives beside the store (PIECES/epochs/) when that is
writable, else in ~/.cache/starcoder2-train/epoch-indexes/ (XDG_CACHE_HOME), named by the store's fingerprint,
epoch, seed and repo_metadata_rate: changing those builds another, nothing else is prepared again. Build time is
linear in records (scripts/benchmark_data.py --assembly: 0.27 s for 2M records on one core of the shared CPU
machine, so ~2.7 s at 20M plus reading their 880 MB of tables; docs/benchmarks.md).

`EpochStream` is a TokenStream (data/store/token_store.py), so PackedDataset, and WindowFim on its windows, read
it as they read a TokenStore. A window of stream tokens [begin, end) finds its records by binary search in the
index (and their number through the Permutation), lays each record's segments out (a few numpy operations over
its files; the last 16 records' layouts are cached, for repositories longer than a window) and copies the
slices it covers from the memory-mapped tokens.
"""

import collections
import hashlib
import os
import socket

import numpy as np
from filelock import FileLock

from starcoder2_train.data.store.pieces import PieceStore
from starcoder2_train.data.store.token_store import OFFSETS_DTYPE, TokenStream, _map_for_random_reads
from starcoder2_train.data.windows.permutation import Permutation, _mix

INDEX_CHUNK = 1 << 22  # records ordered at a time while building an index: ~200 MB of temporaries
LAYOUTS_CACHED = 16


def draw_key(seed: int, epoch: int, stream: str) -> np.uint64:
    """A 64-bit key of (seed, epoch, stream): independent streams of draws for one epoch."""
    digest = hashlib.blake2b(f"{seed}\x00{epoch}\x00{stream}".encode(), digest_size=8, person=b"sc2-assembly")
    return np.uint64(int.from_bytes(digest.digest(), "little"))


def order_seed(seed: int, epoch: int) -> int:
    """The Permutation seed of epoch e's record order."""
    return int(draw_key(seed, epoch, "records"))


def with_metadata(name_hashes: np.ndarray, seed: int, epoch: int, rate: float) -> np.ndarray:
    """Whether each record (by name hash, uint64) carries its name and paths in epoch e: P = rate."""
    uniform = _mix(np.asarray(name_hashes, dtype=np.uint64), draw_key(seed, epoch, "metadata")) >> np.uint64(11)
    return uniform.astype(np.float64) * 2.0**-53 < rate


def file_order(num_files: int, name_hash: int, seed: int, epoch: int) -> np.ndarray:
    """The order of a record's files (numbers in canonical order) in epoch e: a seeded uniform shuffle."""
    key = _mix(np.array([name_hash], dtype=np.uint64), draw_key(seed, epoch, "files"))[0]
    return np.argsort(_mix(np.arange(num_files, dtype=np.uint64), key), kind="stable")


def example_lengths(columns: dict, metadata: np.ndarray) -> np.ndarray:
    """Tokens of each record's example: content, a <file_sep> a file and <|endoftext|>; with metadata also
    <repo_name>, the name and the paths. A document: content and <|endoftext|>."""
    files = columns["num_files"]
    lengths = columns["content_tokens"] + files + 1
    extra = 1 + columns["name_tokens"] + columns["path_tokens"]
    return lengths + np.where(metadata & (files > 0), extra, 0)


def index_cache_dir(pieces: PieceStore) -> str:
    """PIECES/epochs when writable (built once for every machine that reads it), else a per-user cache."""
    beside = os.path.join(pieces.directory, "epochs")
    try:
        os.makedirs(beside, exist_ok=True)
        if os.access(beside, os.W_OK):
            return beside
    except OSError:
        pass
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(root, "starcoder2-train", "epoch-indexes", pieces.fingerprint)
    os.makedirs(folder, exist_ok=True)
    return folder


def index_path(pieces: PieceStore, epoch: int, seed: int, rate: float, cache_dir: str | None = None) -> str:
    name = f"epoch-{epoch}-seed-{seed}-metadata-{float(rate)!r}-{pieces.fingerprint}.offsets"
    return os.path.join(cache_dir or index_cache_dir(pieces), name)


def build_index(pieces: PieceStore, epoch: int, seed: int, rate: float, path: str) -> None:
    """Write epoch e's offsets to `path` (via a temporary name, renamed into place). Memory: one int64 a record
    (the lengths) and the chunk's temporaries."""
    names = ("num_files", "name_tokens", "path_tokens", "content_tokens")
    lengths = []
    for p in range(len(pieces.tokens.names)):
        table = pieces.table(p)
        columns = {name: np.asarray(table[name], dtype=np.int64) for name in names}
        metadata = with_metadata(np.asarray(table["name_hash"]), seed, epoch, rate)
        lengths.append(example_lengths(columns, metadata))
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    order = Permutation(len(lengths), order_seed(seed, epoch))
    partial = f"{path}.partial-{socket.gethostname()}-{os.getpid()}"
    total = 0
    with open(partial, "wb") as handle:
        handle.write(np.zeros(1, dtype=OFFSETS_DTYPE).tobytes())
        for start in range(0, len(lengths), INDEX_CHUNK):
            stop = min(start + INDEX_CHUNK, len(lengths))
            ends = np.cumsum(lengths[order.take(np.arange(start, stop))]) + total
            handle.write(ends.astype(OFFSETS_DTYPE).tobytes())
            total = int(ends[-1])
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def epoch_index(pieces: PieceStore, epoch: int, seed: int, rate: float, cache_dir: str | None = None) -> np.ndarray:
    """Epoch e's offsets, memory-mapped; built first (once per machine, under a file lock) if missing."""
    path = index_path(pieces, epoch, seed, rate, cache_dir)
    expected = (pieces.num_records + 1) * OFFSETS_DTYPE.itemsize
    if not (os.path.exists(path) and os.path.getsize(path) == expected):
        with FileLock(f"{path}.lock"):
            if not (os.path.exists(path) and os.path.getsize(path) == expected):
                build_index(pieces, epoch, seed, rate, path)
    return _map_for_random_reads(path, OFFSETS_DTYPE)


Layout = collections.namedtuple("Layout", "part bounds sources tokens")  # segments of one record's example


class EpochStream(TokenStream):
    """Data epoch `epoch` of the piece store `pieces` (a PieceStore or its directory) as one stream of tokens:
    num_tokens, num_examples (records), tokens(begin, end), example_starts_in(begin, end),
    first_token_of_example_at(position), example(index). Picklable: a worker maps the same index again."""

    def __init__(self, pieces, epoch: int, seed: int, repo_metadata_rate: float, cache_dir: str | None = None):
        self.pieces = pieces if isinstance(pieces, PieceStore) else PieceStore(pieces)
        self.epoch, self.seed, self.rate, self.cache_dir = epoch, seed, repo_metadata_rate, cache_dir
        self.special = self.pieces.special
        self.offsets = epoch_index(self.pieces, epoch, seed, repo_metadata_rate, cache_dir)
        self.num_examples = self.pieces.num_records
        self.num_tokens = int(self.offsets[-1])
        self.order = Permutation(self.num_examples, order_seed(seed, epoch))
        self._layouts: collections.OrderedDict[int, Layout] = collections.OrderedDict()

    def __getstate__(self) -> dict:
        return {key: getattr(self, key) for key in ("pieces", "epoch", "seed", "rate", "cache_dir")}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["pieces"], state["epoch"], state["seed"], state["rate"], state["cache_dir"])

    def __repr__(self) -> str:
        return f"EpochStream({self.pieces.directory!r}, epoch {self.epoch}: {self.num_tokens:,} tokens)"

    def _layout(self, position: int) -> Layout:
        """The segments of the example at epoch position `position`: their bounds in the example, their first
        token in the part's tokens (-1: a structure token) and that token's id."""
        layout = self._layouts.get(position)
        if layout is not None:
            self._layouts.move_to_end(position)
            return layout
        part, row = self.pieces.record(int(self.order[position]))
        _, piece_offsets = self.pieces.tokens._part(part)
        files, first, key = int(row["num_files"]), int(row["first_piece"]), int(row["name_hash"])
        special = self.special
        bounds = np.asarray(piece_offsets[first : first + 2 * files + 2], dtype=np.int64)
        starts, lengths = bounds[:-1], np.diff(bounds)
        if files == 0:  # a document: content <|endoftext|>
            sources, sizes, tokens = [starts[0], -1], [lengths[0], 1], [0, special.eos]
        else:
            metadata = bool(with_metadata(np.array([key], dtype=np.uint64), self.seed, self.epoch, self.rate)[0])
            order = file_order(files, key, self.seed, self.epoch)
            none = np.full(files, -1, dtype=np.int64)
            sources = np.stack([none, starts[1::2][order], starts[2::2][order]], axis=1).reshape(-1)
            sizes = np.stack([none * -1, lengths[1::2][order] * metadata, lengths[2::2][order]], axis=1).reshape(-1)
            tokens = np.stack([np.full(files, special.file_sep), none * 0, none * 0], axis=1).reshape(-1)
            head = ([-1, starts[0]], [1, lengths[0]], [special.repo_name, 0]) if metadata else ([], [], [])
            sources = np.concatenate([head[0], sources, [-1]]).astype(np.int64)
            sizes = np.concatenate([head[1], sizes, [1]]).astype(np.int64)
            tokens = np.concatenate([head[2], tokens, [special.eos]]).astype(np.int64)
        layout = Layout(part, np.concatenate([[0], np.cumsum(sizes)]), np.asarray(sources), np.asarray(tokens))
        expected = int(self.offsets[position + 1]) - int(self.offsets[position])
        if int(layout.bounds[-1]) != expected:
            raise ValueError(
                f"epoch index of {self.pieces.directory} gives example {position} {expected} tokens, its pieces "
                f"{int(layout.bounds[-1])}: the index is stale; delete {self.cache_dir or 'its epochs/ folder'}"
            )
        self._layouts[position] = layout
        if len(self._layouts) > LAYOUTS_CACHED:
            self._layouts.popitem(last=False)
        return layout

    def _render(self, position: int, low: int, high: int) -> np.ndarray:
        """Tokens [low, high) of the example at epoch position `position`, int64."""
        layout = self._layout(position)
        values, _ = self.pieces.tokens._part(layout.part)
        first = int(np.searchsorted(layout.bounds, low, side="right")) - 1
        last = int(np.searchsorted(layout.bounds, high, side="left"))
        out = []
        for segment in range(first, last):
            begin, end = int(layout.bounds[segment]), int(layout.bounds[segment + 1])
            start, stop = max(low, begin) - begin, min(high, end) - begin
            if stop <= start:
                continue
            source = int(layout.sources[segment])
            if source < 0:
                out.append(np.full(stop - start, layout.tokens[segment], dtype=np.int64))
            else:
                out.append(np.asarray(values[source + start : source + stop], dtype=np.int64))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def tokens(self, begin: int, end: int) -> np.ndarray:
        self._check_range(begin, end)
        position = int(np.searchsorted(self.offsets, begin, side="right")) - 1
        out = []
        while begin < end:
            start, stop = int(self.offsets[position]), int(self.offsets[position + 1])
            upto = min(end, stop)
            out.append(self._render(position, begin - start, upto - start))
            begin, position = upto, position + 1
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def example_starts_in(self, begin: int, end: int) -> np.ndarray:
        self._check_range(begin, end)
        low = int(np.searchsorted(self.offsets, begin, side="right"))
        high = int(np.searchsorted(self.offsets, end, side="left"))
        return np.array(self.offsets[low:high], dtype=np.int64)

    def first_token_of_example_at(self, position: int) -> int:
        self._check_range(position, position + 1)
        return int(self._render(int(np.searchsorted(self.offsets, position, side="right")) - 1, 0, 1)[0])

    def example(self, index: int) -> np.ndarray:
        """The example at epoch position `index`, int64."""
        if not 0 <= index < self.num_examples:
            raise IndexError(f"example {index} out of range for {self.num_examples} examples")
        return self._render(index, 0, int(self.offsets[index + 1]) - int(self.offsets[index]))

    def record_at(self, index: int) -> int:
        """The record (in store order) at epoch position `index`."""
        return int(self.order[index])
