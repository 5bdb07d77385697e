"""The preparation's steps when tokens are stored once (data/prepare.py picks them): no file-level FIM in the
prepared tokens (`prepared_rates` all zero: fim_level window, or fim_rate 0), so every data epoch is the same
text in another order, and data/windows/assembly.py renders it while training reads.

- `RepositoryPieces`: each repository's name, `path\\n` and contents tokenized file by file into int32 numpy
  arrays (data/tokens/tokenization.py's `encode_arrays`: structure tokens are never parsed from the text), files
  in canonical (path, content) order; the documents of one batch of REPOSITORIES_PER_BATCH go through the
  tokenizer together, a megabyte of text at a time.
- `PieceStoreWriter`: this task's part of the train piece store (SPLIT/pieces/, data/store/pieces.py) and of the
  eval one, and its held-out repositories as parquet, as prepare.py's StoreWriter does for per-epoch stores.

Memory per task, beside the reader's batch of rows: the batch's token arrays, 4 bytes a token (a repository
capped at max_repository_bytes by the reader: 32 MB of code, ~10M tokens at StarCoder2's ~3.3 bytes a token,
40 MB), one megabyte of text's Encodings (tens of MB), and the writers' buffers (~10 MB each). The per-epoch
path (ExampleTransform) holds a repository as pieces of text and lists of ids, ≥ 36 bytes a token, per epoch.
"""

import os

import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from starcoder2_train.data.sources.shards import REPOSITORIES_PER_BATCH
from starcoder2_train.data.store.pieces import PieceWriter
from starcoder2_train.data.store.prepared import held_out_part_path, part_name, pieces_directory
from starcoder2_train.data.tokens.tokenization import PieceTokenizer
from starcoder2_train.data.tokens.tokenizer import load_tokenizer

HELD_OUT_SCHEMA = pa.schema(
    [
        ("repo_name", pa.string()),
        ("files", pa.list_(pa.struct([("path", pa.string()), ("content", pa.string()), ("language", pa.string())]))),
    ]
)


def canonical_files(files: list[dict]) -> list[tuple[str, str]]:
    """(path, content) of each file, sorted as build_example sorts them before its shuffle."""
    return sorted((f["path"], f["content"]) for f in files)


def repository_parts(files: list[dict], max_bytes: int) -> list[list[dict]]:
    """The repository's files as one part, or, over `max_bytes` of content, as consecutive parts of at most
    `max_bytes` each (whole files in (path, content) order; a file larger than the bound is a part alone).
    Each part is then an example of its own: a window of 4k-16k tokens (13-50 KB of code) never spans the cut
    between two parts of 32 MB, so only the files' neighbours across the cut change."""
    sizes = [len(f["content"].encode("utf-8", "surrogatepass")) for f in files]
    if sum(sizes) <= max_bytes:
        return [files]
    parts, size = [[]], 0
    for size_of, f in sorted(zip(sizes, files), key=lambda pair: (pair[1]["path"], pair[1]["content"])):
        if parts[-1] and size + size_of > max_bytes:
            parts.append([])
            size = 0
        parts[-1].append(f)
        size += size_of
    return parts


class RepositoryPieces(PipelineStep):
    """Documents → the same, with metadata["pieces"] = (name ids, [(path\\n ids, content ids) per file])."""

    name, type = "repository pieces (tokens stored once)", "🔢 - TOKENIZER"

    def __init__(self, tokenizer_name: str):
        super().__init__()
        self.tokenizer_name = tokenizer_name

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        pieces = PieceTokenizer(load_tokenizer(self.tokenizer_name), self.tokenizer_name)
        batch = []
        for document in data or ():
            batch.append(document)
            if len(batch) == REPOSITORIES_PER_BATCH:
                yield from self._tokenize(pieces, batch)
                batch = []
        yield from self._tokenize(pieces, batch)

    def _tokenize(self, pieces: PieceTokenizer, documents: list[Document]):
        texts = []
        for document in documents:
            texts.append(document.id)
            for path, content in canonical_files(document.metadata["files"]):
                texts += [f"{path}\n", content]
        with self.track_time(unit="batch"):
            arrays = iter(pieces.encode_arrays(texts))
        for document in documents:
            name_ids = next(arrays)
            files = [(next(arrays), next(arrays)) for _ in document.metadata["files"]]
            document.metadata["pieces"] = (name_ids, files)
            split = document.metadata["split"]
            tokens = len(name_ids) + sum(len(path) + len(content) for path, content in files)
            self.stat_update(f"{split} repositories")  # here: after every step that drops repositories
            self.stat_update(f"{split} files", value=len(files))
            self.stat_update(f"{split} tokens", value=tokens)
            yield document


class PieceStoreWriter(PipelineStep):
    """Documents with pieces → this task's parts of the train and eval piece stores, and its held-out repositories."""

    name, type = "piece stores", "💽 - WRITER"

    def __init__(self, output_dir: str, vocab_size: int, special):
        super().__init__()
        self.output_dir, self.vocab_size, self.special = output_dir, vocab_size, special

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        name = part_name(rank, world_size)
        writers = {
            split: PieceWriter(pieces_directory(self.output_dir, split), name, self.vocab_size, self.special)
            for split in ("train", "eval")
        }
        held_out_path = held_out_part_path(self.output_dir, rank, world_size)
        os.makedirs(os.path.dirname(held_out_path), exist_ok=True)
        held_out = pq.ParquetWriter(f"{held_out_path}.partial", HELD_OUT_SCHEMA)
        try:
            for document in data or ():
                split = document.metadata["split"]
                name_ids, files = document.metadata.pop("pieces")
                writers[split].add_repository(document.metadata.get("key", document.id), name_ids, files)
                if split == "eval":
                    row = {"repo_name": document.id, "files": document.metadata["files"]}
                    held_out.write_table(pa.Table.from_pylist([row], schema=HELD_OUT_SCHEMA))
                yield document
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        held_out.close()
        os.replace(f"{held_out_path}.partial", held_out_path)
        for writer in writers.values():
            writer.close()
