"""Document tables: parquet or JSONL with a `content` column, one document a row → token rows.

A document source (`dataset_kind: documents`, or `auto` and a first local file with a `content` column and neither
`repo_name` nor `files`) is text that is not a repository: StarCoder2's extra sources (bigcode/starcoder2data-extras)
or a user's own text. Each row becomes one example, `content <|endoftext|>`: no repository name, no file paths,
no file-level FIM (StarCoder2's FIM cuts the files of a repository; window-level FIM, `fim_level: window`, treats
a document like any stretch of a window at the source's FIM rates). Rows with empty or null content are skipped
and counted (`skipped N files: empty content`; a document counts as a file there).

Special tokens. Source text is encoded with special-token parsing off (tokens/tokenization.py): the text
`<file_sep>` in a document is the characters of `<file_sep>`, never the token. Only the tokens a source declares in
`structure_tokens` are read as tokens: the text is split on their literal spellings and each one becomes its id.
What the extras hold (bigcode/starcoder2data-extras' dataset card, revision of 2025, read with the search tool):
fourteen subsets, each parquet with `content` (arxiv, documentation, ir_cpp, ir_low_resource, ir_python, ir_rust,
issues, jupyter_scripts, jupyter_structured, kaggle, lhq, owm, stackoverflow, wikipedia); the card says Kaggle's
notebooks are scripts "prefixed with information on the Kaggle datasets used", with headers in the format of
Jupyter Structured. The StarCoder2 paper (arXiv:2402.19173, sections 2-3) formats GitHub issues with
`<issue_start>`, `<issue_comment>`, `<issue_closed>`, structured notebooks with `<jupyter_start>`,
`<jupyter_text>`, `<jupyter_code>`, `<jupyter_output>` (`<empty_output>`), Jupyter scripts with `<jupyter_script>`,
and the LLVM intermediate-representation pairs with `<code_to_intermediate>` / `<intermediate_to_code>`; pull
requests (`<pr>` ...) are not among the extras' subsets. Whether the extras' `content` holds those tokens as text
could not be checked here (no download): UNVERIFIED. The StarCoder2 recipes declare, per subset, the tokens the
paper's format uses; check a row of each subset before a real run (a declared token that never occurs costs
nothing; one that occurs undeclared is trained on as characters).

datatrove (scripts/prepare_data.py): data/sources/document_reader.py's `DocumentReader` yields one datatrove
Document per row, in the shape data/prepare.py's RepositoryReader gives a repository, so the same later steps run on
it:
`Document(text=content, id="<file name>:<row>", metadata={"files": [], "split": "train", "document": True,
"structure_tokens": [...]})`; its token ids are `document_pieces(text, structure_tokens)` through PieceTokenizer
(the pieces end in `<|endoftext|>`). A document source has no held-out split (evaluation reads the first
repository source: data/pipeline.py).
"""

import glob
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq

from starcoder2_train.configs import RecipeError, is_hub_id
from starcoder2_train.configs.data_sources import DOCUMENTS, REPOSITORIES
from starcoder2_train.data.examples.repo_examples import Piece
from starcoder2_train.data.skips import EMPTY, SkipReport
from starcoder2_train.data.special_tokens import EOS_TOKEN

# What a folder scan takes: parquet when the folder has any (a folder of parquet shards also holds this project's
# JSON records beside them: ingest_summary.json, download records, manifest.json), else JSONL. A `.json` file of
# JSON lines is read when data_files names it, never picked up by a scan.
PARQUET_PATTERNS = ("**/*.parquet",)
JSONL_PATTERNS = ("**/*.jsonl", "**/*.jsonl.gz")
CONTENT = "content"
DOCUMENT_COLUMNS = ("input_ids", "num_tokens", "repo_name", "language", "num_files", "num_fim_psm", "num_fim_spm")


def _is_json(path: str) -> bool:
    return path.endswith((".jsonl", ".jsonl.gz", ".json"))


def document_files(data_args) -> list[str]:
    """The parquet/JSONL files of a document source: data_files (relative to dataset_name_or_path/data_dir), else
    every parquet file under it, or every JSONL file (.jsonl, .jsonl.gz) when it has no parquet; a Hub id: its
    parquet files (data/sources/shards.py resolve_data_files)."""
    from starcoder2_train.data.sources.shards import resolve_data_files

    source = data_args.dataset_name_or_path
    if data_args.data_files or source is None or os.path.isfile(source) or is_hub_id(source):
        return resolve_data_files(data_args)
    root = os.path.join(source, data_args.data_dir or "")
    if not os.path.isdir(root):
        raise RecipeError(f"dataset_name_or_path: {root} is neither a file nor a directory.")
    for patterns in (PARQUET_PATTERNS, JSONL_PATTERNS):
        files = sorted({p for pattern in patterns for p in glob.glob(os.path.join(root, pattern), recursive=True)})
        if files:
            return files
    raise RecipeError(
        f"dataset_name_or_path: {root} holds no parquet or JSONL file (.parquet, .jsonl, .jsonl.gz); name a .json "
        "file of JSON lines in data_files."
    )


