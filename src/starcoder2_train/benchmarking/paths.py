"""The two training paths benchmark.py compares, on the same documents.

- ours: the recipe as given: packed windows with per-document positions (PackedDataset), the recipe's
  attention and its collator, loss_chunk_size, checkpointing and compile keys.
- plain: what one writes with transformers alone: one row per document piece of at most seq_length tokens
  (nothing dropped, as tokenizing with return_overflowing_tokens gives), rows in random order, padded to the
  longest row of the batch with an attention_mask, default attention (sdpa), transformers' own loss and
  default optimizer. It shares SHARED_KEYS with ours; `--plain key=value` overrides its TrainingArguments.
"""

import dataclasses
import json
from collections.abc import Callable

import torch

from starcoder2_train.benchmarking.documents import token_rows
from starcoder2_train.configs import ModelArguments, PretrainingArguments
from starcoder2_train.data.collators import make_collator
from starcoder2_train.data.packing import PackedDataset
from starcoder2_train.data.special_tokens import IGNORE_INDEX, SpecialTokenIds

# Training keys the plain path shares with ours: the same optimisation problem, batch and precision.
SHARED_KEYS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "bf16",
    "fp16",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "lr_scheduler_type",
    "warmup_steps",
    "seed",
    "dataloader_num_workers",
)


@dataclasses.dataclass
class TrainingPath:
    """One way of training the model: what `steps.run_path` hands the Trainer."""

    model_args: ModelArguments
    attention: str
    training_args: PretrainingArguments
    dataset: torch.utils.data.Dataset
    collator: Callable


class PlainRows(torch.utils.data.Dataset):
    """One row per document piece of at most seq_length tokens, in document order (the Trainer shuffles)."""

    def __init__(self, documents, seq_length: int):
        self.pieces = [d[i : i + seq_length] for d in documents for i in range(0, len(d), seq_length)]

    def __len__(self):
        return len(self.pieces)

    def __getitem__(self, index):
        return {"input_ids": self.pieces[index]}


class PadToLongest:
    """Right-pad to the batch's longest row; attention_mask 0 and labels -100 on the padding."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows):
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, : len(row["input_ids"])] = torch.as_tensor(row["input_ids"])
            attention_mask[index, : len(row["input_ids"])] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def plain_training_args(ours: PretrainingArguments, overrides: list[str], output_dir: str) -> PretrainingArguments:
    """transformers' defaults (random order, no fast-path key), the shared keys copied from ours, then --plain."""
    values = {key: getattr(ours, key) for key in SHARED_KEYS}
    for item in overrides:
        key, _, value = item.partition("=")
        values[key] = {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(values[key], str) and value.startswith("{"):
            values[key] = json.loads(value)
    return PretrainingArguments(
        output_dir=output_dir,
        max_steps=ours.max_steps,
        logging_steps=ours.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=ours.use_cpu,
        peak_flops=ours.peak_flops,
        disable_tqdm=True,
        train_sampling_strategy="random",
        **values,
    )


def ours_path(model_args, data_args, training_args, attention: str, documents, special: SpecialTokenIds):
    packed = PackedDataset(
        token_rows(documents),
        data_args.seq_length,
        special,
        cross_document_attention=data_args.cross_document_attention,
        shuffle_seed=training_args.seed,
    )
    return TrainingPath(model_args, attention, training_args, packed, make_collator(attention))


def plain_path(model_args, training_args, overrides: list[str], output_dir: str, documents, seq_length: int, pad_id):
    return TrainingPath(
        dataclasses.replace(model_args, attn_implementation="sdpa"),
        "sdpa",
        plain_training_args(training_args, overrides, output_dir),
        PlainRows(documents, seq_length),
        PadToLongest(pad_id),
    )
