"""Near-deduplication: a file that is a near-copy of another, in any repository, is kept once (`near_dedup`).

datatrove's MinHash deduplication (`datatrove.pipeline.dedup.minhash`), with files as its documents:
1. `FileSignatures` (datatrove's MinhashDedupSignature): the MinHash signature of every file, per task, in the order
   the task reads its files. Shingles are `near_dedup_ngrams`-word n-grams of the text lower-cased, with punctuation
   removed and numbers normalised (datatrove's simplify_text), split on whitespace (`CodeWords`: datatrove's English
   word tokenizer needs nltk and is made for prose);
2. datatrove's MinhashDedupBuckets (one task per band): files whose band hashes are equal are pairs of duplicates;
   with b = near_dedup_buckets bands of r = near_dedup_hashes_per_bucket hashes, files of Jaccard similarity s are
   paired with probability 1 − (1 − s^r)^b (s = 0.8: 0.92 with 14 × 8; the threshold (1/b)^(1/r) = 0.72);
3. `KeepFirstOfCluster`: the pairs joined into groups (union-find); every file of a group but the first in input
   order is removed. datatrove's MinhashDedupCluster keeps the root of a union by size, which depends on how the
   files were split into tasks; keeping the first makes one task and a thousand remove the same files, and the
   in-process pipeline (data/filters/cleaning.py) remove what scripts/prepare_data.py removes;
4. `NearDuplicateFilter`: drops the removed files from the task's repositories, read again in the same order; a
   repository left without files is dropped too, counted as "no file left after filtering".

Costs at The Stack v2 scale. Stage 1 per task: one signature (112 × 8 bytes) per file on disk, sorted in memory per
band: 1 GB of RAM for a task of 10M files. Stage 2 per band: a heap of one signature per task. Stage 3, one
process: a dictionary entry per file that has a duplicate, about 200 bytes each (datatrove's own stage 3 costs the
same; 100M duplicates: 20 GB). Stage 4 per task: the sorted ids of its removed files, 4 bytes each.
"""

import numpy as np
from datatrove.data import Document
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets, MinhashDedupSignature
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

from starcoder2_train.configs import DataArguments
from starcoder2_train.data.skips import NEAR_DUPLICATE, NO_FILE_LEFT

SEED = 1  # of the MinHash permutations; every task must use the same


def minhash_config(data_args: DataArguments) -> MinhashConfig:
    return MinhashConfig(
        n_grams=data_args.near_dedup_ngrams,
        num_buckets=data_args.near_dedup_buckets,
        hashes_per_bucket=data_args.near_dedup_hashes_per_bucket,
        seed=SEED,
        # sha1: datatrove's xxhash path hands xxhash a str, which the installed xxhash 4 refuses.
        hash_config=HashConfig(precision=64, hash_fc="sha1"),
    )


def similarity_threshold(config: MinhashConfig) -> float:
    """The Jaccard similarity above which two files are more likely paired than not: (1/b)^(1/r)."""
    return (1 / config.num_buckets) ** (1 / config.hashes_per_bucket)


class CodeWords(WordTokenizer):
    """Words of simplified text: split on whitespace (punctuation is gone by then)."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


def file_documents(repositories):
    """One Document per file of the repository Documents, in order (what stages 1 and 4 enumerate alike)."""
    for repository in repositories:
        for file in repository.metadata["files"]:
            yield Document(text=file["content"], id=f"{repository.id}/{file['path']}")


class FileSignatures(MinhashDedupSignature):
    """Stage 1 over repository Documents: the signature of each of their files (datatrove's format)."""

    name = "🎯 MinHash stage 1 (files)"

    def __init__(self, output_folder: str, config: MinhashConfig):
        super().__init__(output_folder, config=config, language=CodeWords())

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        super().run(file_documents(data or ()), rank, world_size)


def find_pairs(signature_folder: str, pairs_folder: str, config: MinhashConfig) -> MinhashDedupBuckets:
    """Stage 2, datatrove's: one task per band (world_size num_buckets)."""
    return MinhashDedupBuckets(input_folder=signature_folder, output_folder=pairs_folder, config=config)


class KeepFirstOfCluster(PipelineStep):
    """Stage 3: datatrove's duplicate pairs → `{task:06d}.remove` files (sorted file indices, uint32) of every file
    of a group but its first in (task, index) order, which is input order."""

    name, type = "🎯 MinHash stage 3 (first of each group kept)", "🫂 - DEDUP"

    def __init__(self, pairs_folder: str, remove_folder: str):
        super().__init__()
        self.pairs_folder, self.remove_folder = get_datafolder(pairs_folder), get_datafolder(remove_folder)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        parent: dict[tuple[int, int], tuple[int, int]] = {}

        def root(node):
            top = node
            while parent.get(top, top) != top:
                top = parent[top]
            while node != top:  # path compression
                parent[node], node = top, parent[node]
            return top

        for name in self.pairs_folder.list_files(glob_pattern="*.dups"):
            with self.pairs_folder.open(name, "rb") as handle:
                for task_a, index_a, task_b, index_b in read_tuples_from_file(handle, "I", "I", "I", "I"):
                    first, second = root((task_a, index_a)), root((task_b, index_b))
                    if first != second:  # the later joins the earlier: a group's root is its first file
                        parent[max(first, second)] = min(first, second)
        removed: dict[int, list[int]] = {}
        for node in parent:
            if root(node) != node:
                removed.setdefault(node[0], []).append(node[1])
        for task, indices in removed.items():
            with self.remove_folder.open(f"{task:06d}.remove", "wb") as handle:
                handle.write(np.asarray(sorted(indices), dtype="<u4").tobytes())
            self.stat_update("near-duplicate files", value=len(indices))


def removed_files(remove_folder: str, rank: int) -> np.ndarray:
    """The sorted indices of task `rank`'s files that stage 3 removed (none when it wrote no file for the task)."""
    folder = get_datafolder(remove_folder)
    if not folder.isfile(f"{rank:06d}.remove"):
        return np.zeros(0, dtype=np.uint32)
    with folder.open(f"{rank:06d}.remove", "rb") as handle:
        return np.frombuffer(handle.read(), dtype="<u4")


def keep_files(files: list, first_index: int, removed: np.ndarray) -> tuple[list, int]:
    """(files whose index — first_index, first_index + 1, ... — is not in `removed`, how many were dropped)."""
    if not len(removed) or not files:
        return files, 0
    indices = np.arange(first_index, first_index + len(files))
    positions = np.minimum(np.searchsorted(removed, indices), len(removed) - 1)
    gone = removed[positions] == indices
    return [file for file, drop in zip(files, gone) if not drop], int(gone.sum())


class NearDuplicateFilter(PipelineStep):
    """Stage 4 over repository Documents: the files stage 3 removed are dropped, counted."""

    name, type = "🎯 MinHash stage 4 (files dropped)", "🫂 - DEDUP"

    def __init__(self, remove_folder: str):
        super().__init__()
        self.remove_folder = remove_folder

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        removed, index = removed_files(self.remove_folder, rank), 0
        for document in data or ():
            files = document.metadata["files"]
            kept, dropped = keep_files(files, index, removed)
            index += len(files)
            if dropped:
                self.stat_update(f"files: {NEAR_DUPLICATE}", value=dropped)
            if not kept:
                self.stat_update(f"repositories: {NO_FILE_LEFT}")
                continue
            document.metadata["files"] = kept
            yield document
