"""The held-out set of the evaluation tasks: bounded by the recipe, drawn by seed, made once per machine, and read
in place by every rank.

What is drawn. Every held-out file gets a key (its rank among its repository's files of the same language, then
a 64-bit blake2b of `seed/repo_name/path`); each language's files are taken in key order, so the first files of a
language come from as many different repositories as hold that language, chosen by the seed, not by the
repositories' order. At most `eval_languages` languages are kept, those with the most held-out files. Loss rows
(`<file_sep>code<|endoftext|>`, evaluation/held_out.py) are taken until the language holds
`eval_tokens_per_language` tokens; the last row is cut there (the loss of a file's beginning is still a loss per
token). FIM problems (`fim_eval_lines_per_file` seeded lines per file, evaluation/fim.py) are taken from the same
key order a language at a time, round robin over the languages, until `fim_eval_problems`.

Where it lives. `ensure_held_out_set` writes `<cache_dir>/held_out-<fingerprint>/`: `loss/` a token store
(data/store/token_store.py; one part per language, `NNN` in `held_out.json`'s language order), `fim.jsonl`
(one problem a line) and `held_out.json` (written last: a folder without it is not a set). One process per
machine builds, under a file lock (the others wait on it, then open); it builds in a folder of its own and renames
it into place, so that machines sharing `cache_dir` never see half a set (the first rename wins). The fingerprint
covers the held-out repositories' names, the tokenizer's vocabulary and merges (data/store/manifest.py), the seed
and the bounds: a changed recipe makes a new set.

Cost at the 3B recipe's scale (recipes/starcoder2-3b/pretrain.yaml: 17 languages, 2M tokens each, 1,700 FIM
problems, 160 ranks, seq_length 4096). Before: every rank tokenized every held-out file (eval_fraction 0.001 of
~600B tokens, ~600M tokens as Python int lists, ~22 GB a rank) and scored all of it. Now, once per machine: the
key scan reads the repo_name, path and language columns through Arrow (the contents are not touched) and keeps one
(key, repository, file) tuple per held-out file (~500k files: ~60 MB in the building process, freed after), then
tokenizes only the files it takes (~34M tokens, 68 MB of uint16 on disk). Per rank: the store memory-mapped
(the page cache is shared by the machine's ranks), the list of all ~8.3k (row, start, stop) windows (~1 MB), the
tokens of its own ~52 windows as it scores them, and the FIM file read once (its 1,700 problems are whole files:
~10 MB transient at a ~6 KB mean file), keeping its own ~11 problems.
"""

import hashlib
import json
import os
import shutil
import socket
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from filelock import FileLock

from starcoder2_train.data.store.manifest import tokenizer_identity
from starcoder2_train.data.store.token_store import OFFSETS_DTYPE, TokenStore
from starcoder2_train.data.store.token_writer import TokenStoreWriter
from starcoder2_train.data.tokens.tokenization import PieceTokenizer
from starcoder2_train.evaluation.fim import FimProblem, build_fim_problems

VERSION = 1
MANIFEST = "held_out.json"
TOKENIZE_BATCH = 64  # files tokenized at a time while a language fills its budget


def path_hash(seed: int, path: str) -> int:
    """A seeded 64-bit hash of a file's `repo_name/path`: the second part of its key (module docstring)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{path}".encode(), digest_size=8).digest(), "big")


def _repository_batches(repositories, batch_size: int = 1024):
    """pyarrow Tables of (repo_name, files) rows, in order: a datasets.Dataset read as Arrow (its contents stay in
    Arrow, memory-mapped), or a list of dicts converted a batch at a time."""
    if hasattr(repositories, "with_format"):
        yield from repositories.select_columns(["repo_name", "files"]).with_format("arrow").iter(batch_size)
        return
    for start in range(0, len(repositories), batch_size):
        rows = repositories[start : start + batch_size]
        yield pa.table(
            {
                "repo_name": [row["repo_name"] for row in rows],
                "files": [[{"path": f["path"], "language": f["language"]} for f in row["files"]] for row in rows],
            }
        )


def _names_and_files(table: pa.Table):
    """(repo names, per-file path, language and repository index within the table), without the contents."""
    files = table.column("files").combine_chunks()
    flat = pc.list_flatten(files)
    owners = pc.list_parent_indices(files).to_numpy()
    paths = pc.struct_field(flat, "path").to_pylist()
    languages = pc.struct_field(flat, "language").to_pylist()
    return table.column("repo_name").to_pylist(), paths, languages, owners


def repositories_fingerprint(repositories) -> str:
    """blake2b of the held-out repositories' names and file paths, in order."""
    digest = hashlib.blake2b(digest_size=16)
    for table in _repository_batches(repositories):
        names, paths, _, _ = _names_and_files(table)
        digest.update("\0".join(names).encode() + b"\1" + "\0".join(paths).encode() + b"\2")
    return digest.hexdigest()


