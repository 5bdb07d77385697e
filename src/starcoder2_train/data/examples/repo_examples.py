"""Repository-level examples in StarCoder2's format (paper, section 5.1).

A repository becomes one example: its files in a seeded random order, and, with probability
`repo_metadata_rate`, the repository name and each file's path:

    <repo_name>name<file_sep>path1\ncode1<file_sep>path2\ncode2<|endoftext|>    (with metadata)
    <file_sep>code1<file_sep>code2<|endoftext|>                               (without)

Examples are written as *pieces* (docs/architecture.md): `(True, token)` for a structure token and
`(False, text)` for source text, so that tokenization can keep the two apart.
"""

import hashlib
import random
from dataclasses import dataclass

from starcoder2_train.data.special_tokens import REPO_NAME

Piece = tuple[bool, str]


def example_rng(seed: int, epoch: int, repo_name: str, stream: str) -> random.Random:
    """A random generator that depends on (seed, epoch, repository, stream) and nothing else.

    Seeding per example (rather than one stream per dataset, as Megatron does) makes every choice
    independent of num_proc, shard order, data-loader workers and how far iteration has gone, so a
    resumed or re-sharded run sees exactly the same samples. `stream` separates independent
    decisions (file order, FIM) so that changing one rate does not reshuffle the other.
    """
    key = f"{seed}\x00{epoch}\x00{stream}\x00{repo_name}".encode("utf-8", "surrogatepass")
    return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))


@dataclass
class RepoExample:
    """A repository ready to be rendered: files in training order, metadata on or off."""

    repo_name: str
    with_metadata: bool
    files: list[tuple[str, str]]  # (path, content), in training order

    def file_header(self, path: str) -> str:
        """Text that precedes a file's code: its path and a newline when metadata is on."""
        return f"{path}\n" if self.with_metadata else ""

    def head(self) -> list[Piece]:
        """The pieces before the first file: `<repo_name>name` when metadata is on."""
        return [(True, REPO_NAME), (False, self.repo_name)] if self.with_metadata else []


def build_example(repo_name: str, files: list[dict], seed: int, epoch: int, repo_metadata_rate: float) -> RepoExample:
    """Order a repository's files and decide on metadata, deterministically for (seed, epoch, repo_name).

    The files are sorted by path (then content) before the seeded shuffle, so that the order depends on
    (seed, epoch, repository) only, not on the order the shards listed them in.
    """
    rng = example_rng(seed, epoch, repo_name, "repository")
    ordered = sorted((f["path"], f["content"]) for f in files)
    rng.shuffle(ordered)
    with_metadata = rng.random() < repo_metadata_rate
    return RepoExample(repo_name=repo_name, with_metadata=with_metadata, files=ordered)