def _json_records(path: str):
    """The JSON value of each non-blank line of a JSONL file (gzip when it ends in .gz); a line that is not JSON
    refused naming the file."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise RecipeError(f"{path}: not JSONL (one JSON object a line): {error}.") from None


def _first_json_record(path: str) -> dict | None:
    for record in _json_records(path):
        return record if isinstance(record, dict) else {}
    return None


def check_document_file(path: str) -> None:
    """A RecipeError naming the file and column unless `path` has a text `content` column."""
    if _is_json(path):
        record = _first_json_record(path)
        if record is None:
            return  # an empty file: no document
        if CONTENT not in record:
            raise RecipeError(
                f"{path}: no {CONTENT} column (its keys: {', '.join(record) or 'none'}); a document table needs one "
                f'text field named {CONTENT} per row ({{"content": "..."}} a line).'
            )
        if not isinstance(record[CONTENT], str) and record[CONTENT] is not None:
            raise RecipeError(
                f"{path}: column {CONTENT} holds {type(record[CONTENT]).__name__}, not text; write each document's "
                "text as a string."
            )
        return
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise RecipeError(f"{path}: not a readable parquet file ({type(error).__name__}: {error}).") from None
    if CONTENT not in schema.names:
        raise RecipeError(
            f"{path}: no {CONTENT} column (its columns: {', '.join(schema.names)}); a document table needs one text "
            f"column named {CONTENT}, one document a row."
        )
    type_ = schema.field(CONTENT).type
    type_ = type_.value_type if pa.types.is_dictionary(type_) else type_
    if not (pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_null(type_)):
        raise RecipeError(
            f"{path}: column {CONTENT} is {type_}, not a string; write each document's text as a string."
        )


def source_kind(data_args) -> str:
    """The resolved dataset_kind: as set, or for `auto` the first local file's schema (documents: a content
    column and neither repo_name nor files; JSONL: documents). A Hub id or a missing path: repositories."""
    if data_args.dataset_kind != "auto":
        return data_args.dataset_kind
    source = data_args.dataset_name_or_path
    if source is None or not os.path.exists(source):
        return REPOSITORIES
    try:
        files = document_files(data_args)
    except RecipeError:
        return REPOSITORIES  # the repository reader says what is wrong with it
    first = files[0]
    if _is_json(first):
        return DOCUMENTS
    try:
        names = set(pq.read_schema(first).names)
    except (pa.ArrowException, OSError):
        return REPOSITORIES
    return DOCUMENTS if CONTENT in names and not names & {"repo_name", "files"} else REPOSITORIES


def document_pieces(text: str, structure_tokens=()) -> list[Piece]:
    """A document as pieces: its text, the declared `structure_tokens` as tokens, then `<|endoftext|>`."""
    pieces: list[Piece] = []
    if structure_tokens:
        pattern = re.compile("|".join(re.escape(token) for token in sorted(structure_tokens, key=len, reverse=True)))
        position = 0
        for match in pattern.finditer(text):
            pieces += [(False, text[position : match.start()]), (True, match.group())]
            position = match.end()
        pieces.append((False, text[position:]))
    else:
        pieces.append((False, text))
    return [piece for piece in pieces if piece[0] or piece[1]] + [(True, EOS_TOKEN)]


class DocumentTransform:
    """Document rows (content, optional language) → token rows with pipeline.py's columns (a picklable callable)."""

    def __init__(self, tokenizer, structure_tokens=()):
        self.tokenizer, self.structure_tokens = tokenizer, tuple(structure_tokens or ())

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        texts = batch[CONTENT]
        ids = self.tokenizer.encode([document_pieces(text, self.structure_tokens) for text in texts])
        languages = batch.get("language") or [""] * len(texts)
        return {
            "input_ids": [np.asarray(row, dtype=np.int32) for row in ids],
            "num_tokens": [len(row) for row in ids],
            "repo_name": [""] * len(texts),
            "language": [str(language or "") for language in languages],
            "num_files": [1] * len(texts),
            "num_fim_psm": [0] * len(texts),
            "num_fim_spm": [0] * len(texts),
        }