def ranked_files(repositories, seed: int) -> dict[str, list[tuple[int, int]]]:
    """{language: [(repository index, file index), ...] in key order: (rank of the file among its repository's
    files of that language by path_hash, path_hash)."""
    keyed, offset = defaultdict(list), 0
    for table in _repository_batches(repositories):
        names, paths, languages, owners = _names_and_files(table)
        starts = np.searchsorted(owners, np.arange(len(names)))  # each repository's first file in the flat list
        per_repository = defaultdict(list)
        for position, (language, owner) in enumerate(zip(languages, owners)):
            per_repository[(int(owner), language or "unknown")].append(position)
        for (owner, language), positions in per_repository.items():
            hashes = sorted((path_hash(seed, f"{names[owner]}/{paths[p]}"), p) for p in positions)
            for rank, (hashed, position) in enumerate(hashes):
                keyed[language].append(((rank, hashed), offset + owner, position - int(starts[owner])))
        offset += len(names)
    return {language: [(r, f) for _, r, f in sorted(entries)] for language, entries in sorted(keyed.items())}


def _file(repositories, repository: int, index: int, language: str) -> dict:
    row = repositories[repository]
    file = row["files"][index]
    return {"path": f"{row['repo_name']}/{file['path']}", "content": file["content"], "language": language}


def fingerprint(repositories, tokenizer, settings: dict) -> str:
    identity = tokenizer_identity(tokenizer)
    material = [VERSION, repositories_fingerprint(repositories), identity["size"], identity["sha256"], settings]
    return hashlib.blake2b(json.dumps(material, sort_keys=True).encode(), digest_size=10).hexdigest()


def build_held_out_set(repositories, tokenizer, directory: str, settings: dict) -> None:
    """Write the set (module docstring) into `directory`, which must not exist yet."""
    ranked = ranked_files(repositories, settings["seed"])
    if settings["languages"]:  # the languages with the most held-out files, ties by name
        kept = sorted(ranked, key=lambda language: (-len(ranked[language]), language))[: settings["languages"]]
        ranked = {language: ranked[language] for language in sorted(kept)}
    pieces = PieceTokenizer(tokenizer)
    special = pieces.special
    os.makedirs(os.path.join(directory, "loss"))
    budget, summary = settings["tokens_per_language"], {"languages": [], "rows": [], "tokens": []}
    for language, order in ranked.items():
        rows = tokens = 0
        writer = TokenStoreWriter(os.path.join(directory, "loss"), f"{len(summary['languages']):03d}", len(tokenizer))
        for start in range(0, len(order), TOKENIZE_BATCH):
            files = [_file(repositories, r, f, language) for r, f in order[start : start + TOKENIZE_BATCH]]
            for ids in pieces.encode_texts([file["content"] for file in files]):
                row = [special.file_sep, *ids, special.eos][: budget - tokens if budget else None]
                if len(row) >= 2:
                    writer.add(row)
                    rows, tokens = rows + 1, tokens + len(row)
                if budget and tokens >= budget - 1:
                    break
            else:
                continue
            break
        if rows:
            writer.close()
            summary["languages"].append(language), summary["rows"].append(rows), summary["tokens"].append(tokens)
        else:
            writer.abort()
    problems = draw_fim_problems(repositories, ranked, settings)
    with open(os.path.join(directory, "fim.jsonl"), "w") as handle:
        for problem in problems:
            handle.write(json.dumps(problem.__dict__) + "\n")
    manifest = {"version": VERSION, "settings": settings, "fim_problems": len(problems), **summary}
    with open(os.path.join(directory, MANIFEST), "w") as handle:
        json.dump(manifest, handle, indent=1)


