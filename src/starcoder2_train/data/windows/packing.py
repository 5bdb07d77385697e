"""Packing token rows into fixed `seq_length` windows, with nothing truncated and nothing dropped.

The token rows (one per repository example, each ending in `<|endoftext|>`) are read as one stream;
window i holds stream tokens [i·seq_length, (i+1)·seq_length). An example longer than the window
simply continues in the next window. Only the last window is padded, and padding is never trained on.

Keeping examples apart: transformers (eager, sdpa, flex_attention, and flash_attention_2 on a
flattened batch) treats a row whose `position_ids` restart at 0 as several sequences and masks
attention between them, provided the model runs with `use_cache=False` and no `attention_mask`. So
positions restart at each example start, and at the window start for the continuation of a long
example. The first token of each new example is not a training target: it would be predicted from
the end of the previous example, which it cannot see.

Labels are IGNORE_INDEX (-100) on padding, on `<fim_pad>`, and (when isolated) on those example starts.
`cross_document_attention: true` gives the plain concatenation instead: positions 0..seq_length-1.
Batches are made by collators.py.

Window-level FIM (`fim_level: window`, data/examples/fim.py WindowFim): window i then reads stream tokens
[i·stride, (i+1)·stride) with stride = seq_length − WindowFim.reserve(seq_length) (496 of 512, 4,064 of 4,096),
FIM-transforms the files in it, and pads what the sentinels leave of the room; nothing is truncated.

The stream comes from a token store (data/store/token_store.py: memory-mapped, shared by every process of a machine)
or from token rows still in Arrow (a datasets.Dataset or pyarrow table: `ArrowTokenRows`, read chunk by chunk
in place). With a shuffle seed the windows are read in the order of a `Permutation` (data/windows/permutation.py),
computed per index. Cost per rank at 3T tokens (~730M windows of 4,096): the store's index (two int64 per
part), 48 bytes of permutation keys, and one window's arrays at a time.
"""

import os

import numpy as np
import torch

from starcoder2_train.data.examples.fim import WindowFim, WindowFimCounts
from starcoder2_train.data.special_tokens import IGNORE_INDEX, SpecialTokenIds
from starcoder2_train.data.store.token_store import TokenStore, TokenStream, chunk_arrays, input_ids_column
from starcoder2_train.data.windows.permutation import Permutation


class ArrowTokenRows(TokenStream):
    """Token rows (datasets.Dataset or pyarrow table with `input_ids`) read in place as one stream, one part per
    non-empty Arrow chunk: no combine_chunks (no copy, and no 32-bit offsets over the whole stream), each chunk
    read through its own offsets, int64 cumulative starts across chunks (24 bytes a chunk with its number: at
    ~1,000 rows a chunk, 36 MB per rank for 1.5B rows, beside Arrow's own objects for each chunk; a TokenStore
    is the way to train at that scale)."""

    def __init__(self, token_rows):
        self._rows = token_rows
        self._column = input_ids_column(token_rows)
        chunks = [(number, chunk) for number, chunk in enumerate(self._column.chunks) if len(chunk)]
        self._chunk_numbers = np.array([number for number, _ in chunks], dtype=np.int64)
        bounds = [chunk.offsets.to_numpy(zero_copy_only=False)[[0, -1]] for _, chunk in chunks]
        self._index([int(last) - int(first) for first, last in bounds], [len(chunk) for _, chunk in chunks])

    def _part(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        return chunk_arrays(self._column.chunk(int(self._chunk_numbers[p])))

    def __getstate__(self) -> dict:
        return {"rows": self._rows}  # a memory-mapped datasets.Dataset pickles as its file paths

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["rows"])


def open_token_stream(source) -> TokenStream:
    """A TokenStream (a TokenStore, say) as it is; a directory as a TokenStore; token rows as ArrowTokenRows."""
    if isinstance(source, TokenStream):
        return source
    if isinstance(source, (str, os.PathLike)):
        return TokenStore(source)
    return ArrowTokenRows(source)


