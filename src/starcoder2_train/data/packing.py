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
"""

import numpy as np
import pyarrow as pa
import torch

from starcoder2_train.data.special_tokens import IGNORE_INDEX, SpecialTokenIds


class PackedDataset(torch.utils.data.Dataset):
    """Map-style view of a token-row dataset as packed windows; O(1) random access, deterministic.

    `shuffle_seed` (optional) permutes the windows, so that the trainer can read them sequentially
    and a resumed run continues exactly where it stopped.
    """

    def __init__(
        self,
        token_rows,
        seq_length: int,
        special: SpecialTokenIds,
        cross_document_attention: bool = False,
        shuffle_seed: int | None = None,
    ):
        self.seq_length = seq_length
        self.special = special
        self.cross_document_attention = cross_document_attention
        table = token_rows.data.table if hasattr(token_rows, "data") else token_rows
        if hasattr(token_rows, "_indices") and token_rows._indices is not None:
            token_rows = token_rows.flatten_indices()
            table = token_rows.data.table
        column = table.column("input_ids")
        self.tokens = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        lengths = np.diff(self.tokens.offsets.to_numpy())
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # example starts in the stream
        self.total_tokens = int(self.starts[-1])
        self.num_windows = -(-self.total_tokens // seq_length)
        self.order = None
        if shuffle_seed is not None:
            self.order = np.random.default_rng(shuffle_seed).permutation(self.num_windows)

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
            index = int(self.order[index])
        begin = index * self.seq_length
        end = min(begin + self.seq_length, self.total_tokens)
        flat = self.tokens.values
        tokens = flat.slice(begin, end - begin).to_numpy(zero_copy_only=False).astype(np.int64)
        # Example starts inside (begin, end), relative to the window.
        first = np.searchsorted(self.starts, begin, side="right")
        last = np.searchsorted(self.starts, end, side="left")
        inner_starts = self.starts[first:last] - begin
        length = end - begin
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
