"""The preparation's steps when the tokens carry file-level FIM (data/prepare.py picks them): `fim_level: file` at
fim_rate and fim_fragment_rate above 0, so every data epoch cuts other files at other places and is other text,
written as a copy of its own (train/epoch-<e>/).

- `ExampleTokenizer`: repository examples, FIM and tokens for every data epoch asked for, with this project's own
  ExampleTransform (datatrove's tokenizer parses special tokens in the text, which must never happen here).
- `StoreWriter`: one token-store part per (split, epoch) and task, `part-<r>-of-<N>`, and the held-out
  repositories themselves as parquet for the evaluation tasks (data/prepare_pieces.py's HeldOutWriter).

What it costs: a full copy per data epoch (2 bytes a token: ~1.2 TB an epoch of ~600B tokens at StarCoder2-3B's
scale), and in memory a repository as pieces of text and lists of ids, ≥ 36 bytes a token, per epoch; tokens
stored once (data/prepare_pieces.py) cost 2 bytes a token once and 8 bytes a repository an epoch.
first_epoch > 0 prepares more epochs of such a store (scripts/prepare_data.py --epochs), eval written before.
"""

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from starcoder2_train.configs import DataArguments
from starcoder2_train.data.examples.fim import prepared_rates
from starcoder2_train.data.pipeline import ExampleTransform
from starcoder2_train.data.prepare_pieces import HeldOutWriter, in_batches
from starcoder2_train.data.store.prepared import part_name, store_directory
from starcoder2_train.data.store.token_writer import TokenStoreWriter
from starcoder2_train.data.tokens.tokenization import PieceTokenizer
from starcoder2_train.data.tokens.tokenizer import load_tokenizer


class ExampleTokenizer(PipelineStep):
    """Documents → token ids of every epoch (metadata["input_ids"][epoch]), with this project's tokenization."""

    name, type = "repository examples + FIM + tokens", "🔢 - TOKENIZER"

    def __init__(self, data_args: DataArguments, seed: int, epochs: int, first_epoch: int = 0):
        super().__init__()
        self.tokenizer_name = data_args.tokenizer_name_or_path
        self.rates = prepared_rates(data_args)  # none with fim_level: window (FIM per window, in training)
        self.repo_metadata_rate, self.seed, self.epochs = data_args.repo_metadata_rate, seed, epochs
        self.first_epoch = first_epoch  # > 0: more epochs of a prepared store (scripts/prepare_data.py)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        pieces = PieceTokenizer(load_tokenizer(self.tokenizer_name), self.tokenizer_name)
        transforms = [
            ExampleTransform(pieces, self.rates, self.repo_metadata_rate, self.seed, epoch)
            for epoch in range(self.first_epoch, self.epochs)
        ]
        for batch in in_batches(data):
            yield from self._tokenize(batch, transforms)

    def _tokenize(self, documents: list[Document], transforms):
        rows = {"repo_name": [d.id for d in documents], "files": [d.metadata["files"] for d in documents]}
        for document in documents:
            document.metadata["input_ids"] = {}
        for transform in transforms:
            with self.track_time(unit="batch"):
                out = transform(rows)
            for index, document in enumerate(documents):
                document.metadata["input_ids"][transform.epoch] = out["input_ids"][index]
                if transform.epoch == self.first_epoch:
                    split = document.metadata["split"]
                    self.stat_update(f"{split} repositories")  # here: after every step that drops repositories
                    self.stat_update(f"{split} files", value=out["num_files"][index])
                    self.stat_update(f"{split} files FIM PSM", value=out["num_fim_psm"][index])
                    self.stat_update(f"{split} files FIM SPM", value=out["num_fim_spm"][index])
                    self.stat_update(f"{split} tokens", value=int(out["num_tokens"][index]))
        yield from documents


class StoreWriter(PipelineStep):
    """Documents → this task's token-store parts (train epochs, eval) and its held-out repositories."""

    name, type = "token stores", "💽 - WRITER"

    def __init__(self, output_dir: str, epochs: int, vocab_size: int, first_epoch: int = 0):
        super().__init__()
        self.output_dir, self.epochs, self.vocab_size = output_dir, epochs, vocab_size
        self.first_epoch = first_epoch  # > 0: train epochs [first_epoch, epochs) only; eval was written before

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        name = part_name(rank, world_size)
        parts = [("train", epoch) for epoch in range(self.first_epoch, self.epochs)]
        parts += [("eval", 0)] if self.first_epoch == 0 else []
        writers = {
            (split, epoch): TokenStoreWriter(store_directory(self.output_dir, split, epoch), name, self.vocab_size)
            for split, epoch in parts
        }
        held_out = HeldOutWriter(self.output_dir, rank, world_size) if self.first_epoch == 0 else None
        for document in data or ():
            split = document.metadata["split"]
            epochs = (
                range(self.first_epoch, self.epochs) if split == "train" else (0,) if self.first_epoch == 0 else ()
            )
            for epoch in epochs:
                writers[split, epoch].add(document.metadata["input_ids"][epoch])
            if split == "eval" and held_out is not None:
                held_out.add(document)
            yield document
        if held_out is not None:
            held_out.close()
        for writer in writers.values():
            writer.close()