def draw_fim_problems(repositories, ranked: dict, settings: dict) -> list[FimProblem]:
    """Round robin over the languages, each giving its next file's `fim_lines_per_file` problems (key order: a
    different repository each time while the language has one), until `fim_problems` problems."""
    wanted, lines = settings["fim_problems"], settings["fim_lines_per_file"]
    problems, cursors = [], dict.fromkeys(ranked, 0)
    while len(problems) < wanted and cursors:
        for language in list(cursors):
            if cursors[language] >= len(ranked[language]):
                del cursors[language]
                continue
            file = _file(repositories, *ranked[language][cursors[language]], language)
            cursors[language] += 1
            problems += build_fim_problems([file], seed=settings["seed"], problems_per_file=lines)
            if len(problems) >= wanted:
                break
    return problems[:wanted]


def ensure_held_out_set(
    repositories,
    tokenizer,
    cache_dir: str,
    *,
    seed: int,
    tokens_per_language: int,
    fim_problems: int,
    fim_lines_per_file: int = 1,
    languages: int = 0,
) -> "HeldOutSet":
    """The set of these repositories and bounds under `cache_dir`, built by the first process of the machine to
    get the lock (the others wait, then open it). `tokens_per_language` 0: every held-out file, whole;
    `languages`: at most this many languages, those with the most held-out files (0: all)."""
    settings = {
        "seed": seed,
        "tokens_per_language": tokens_per_language,
        "fim_problems": fim_problems,
        "fim_lines_per_file": fim_lines_per_file,
        "languages": languages,
    }
    final = os.path.join(cache_dir, f"held_out-{fingerprint(repositories, tokenizer, settings)}")
    os.makedirs(cache_dir, exist_ok=True)
    with FileLock(f"{final}.{socket.gethostname()}.lock"):
        if not os.path.isfile(os.path.join(final, MANIFEST)):
            building = f"{final}.building-{socket.gethostname()}-{os.getpid()}"
            shutil.rmtree(building, ignore_errors=True)
            build_held_out_set(repositories, tokenizer, building, settings)
            try:
                os.rename(building, final)
            except OSError:  # another machine renamed its own copy first: the same bytes, keep theirs
                shutil.rmtree(building, ignore_errors=True)
    return HeldOutSet(final)


class HeldOutSet:
    """A built set, opened: `languages`, `loss_rows` (TokenRows, memory-mapped) and `fim_problems(rank, world)`."""

    def __init__(self, directory: str):
        self.directory = directory
        with open(os.path.join(directory, MANIFEST)) as handle:
            self.manifest = json.load(handle)
        self.languages = self.manifest["languages"]
        self.loss_rows = TokenRows(os.path.join(directory, "loss"), self.languages) if self.languages else None

    def fim_problems(self) -> list[FimProblem]:
        """Every problem, in the drawn order (evaluate_fim splits them across ranks)."""
        with open(os.path.join(self.directory, "fim.jsonl")) as handle:
            return [FimProblem(**json.loads(line)) for line in handle]


class TokenRows:
    """Loss rows in a token store, one part per language: `lengths` (int64 per row, read from the offsets),
    `language(row)` and `tokens(row, start, stop)`; the same interface as loss.ListRows."""

    def __init__(self, directory: str, languages: list[str]):
        self.store = TokenStore(directory)
        ends = [
            np.fromfile(os.path.join(directory, f"{name}.offsets"), dtype=OFFSETS_DTYPE) for name in self.store.names
        ]
        self.lengths = np.concatenate([np.diff(offsets) for offsets in ends])
        self._starts = np.concatenate([[0], np.cumsum(self.lengths)])  # rows are the store's examples, in order
        self._languages = np.repeat(np.arange(len(languages)), [len(offsets) - 1 for offsets in ends])
        self.names = languages

    def __len__(self) -> int:
        return len(self.lengths)

    def language(self, row: int) -> str:
        return self.names[int(self._languages[row])]

    def tokens(self, row: int, start: int, stop: int) -> np.ndarray:
        first = int(self._starts[row])
        return self.store.tokens(first + start, first + stop)
