"""The piece store: every repository's tokens written once, in pieces from which any data epoch is assembled.

A repository example (data/examples/repo_examples.py) is `[<repo_name> name] (<file_sep> [path\\n] content)*
<|endoftext|>`: per epoch its files are reordered and its metadata (the bracketed parts) drawn, but the text is
the same. So the preparation writes the text once, as pieces, and data/windows/assembly.py renders each epoch
while reading. A piece store is a directory (prepared data's train/pieces/) of parts, one per task:
- `NAME.{tokens,offsets,json}`: a token-store part (data/store/token_store.py's format, written by
  TokenStoreWriter) whose "examples" are pieces: for each repository its name's tokens, then for each file in
  canonical order (sorted by (path, content), as build_example sorts before its shuffle) the tokens of
  `path + "\\n"` and the tokens of its content, so 1 + 2·files pieces; a document (a record with 0 files) is one
  piece, its content;
- `NAME.repositories.npy`: the part's repository table, a numpy structured array (RECORD) read memory-mapped:
  per record the blake2b of its name (uint64: the key of its per-epoch draws), its first piece (in the part),
  its number of files, and its name, path and content token counts (what an epoch's index is built from, without
  reading a token). Written before the part's JSON, so a part whose JSON exists has its table;
- `pieces.json`: the format, and the structure tokens' ids the tokens were written with (so an epoch can be
  assembled without loading the tokenizer).

Tokenizing `path\\n` apart from the content can differ from tokenizing `path\\ncontent` as one text (what the
in-process pipeline does): the byte-level pre-tokenizer (GPT-2's regex) joins the newline to the whitespace that
opens the content, so a content that starts with a space, tab or newline (or a path that ends in one) gets
another, equally valid, tokenization of the same text at that boundary. Nowhere else: `<file_sep>` and
`<|endoftext|>` are ids, never text, and the name is tokenized alone on both paths.

Cost on disk at StarCoder2-3B's scale (3.3T training tokens are ~5.5 epochs of ~600B tokens; ~20M repositories
after filtering, ~30,000 tokens and ~12 files each): 2 bytes a token (uint16), plus 8 bytes an offset a piece
(25 pieces a repository: 200 bytes), plus RECORD.itemsize = 44 bytes a repository in its table: 600B × 2 +
20M × 244 = 1.2 TB + 4.9 GB, 2.008 bytes a stored token; every epoch after the first costs only its index
(data/windows/assembly.py: 8 bytes a repository, 160 MB), where per-epoch copies cost 1.2 TB each.
In memory while reading: the token store's (two int64 a part) and one int64 a part for the tables' record counts.
"""

import hashlib
import json
import os

import numpy as np

from starcoder2_train.data.special_tokens import SpecialTokenIds
from starcoder2_train.data.store.token_store import TokenStore
from starcoder2_train.data.store.token_writer import TokenStoreWriter

FORMAT = "starcoder2-train piece store"
VERSION = 1
METADATA = "pieces.json"
TABLE_SUFFIX = ".repositories.npy"
RECORD = np.dtype(
    [
        ("name_hash", "<u8"),
        ("first_piece", "<i8"),
        ("num_files", "<i4"),
        ("name_tokens", "<i8"),
        ("path_tokens", "<i8"),
        ("content_tokens", "<i8"),
    ],
    align=False,
)
_FLUSH_RECORDS = 1 << 16  # records kept before they are written: 2.9 MB


