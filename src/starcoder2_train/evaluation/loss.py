"""Loss and perplexity on held-out token rows, per language.

Each row (an example: `input_ids` and `language`) is scored on its own, never packed with another, so
that a language's number does not depend on its neighbours. A row longer than `seq_length` is cut into
windows that overlap by one token: every token after the first of the row is predicted exactly once, with
the context of its own window (a window does not see the one before it).
Loss is the mean negative log-likelihood per predicted token (nats); perplexity is exp(loss).
"""

import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from starcoder2_train.data.special_tokens import IGNORE_INDEX


def windows(input_ids: list[int], seq_length: int) -> list[list[int]]:
    """Windows of at most seq_length tokens, each starting on the last token of the one before."""
    if seq_length < 2:
        raise ValueError(f"seq_length must be at least 2, got {seq_length}.")
    stride = seq_length - 1
    return [input_ids[start : start + seq_length] for start in range(0, max(1, len(input_ids) - 1), stride)]


@torch.no_grad()
def evaluate_loss(model, dataset, *, seq_length: int, batch_size: int = 8) -> dict:
    """Token-weighted loss and perplexity over all rows, and per language.

    dataset: a datasets.Dataset (or list of dicts) with `input_ids` (list of int) and `language` (str).
    Returns {"loss", "perplexity", "tokens", "loss/<language>", "perplexity/<language>", "tokens/<language>"}.
    """
    pieces = []  # (language, window)
    for row in dataset:
        pieces += [(row["language"], window) for window in windows(row["input_ids"], seq_length) if len(window) > 1]
    if not pieces:
        raise ValueError("evaluate_loss: no row has two tokens or more; there is nothing to predict.")
    pieces.sort(key=lambda piece: -len(piece[1]))  # similar lengths together: less padding
    nll, tokens = defaultdict(float), defaultdict(int)
    was_training, device = model.training, model.device
    model.eval()
    try:
        for start in range(0, len(pieces), batch_size):
            batch = pieces[start : start + batch_size]
            width = len(batch[0][1])
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (_, window) in enumerate(batch):
                input_ids[row, : len(window)] = torch.tensor(window)
                attention_mask[row, : len(window)] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
            per_token = F.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), targets, reduction="none", ignore_index=IGNORE_INDEX
            )
            for row, (language, window) in enumerate(batch):
                nll[language] += per_token[row].sum().item()
                tokens[language] += len(window) - 1
    finally:
        model.train(was_training)
    total_nll, total_tokens = sum(nll.values()), sum(tokens.values())
    metrics = {
        "loss": total_nll / total_tokens,
        "perplexity": math.exp(total_nll / total_tokens),
        "tokens": total_tokens,
    }
    for language in sorted(tokens):
        loss = nll[language] / tokens[language]
        metrics.update(
            {
                f"loss/{language}": loss,
                f"perplexity/{language}": math.exp(loss),
                f"tokens/{language}": tokens[language],
            }
        )
    return metrics