class PackedDataset(torch.utils.data.Dataset):
    """Map-style view of a token stream as packed windows; O(1) random access, deterministic.

    `token_rows`: a TokenStore, the directory of one, or token rows (a datasets.Dataset or pyarrow table with an
    `input_ids` column). `shuffle_seed` (optional) permutes the windows, so that the trainer can read them
    sequentially and a resumed run continues exactly where it stopped.
    """

    def __init__(
        self,
        token_rows,
        seq_length: int,
        special: SpecialTokenIds,
        cross_document_attention: bool = False,
        shuffle_seed: int | None = None,
        fim: WindowFim | None = None,
    ):
        self.seq_length = seq_length
        self.special = special
        self.cross_document_attention = cross_document_attention
        self.stream = open_token_stream(token_rows)
        self.total_tokens = self.stream.num_tokens
        self.fim = fim
        # With window-level FIM a window reads `stride` stream tokens and keeps the rest for FIM sentinels.
        self.stride = seq_length - (WindowFim.reserve(seq_length) if fim is not None else 0)
        self.num_windows = -(-self.total_tokens // self.stride)
        self.order = None if shuffle_seed is None else Permutation(self.num_windows, shuffle_seed)

    def __len__(self) -> int:
        return self.num_windows

    @property
    def padding_tokens(self) -> int:
        return self.num_windows * self.seq_length - self.total_tokens

    @property
    def efficiency(self) -> float:
        """Real tokens over all tokens in the windows."""
        return self.total_tokens / max(1, self.num_windows * self.seq_length)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range for {self.num_windows} windows")
        if self.order is not None:
            index = self.order[index]
        tokens, inner_starts, _ = self._window_tokens(int(index))
        length = len(tokens)
        pad = self.seq_length - length

        labels = tokens.copy()
        labels[tokens == self.special.fim_pad] = IGNORE_INDEX
        if self.cross_document_attention:
            position_ids = np.arange(self.seq_length, dtype=np.int64)
        else:
            segment_starts = np.concatenate([[0], inner_starts]).astype(np.int64)
            segment_lengths = np.diff(np.concatenate([segment_starts, [length]]))
            position_ids = np.arange(length, dtype=np.int64) - np.repeat(segment_starts, segment_lengths)
            labels[inner_starts] = IGNORE_INDEX
            if pad:
                position_ids = np.concatenate([position_ids, np.arange(pad, dtype=np.int64)])
        if pad:
            tokens = np.concatenate([tokens, np.full(pad, self.special.eos, dtype=np.int64)])
            labels = np.concatenate([labels, np.full(pad, IGNORE_INDEX, dtype=np.int64)])
        return {"input_ids": tokens, "labels": labels, "position_ids": position_ids}

    def _window_tokens(self, index: int):
        """(tokens, example starts inside, WindowFimCounts) of window `index` of the stream (not the order)."""
        begin = index * self.stride
        end = min(begin + self.stride, self.total_tokens)
        tokens = self.stream.tokens(begin, end)
        inner_starts = self.stream.example_starts_in(begin, end) - begin  # relative to the window
        if self.fim is None:
            return tokens, inner_starts, None
        starts = np.zeros(len(tokens), dtype=bool)
        starts[inner_starts] = True
        metadata = self.stream.first_token_of_example_at(begin) == self.special.repo_name
        tokens, starts, counts = self.fim(index, tokens, starts, metadata, self.seq_length)
        return tokens, np.flatnonzero(starts[1:]) + 1, counts

    def sample_fim_counts(self, windows: int = 1000) -> WindowFimCounts:
        """WindowFimCounts of the first `windows` windows in training order (each transformed again: about a
        second per thousand 4k windows), for the data report."""
        counts = WindowFimCounts()
        for position in range(min(windows, self.num_windows)):
            counts.add(self._window_tokens(int(self.order[position]) if self.order is not None else position)[2])
        return counts