def name_hash(key: str) -> int:
    """The record's key for its per-epoch draws: blake2b (8 bytes, little-endian) of its name."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class PieceWriter:
    """Writes part NAME of the piece store in `directory`: `add_repository` / `add_document`, then `close()`.

    Memory: the token writer's (file buffers, 8 MB of offsets) and up to _FLUSH_RECORDS table records; the
    caller holds one record's token arrays at a time."""

    def __init__(self, directory, name: str, vocab_size: int, special: SpecialTokenIds):
        self.directory, self.name = os.fspath(directory), name
        self.tokens = TokenStoreWriter(directory, name, vocab_size)
        self.table_path = os.path.join(self.directory, f"{name}{TABLE_SUFFIX}")
        self._table = open(f"{self.table_path}.partial", "wb", buffering=1 << 20)
        self._records: list[tuple] = []
        self.num_records = 0
        write_metadata(self.directory, special)

    def add_repository(self, key: str, name_ids, files: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """One repository: its name's tokens and (path + "\\n" tokens, content tokens) of each file, in canonical
        order (sorted by (path, content)); `key` names it for its draws (its name, or the name of a part)."""
        if not files:
            raise ValueError(f"PieceWriter {self.name}: repository {key!r} has no file")
        first = self.tokens.num_examples
        self.tokens.add(name_ids)
        path_tokens = content_tokens = 0
        for path_ids, content_ids in files:
            self.tokens.add(path_ids)
            self.tokens.add(content_ids)
            path_tokens += len(path_ids)
            content_tokens += len(content_ids)
        self._record((name_hash(key), first, len(files), len(name_ids), path_tokens, content_tokens))

    def add_document(self, key: str, content_ids) -> None:
        """One document (a record of 0 files): its content tokens, structure tokens already ids."""
        first = self.tokens.num_examples
        self.tokens.add(content_ids)
        self._record((name_hash(key), first, 0, 0, 0, len(content_ids)))

    def _record(self, record: tuple) -> None:
        self._records.append(record)
        self.num_records += 1
        if len(self._records) >= _FLUSH_RECORDS:
            self._flush()

    def _flush(self) -> None:
        if self._records:
            self._table.write(np.array(self._records, dtype=RECORD).tobytes())
            self._records = []

    def close(self) -> dict:
        """The table as NAME.repositories.npy (a .npy header before the records), then the token part (its JSON
        last: the part is complete once that exists)."""
        self._flush()
        self._table.close()
        with open(f"{self.table_path}.partial", "rb") as raw, open(f"{self.table_path}.header", "wb") as out:
            header = {"descr": np.lib.format.dtype_to_descr(RECORD), "fortran_order": False}
            np.lib.format.write_array_header_1_0(out, {**header, "shape": (self.num_records,)})
            while block := raw.read(1 << 24):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        os.remove(f"{self.table_path}.partial")
        os.replace(f"{self.table_path}.header", self.table_path)
        return self.tokens.close()

    def abort(self) -> None:
        self._table.close()
        self.tokens.abort()
        for suffix in (".partial", ".header"):
            if os.path.exists(self.table_path + suffix):
                os.remove(self.table_path + suffix)


def write_metadata(directory: str, special: SpecialTokenIds) -> None:
    """pieces.json (every task writes the same, atomically)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, METADATA)
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w") as handle:
        json.dump({"format": FORMAT, "version": VERSION, "special": special.__dict__}, handle, indent=1)
    os.replace(partial, path)


def is_piece_store(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, METADATA))


class PieceStore:
    """The piece store in `directory`: `tokens` (its TokenStore of pieces), `special`, `num_records`, and
    `records(begin, end)` / `record(r)` over the records of all parts in part order, each part's table mapped
    when first read. `fingerprint` names the stored tokens (the parts' digests), for the epoch indexes' cache."""

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        try:
            with open(os.path.join(self.directory, METADATA)) as handle:
                metadata = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise FileNotFoundError(f"piece store {self.directory}: no readable {METADATA} ({error})") from error
        if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
            raise ValueError(f"piece store {self.directory}: {METADATA} is not version {VERSION} of {FORMAT!r}")
        self.special = SpecialTokenIds(**metadata["special"])
        self.tokens = TokenStore(self.directory)
        counts = [self._table_length(name) for name in self.tokens.names]
        self.record_starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self.num_records = int(self.record_starts[-1])
        self._tables: dict[int, np.ndarray] = {}
        digests = hashlib.blake2b(digest_size=8)
        for name in self.tokens.names:
            with open(os.path.join(self.directory, f"{name}.json"), "rb") as handle:
                digests.update(handle.read())
        self.fingerprint = digests.hexdigest()

    def _table_path(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}{TABLE_SUFFIX}")

    def _table_length(self, name: str) -> int:
        """The record count from the .npy header alone (nothing mapped)."""
        path = self._table_path(name)
        try:
            with open(path, "rb") as handle:
                if np.lib.format.read_magic(handle) != (1, 0):
                    raise ValueError("not a version 1.0 .npy header")
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        except (OSError, ValueError) as error:
            raise ValueError(f"piece store {self.directory}: part {name}: unreadable {path} ({error})") from error
        if dtype != RECORD:
            raise ValueError(f"piece store {self.directory}: part {name}: {path} holds {dtype}, not {RECORD}")
        return int(shape[0])

    def table(self, p: int) -> np.ndarray:
        """Part p's records, memory-mapped on first use (44 bytes a record)."""
        table = self._tables.get(p)
        if table is None:
            if self.record_starts[p + 1] == self.record_starts[p]:
                table = np.zeros(0, dtype=RECORD)
            else:
                table = np.load(self._table_path(self.tokens.names[p]), mmap_mode="r")
            if len(self._tables) >= 64:
                self._tables.pop(next(iter(self._tables)))
            self._tables[p] = table
        return table

    def locate(self, record: int) -> tuple[int, int]:
        """(part, row in its table) of record `record`."""
        p = int(np.searchsorted(self.record_starts, record, side="right")) - 1
        return p, record - int(self.record_starts[p])

    def record(self, record: int) -> tuple[int, np.void]:
        """(part, its row) of one record."""
        p, row = self.locate(record)
        return p, self.table(p)[row]

    def columns(self, names: tuple[str, ...]):
        """Yields, part after part, a dict of those columns of its records as int64 arrays (vectorised builds)."""
        for p in range(len(self.tokens.names)):
            table = self.table(p)
            yield {name: np.asarray(table[name]).astype(np.int64) for name in names}

    def __getstate__(self) -> dict:
        return {"directory": self.directory}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"])