def load_documents(data_args):
    """(datasets.Dataset of the non-empty documents with content and language, SkipReport), every file checked;
    max_repositories caps the documents as it caps repositories."""
    import datasets

    files = document_files(data_args)
    local = [path for path in files if not path.startswith("hf://")]
    for path in local:
        check_document_file(path)
    builder = "json" if _is_json(files[0]) else "parquet"
    try:
        table = datasets.load_dataset(builder, data_files=files, split="train")
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as error:
        raise RecipeError(
            f"dataset_name_or_path: the document files of {data_args.dataset_name_or_path} could not be read "
            f"together ({type(error).__name__}: {error}); give files of one format and schema."
        ) from None
    if CONTENT not in table.column_names:
        raise RecipeError(f"{files[0]}: no {CONTENT} column (its columns: {', '.join(table.column_names)}).")
    keep = [CONTENT] + (["language"] if "language" in table.column_names else [])
    table = table.select_columns(keep)
    report = SkipReport()
    kept = table.filter(lambda rows: [bool(text) for text in rows[CONTENT]], batched=True, desc="documents")
    report.files[EMPTY] += len(table) - len(kept)
    if data_args.max_repositories is not None and len(kept) > data_args.max_repositories:
        from starcoder2_train.data.skips import BEYOND_MAX_REPOSITORIES

        report.repositories[BEYOND_MAX_REPOSITORIES] += len(kept) - data_args.max_repositories
        kept = kept.select(range(data_args.max_repositories))
    kept = clean_documents(kept, data_args, report)
    if len(kept) == 0:
        raise RecipeError(
            f"dataset_name_or_path: {data_args.dataset_name_or_path} holds no document left to train on."
        )
    return kept, report


def _find_benchmarks(batch: dict, index) -> dict:
    matches = [index.find(text) for text in batch[CONTENT]]
    return {"benchmark": [m.benchmark if m else "" for m in matches], "text": [m.name if m else "" for m in matches]}


def _as_repositories(batch: dict, indices: list[int]) -> dict:
    languages = batch.get("language") or [""] * len(indices)
    names = [f"document {index}" for index in indices]
    files = [[{"path": name, "content": text, "language": language or ""}] for name, text, language in
             zip(names, batch[CONTENT], languages)]  # fmt: skip
    return {"repo_name": names, "files": files}


def _from_repositories(batch: dict) -> dict:
    return {
        CONTENT: [files[0]["content"] for files in batch["files"]],
        "language": [files[0]["language"] for files in batch["files"]],
    }


def clean_documents(rows, data_args, report: SkipReport):
    """The source's filters on its documents, as on a repository's files: decontamination (a document holding a
    benchmark's text is dropped, counted and listed in report.contaminated as `document N`), then near-deduplication
    and PII redaction (data/filters/cleaning.py, each document as a repository of one file). Languages, licenses,
    vendor and generated flags describe files of repositories: a document table has none, they do not apply."""
    from starcoder2_train.data.filters.decontamination import load_benchmark_index
    from starcoder2_train.data.skips import contamination_reason

    index = load_benchmark_index(data_args)
    if index is not None and len(rows):
        found = rows.map(_find_benchmarks, batched=True, fn_kwargs={"index": index}, num_proc=data_args.num_proc,
                         desc="decontamination (documents)")  # fmt: skip
        hits = [i for i, benchmark in enumerate(found["benchmark"]) if benchmark]
        for i in hits:
            benchmark = found[i]["benchmark"]
            report.files[contamination_reason(benchmark)] += 1
            path = f"document {i}"
            report.contaminated.append(
                {"repo_name": "", "path": path, "benchmark": benchmark, "text": found[i]["text"]}
            )
        rows = rows.select(sorted(set(range(len(rows))) - set(hits))) if hits else rows
    if (data_args.near_dedup or data_args.pii_redaction) and len(rows):
        from starcoder2_train.data.filters.cleaning import clean_repositories

        repositories = rows.map(_as_repositories, batched=True, with_indices=True, remove_columns=rows.column_names)
        repositories = clean_repositories(repositories, data_args, report)
        rows = repositories.map(_from_repositories, batched=True, remove_columns=repositories.column_names)
    return rows


def read_contents(path: str):
    """The content of each row of one checked file, in order (parquet in batches, JSONL line by line)."""
    if _is_json(path):
        yield from (record.get(CONTENT) if isinstance(record, dict) else None for record in _json_records(path))
        return
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[CONTENT]):
        yield from batch.column(0).to_pylist()
