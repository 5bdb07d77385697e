"""Writing a token store part (the format: token_store.py): one writer per task, appending examples.

`TokenStoreWriter(directory, name, vocab_size)` appends examples with `add` / `add_rows` and, at `close()`,
renames its files into place, the JSON last, so that a killed writer never leaves a part that opens. Memory:
the example ends not yet written (at most 1M int64, 8 MB), and one example or Arrow chunk at a time.
"""

import hashlib
import json
import os

import numpy as np

from starcoder2_train.data.store.token_store import (
    _FLUSH_OFFSETS,
    OFFSETS_DTYPE,
    chunk_arrays,
    input_ids_column,
    is_token_rows,
    part_metadata,
    token_dtype,
)


class TokenStoreWriter:
    """Writes one part NAME of the store in `directory`; memory is bounded (the file buffers and 8 MB of offsets).

    Use it as a context manager, or call `close()` (which makes the part complete and returns its metadata);
    on an exception inside the `with`, `abort()` removes what was written. Writing a NAME again replaces it:
    its old JSON goes first, so a rewrite that dies half-way never reads as the old part.
    """

    def __init__(self, directory, name: str, vocab_size: int):
        if not name or name.startswith(".") or os.sep in name or name.endswith(".partial"):
            raise ValueError(f"TokenStoreWriter: {name!r} is not a usable part name")
        self.directory, self.name, self.vocab_size = os.fspath(directory), name, vocab_size
        self.dtype = token_dtype(vocab_size)
        os.makedirs(self.directory, exist_ok=True)
        self.paths = {suffix: os.path.join(self.directory, f"{name}.{suffix}") for suffix in ("tokens", "offsets")}
        self.metadata_path = os.path.join(self.directory, f"{name}.json")
        if os.path.exists(self.metadata_path):
            os.remove(self.metadata_path)
        self._files = {suffix: open(f"{path}.partial", "wb", buffering=1 << 20) for suffix, path in self.paths.items()}
        self._digests = {suffix: hashlib.blake2b(digest_size=16) for suffix in self.paths}
        self._ends: list[np.ndarray] = []
        self._pending_ends = 0
        self.num_tokens = self.num_examples = 0
        self.closed = False
        self._write("offsets", np.zeros(1, dtype=OFFSETS_DTYPE))

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            self.abort()
        elif not self.closed:
            self.close()

    def _write(self, suffix: str, array: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        self._digests[suffix].update(data)
        self._files[suffix].write(data)

    def _flush_ends(self) -> None:
        if self._ends:
            self._write("offsets", np.concatenate(self._ends).astype(OFFSETS_DTYPE))
            self._ends, self._pending_ends = [], 0

    def _append(self, values: np.ndarray, ends: np.ndarray) -> None:
        """Examples whose tokens are `values`, example j ending at ends[j] (relative to values[0])."""
        if self.closed:
            raise ValueError(f"TokenStoreWriter {self.name}: closed")
        if values.size:
            if not np.issubdtype(values.dtype, np.integer):
                raise TypeError(f"TokenStoreWriter {self.name}: token ids must be integers, got {values.dtype}")
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"TokenStoreWriter {self.name}: token id {low if low < 0 else high} outside "
                    f"[0, {self.vocab_size}) (example {self.num_examples} onwards)"
                )
            self._write("tokens", values.astype(self.dtype, copy=False))
        self._ends.append(np.asarray(ends, dtype=np.int64) + self.num_tokens)
        self._pending_ends += len(ends)
        self.num_tokens += int(values.size)
        self.num_examples += len(ends)
        if self._pending_ends >= _FLUSH_OFFSETS:
            self._flush_ends()

    def add(self, ids) -> None:
        """Append one example: a sequence of token ids (list, numpy array, ...)."""
        values = np.asarray(ids)
        if values.ndim != 1:
            raise ValueError(f"TokenStoreWriter {self.name}: one example is a 1-d sequence, got shape {values.shape}")
        self._append(values, np.array([values.size]))

    def add_rows(self, rows) -> None:
        """Append many examples: token rows (datasets.Dataset, pyarrow Table/array with `input_ids`), written a
        whole Arrow chunk at a time, or any iterable of sequences of ids, one example each."""
        if is_token_rows(rows):
            for chunk in input_ids_column(rows).chunks:
                if len(chunk):
                    values, offsets = chunk_arrays(chunk)
                    self._append(values[offsets[0] : offsets[-1]], offsets[1:] - offsets[0])
            return
        for ids in rows:
            self.add(ids)

    def close(self) -> dict:
        """Make the part complete: flush, sync, rename the files into place (the JSON last); its metadata."""
        if self.closed:
            raise ValueError(f"TokenStoreWriter {self.name}: closed already")
        self._flush_ends()
        for handle in self._files.values():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        self.closed = True
        metadata = part_metadata(
            self.vocab_size,
            self.num_tokens,
            self.num_examples,
            self._digests["tokens"].hexdigest(),
            self._digests["offsets"].hexdigest(),
        )
        for path in self.paths.values():
            os.replace(f"{path}.partial", path)
        with open(f"{self.metadata_path}.partial", "w") as handle:
            json.dump({"name": self.name, **metadata}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(f"{self.metadata_path}.partial", self.metadata_path)
        return metadata

    def abort(self) -> None:
        """Drop what was written: no part of this name is left behind."""
        for handle in self._files.values():
            handle.close()
        self.closed = True
        for path in self.paths.values():
            if os.path.exists(f"{path}.partial"):
                os.remove(f"{path}.partial")


def write_token_rows(token_rows, directory, name: str, vocab_size: int) -> dict:
    """Write the pipeline's token rows (a datasets.Dataset or pyarrow table with `input_ids`) as part NAME."""
    with TokenStoreWriter(directory, name, vocab_size) as writer:
        writer.add_rows(token_rows)
        return writer.close()
