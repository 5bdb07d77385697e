"""Loss and perplexity on held-out token rows, per language, with the rows' windows split across ranks.

Each row (an example: `input_ids` and `language`) is scored on its own, never packed with another, so
that a language's number does not depend on its neighbours. A row longer than `seq_length` is cut into
windows that overlap by one token: every token after the first of the row is predicted exactly once, with
the context of its own window (a window does not see the one before it).
Loss is the mean negative log-likelihood per predicted token (nats); perplexity is exp(loss).

Across ranks: the windows (row, start, stop) of every row are listed from the rows' lengths alone, longest first,
and window i is scored by rank i % world_size (evaluation/ranks.py), which reads only its windows' tokens; the
negative log-likelihood and token count of each language are summed over the ranks, so the figures are those of
one rank scoring everything (up to float addition order: tests/test_held_out_set.py, 2 processes).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from starcoder2_train.data.special_tokens import IGNORE_INDEX
from starcoder2_train.evaluation.ranks import share, sum_across_ranks


def windows(input_ids: list[int], seq_length: int) -> list[list[int]]:
    """Windows of at most seq_length tokens, each starting on the last token of the one before."""
    if seq_length < 2:
        raise ValueError(f"seq_length must be at least 2, got {seq_length}.")
    stride = seq_length - 1
    return [input_ids[start : start + seq_length] for start in range(0, max(1, len(input_ids) - 1), stride)]


class ListRows:
    """Rows given as dicts (a list or datasets.Dataset of {input_ids, language}), with the interface of
    held_out_set.TokenRows: `lengths`, `language(row)`, `tokens(row, start, stop)`."""

    def __init__(self, dataset):
        self._ids = [list(row["input_ids"]) for row in dataset]
        self._languages = [row["language"] for row in dataset]
        self.lengths = np.array([len(ids) for ids in self._ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ids)

    def language(self, row: int) -> str:
        return self._languages[row]

    def tokens(self, row: int, start: int, stop: int):
        return self._ids[row][start:stop]


def window_spans(lengths, seq_length: int) -> list[tuple[int, int, int]]:
    """(row, start, stop) of every window with a token to predict (`windows`' cuts), longest first."""
    if seq_length < 2:
        raise ValueError(f"seq_length must be at least 2, got {seq_length}.")
    stride = seq_length - 1
    spans = [
        (row, start, min(start + seq_length, length))
        for row, length in enumerate(int(n) for n in lengths)
        for start in range(0, max(1, length - 1), stride)
        if min(start + seq_length, length) - start > 1
    ]
    spans.sort(key=lambda span: (span[1] - span[2], span[0], span[1]))  # similar lengths together: less padding
    return spans


@torch.no_grad()
def evaluate_loss(model, dataset, *, seq_length: int, batch_size: int = 8, rank: int = 0, world_size: int = 1) -> dict:
    """Token-weighted loss and perplexity over all rows, and per language, summed over `world_size` ranks.

    dataset: a datasets.Dataset or list of dicts with `input_ids` (list of int) and `language` (str), or rows
    with ListRows' interface (held_out_set.TokenRows). Every rank passes the same rows and scores its share.
    Returns {"loss", "perplexity", "tokens", "loss/<language>", "perplexity/<language>", "tokens/<language>"}.
    """
    rows = dataset if hasattr(dataset, "lengths") else ListRows(dataset)
    spans = window_spans(rows.lengths, seq_length)
    if not spans:
        raise ValueError("evaluate_loss: no row has two tokens or more; there is nothing to predict.")
    languages = sorted({rows.language(row) for row in {span[0] for span in spans}})
    column = {language: index for index, language in enumerate(languages)}
    nll, tokens = [0.0] * len(languages), [0] * len(languages)
    mine = share(len(spans), rank, world_size)
    was_training, device = model.training, model.device
    model.eval()
    try:
        for start in range(0, len(mine), batch_size):
            # None: a padding item (ranks.share), scored as window 0 and discarded
            batch = [(index, spans[0 if index is None else index]) for index in mine[start : start + batch_size]]
            pieces = [rows.tokens(*span) for _, span in batch]
            width = max(len(piece) for piece in pieces)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, piece in enumerate(pieces):
                input_ids[row, : len(piece)] = torch.as_tensor(np.asarray(piece, dtype=np.int64))
                attention_mask[row, : len(piece)] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
            per_token = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), targets, reduction="none", ignore_index=IGNORE_INDEX
            )
            sums = per_token.sum(dim=1).tolist()
            for (index, span), total, piece in zip(batch, sums, pieces):
                if index is not None:
                    nll[column[rows.language(span[0])]] += total
                    tokens[column[rows.language(span[0])]] += len(piece) - 1
    finally:
        model.train(was_training)
    reduced = sum_across_ranks(nll + tokens, device, world_size)
    nll, tokens = reduced[: len(languages)], [round(count) for count in reduced[len(languages) :]]
    total_nll, total_tokens = sum(nll), sum(tokens)
    metrics = {
        "loss": total_nll / total_tokens,
        "perplexity": math.exp(total_nll / total_tokens),
        "tokens": total_tokens,
    }
    for index, language in enumerate(languages):
        loss = nll[index] / tokens[index]
        metrics.update(
            {
                f"loss/{language}": loss,
                f"perplexity/{language}": math.exp(loss),
                f"tokens/{language}": tokens[index],
            }
        )
    return metrics
