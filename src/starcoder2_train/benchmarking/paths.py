"""The training paths benchmark.py compares, on the same documents.

- ours: the recipe as given: packed windows with per-document positions (PackedDataset), the recipe's
  attention and its collator, loss kernel, checkpointing and compile keys.
- plain: what one writes with transformers alone: one row per document piece of at most seq_length tokens
  (nothing dropped, as tokenizing with return_overflowing_tokens gives), rows in random order, padded to the
  longest row of the batch with an attention_mask, default attention (sdpa), transformers' own loss.
- flattening: the best path transformers offers without this project: `DataCollatorWithFlattening` joins
  the same pieces, in random order, into one row per micro batch with position_ids that restart at every
  piece and no attention_mask; attention is flash_attention_2 where transformers accepts it (the flash-attn
  distribution on CUDA, model/flash.py `flash_attention_2_available`; it reads the documents from the
  collator's cu_seq_lens), else sdpa, for which transformers builds a per-document
  block mask from the position_ids (masking_utils.find_packed_sequence_indices, 5.24). The pieces per micro
  batch are chosen so that its mean tokens equal ours (seq_length x micro batch).

The baselines share SHARED_KEYS with ours (precision, optimizer, batch, DeepSpeed config) and run with the
project's keys at transformers' behaviour (loss_kernel transformers, no float8, no compile, no partial
checkpointing); `--plain key=value` / `--flattening key=value` override their TrainingArguments.
"""

import dataclasses
import json
from collections.abc import Callable

import numpy as np
import torch
from transformers import DataCollatorWithFlattening

from starcoder2_train.benchmarking.documents import token_rows
from starcoder2_train.configs import FLASH_ATTENTION_2, ModelArguments, PretrainingArguments
from starcoder2_train.data.batches.collators import make_collator
from starcoder2_train.data.special_tokens import IGNORE_INDEX, SpecialTokenIds
from starcoder2_train.data.windows.packing import PackedDataset
from starcoder2_train.model.flash import flash_attention_2_available

BASELINES = ("plain", "flattening")

# Training keys the baselines share with ours: the same optimisation problem, batch, precision and engine.
SHARED_KEYS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "bf16",
    "fp16",
    "optim",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "seed",
    "dataloader_num_workers",
    "logging_nan_inf_filter",
    "deepspeed",
)
# The project's keys, at the values that give transformers' own behaviour.
TRANSFORMERS_BEHAVIOUR = dict(
    loss_kernel="transformers",
    loss_chunk_size=0,
    float8=False,
    compile_layers=False,
    gradient_checkpointing_layers=None,
)


@dataclasses.dataclass
class TrainingPath:
    """One way of training the model: what `steps.run_path` hands the Trainer."""

    model_args: ModelArguments
    attention: str
    training_args: PretrainingArguments
    dataset: torch.utils.data.Dataset
    collator: Callable
    details: dict = dataclasses.field(default_factory=dict)


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


def parse_overrides(items: list[str]) -> dict:
    """`key=value` words into TrainingArguments values: JSON where the value is JSON (numbers, true/false,
    {...}), else the string."""
    values = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            values[key] = json.loads({"True": "true", "False": "false"}.get(value, value))
        except ValueError:
            values[key] = value
    return values


def baseline_training_args(ours: PretrainingArguments, overrides: list[str], output_dir: str, **keys):
    """transformers' defaults (random order, the project's keys at transformers' behaviour), the shared keys
    copied from ours, then `keys` (set by the path), then the command line's overrides."""
    values = {key: getattr(ours, key) for key in SHARED_KEYS}
    known = {field.name for field in dataclasses.fields(PretrainingArguments)}
    values.update({key: value for key, value in TRANSFORMERS_BEHAVIOUR.items() if key in known}, **keys)
    values.update(parse_overrides(overrides))
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


def plain_training_args(ours: PretrainingArguments, overrides: list[str], output_dir: str) -> PretrainingArguments:
    return baseline_training_args(ours, overrides, output_dir)


def ours_path(model_args, data_args, training_args, attention: str, documents, special: SpecialTokenIds):
    packed = PackedDataset(
        token_rows(documents),
        data_args.seq_length,
        special,
        cross_document_attention=data_args.cross_document_attention,
        shuffle_seed=training_args.seed,
    )
    details = {"packing_efficiency": packed.efficiency, "windows": len(packed)}
    return TrainingPath(model_args, attention, training_args, packed, make_collator(attention), details)


def baseline_model_args(model_args: ModelArguments, attention: str) -> ModelArguments:
    """The model as transformers alone would build it: `attention`, PyTorch's own flash kernel."""
    known = {field.name for field in dataclasses.fields(model_args)}
    flash = {"flash_attention_impl": "fa2"} if "flash_attention_impl" in known else {}
    return dataclasses.replace(model_args, attn_implementation=attention, **flash)


def plain_path(model_args, training_args, overrides: list[str], output_dir: str, documents, seq_length: int, pad_id):
    rows = PlainRows(documents, seq_length)
    return TrainingPath(
        baseline_model_args(model_args, "sdpa"),
        "sdpa",
        plain_training_args(training_args, overrides, output_dir),
        rows,
        PadToLongest(pad_id),
        {"rows": len(rows)},
    )


def flattening_attention(cuda: bool) -> str:
    """flash_attention_2 where transformers accepts it (`flash_attention_2_available`: flash-attn on CUDA; a
    flash-attn-4 install alone is not it), else sdpa (with transformers' packed mask)."""
    return FLASH_ATTENTION_2 if flash_attention_2_available(cuda) else "sdpa"


def documents_per_batch(piece_lengths, tokens_per_micro_batch: int) -> int:
    """Pieces per flattened micro batch whose mean length gives `tokens_per_micro_batch` tokens (at least 1)."""
    return max(1, round(tokens_per_micro_batch / float(np.mean(piece_lengths))))


def flattening_path(model_args, training_args, overrides: list[str], output_dir: str, documents, seq_length: int):
    """The pieces of `documents` (as the plain path cuts them) through DataCollatorWithFlattening."""
    rows = PlainRows(documents, seq_length)
    lengths = [len(piece) for piece in rows.pieces]
    tokens = seq_length * training_args.per_device_train_batch_size
    per_batch = documents_per_batch(lengths, tokens)
    cuda = torch.cuda.is_available() and not training_args.use_cpu
    attention = flattening_attention(cuda)
    args = baseline_training_args(training_args, overrides, output_dir, per_device_train_batch_size=per_batch)
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=attention == FLASH_ATTENTION_2)
    details = {
        "documents_per_batch": per_batch,
        "mean_tokens_per_micro_batch": per_batch * float(np.mean(lengths)),
        "ours_tokens_per_micro_batch": tokens,
        "rows": len(rows),
    }
    return TrainingPath(baseline_model_args(model_args, attention), attention, args, rows, collator, details)
