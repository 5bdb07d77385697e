"""The preparation's steps when tokens are stored once (data/prepare.py picks them): no file-level FIM in the
prepared tokens (`prepared_rates` all zero: fim_level window, or fim_rate 0), so every data epoch is the same
text in another order, and data/windows/assembly.py renders it while training reads.

- `RepositoryPieces`: each repository's name, `path\\n` and contents tokenized file by file into int32 numpy
  arrays (data/tokens/tokenization.py's `encode_arrays`: structure tokens are never parsed from the text), files
  in canonical (path, content) order; the documents of one batch (in_batches: 64 documents or 64 MB of content)
  go through the tokenizer together, a megabyte of text at a time. A document of a document source (data/sources/
  document_reader.py: one file, metadata["document"]) becomes one array, its content: the source's declared
  `structure_tokens` as their ids, all other text encoded with special-token parsing off (`document_parts`,
  `join_document`), no `<|endoftext|>` (the assembly adds it); it is written as a record of 0 files.
- `PieceStoreWriter`: this task's part of the train piece store (SPLIT/pieces/, data/store/pieces.py) and of the
  eval one, and its held-out repositories as parquet, as prepare.py's StoreWriter does for per-epoch stores.

Memory per task, beside the reader's batch of rows: the batch's token arrays, 4 bytes a token (a repository
capped at max_repository_bytes by the reader: 32 MB of code, ~10M tokens at StarCoder2's ~3.3 bytes a token,
40 MB), one megabyte of text's Encodings (tens of MB), and the writers' buffers (~10 MB each). The per-epoch
path (ExampleTransform) holds a repository as pieces of text and lists of ids, ≥ 36 bytes a token, per epoch.
"""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

from starcoder2_train.data.sources import shards
from starcoder2_train.data.sources.documents import document_pieces
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


def in_batches(documents, size: int = REPOSITORIES_PER_BATCH, max_bytes: int | None = None):
    """The documents of a datatrove step's input in lists of at most `size` documents holding at most `max_bytes`
    (None: BATCH_BYTES) of file content together, counted in characters of the decoded text (a larger document is
    a list alone; the last list shorter; none when empty): a batch's text and token arrays stay bounded whatever
    its repositories' sizes (data/sources/shards.py's BATCH_BYTES says by how much)."""
    max_bytes = shards.BATCH_BYTES if max_bytes is None else max_bytes
    batch, held = [], 0
    for document in documents or ():
        contents = sum(len(file["content"]) for file in document.metadata["files"])
        if batch and (len(batch) == size or held + contents > max_bytes):
            yield batch
            batch, held = [], 0
        batch.append(document)
        held += contents
    if batch:
        yield batch


class HeldOutWriter:
    """This task's held-out repositories (repo_name, files) as EVAL/repositories/part-<r>-of-<N>.parquet, written
    under a temporary name and renamed into place on close (the evaluation reads only complete parts)."""

    def __init__(self, output_dir: str, rank: int, world_size: int):
        self.path = held_out_part_path(output_dir, rank, world_size)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.writer = pq.ParquetWriter(f"{self.path}.partial", HELD_OUT_SCHEMA)

    def add(self, document: Document) -> None:
        row = {"repo_name": document.id, "files": document.metadata["files"]}
        self.writer.write_table(pa.Table.from_pylist([row], schema=HELD_OUT_SCHEMA))

    def close(self) -> None:
        self.writer.close()
        os.replace(f"{self.path}.partial", self.path)


def document_parts(text: str, structure_tokens=()) -> list[tuple[bool, str]]:
    """A document's content as pieces: its declared structure tokens (True) and the text between them (False),
    data/sources/documents.py's `document_pieces` less the `<|endoftext|>` that the assembly adds."""
    return document_pieces(text, structure_tokens)[:-1]


def join_document(pieces: PieceTokenizer, parts: list[tuple[bool, str]], arrays) -> np.ndarray:
    """One document's content ids, int32: each structure token's id, each text piece's next array of `arrays`
    (encoded with special-token parsing off, in the order of `parts`)."""
    ids = [np.array([pieces.token_ids[text]], np.int32) if is_token else next(arrays) for is_token, text in parts]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)


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
    """Documents → the same, with metadata["pieces"] = (name ids, [(path\\n ids, content ids) per file]), or for
    a document of a document source (None, its content ids)."""

    name, type = "repository pieces (tokens stored once)", "🔢 - TOKENIZER"

    def __init__(self, tokenizer_name: str, structure_tokens=()):
        super().__init__()
        self.tokenizer_name, self.structure_tokens = tokenizer_name, tuple(structure_tokens or ())

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        pieces = PieceTokenizer(load_tokenizer(self.tokenizer_name), self.tokenizer_name)
        for batch in in_batches(data):
            yield from self._tokenize(pieces, batch)

    def _tokenize(self, pieces: PieceTokenizer, documents: list[Document]):
        texts, parts = [], {}
        for index, document in enumerate(documents):
            if document.metadata.get("document"):  # one file, its content: a record of 0 files
                parts[index] = document_parts(document.metadata["files"][0]["content"], self.structure_tokens)
                texts += [text for is_token, text in parts[index] if not is_token]
                continue
            texts.append(document.id)
            for path, content in canonical_files(document.metadata["files"]):
                texts += [f"{path}\n", content]
        with self.track_time(unit="batch"):
            arrays = iter(pieces.encode_arrays(texts))
        for index, document in enumerate(documents):
            if index in parts:
                content = join_document(pieces, parts[index], arrays)
                document.metadata["pieces"] = (None, content)
                tokens = len(content)
            else:
                name_ids = next(arrays)
                files = [(next(arrays), next(arrays)) for _ in document.metadata["files"]]
                document.metadata["pieces"] = (name_ids, files)
                tokens = len(name_ids) + sum(len(path) + len(content) for path, content in files)
            split = document.metadata["split"]
            self.stat_update(f"{split} repositories")  # here: after every step that drops repositories
            self.stat_update(f"{split} files", value=len(document.metadata["files"]))
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
        held_out = HeldOutWriter(self.output_dir, rank, world_size)
        try:
            for document in data or ():
                split = document.metadata["split"]
                name_ids, files = document.metadata.pop("pieces")
                key = document.metadata.get("key", document.id)
                if name_ids is None:
                    writers[split].add_document(key, files)
                else:
                    writers[split].add_repository(key, name_ids, files)
                if split == "eval":
                    held_out.add(document)
                yield document
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        held_out.close()
        for writer in writers.values():
            writer.close()
