"""Windows → batches: what the model receives, chosen for the attention kernel by `make_collator`.

A packed window (packing.py) keeps its documents apart by `position_ids` that restart at 0 at each
document. The collators here stack windows and add what a kernel needs to see those boundaries:

- `PackedCollator`: `input_ids`, `labels`, `position_ids` stacked to (batch, seq_length), no
  `attention_mask` (transformers' eager, sdpa, flex_attention and `sdpa_blocked` read the documents from
  the positions). `flatten=True` joins the batch into one row, which is how transformers' flash_attention_2
  recognises packed sequences (only at batch size 1).
- `DocumentBoundaryCollator`: adds `document_boundaries` (flash-attn's `cu_seq_lens` and `max_length`),
  computed here on the CPU in the data-loader worker, so that `sdpa_varlen` never waits for the GPU to find
  them. Cost: one int32 per document of the batch. The longest document reaches a compiled layer as a
  symbolic size, not a constant (model/attention.py, `_mark_documents_dynamic`).

`make_collator(attn_implementation)` is the one place that picks among them; scripts call it.
"""

import numpy as np
import torch

from starcoder2_train.configs import FLASH_ATTENTION_2, SDPA_VARLEN
from starcoder2_train.data.special_tokens import IGNORE_INDEX


class PackedCollator:
    """Stacks packed windows into a batch; no attention_mask, so packing is read from position_ids.

    `flatten=True` joins the batch into one row of batch·seq_length tokens, which is how
    flash_attention_2 in transformers recognises packed sequences (it does so only for batch size 1). The
    loss shifts labels by one along the row, so there the last token of a window would be trained to predict
    the first token of the next, unrelated, window: the first label of every window is IGNORE_INDEX.
    """

    def __init__(self, flatten: bool = False):
        self.flatten = flatten

    def __call__(self, windows: list[dict]) -> dict:
        batch = {
            key: torch.from_numpy(np.stack([w[key] for w in windows]))
            for key in ("input_ids", "labels", "position_ids")
        }
        if self.flatten:
            batch["labels"][:, 0] = IGNORE_INDEX  # never a target across windows (a window's own start never is)
            batch = {key: value.reshape(1, -1) for key, value in batch.items()}
        return batch


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) → True where a document starts: at each row's start and where positions do not count on."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) → the index of each token's document in its row (1, 2, ...)."""
    return document_starts(position_ids).cumsum(dim=1)


def cumulative_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) → int32 offsets of each document start in the flattened batch of batch·seq tokens, then the
    total: flash-attn's `cu_seq_lens`. On a GPU tensor this waits for the device (`nonzero` sizes its output)."""
    batch, seq = position_ids.shape
    starts = document_starts(position_ids).reshape(-1).nonzero().flatten()
    total = torch.tensor([batch * seq], device=starts.device)
    return torch.cat([starts, total]).to(torch.int32)


def document_boundaries(position_ids: torch.Tensor) -> dict:
    """flash-attn's variable-length arguments for the batch flattened to one stream of batch·seq tokens.

    `cu_seq_lens_q`/`_k`: `cumulative_lengths`; `max_length_q`/`_k`: the longest document, as a Python int (which
    sdpa_varlen passes to the kernel: it sizes the kernel's grid, model/attention.py). Names as transformers'
    FlashAttentionKwargs, so flash_attention_2 reads them too.
    """
    cu_seq_lens = cumulative_lengths(position_ids)
    max_length = int(cu_seq_lens.diff().max())
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


class DocumentBoundaryCollator:
    """Wrap a collator that returns `position_ids`: add `document_boundaries` of the batch, computed on the CPU."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        return {**batch, **document_boundaries(batch["position_ids"])}


def make_collator(attn_implementation: str):
    """The collator for a resolved attention implementation (after `model.factory.choose_attention`).

    flash_attention_2: one flattened row per batch (transformers finds the documents from `position_ids`);
    sdpa_varlen: stacked rows plus the document boundaries; every other kernel: stacked rows, the documents
    read from `position_ids`.
    """
    if attn_implementation == "auto":
        raise ValueError("make_collator: resolve attn_implementation 'auto' with choose_attention first.")
    if attn_implementation == FLASH_ATTENTION_2:
        return PackedCollator(flatten=True)
    if attn_implementation == SDPA_VARLEN:
        return DocumentBoundaryCollator(PackedCollator())
    return PackedCollator()
