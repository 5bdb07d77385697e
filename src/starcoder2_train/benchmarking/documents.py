"""The documents a benchmark trains on: synthetic ones, a token file (.npz), or the project's pipeline.

A token file holds token rows without any preprocessing (`tokens`, `lengths`, `special`), so that a machine
with only torch and transformers can run on exactly the rows the pipeline produced elsewhere; it is written
by `benchmark.py --save_token_file` and read by `--token_file` (the training benchmark and the device check's
attention kernels alike). A document is one repository example: a 1-d int64 array ending in <|endoftext|>.
"""

import dataclasses

import numpy as np
import pyarrow as pa

from starcoder2_train.data.special_tokens import SpecialTokenIds

SYNTHETIC_SPECIAL = SpecialTokenIds(
    eos=0, fim_prefix=1, fim_middle=2, fim_suffix=3, fim_pad=4, repo_name=5, file_sep=6
)


def synthetic_documents(count: int, vocab_size: int, seed: int = 0) -> list[np.ndarray]:
    """Documents with log-normal lengths (median 2,000 tokens, many short, a long tail) and random tokens."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=np.log(2000), sigma=1.2, size=count), 16, 200_000).astype(int)
    return [np.append(rng.integers(7, vocab_size, size=n - 1), 0) for n in lengths]  # ends in <|endoftext|>


def save_token_file(path: str, documents, special: SpecialTokenIds) -> None:
    tokens = np.concatenate(documents)
    dtype = np.uint16 if tokens.max() < 2**16 else np.int32
    np.savez_compressed(
        path,
        tokens=tokens.astype(dtype),
        lengths=np.array([len(d) for d in documents]),
        special=np.array(dataclasses.astuple(special)),
    )


def load_token_file(path: str) -> tuple[list[np.ndarray], SpecialTokenIds]:
    """The documents and special token ids of a file written by `save_token_file`."""
    with np.load(path) as data:
        tokens, lengths, special = data["tokens"], data["lengths"], data["special"]
    documents = np.split(tokens.astype(np.int64), np.cumsum(lengths)[:-1])
    return documents, SpecialTokenIds(*special.tolist())


def load_documents(model_args, data_args, training_args, token_file=None, synthetic=None):
    """(documents, SpecialTokenIds, vocabulary size needed, description of the data), from `token_file`,
    else `synthetic` documents, else the recipe's dataset through the project's pipeline."""
    if token_file:
        documents, special = load_token_file(token_file)
        vocab_needed = max(int(d.max()) for d in documents if len(d)) + 1
        return documents, special, vocab_needed, f"token file {token_file}"
    if synthetic:
        vocab = 49152 if model_args.model_config and model_args.model_config.startswith("starcoder2") else 4096
        return (
            synthetic_documents(synthetic, vocab, training_args.seed),
            SYNTHETIC_SPECIAL,
            vocab,
            f"{synthetic} synthetic documents (log-normal lengths, median 2000 tokens)",
        )
    from starcoder2_train.data.pipeline import load_token_rows  # the datasets library, only for this source
    from starcoder2_train.data.tokens.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(data_args.tokenizer_name_or_path or model_args.model_name_or_path)
    rows, _ = load_token_rows(data_args, tokenizer, training_args.seed)
    documents = [np.asarray(ids, dtype=np.int64) for ids in rows["input_ids"]]
    return (
        documents,
        SpecialTokenIds.from_tokenizer(tokenizer),
        len(tokenizer),
        f"{data_args.dataset_name_or_path} through the project's pipeline ({len(documents)} repository examples)",
    )


def first_documents(documents, max_tokens: int):
    """The first documents, up to the one that reaches `max_tokens` tokens."""
    keep = int(np.searchsorted(np.cumsum([len(d) for d in documents]), max_tokens)) + 1
    return documents[:keep]


def token_rows(documents) -> pa.Table:
    """The documents as the pipeline's token rows (an `input_ids` column of int32 lists), for PackedDataset."""
    return pa.table({"input_ids": pa.array([d.tolist() for d in documents], type=pa.list_(pa.int32()))})


def describe(documents, seq_length: int) -> dict:
    lengths = np.array([len(d) for d in documents])
    return {
        "documents": len(lengths),
        "tokens": int(lengths.sum()),
        "length_percentiles_10_50_90": [int(v) for v in np.percentile(lengths, [10, 50, 90])],
        "share_of_documents_longer_than_seq_length": float((lengths > seq_length).mean()),
    }
